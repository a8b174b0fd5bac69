"""Proposal: the smallest set of float layers (or range clips) that brings the outputs to a target.

Layers are ranked by their isolated (single) error from analysis; candidate
hybrid models are built through the same path as step2 and measured on real
samples. A bisection over the ranked list needs about log2(N) + 2 evaluations.
A fallback layer runs in float and reads its inputs unquantized, so each layer
is a self-contained unit: no neighbour has to fall back with it.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .calibration import session_for
from .config import Cfg, CfgEntry, short_float
from .cost import PROPOSED, USER, FloatShare, concrete_shapes, float_share, layer_macs
from .dataset import load_callable
from .errors import InputError
from .metrics import cosine, snr_db
from .observers import HistogramObserver, compute_range
from .plan import GraphView, QuantPlan
from .qparams import compute_qparams, levels
from .settings import Settings

BuildFn = Callable[[dict[str, str], dict[str, dict[str, Any]]], onnx.ModelProto]


@dataclass
class Target:
    """What the outputs must reach: cosine and/or SNR on every output, and optionally a task metric."""

    cosine: float | None = 0.99
    snr_db: float | None = None
    eval_fn: str | None = None
    max_drop: float = 0.01


@dataclass
class Score:
    """Measured quality of one candidate model: per-output mean cosine and SNR, and the task score."""

    cosine: dict[str, float]
    snr_db: dict[str, float]
    task: float | None = None

    @property
    def worst_cosine(self) -> float:
        return min(self.cosine.values())

    @property
    def worst_snr(self) -> float:
        return min(self.snr_db.values())

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "snr_db": self.snr_db, "task": self.task}

    def describe(self) -> str:
        text = f"output cosine {self.worst_cosine:.5f}, SNR {self.worst_snr:.2f} dB"
        return text + (f", task {self.task:.4f}" if self.task is not None else "")


@dataclass
class ProposalResult:
    """The choice, what it costs and what it measured.

    `layers` and `clips` are what the proposal adds; `existing` are the cfg's own
    custom_quantize_layers (node -> precision), kept; `cost` splits the float compute of
    the model built with both by cause; `baseline_label` names what `baseline` measured;
    `edits` describes the user's edits the proposal started from; `written` is True when
    `propose_cfg` changed the cfg file.
    """

    layers: dict[str, str]
    comments: dict[str, str]
    clips: dict[str, dict[str, Any]]
    clip_comments: dict[str, str]
    baseline: Score
    predicted: Score
    met: bool
    evaluations: int
    ranked: list[tuple[str, float]]
    float_fraction: float
    choice: str
    seconds: float
    fp32_task: float | None = None
    measured: Score | None = None
    log: list[str] = field(default_factory=list)
    cost: FloatShare | None = None
    existing: dict[str, str] = field(default_factory=dict)
    baseline_label: str = "the default quantization"
    edits: list[str] = field(default_factory=list)
    written: bool = False


class Evaluator:
    """Scores candidate models on fixed samples against the fp32 outputs (computed once)."""

    def __init__(self, fp32: onnx.ModelProto, samples: list[dict[str, np.ndarray]], target: Target) -> None:
        self.samples = samples
        self.target = target
        sess = session_for(fp32, basic=False)
        self.names = [o.name for o in sess.get_outputs()]
        self.ref = [sess.run(self.names, s) for s in samples]
        self.evaluations = 0
        self._eval = None
        self.fp32_task = None
        if target.eval_fn:
            self._eval = load_callable(target.eval_fn, "--eval function")
            self.fp32_task = self._task(fp32)

    def _task(self, model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="hybridq-eval-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            onnx.save_model(model, str(path))
            try:
                return float(self._eval(str(path)))
            except Exception as exc:
                raise InputError(f"The --eval function {self.target.eval_fn!r} failed: {type(exc).__name__}: {exc}. It must take a model path and return a number.") from exc

    def score(self, model: onnx.ModelProto) -> Score:
        """Run the candidate on every sample; one evaluation."""
        self.evaluations += 1
        sess = session_for(model, basic=False)
        cos: dict[str, list[float]] = {n: [] for n in self.names}
        snr: dict[str, list[float]] = {n: [] for n in self.names}
        for feeds, ref in zip(self.samples, self.ref):
            for name, r, q in zip(self.names, ref, sess.run(self.names, feeds)):
                cos[name].append(cosine(r, q))
                snr[name].append(snr_db(r, q))
        task = self._task(model) if self._eval else None
        return Score({n: float(np.mean(v)) for n, v in cos.items()}, {n: _mean_db(v) for n, v in snr.items()}, task)

    def met(self, s: Score) -> bool:
        """Does a score reach the target on every output?"""
        t = self.target
        if t.cosine is not None and s.worst_cosine < t.cosine:
            return False
        if t.snr_db is not None and s.worst_snr < t.snr_db:
            return False
        if s.task is not None and self.fp32_task is not None and s.task < self.fp32_task - t.max_drop:
            return False
        return True


def _mean_db(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf
    return float(np.mean(finite))


def rank_layers(single: dict[str, float], plan: QuantPlan, model: onnx.ModelProto) -> list[tuple[str, float]]:
    """Quantized layers, worst isolated cosine first; an absorbed Relu/Clip's error counts for its producer."""
    g = GraphView(model)
    quantized = {n for n, lp in plan.layers.items() if lp.precision not in ("float16", "float32")}
    worst: dict[str, float] = {}
    for node, cos in single.items():
        target = node
        if node not in quantized and node in g.by_name:
            prod = g.producer_node(g.by_name[node].input[0]) if g.by_name[node].input else None
            target = prod.name if prod is not None else node
        if target in quantized and not math.isnan(cos):
            worst[target] = min(cos, worst.get(target, 1.0))
    return sorted(worst.items(), key=lambda kv: (kv[1], kv[0]))


