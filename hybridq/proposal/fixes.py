"""The fixes a proposal can make, cheapest first; each is cfg data that step2 applies without re-calibration.

One function per kind in the explicit FIXES table. A fix returns candidates: edits
to quantize_parameters entries (a range algorithm, a clipped min/max, channel
equalization scales, bias corrections) or to custom_quantize_layers (float
fallback). The search scores them; nothing here runs a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from .. import bias_correction, equalize
from ..build import Edits
from ..config import CfgEntry, short_float
from ..int4 import int4_bytes, int4_candidates, weight_bytes
from ..observers import HistogramObserver, compute_range
from ..patterns import hard_swish_floors, saturation_ranges
from ..targets import floored
from ..plan import GraphView, QuantPlan
from ..qparams import compute_qparams, levels
from ..settings import Settings
from .ranker import ChannelStats

WIDER = 1.05
"""A range algorithm is proposed for a tensor when the current range is at least this much wider."""


@dataclass
class Candidate:
    """One fix as data: entries to replace, layers to set, a comment for each, and the float compute it adds."""

    kind: str
    label: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    cost: float = 0.0

    def onto(self, edits: Edits, model: onnx.ModelProto) -> Edits:
        """The edits with this fix applied on top."""
        out = edits.with_entries(self.entries, model)
        out.layers.update(self.layers)
        return out


@dataclass
class Context:
    """What every fix may read: the temp model, its statistics, the plan and the cfg as it stands."""

    temp: onnx.ModelProto
    observers: dict[str, HistogramObserver]
    settings: Settings
    plan: QuantPlan
    written: dict[str, dict[str, Any]]
    protected: set[str]
    graph: GraphView = field(init=False)
    bias_memo: dict[Any, Any] = field(init=False, default_factory=dict)  # fp32 layer means for bias_fix (see cumulative_shifts)

    def __post_init__(self) -> None:
        self.graph = GraphView(self.temp)
        # Ranges a fix computes are those step2 would: a floored tensor's statistics clamped as build() clamps them.
        self.observers = floored(self.observers, self.plan.floors)

    def entry(self, edits: Edits, tensor: str) -> dict[str, Any]:
        """The entry a tensor has now (the edits', else step1's)."""
        e = edits.entries.get(tensor)
        return dict(e.values) if isinstance(e, CfgEntry) else dict(self.written.get(tensor, {}))


def _floats(values) -> list[float]:
    return [short_float(float(v)) for v in np.asarray(values, np.float64).reshape(-1)]


def _ranged(cur: dict[str, Any], lo: float, hi: float, **more: Any) -> dict[str, Any]:
    """The entry with range [lo, hi] and the scale/zero_point step2 computes from it, so the cfg agrees with itself."""
    (lo,), (hi,) = _floats([lo]), _floats([hi])  # as written: step2 computes from these
    qp = compute_qparams(np.array([lo]), np.array([hi]), cur.get("dtype", "uint8"), cur.get("qtype") == "sym")
    cur.update(min=[lo], max=[hi], scale=_floats(qp.scale), zero_point=[int(z) for z in np.ravel(qp.zero_point)], **more)
    return cur


def range_fix(ctx: Context, edits: Edits, algorithm: str) -> list[Candidate]:
    """One candidate: every tensor whose `algorithm` range is narrower than its current one takes it."""
    cand = Candidate("range", f"{algorithm} ranges")
    for t, (lo, hi) in _algorithm_ranges(ctx, edits, algorithm).items():
        cur = ctx.entry(edits, t)
        old_lo, old_hi = cur["min"][0], cur["max"][0]
        width, narrow = max(old_hi, 0.0) - min(old_lo, 0.0), max(hi, 0.0) - min(lo, 0.0)
        if narrow > 0 and width / narrow >= WIDER:
            _ranged(cur, lo, hi, algorithm=algorithm)
            cand.entries[t] = cur
            cand.comments[t] = f"proposal: range [{old_lo:.4g}, {old_hi:.4g}] -> [{lo:.4g}, {hi:.4g}] ({algorithm})"
    cand.label = f"{algorithm} ranges on {len(cand.entries)} tensor(s)"
    return [cand] if cand.entries else []


def _algorithm_ranges(ctx: Context, edits: Edits, algorithm: str) -> dict[str, tuple[float, float]]:
    """Each tensor's `algorithm` range where a range fix may change it. The members of a group sharing one scale (npu) take
    their union, or none does when one of them may not change: the range fixed on one member is the whole group's."""
    out = {}
    for t, tp in ctx.plan.tensors.items():
        obs = ctx.observers.get(t)
        cur = ctx.entry(edits, t)
        if t in ctx.protected or obs is None or not obs.bins or not cur or cur.get("algorithm") == algorithm or "equalize" in cur:
            continue
        out[t] = compute_range(obs, algorithm, levels(tp.dtype), ctx.settings.percentile)
    for group in ctx.plan.shared:
        members = [t for t in group if t in ctx.plan.tensors]
        if all(t in out for t in members):
            out.update(dict.fromkeys(members, (min(out[t][0] for t in members), max(out[t][1] for t in members))))
        else:
            for t in members:
                out.pop(t, None)
    return out


