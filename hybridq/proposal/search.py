"""The search: climb the ladder of fixes, cheapest first, keep what helps, stop at the target.

Steps, each scored on the model step2 would build: (1) a range algorithm for the
tensors it narrows (mse, percentile); (2) the tensors only depthwise Convs read,
equalized into their filters, then per tensor with outlier channels, a clip or an
equalization; (3) bias correction; (4) float fallback of the fewest layers,
ordered by the damage each does at the outputs quantized alone in the fp32 model
(local error pre-ranks which are measured): the worst 1, 2, 4, ... layers, then the
fewest of that list by bisection. The fixes of steps 1-3 cost no float compute;
step 4 stays within the float budget. Every candidate is a row of the table the user sees.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from ..build import Built, Edits
from ..errors import ConfigError
from ..cost import PROPOSED, USER, FloatShare, concrete_shapes, float_share, layer_macs
from ..placement import CostTable
from ..float_reasons import policy_name
from .. import equalize
from ..plan import GraphView, QuantPlan, predicted_latency
from ..resolve import weight_entry
from ..settings import Settings
from ..targets import get as get_target
from .climb import Climb, Row, State
from .evaluator import Evaluator, Score
from .fixes import (Candidate, Context, bias_fix, clamp_fix, clip_fix, depthwise_equalize_fix, depthwise_read, equalize_fix, float_fix,
                    int4_fix, range_fix)
from .ranker import channel_stats, local_rank, outlier_tensors

ALONE_LAYERS = 64
"""Top locally-ranked layers whose damage at the outputs, each quantized alone, orders the float step (the rest follow)."""
ALONE_ROWS = 8
"""Rows of the candidate table for the alone measurements: the worst layers."""
SENSITIVITY_SAMPLES = 4
OUTLIER_TENSORS = 6
DEFAULT_FLOAT_BUDGET = 0.05
"""Default --max-float-fraction: float compute the proposal may add (SPEC 9: <= 5 % of compute)."""


def float_causes(model: onnx.ModelProto, plan: QuantPlan, macs: dict[str, float], proposed: set[str], settings: Settings) -> dict[str, str]:
    """Cause of every MAC-counted layer that runs float in the model built from `plan` with `proposed` moved to float."""
    ops = {n.name: n.op_type for n in model.graph.node}
    default_ops = get_target(settings.target).placement.default_ops or settings.quantize_ops
    cause: dict[str, str] = {}
    for name in macs:
        lp = plan.layers.get(name)
        if name in proposed:
            cause[name] = PROPOSED
        elif lp is None:
            cause[name] = "quantize_ops" if ops.get(name) not in default_ops else f"{ops.get(name)} without int8 form"
        elif lp.precision in ("float16", "float32"):
            cause[name] = USER if lp.reason == "cfg" else policy_name(lp.reason)
    return cause


@dataclass
class ProposalResult:
    """The choice, what it costs, what it measured, and every candidate tried.

    `layers` and `entries` are what the proposal adds (float layers; quantize_parameters entries it
    rewrote: ranges, clips, equalization, bias corrections); `existing` are the cfg's own
    custom_quantize_layers, kept; `cost` splits the float compute of the model built with both by
    cause; `baseline_label` names what `baseline` measured; `edits` describes the user's edits the
    proposal started from; `written` is True when `propose_cfg` changed the cfg file.
    """

    layers: dict[str, str]
    comments: dict[str, str]
    entries: dict[str, dict[str, Any]]
    entry_comments: dict[str, str]
    baseline: Score
    predicted: Score
    met: bool
    evaluations: int
    ranked: list[tuple[str, float]]
    float_fraction: float
    choice: str
    seconds: float
    table: list[Row] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    fp32_task: float | None = None
    measured: Score | None = None
    baseline_label: str = "the default quantization"
    cost: FloatShare | None = None
    existing: dict[str, str] = field(default_factory=dict)
    edits: list[str] = field(default_factory=list)
    written: bool = False
    built_layers: dict[str, int] = field(default_factory=dict)  # layers per precision of the model step2 builds from the written cfg
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the outputs were judged (an integer output: by what decides it)
    target: str = ""  # the target as enforced (Target.describe)
    latency_ms: tuple[float, float, float] | None = None  # predicted: the starting model, the proposal's, fp32 (measured cost model)
    cost_unit: str = "compute"  # what a candidate's cost is a share of: compute (MACs), or quantized layers (an NPU)
    budget_hit: str | None = None  # the budget that left ranked layers out: "layers", "slowdown" or "fraction" (None: none)

    @property
    def task_judged(self) -> bool:
        """Was the target a task metric (--eval)?"""
        return self.fp32_task is not None


def search(
    ctx: Context, evaluator: Evaluator, build: Callable[[Edits], Built], base: Edits, first: Built,
    single: Callable[[], dict[str, float]], samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any], *,
    fallback: str | tuple[str, ...] = "float32",
    max_float_layers: int | None = None, max_float_fraction: float | None = DEFAULT_FLOAT_BUDGET, started_from: str = "the default quantization",
    max_bytes: int | None = None, measure: Callable[[onnx.ModelProto], dict[str, float]] | None = None,
    costs: CostTable | None = None, max_slowdown: float | None = None,
) -> ProposalResult:
    """The cheapest candidate that meets the evaluator's target, or the best one within the budget.

    With `max_bytes`, int4 weights first bring the model under that size (`measure` gives isolated cosines to rank by).
    With `costs` (step1's measured cost table) and `max_slowdown`, the float layers added may slow the
    starting model's predicted latency by at most that factor. `fallback` may list precisions, cheapest first
    (npu: int16, then float16): the fallback step runs with each until one meets the target.
    """
    t0 = time.perf_counter()
    climb = Climb(ctx, evaluator, build, base, first, started_from)
    if max_bytes is not None:
        _size_step(climb, measure or (lambda m: {}), max_bytes)
    macs = layer_macs(concrete_shapes(ctx.temp, samples[0]) if samples else ctx.temp)
    total = sum(macs.values()) or 1.0
    start_ms = predicted_latency(ctx.temp, first.plan, costs) if costs is not None else None
    ms_budget = (max_slowdown - 1.0) * start_ms if start_ms is not None and max_slowdown is not None else None
    ms_added = {n: max(0.0, costs.fp32[n] - costs.int8[n]) for n in costs.int8 if n in costs.fp32} if costs is not None else {}
    ranked: list[tuple[str, float]] = []
    unit, limit = "compute", None
    met_at_start = climb.met
    if met_at_start:
        _free_fixes(climb, samples, session)
        choice = ", ".join(c.label for c in climb.kept) or f"{started_from} already meets the target; nothing to change"
    elif _zero_cost_fixes(climb, samples, session):
        _free_fixes(climb, samples, session)  # met part way up: the rest is a free gain, so proposing again changes nothing
        choice = ", ".join(c.label for c in climb.kept)
    else:
        _fit_with_floats(climb, samples, session)
        # the layers the cfg sets, by the node each entry resolved to (an entry may name a tensor or a fused node)
        taken = {n: lp.precision for n, lp in climb.built.plan.layers.items() if lp.reason == "cfg"}
        ranked = [(n, c) for n, c in local_rank(single(), ctx.plan, ctx.temp) if n not in taken]
        weights, wtotal, unit = macs, total, "compute"
        if get_target(ctx.settings.target).cost_by_layers:  # an NPU: each float16 layer costs a trip out of the integer unit
            weights, unit = {n: 1.0 for n in ctx.plan.layers}, "quantized layers"
            wtotal = float(len(weights)) or 1.0
        units = _float_units(ctx, ranked) if get_target(ctx.settings.target).placement.float_reads_quantized else {}
        order = _alone_order(climb, ranked, units)
        placement = get_target(ctx.settings.target).placement  # --max-float-layers counts layers the target would quantize
        ops = placement.default_ops if placement.default_ops is not None else ctx.settings.quantize_ops
        yours = [n for n, p in taken.items() if p in ("float16", "float32") and ctx.graph.by_name[n].op_type in ops]
        floats = len(yours)
        budget = _within_budget(order, weights, wtotal, floats, max_float_fraction, max_float_layers, ms_added, ms_budget)
        limit = _limit(len(budget) < len(order), max_float_layers is not None and len(budget) + floats >= max_float_layers, ms_budget)
        if max_bytes is not None:  # float weights are 4x int8 ones: keep the size budget
            budget = _within_size(budget, climb, max_bytes - climb.built.model.ByteSize())
        none_left = (f"--max-float-layers {max_float_layers} is used up by the cfg's own float layer(s) ({', '.join(yours)})"
                     if max_float_layers is not None and floats >= max_float_layers > 0 else "the float budget allows no layer")
        choice = _fallback_steps(climb, (fallback,) if isinstance(fallback, str) else fallback,
                                 lambda fb: _float_step(climb, ranked, budget, len(order) - len(budget), fb, weights, wtotal, unit, none_left))
    if not met_at_start and climb.prune():  # a free gain on a met target is kept, though the target holds without it
        choice = (", ".join(c.label for c in climb.kept) or "no change") + ("" if climb.met else "; target NOT met")
    result = _result(climb, choice, ranked, macs, total, time.perf_counter() - t0)
    result.cost_unit, result.budget_hit = unit, limit
    if costs is not None:
        result.latency_ms = (start_ms, predicted_latency(ctx.temp, climb.built.plan, costs), costs.model_fp32)
    return result


def _size_step(climb: Climb, measure: Callable[[onnx.ModelProto], dict[str, float]], max_bytes: int) -> None:
    """The size budget: int4 weights for the least sensitive MatMul/Gemm layers (isolated cosine measured with all of them
    int4) until the built model fits; kept whatever it scores, the other fixes then work on accuracy. At most one build per layer."""
    ctx, size = climb.ctx, climb.built.model.ByteSize()
    budget = f"--max-size-mb {max_bytes / 1e6:g}"
    if size <= max_bytes:
        climb._row("size", f"{size / 1e6:.3g} MB already within {budget}", climb.score, 0.0, "no change")
        return
    every = int4_fix(ctx, climb.edits, climb.built.plan, 1 << 62, 0, {})
    cosine = measure(climb.build(every[0].onto(climb.edits, ctx.temp)).model) if every else {}
    edits, built, layers, comments = climb.edits, climb.built, {}, {}
    while size > max_bytes:
        more = int4_fix(ctx, edits, built.plan, size, max_bytes, cosine)
        if not more:
            break
        layers.update(more[0].layers)
        comments.update(more[0].comments)
        edits = more[0].onto(edits, ctx.temp)
        built = climb.build(edits)
        size = built.model.ByteSize()
    if not layers:
        climb._row("size", f"{size / 1e6:.3g} MB; no MatMul/Gemm can be int4", climb.score, 0.0, f"{budget} not reachable")
        return
    c = Candidate("int4", f"{len(layers)} layer(s) in int4 ({size / 1e6:.3g} MB)", layers=layers, comments=comments)
    climb.score, climb.edits, climb.built = climb.evaluator.score(built.model), edits, built
    climb.kept.append(c)
    climb._row("size", c.label, climb.score, 0.0, "kept: within " + budget if size <= max_bytes else f"kept: {budget} not reachable with int4")


def _zero_cost_fixes(climb: Climb, samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> bool:
    """Steps 1-3 of the ladder (range algorithm, outlier channels, bias correction); True once the target is met."""
    ctx, evaluator = climb.ctx, climb.evaluator
    climb.try_each("range", _range_candidates(climb))
    if climb.met:
        return True
    # Outliers are found on a few samples; the ranges a clip or an equalization writes are per-channel statistics
    # (step1 keeps none) over all the proposal's samples, those the candidates are scored on included.
    found = outlier_tensors(channel_stats(ctx.temp, evaluator.samples[:8] + samples[:8], list(ctx.plan.tensors)), OUTLIER_TENSORS)
    everything = evaluator.samples + [x for x in samples if not any(x is y for y in evaluator.samples)]
    dw = depthwise_read(ctx)
    full = channel_stats(ctx.temp, everything, list(dict.fromkeys([st.tensor for st in found] + dw)))
    climb.try_each("outlier", depthwise_equalize_fix(ctx, climb.base, {t: full[t] for t in dw if t in full}))
    if climb.met:
        return True
    for st in (full.get(f.tensor, f) for f in found):
        if st.tensor in climb.edits.equalize:  # a view of a tensor equalized already: that fix set its range
            continue
        cands = clip_fix(ctx, climb.base, st) + equalize_fix(ctx, climb.base, st)  # from step1's entry: a later prune stays clean
        if cands:
            climb.try_each("outlier", cands)
        if climb.met:
            return True
    climb.try_each("bias", _bias_candidates(climb, samples, session))
    climb.prune()
    return climb.met


def _free_fixes(climb: Climb, samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> None:
    """Target met: the fixes that cost nothing at run time (range algorithm, bias correction) are still tried, and
    kept only when they clearly improve the outputs (beyond Evaluator.resolution): a free gain, never a trade. A bias
    correction changes what the ranges see, so the range rung is tried once more after one is kept: proposing again
    on the result then finds nothing left to gain."""
    ranged = climb.try_each("range", _range_candidates(climb))
    if climb.try_each("bias", _bias_candidates(climb, samples, session)) and not ranged:
        climb.try_each("range", _range_candidates(climb))


def _range_candidates(climb: Climb) -> list[Candidate]:
    """Step 1's candidates on top of the current edits: mse ranges, percentile ranges, ranges clamped where readers saturate."""
    return range_fix(climb.ctx, climb.edits, "mse") + range_fix(climb.ctx, climb.edits, "percentile") + clamp_fix(climb.ctx, climb.edits)


def _bias_candidates(climb: Climb, samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> list[Candidate]:
    """Step 3's candidate on top of the current edits and the model they build."""
    return bias_fix(climb.ctx, climb.edits, climb.built.fixed, climb.built.model, samples, session)


def _limit(cut: bool, by_count: bool, ms_budget: float | None) -> str | None:
    """Which budget left ranked layers out of the float step: "layers", "slowdown" or "fraction" (None: none did)."""
    if not cut:
        return None
    return "layers" if by_count else "slowdown" if ms_budget is not None else "fraction"


def _within_budget(order: list[str], macs: dict[str, float], total: float, taken: int,
                   max_fraction: float | None, max_layers: int | None,
                   ms_added: dict[str, float] | None = None, ms_budget: float | None = None) -> list[str]:
    """The layers of `order`, in order, that fit the float budget (compute share added, layer count with the user's,
    predicted milliseconds added when a measured cost table and --max-slowdown give one)."""
    names: list[str] = []
    used = used_ms = 0.0
    for n in order:
        share = macs.get(n, 0.0) / total
        if max_fraction is not None and used + share > max_fraction + 1e-12:
            continue
        ms = (ms_added or {}).get(n, 0.0)
        if ms_budget is not None and used_ms + ms > ms_budget + 1e-9:
            continue
        used_ms += ms
        if max_layers is not None and len(names) + taken >= max_layers:
            break
        names.append(n)
        used += share
    return names


def _within_size(order: list[str], climb: Climb, room: int) -> list[str]:
    """The layers of `order`, in order, whose float32 weights (over their quantized ones) fit `room` bytes together."""
    names, used = [], 0
    for n in order:
        node = climb.ctx.graph.by_name.get(n)
        w = node.input[1] if node is not None and len(node.input) > 1 else ""
        wp = climb.built.plan.weights.get(w)
        extra = int(np.prod(climb.ctx.graph.inits[w].dims)) * (2 if wp.dtype == "int16" else 3) if wp is not None else 0
        if used + extra <= room:
            names.append(n)
            used += extra
    return names



def _sizes(n: int) -> list[int]:
    """Float-set sizes tried below the target: 1, 2, 4, ... layers of the ordered budget, then all n."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def _cheapest_alike(climb: Climb, found: list[tuple[State, Row]]) -> tuple[State, Row] | None:
    """Below the target: the cheapest candidate as good as the best one, within what the measure resolves
    (Evaluator.resolution), so a tenth of a dB does not buy ten more float layers; None when the current
    state, which adds no float layer, is itself as good as the best (then no float layer is bought at all)."""
    best = found[0]
    for f in found[1:]:
        if climb.better(f[0][0], best[0][0]):
            best = f
    if climb.evaluator.as_good(climb.score, best[0][0]):
        return None
    alike = [f for f in found if climb.evaluator.as_good(f[0][0], best[0][0])]
    return min(alike, key=lambda f: f[0][1].cost)


def _fit_with_floats(climb: Climb, samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> None:
    """A kept bias correction corrects each layer for the errors of the quantized layers upstream: under a layer set float
    later, its followers would correct an error that is gone (PP-OCR rec: its first depthwise Conv set float under the
    correction scored -1.4 dB of log-probability SNR, the correction alone 13.8, the Conv with the correction fitted
    again 12.4). So each float candidate of step 4 is scored with the correction fitted again to its placement."""
    if not any(c.kind == "bias_correction" for c in climb.kept):
        return
    unfitted = climb.base
    for c in climb.kept:
        if c.kind != "bias_correction":
            unfitted = c.onto(unfitted, climb.ctx.temp)

    def fit(edits: Edits, built: Built) -> Candidate | None:
        return next(iter(bias_fix(climb.ctx, edits, built.fixed, built.model, samples, session)), None)

    climb.refit = (unfitted, fit)


def _fallback_steps(climb: Climb, fallbacks: tuple[str, ...], step: Callable[[str], str]) -> str:
    """Step 4 with each precision in turn, cheapest first, until one meets the target; each is tried from the same
    state. When none meets it, the best one (the cheaper on a tie) stands and the others' kept rows are marked undone."""
    start = (climb.score, climb.edits, climb.built, list(climb.kept))
    tried: list[tuple[str, str, tuple, list[Row]]] = []
    for fb in fallbacks:
        climb.score, climb.edits, climb.built, climb.kept = start[0], start[1], start[2], list(start[3])
        rows, choice = len(climb.table), step(fb)
        tried.append((fb, choice, (climb.score, climb.edits, climb.built, list(climb.kept)), climb.table[rows:]))
        if climb.met:
            break
    best = tried[-1] if climb.met else max(tried, key=lambda t: climb.quality(t[2][0]))  # max keeps the first of equals
    climb.score, climb.edits, climb.built, climb.kept = best[2]
    for r in (r for fb, _, _, rows in tried if fb != best[0] for r in rows if r.outcome.startswith("kept")):
        r.outcome += f"; undone: {best[0]} {'meets the target' if climb.met else 'scores better'}"
    return best[1]


def _keep_float(climb: Climb, state: State, row: Row, outcome: str) -> None:
    """Make a float candidate the current state and mark its row."""
    climb.score, chosen, climb.edits, climb.built = state
    if climb.refit is not None:  # the chosen candidate carries the bias correction fitted to it
        climb.kept = [c for c in climb.kept if c.kind != "bias_correction"]
    climb.kept.append(chosen)
    row.outcome = outcome


def _float_step(climb: Climb, ranked: list[tuple[str, float]], budget: list[str], skipped: int, fallback: str,
                macs: dict[str, float], total: float, unit: str = "compute", none_left: str = "the float budget allows no layer") -> str:
    """Step 4: the fewest float layers of `budget` (worst first) that meet the target: prefixes of 1, 2, 4, ... layers
    until one meets, then bisection; below the target, the cheapest prefix as good as the best. Returns the choice
    (`none_left`: why, when the budget leaves no layer)."""
    prefix = ", ".join(c.label for c in climb.kept)
    if not budget:
        return f"{prefix or 'no change'}; {none_left} and the target is not met"
    single_of = dict(ranked)

    def why(n: str) -> str:
        rank, alone = climb.damage.get(n, (0, math.nan))
        worst = (f"{rank} of {len(climb.damage)} by damage at the outputs ({climb.evaluator.quality_name} quantized alone: {alone:.4f})"
                 if rank else "ranked by local error")
        return f"proposal: {worst}, local cos {single_of.get(n, math.nan):.4f}, {100 * macs.get(n, 0.0) / total:.1f} % of {unit}"

    def candidate(names: list[str]) -> State:
        why_of = {n: why(n) for n in names}
        c, e = climb.float_edits(float_fix(climb.ctx, names, fallback, sum(macs.get(n, 0.0) for n in names) / total, why_of))
        b = climb.build(e)
        return climb.evaluator.score(b.model), c, e, b

    found: list[tuple[State, Row]] = []
    lo = 0
    for k in _sizes(len(budget)):
        state = candidate(budget[:k])
        ok, gain = climb.evaluator.met(state[0]), climb.better(state[0], climb.score)
        note = f" (budget; {skipped} more ranked layer(s) do not fit)" if k == len(budget) and skipped else ""
        climb._row("float", f"{state[1].label}, worst first{note}", state[0], state[1].cost, "meets" if ok else "improves" if gain else "no gain")
        if ok:
            break
        if gain:
            found.append((state, climb.table[-1]))
        lo = k
    else:
        if not found:
            return f"{prefix or 'no change'}; target NOT met"
        alike = _cheapest_alike(climb, found)
        if alike is None:
            for _, r in found:
                r.outcome = "no clear gain over no float layer"
            return f"{prefix or 'no change'}; target NOT met: no float layer within the budget gains more than the measure resolves"
        best, row = alike
        for s, r in found:
            if r is not row and s[1].cost > best[1].cost:
                r.outcome = "no better than a cheaper one"
        _keep_float(climb, best, row, "kept: best within the budget (cheapest of the alike)")
        return ", ".join(k.label for k in climb.kept) + "; target NOT met within the float budget"
    hi, best, row = k, state, climb.table[-1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        state = candidate(budget[:mid])
        ok = climb.evaluator.met(state[0])
        climb._row("float", f"{state[1].label}, worst first", state[0], state[1].cost, "meets" if ok else "below target")
        if ok:
            hi, best, row = mid, state, climb.table[-1]
        else:
            lo = mid
    _keep_float(climb, best, row, "kept: fewest float layers that meet the target")
    return ", ".join(c.label for c in climb.kept)


def _result(climb: Climb, choice: str, ranked: list[tuple[str, float]], macs: dict[str, float], total: float,
            seconds: float) -> ProposalResult:
    """The kept fixes as cfg data (layers, entries, their comments) with the scores and the cost."""
    layers: dict[str, str] = {}
    comments: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    entry_comments: dict[str, str] = {}
    for c in climb.kept:
        layers.update(c.layers)
        entries.update(c.entries)
        for k, v in c.comments.items():
            (comments if k in c.layers else entry_comments)[k] = v
    ctx = climb.ctx
    _equalized_weights(climb, entries, entry_comments)
    floats = {n for n, p in layers.items() if p in ("float16", "float32")}
    cost = float_share(macs, float_causes(ctx.temp, climb.built.plan, macs, floats, ctx.settings))
    return ProposalResult(
        layers, comments, entries, entry_comments, climb.baseline, climb.score, climb.met, climb.evaluator.evaluations,
        ranked, sum(macs.get(n, 0.0) for n in floats) / total, choice, seconds, climb.table,
        [c.label for c in climb.kept], climb.evaluator.fp32_task, baseline_label=climb.started_from, cost=cost,
        existing=dict(climb.base.layers),
    )


def _equalized_weights(climb: Climb, entries: dict[str, dict[str, Any]], comments: dict[str, str]) -> None:
    """The weight entries of the layers an equalization rescaled (the producer's divided, the readers' multiplied), as
    step2 quantizes them: the range of the scaled weights (step1 listed the original's; ori_min/ori_max keep it)."""
    ctx, built = climb.ctx, climb.built
    view = GraphView(built.fixed)
    sites = {}
    for t in [t for t, e in entries.items() if "equalize" in e]:
        site = equalize.find_site(ctx.temp, t, ctx.graph)
        if not isinstance(site, str):
            sites.setdefault(site.producer, (t, site))  # the views of one tensor: one site
    for t, site in sites.values():
        for w in equalize.scaled_weights(site, ctx.graph):
            if w not in built.plan.weights or w in ctx.protected:
                continue
            fresh = weight_entry(built.plan.weights[w], view.init_array(w))[0]
            bound = [max(-lo, hi) for lo, hi in zip(fresh["min"], fresh["max"])]  # the symmetric range step2 uses
            cur = entries.get(w) or ctx.entry(climb.edits, w)
            cur.update(min=[-b for b in bound], max=bound, scale=fresh["scale"], zero_point=fresh["zero_point"])
            entries[w] = cur
            comments.setdefault(w, f"proposal: the range of these weights after equalizing '{t}' (channel c rescaled by its "
                                   "equalize[c]); ori_min/ori_max are the original weights'")


def _float_units(ctx: Context, ranked: list[tuple[str, float]]) -> dict[str, list[str]]:
    """Per ranked layer, the layers to float with it where a float layer reads quantized inputs (an NPU): its
    quantized readers too, so the tensor it writes stays float (alone, a float Add would change nothing), and
    the whole of any pattern the target runs as one layer (a HardSwish chain) that the unit touches."""
    names = {n for n, _ in ranked}
    fused = get_target(ctx.settings.target).placement.fused_patterns
    inner = fused(ctx.graph) if fused else set()
    units: dict[str, list[str]] = {}
    for n, _ in ranked:
        unit = [n] + [c.name for o in ctx.graph.by_name[n].output for c in ctx.graph.consumer_nodes(o)]
        for m in unit:  # grows while it runs: a pattern's nodes are reached through its inner tensors
            node = ctx.graph.by_name.get(m)
            if node is None:
                continue
            touching = [c.name for o in node.output if o in inner for c in ctx.graph.consumer_nodes(o)]
            touching += [p.name for i in node.input if i in inner for p in [ctx.graph.producer_node(i)] if p is not None]
            unit += [t for t in touching if t not in unit]
        units[n] = [m for m in unit if m in names]
    return units


def _alone_order(climb: Climb, ranked: list[tuple[str, float]], units: dict[str, list[str]]) -> list[str]:
    """Layer order for the fallback: each of the top ALONE_LAYERS locally-ranked layers quantized alone in the fp32 model
    (every other layer float32, no bias correction), the most damage at the outputs first; the rest after, in local order;
    each with its unit (see :func:`_float_units`).

    Alone, a layer's error reaches the outputs unmasked. In the int8 model the layers' errors mask and cancel each
    other: PP-OCR det's 1x1 Conv whose output quantization alone costs the outputs all of the int8 model's error
    (16.3 dB SNR) measured 1.3 dB worse when set float there alone; with the three next-worst, 3.4 dB better."""
    head = [n for n, _ in ranked[:ALONE_LAYERS]]
    if len(head) < 2:
        return list(dict.fromkeys(m for n, _ in ranked for m in units.get(n, [n])))
    quantized = [n for n, lp in climb.built.plan.layers.items() if lp.precision not in ("float16", "float32")]
    base = climb.refit[0] if climb.refit is not None else climb.edits

    measured: list[str] = []

    def models() -> Iterator[onnx.ModelProto]:
        for n in head:
            others = float_fix(climb.ctx, [m for m in quantized if m != n], "float32", 0.0, {})
            try:
                model = climb.build(others.onto(base, climb.ctx.temp)).model
            except ConfigError:  # a layer step2 cannot quantize on its own: ordered by its local error, after the measured
                continue
            measured.append(n)
            yield model

    # independent runs: side by side when the evaluator has workers (each built here while the others are scored)
    scores = dict(zip(measured, climb.evaluator.score_many(models(), limit=SENSITIVITY_SAMPLES)))
    worst = sorted(measured, key=lambda n: climb.quality(scores[n]))
    climb.damage = {n: (i + 1, climb.quality(scores[n])) for i, n in enumerate(worst)}
    for i, n in enumerate(worst[:ALONE_ROWS]):
        climb._row("sensitivity", f"{n} quantized alone, the rest float32 ({SENSITIVITY_SAMPLES} samples)", scores[n], 0.0,
                   f"damage rank {i + 1} of {len(worst)}")
    rest = [n for n in head if n not in scores] + [n for n, _ in ranked[ALONE_LAYERS:]]
    return list(dict.fromkeys(m for n in worst + rest for m in units.get(n, [n])))