def clip_candidates(
    plan: QuantPlan, observers: dict[str, HistogramObserver], entries: dict[str, dict[str, Any]], settings: Settings,
    keep: set[str] = frozenset(),
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Range clips: every activation whose MSE-optimal range is tighter than its current one.

    Outliers stretch a min/max range so that the bulk of the values gets few levels;
    the MSE range (from the stored histogram) trades a little saturation for resolution.
    `entries` are the cfg's entries; a tensor in `keep` (one the user edited) or without an
    entry is never a candidate. A clip carries the scale and zero point of its new range.
    """
    clips: dict[str, dict[str, Any]] = {}
    comments: dict[str, str] = {}
    for t, tp in plan.tensors.items():
        obs = observers.get(t)
        if obs is None or not obs.bins or t not in entries or t in keep or entries[t].get("algorithm") == "mse":
            continue
        if "min" not in entries[t] or "max" not in entries[t]:
            continue
        lo, hi = compute_range(obs, "mse", levels(tp.dtype), settings.percentile)
        old_lo, old_hi = entries[t]["min"][0], entries[t]["max"][0]
        width, clipped = max(old_hi, 0.0) - min(old_lo, 0.0), max(hi, 0.0) - min(lo, 0.0)
        if clipped > 0 and width / clipped >= 1.05:
            lo, hi = short_float(lo), short_float(hi)
            qp = compute_qparams([lo], [hi], tp.dtype, entries[t].get("qtype", "sym" if tp.symmetric else "asym") == "sym")
            entry = dict(entries[t])
            entry.update(algorithm="mse", min=[lo], max=[hi], scale=[short_float(float(qp.scale[0]))], zero_point=[int(qp.zero_point[0])])
            clips[t] = entry
            comments[t] = f"proposal: range [{old_lo:.4g}, {old_hi:.4g}] clipped to [{lo:.4g}, {hi:.4g}] (mse)"
    return clips, comments


POLICY_NAMES = (
    ("stem Conv", "float_stem"),
    ("depthwise Conv", "float_depthwise"),
    ("Conv on a 1x1 pooled", "float_pooled"),
    ("ConvTranspose", "ConvTranspose"),
    ("Conv producing a graph output", "graph-output Conv"),
    ("detection-head Conv", "detection head"),
)
"""Short names for the plan's policy reasons (the setting that decides, where there is one)."""


def policy_name(reason: str) -> str:
    """The setting or rule behind a plan's policy reason, e.g. 'float_stem'."""
    for prefix, name in POLICY_NAMES:
        if reason.startswith(prefix):
            return name
    return reason.split(" (")[0].split(":")[0]


def float_causes(model: onnx.ModelProto, plan: QuantPlan, macs: dict[str, float], proposed: set[str], settings: Settings) -> dict[str, str]:
    """Cause of every MAC-counted layer that runs float in the model built from `plan` with `proposed` moved to float."""
    ops = {n.name: n.op_type for n in model.graph.node}
    cause: dict[str, str] = {}
    for name in macs:
        lp = plan.layers.get(name)
        if name in proposed:
            cause[name] = PROPOSED
        elif lp is None:
            cause[name] = "quantize_ops" if ops.get(name) not in settings.quantize_ops else f"{ops.get(name)} without int8 form"
        elif lp.precision in ("float16", "float32"):
            cause[name] = USER if lp.reason == "cfg" else policy_name(lp.reason)
    return cause


def _better(a: Score, b: Score) -> bool:
    """Is score a better than b (task score when there is one, else the worst output cosine)?"""
    if a.task is not None and b.task is not None:
        return a.task > b.task
    return a.worst_cosine > b.worst_cosine


def as_cfg(
    settings: Settings, custom: dict[str, str], entries: dict[str, dict[str, Any]], edits: dict[str, dict[str, Any]],
    source: Cfg | None = None,
) -> Cfg:
    """An in-memory cfg: the given entries with `edits` applied, and `custom` layer precisions.

    With `source` (the cfg file the entries come from), errors name its path and the entries' lines.
    """
    path = source.path if source is not None else Path("<proposal>")
    lines = {t: e.line for t, e in source.entries.items()} if source is not None else {}
    custom_lines = source.custom_lines if source is not None else {}
    merged = {t: CfgEntry(t, lines.get(t, 0), dict(edits.get(t, v))) for t, v in entries.items()}
    return Cfg(path, {}, settings, dict(custom), {k: custom_lines.get(k, 0) for k in custom}, merged)


def propose(
    build: BuildFn,
    evaluator: Evaluator,
    single: dict[str, float],
    plan: QuantPlan,
    model: onnx.ModelProto,
    observers: dict[str, HistogramObserver],
    entries: dict[str, dict[str, Any]],
    settings: Settings,
    *,
    fallback: str = "float32",
    max_float_layers: int | None = None,
    max_float_fraction: float | None = None,
    existing: dict[str, str] | None = None,
    keep: set[str] = frozenset(),
    baseline_label: str = "the default quantization",
) -> ProposalResult:
    """Search the ranked layers (and range clips) for the cheapest candidate that meets the target.

    `plan` and `entries` are those of the cfg the proposal starts from (with the user's edits),
    `existing` its custom_quantize_layers (node -> precision); these layers are never ranked.
    Tensors in `keep` (edited by the user) are never clipped. `baseline_label` names the
    starting point in the result's wording.
    """
    t0 = time.perf_counter()
    existing = dict(existing or {})
    log: list[str] = []
    ranked = [(n, c) for n, c in rank_layers(single, plan, model) if n not in existing]
    full_ranking = list(ranked)
    macs = layer_macs(concrete_shapes(model, evaluator.samples[0]) if evaluator.samples else model)
    total = sum(macs.values()) or 1.0

    def cost(layers: list[str]) -> FloatShare:
        return float_share(macs, float_causes(model, plan, macs, set(layers), settings))

    def fraction(layers: list[str]) -> float:
        return cost(layers).fraction

    def candidate(k: int, clips: dict[str, dict[str, Any]]) -> Score:
        layers = dict(existing)
        layers.update({n: fallback for n, _ in ranked[:k]})
        s = evaluator.score(build(layers, clips))
        log.append(f"eval {evaluator.evaluations}: {k} float layer(s){' + clips' if clips else ''}: {s.describe()}")
        return s

    base = candidate(0, {})
    clips: dict[str, dict[str, Any]] = {}
    clip_comments: dict[str, str] = {}
    best_clips: dict[str, dict[str, Any]] = {}

    def result(k: int, score: Score, met: bool, choice: str, use_clips: dict[str, dict[str, Any]]) -> ProposalResult:
        layers = {n: fallback for n, _ in ranked[:k]}
        position = {n: i + 1 for i, (n, _) in enumerate(full_ranking)}
        comments = {
            n: f"proposal rank {position[n]}/{len(full_ranking)}: single cos {c:.4f}, {100 * macs.get(n, 0.0) / total:.1f} % of compute"
            for n, c in ranked[:k]
        }
        return ProposalResult(
            layers=layers, comments=comments, clips=use_clips, clip_comments={t: clip_comments[t] for t in use_clips},
            baseline=base, predicted=score, met=met, evaluations=evaluator.evaluations, ranked=full_ranking,
            float_fraction=fraction(list(layers)), choice=choice, seconds=time.perf_counter() - t0,
            fp32_task=evaluator.fp32_task, log=log, cost=cost(list(layers)), existing=dict(existing), baseline_label=baseline_label,
        )

    if evaluator.met(base):
        return result(0, base, True, f"{baseline_label} already meets the target; nothing to change", {})

    clips, clip_comments = clip_candidates(plan, observers, entries, settings, keep)
    base_for_search = base
    if clips:
        s = candidate(0, clips)
        if evaluator.met(s):
            return result(0, s, True, f"MSE range clips on {len(clips)} tensor(s) meet the target with no float layer", clips)
        if _better(s, base):
            best_clips, base_for_search = clips, s
            log.append("range clips improve the outputs; kept under the float layers")

    if max_float_fraction is not None:
        # Keep the rank order but skip layers that would not fit the compute budget.
        chosen: list[tuple[str, float]] = []
        for item in ranked:
            if fraction([n for n, _ in chosen] + [item[0]]) <= max_float_fraction:
                chosen.append(item)
        skipped = len(ranked) - len(chosen)
        if skipped:
            log.append(f"{skipped} ranked layer(s) skipped: they do not fit --max-float-fraction {max_float_fraction}")
        ranked[:] = chosen
    limit = len(ranked)
    if max_float_layers is not None:
        limit = min(limit, max(0, max_float_layers - len(existing)))
    if limit == 0:
        return result(0, base_for_search, False, "the budget allows no float layer and the target is not met", best_clips)
    top = candidate(limit, best_clips)
    if not evaluator.met(top):
        if not _better(top, base_for_search):
            what = "range clips only" if best_clips else "no change"
            return result(0, base_for_search, False, f"{limit} float layer(s) (the budget) miss the target and do not improve on it; {what}", best_clips)
        return result(limit, top, False, f"even {limit} float layer(s) (the budget) miss the target; best effort", best_clips)
    lo, hi, hi_score = 0, limit, top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = candidate(mid, best_clips)
        if evaluator.met(s):
            hi, hi_score = mid, s
        else:
            lo = mid
    what = f"{hi} float layer(s), the {hi} worst by isolated error"
    return result(hi, hi_score, True, what + (" plus range clips" if best_clips else ""), best_clips)