def clamp_fix(ctx: Context, edits: Edits) -> list[Candidate]:
    """One candidate (cpu; the npu clamps by default): each tensor only saturating readers read (a HardSwish below -3, a
    Relu below 0, a Clip or HardSigmoid beyond its bounds) takes the range its readers tell apart, with its algorithm.

    Exact for the float readers a cpu model runs there, and a finer grid; yet not always better end to end (PP-OCR det
    +1.2 dB output SNR, rec -12 dB), so it is a candidate the search verifies, not a default.
    """
    if ctx.plan.floors:
        return []
    bounds = saturation_ranges(ctx.graph, {t: "int16" for t in ctx.plan.tensors})  # int16: no 8-bit Sigmoid bound for float readers
    clamped, swish = floored(ctx.observers, bounds), hard_swish_floors(ctx.graph)
    cand = Candidate("range", "ranges clamped at saturating readers")
    for t, (b_lo, b_hi) in bounds.items():
        obs, cur = clamped.get(t), ctx.entry(edits, t)
        if t in ctx.protected or obs is None or obs is ctx.observers.get(t) or not cur or "equalize" in cur or not obs.bins:
            continue
        lo, hi = compute_range(obs, cur.get("algorithm", ctx.settings.algorithm), levels(ctx.plan.tensors[t].dtype), ctx.settings.percentile)
        old_lo, old_hi = cur["min"][0], cur["max"][0]
        if lo <= old_lo and hi >= old_hi:
            continue
        cand.entries[t] = _ranged(cur, lo, hi)
        readers = "HardSwish" if t in swish else ", ".join(sorted({n.op_type for n in ctx.graph.consumer_nodes(t)}))
        cand.comments[t] = (f"proposal: range [{old_lo:.4g}, {old_hi:.4g}] -> [{lo:.4g}, {hi:.4g}]: its readers ({readers}) "
                            f"give one output outside [{b_lo:.4g}, {b_hi:.4g}]")
    cand.label = f"ranges clamped at saturating readers on {len(cand.entries)} tensor(s)"
    return [cand] if cand.entries else []


PASS_CHANNELS = ("GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool", "Relu", "Flatten", "Identity")
"""Ops between an activation and the layer that weighs its channels that keep the channels where they are."""
NEGLIGIBLE = 0.1
"""An outlier channel carries nothing downstream when its largest contribution to a reader is below this
share of the median channel's."""


