"""The state of a proposal's search: current edits, their score, what was kept, and the table of candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..build import Built, Edits
from ..errors import ConfigError
from .evaluator import Evaluator, Score
from .fixes import Candidate, Context

@dataclass
class Row:
    """One candidate the search scored: the table printed and written beside the cfg."""

    step: str
    fix: str
    quality: float
    cosine: float
    snr_db: float
    slice_snr_db: float
    cost: float
    outcome: str
    logp_snr_db: float | None = None  # Softmax outputs' log-probability SNR, by which candidates are compared

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in vars(self).items()}


State = tuple[Score, Candidate, Edits, Built]
"""A scored candidate: its score, the fix, the edits with it, the model step2 builds from them."""


class Climb:
    """The state of the search: current edits, their score, what was kept, and the table."""

    def __init__(self, ctx: Context, evaluator: Evaluator, build: Callable[[Edits], Built], base: Edits, first: Built, started_from: str) -> None:
        self.ctx, self.evaluator, self.build = ctx, evaluator, build
        self.table: list[Row] = []
        self.kept: list[Candidate] = []
        self.base = base
        self.edits = base
        self.built = first
        self.score = evaluator.score(self.built.model)
        self.baseline = self.score
        self.started_from = started_from
        # (kept fixes..., the one pruned) by id -> those fixes, held so no id is reused: found needed, not tried again
        self._needed: dict[tuple[int, ...], tuple[Candidate, ...]] = {}
        self.refit: tuple[Edits, Callable[[Edits, Built], Candidate | None]] | None = None  # float step: edits without the bias fix, its fit
        self.damage: dict[str, tuple[int, float]] = {}  # layer -> (rank, measure) quantized alone (see _alone_order)
        self._row("start", started_from, self.score, 0.0, "met" if self.met else "below target")

    @property
    def met(self) -> bool:
        return self.evaluator.met(self.score)

    def quality(self, s: Score) -> float:
        return self.evaluator.quality(s)

    def better(self, a: Score, b: Score) -> bool:
        return self.evaluator.better(a, b)

    def float_edits(self, c: Candidate) -> tuple[Candidate, Edits]:
        """A float candidate and the edits it makes on the current ones; with a kept bias correction, the candidate
        carries one fitted again to its placement instead (see :func:`_fit_with_floats`)."""
        if self.refit is None:
            return c, c.onto(self.edits, self.ctx.temp)
        unfitted, fit = self.refit
        edits = c.onto(unfitted, self.ctx.temp)
        bias = fit(edits, self.build(edits))
        if bias is None:
            return c, edits
        both = Candidate(c.kind, f"{c.label}, {bias.label} fitted again", bias.entries, c.layers, {**c.comments, **bias.comments}, c.cost)
        return both, both.onto(unfitted, self.ctx.temp)

    def _row(self, step: str, fix: str, s: Score, cost: float, outcome: str) -> None:
        self.table.append(Row(step, fix, self.quality(s), s.worst_cosine, s.worst_snr, s.worst_slice_snr, cost, outcome, s.logp_snr))

    def try_each(self, step: str, cands: list[Candidate]) -> bool:
        """Score each candidate on top of the current edits; keep the best if it beats the current score. On a met target
        only by more than the measure resolves (see Evaluator.as_good): a free gain, never noise. Below it a fix costs no
        float layer and the later rungs build on it, so a smaller gain is kept too, and its row says it is within what the
        samples resolve (PP-OCR det: the depthwise equalization, dropped as unresolved, left 3 float layers instead of 1)."""
        best: tuple[Score, Candidate, Edits, Built] | None = None
        tried: list[tuple[Candidate, Edits, Built | ConfigError]] = []
        for c in cands:
            edits = c.onto(self.edits, self.ctx.temp)
            try:
                tried.append((c, edits, self.build(edits)))
            except ConfigError as exc:  # a fix that step2 could not apply here: a row, not the end of the search
                tried.append((c, edits, exc))
        # scored side by side when the evaluator has workers; rows and choice in candidate order as before
        scores = iter(self.evaluator.score_many([b.model for _, _, b in tried if not isinstance(b, ConfigError)]))
        for c, edits, built in tried:
            if isinstance(built, ConfigError):
                self.table.append(Row(step, c.label, float("nan"), float("nan"), float("nan"), float("nan"), c.cost,
                                      f"not applicable: {built}"[:160]))
                continue
            s = next(scores)
            self._row(step, c.label, s, c.cost, "")
            if not self.evaluator.flips_more(s, self.score) and (best is None or self.quality(s) > self.quality(best[0])):
                best = (s, c, edits, built)
        rows = [r for r in self.table[len(self.table) - len(cands):] if not r.outcome.startswith("not applicable")]
        gain = best is not None and self.better(best[0], self.score)
        crosses = gain and not self.met and self.evaluator.met(best[0])  # the fix that meets the target: clear enough
        unclear = gain and not crosses and self.evaluator.as_good(self.score, best[0])
        if not gain or (unclear and self.met):
            for r in rows:
                r.outcome = "no clear gain" if gain and r.fix == best[1].label else "no gain"
            return False
        kept = "kept (a gain within what the samples resolve)" if unclear else "kept"
        for r in rows:
            r.outcome = kept if r.fix == best[1].label else "worse than the kept one"
        self.score, c, self.edits, self.built = best
        self.kept.append(c)
        return True


    def prune(self) -> bool:
        """Drop kept fixes the others make unneeded: each tried once without it (a later fix of the same tensor wins anyway).

        A fix goes when the rest still meet the target, or, below the target, when the rest score at least as well.
        A fix found needed among the same kept fixes is not built and scored again (no new row): the score is the same.
        """
        dropped = False
        for c in list(self.kept[:-1]) if len(self.kept) > 1 else []:
            key = (*map(id, self.kept), id(c))
            if c.kind == "int4" or key in self._needed:  # int4: the size budget, not an accuracy fix
                continue
            edits = self.base
            for k in self.kept:
                if k is not c:
                    edits = k.onto(edits, self.ctx.temp)
            built = self.build(edits)
            s = self.evaluator.score(built.model)
            better = self.evaluator.met(s) if self.met else (
                self.quality(s) >= self.quality(self.score) and not self.evaluator.flips_more(s, self.score))
            cost = sum(k.cost for k in self.kept if k is not c)  # what the rest cost: the fixes this row keeps
            self._row("prune", f"without: {c.label}", s, cost, "dropped: not needed" if better else "needed")
            if better:
                self.kept.remove(c)
                self.score, self.edits, self.built = s, edits, built
                dropped = True
            else:
                self._needed[key] = (*self.kept, c)
        return dropped