def contributions(ctx: Context, stats: ChannelStats, depth: int = 4) -> np.ndarray | None:
    """Per channel, largest |value| x largest |weight| any reader gives it; None when some reader does not weigh
    channels (through pooling, Relu and Flatten, which keep them in place)."""
    t = stats.tensor
    for _ in range(depth):
        readers = ctx.graph.consumer_nodes(t)
        if len(readers) == 1 and readers[0].op_type in PASS_CHANNELS:
            t = readers[0].output[0]
            continue
        if not readers:
            return None
        weights = np.zeros(stats.min.size)
        for r in readers:
            info = equalize.in_channel(r, t, ctx.graph)
            if info is None:
                return None
            w = np.abs(ctx.graph.init_array(info[0]))
            per = np.moveaxis(w, info[1], 0).reshape(w.shape[info[1]], -1).max(axis=1)
            if per.size != weights.size:
                return None
            weights = np.maximum(weights, per)
        return stats.absmax * weights
    return None


def _clipped_channels(ctx: Context, stats: ChannelStats) -> tuple[np.ndarray, bool]:
    """The outlier channels a clip may saturate, and whether the readers' weights are known: then only those the readers
    (nearly) ignore, else all of them (the search verifies the clip)."""
    out = stats.outliers()
    contrib = contributions(ctx, stats)
    if contrib is None or not out.size:
        return out, False
    ordinary = np.median(np.delete(contrib, out)) if contrib.size > out.size else 0.0
    return out[contrib[out] < NEGLIGIBLE * ordinary], True


def clip_fix(ctx: Context, edits: Edits, stats: ChannelStats) -> list[Candidate]:
    """Clip a tensor to the range of the channels its readers use (an informative outlier is equalized instead); offered
    only when that saturates an outlier channel they ignore and narrows the current range, which it never widens."""
    t = stats.tensor
    if t in ctx.protected or t not in ctx.plan.tensors:
        return []
    clipped, weighed = _clipped_channels(ctx, stats)
    keep = np.setdiff1d(np.arange(stats.min.size), clipped)
    cur = ctx.entry(edits, t)
    if not clipped.size or not keep.size or not cur:
        return []
    old_lo, old_hi = float(cur["min"][0]), float(cur["max"][0])
    own_lo, own_hi = _floats([min(float(stats.min[keep].min()), 0.0), max(float(stats.max[keep].max()), 0.0)])
    lo, hi = max(own_lo, old_lo), min(own_hi, old_hi)
    sat = clipped[(stats.max[clipped] > hi) | (stats.min[clipped] < lo)]
    if not sat.size or hi <= lo or (lo, hi) == (old_lo, old_hi):
        return []
    _ranged(cur, lo, hi).pop("equalize", None)
    peaks = np.where(stats.max[sat] > hi, stats.max[sat], stats.min[sat])
    chans = ", ".join(str(int(c)) for c in sat[:6]) + (" ..." if sat.size > 6 else "")
    capped = " (within step1's range)" if (lo, hi) != (own_lo, own_hi) else ""
    which = f"channel(s) {chans}, which its readers weigh (nearly) zero," if weighed else f"its outlier channel(s) {chans}"
    comment = (f"proposal: clipped to [{lo:.4g}, {hi:.4g}] (was [{old_lo:.4g}, {old_hi:.4g}]), the range of its other channels "
               f"over {stats.samples} proposal sample(s){capped}; {which} reach {peaks[np.argmax(np.abs(peaks))]:.4g} there and saturate")
    return [Candidate("clip", f"clip '{t}' (outlier channel(s) {chans})", {t: cur}, comments={t: comment})]


def _site(ctx: Context, stats: ChannelStats) -> equalize.Site | None:
    """The equalization site of a quantized tensor the proposal may change, or None."""
    t = stats.tensor
    if t in ctx.protected or t not in ctx.plan.tensors:
        return None
    site = equalize.find_site(ctx.temp, t, ctx.graph)
    if isinstance(site, str) or site.axis % stats.rank != stats.axis or site.channels != stats.min.size:
        return None
    if any(i in ctx.plan.tensors for n in site.path for i in ctx.graph.by_name[n].input if i not in ctx.graph.inits):
        return None  # a quantized tensor inside the site would change range too
    scaled = {i for n in (site.producer, *site.path, *site.readers) for i in ctx.graph.by_name[n].input if i in ctx.graph.inits}
    if scaled & ctx.protected:
        return None  # a weight range the user edited would apply to the rescaled weights
    return site


def _equalized(ctx: Context, edits: Edits, stats: ChannelStats, site: equalize.Site, scales: np.ndarray) -> tuple[dict[str, dict[str, Any]], str] | None:
    """The entries equalized by `scales`, each with the range the channels then span, and their comment: the tensor's, and
    those of the views of it ONNX Runtime puts before each Gemm (the same channels); None when one has no entry or is the user's."""
    carriers = [v for v in site.views if v in ctx.plan.tensors] or [stats.tensor]
    if any(v in ctx.protected for v in carriers):
        return None
    lo, hi = min(float((stats.min / scales).min()), 0.0), max(float((stats.max / scales).max()), 0.0)
    entries = {v: ctx.entry(edits, v) for v in carriers}
    if not all(entries.values()):
        return None
    for cur in entries.values():
        _ranged(cur, lo, hi, equalize=_floats(scales))
    return entries, (f"proposal: equalized: channel c divided by equalize[c] here and multiplied into "
                 f"{', '.join(site.readers)}'s weights (largest scale {scales.max():.4g}, channel {int(np.argmax(scales))}); "
                 f"range after equalization [{lo:.4g}, {hi:.4g}]")


def equalize_fix(ctx: Context, edits: Edits, stats: ChannelStats) -> list[Candidate]:
    """Move the outlier channels' scale into the readers' weights: right when the outliers carry information."""
    site = _site(ctx, stats)
    if site is None:
        return []
    made = _equalized(ctx, edits, stats, site, equalize.smooth_scales(stats.absmax, equalize.reader_absmax(ctx.temp, site, ctx.graph)))
    if made is None:
        return []
    t = stats.tensor
    label = f"equalize '{t}' into {', '.join(site.readers)} ({stats.outliers().size} outlier channel(s))"
    return [Candidate("equalize", label, made[0], comments={v: made[1] for v in made[0]})]


def depthwise_read(ctx: Context) -> list[str]:
    """Quantized tensors that only depthwise Convs read, each with its weights quantized per channel."""
    out = []
    for t in ctx.plan.tensors:
        readers = ctx.graph.consumer_nodes(t)
        if readers and t not in ctx.graph.outputs and all(
                equalize.depthwise(r, ctx.graph) and r.input[0] == t and getattr(ctx.plan.weights.get(r.input[1]), "axis", None) == 0
                for r in readers):
            out.append(t)
    return out


def depthwise_equalize_fix(ctx: Context, edits: Edits, stats: dict[str, ChannelStats]) -> list[Candidate]:
    """One candidate: every tensor of `stats` (see :func:`depthwise_read`) whose producer can divide its channels is
    equalized fully into the depthwise Convs reading it, s_c = absmax_c / median absmax (cross-layer equalization).

    A depthwise filter is one weight channel, quantized on its own grid, so scaling it loses nothing: every channel of
    the tensor gets the range of the typical one (PP-OCR det: the input of its first stride-2 depthwise Conv, quantized
    alone in the fp32 model, cost the outputs 23.7 dB of noise-to-signal; equalized, 41.5 dB).
    """
    cand = Candidate("equalize", "")
    for t, st in stats.items():
        site = _site(ctx, st)
        live = st.absmax[st.absmax > 0]
        if site is None or not live.size:
            continue
        made = _equalized(ctx, edits, st, site, np.where(st.absmax > 0, st.absmax / np.median(live), 1.0))
        if made is not None:
            cand.entries.update(made[0])
            cand.comments.update({v: made[1] for v in made[0]})
    cand.label = f"equalize {len(cand.entries)} tensor(s) into the depthwise Convs reading them"
    return [cand] if cand.entries else []


def bias_fix(ctx: Context, edits: Edits, fixed: onnx.ModelProto, qdq: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
             session: Callable[[onnx.ModelProto], Any]) -> list[Candidate]:
    """Shift each quantized Conv/Gemm/Linear's bias by its mean output error in the model as it runs (upstream errors
    included, layers in order: :func:`hybridq.bias_correction.cumulative_shifts`), over at most BIAS_SAMPLES samples."""
    layers = bias_correction.correctable_layers((w.node for w in ctx.plan.weights.values()), ctx.graph)
    samples = samples[:BIAS_SAMPLES]
    shifts = bias_correction.cumulative_shifts(fixed, qdq, layers, samples, session, ctx.bias_memo)
    cand = Candidate("bias_correction", "")
    for layer, shift in shifts.items():
        node = ctx.graph.by_name[layer]
        weight = node.input[1]
        if weight in ctx.protected or not np.any(shift):
            continue
        cur = ctx.entry(edits, weight)
        if not cur:
            continue
        prev = np.asarray(cur.get("bias_correction", np.zeros_like(shift)), np.float64)
        cur["bias_correction"] = _floats(prev + shift)
        cand.entries[weight] = cur
        cand.comments[weight] = (f"proposal: bias of {layer} shifted by its mean output error in the quantized model "
                                 f"(earlier layers corrected) over {len(samples)} samples (largest {np.abs(shift).max():.3g})")
    cand.label = f"bias correction on {len(cand.entries)} layer(s)"
    return [cand] if cand.entries else []


BIAS_SAMPLES = 8
"""Samples the bias correction is fitted on: one pass each per corrected layer (PP-OCR det, 41 layers: 25 s at 8)."""


def float_fix(ctx: Context, layers: list[str], precision: str, cost: float, why: dict[str, str]) -> Candidate:
    """Run these layers in float (float32 or float16), their inputs unquantized; or in int16 (npu, `--fallback int16`)."""
    return Candidate("float", f"{len(layers)} layer(s) in {precision}", layers={n: precision for n in layers},
                     comments={n: why.get(n, "proposal") for n in layers}, cost=cost)


def int4_fix(ctx: Context, edits: Edits, built: QuantPlan, size: int, max_bytes: int, cosine: dict[str, float]) -> list[Candidate]:
    """int4 weights for the fewest MatMul/Gemm layers that bring `size` (bytes, built from `built`) under `max_bytes`.

    The least sensitive layers go first: highest isolated cosine at int4 (`cosine`, measured; unmeasured layers last).
    Layers the cfg sets, and those whose weight entry the user edited, are left alone. Sizes are estimates
    (:func:`hybridq.int4.weight_bytes`); the search verifies the built size.
    """
    block = ctx.settings.int4_block_size
    free = [n for n in int4_candidates(ctx.temp) if n not in edits.layers and ctx.graph.by_name[n].input[1] not in ctx.protected]
    order = sorted(free, key=lambda n: (-cosine.get(n, -2.0), n))
    chosen: list[str] = []
    for n in order:
        if size <= max_bytes:
            break
        k, m = (int(d) for d in ctx.graph.inits[ctx.graph.by_name[n].input[1]].dims)
        size -= weight_bytes(n, ctx.temp, built, block) - int4_bytes(k, m, block)
        chosen.append(n)
    why = {n: f"proposal: int4 for the size budget, {i + 1}/{len(order)} least sensitive"
              + (f" (isolated cosine at int4 {cosine[n]:.4f})" if n in cosine else "") for i, n in enumerate(chosen)}
    label = f"{len(chosen)} layer(s) in int4 (estimated {size / 1e6:.3g} MB)"
    return [Candidate("int4", label, layers={n: "int4" for n in chosen}, comments=why)] if chosen else []


FIXES: dict[str, Callable[..., Any]] = {
    "range": range_fix,
    "clip": clip_fix,
    "equalize": equalize_fix,
    "depthwise_equalize": depthwise_equalize_fix,
    "bias_correction": bias_fix,
    "float": float_fix,
    "int4": int4_fix,
}
"""The ladder, cheapest first. int16 layers are not offered for target cpu: ONNX Runtime's CPU
provider has no int16 kernels, so an int16 layer costs at least what a float layer costs. On npu,
`--fallback int16` makes the fallback step's layers int16 instead of float16."""
