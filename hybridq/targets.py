"""Where the deployable model will run: one entry per target, in the `TARGETS` table.

A target decides two things: where Q/DQ go (its `plan.Placement`: the op table, the
ops quantized by default, the scale-sharing rules) and the model analysis measures
(its `deploy` function). `build.build` and `api` look the entry up by the cfg's
`settings: target:`; the stages hold no `if target == ...` chains.

- `cpu`: ONNX Runtime's fused CPU kernels, today's placement (`plan.QUANTIZABLE`).
- `npu`: an integer-only accelerator (RKNN, QNN HTP, Ethos-U): every activation tensor
  between the operators of `NPU_QUANTIZABLE` carries Q/DQ. Float16 fallback layers read the
  dequantized int8 view of their inputs between explicit Casts, as a layer the NPU hands to
  its float16 unit does. Its rules, each read from RKNN-Toolkit2 2.5's cfgs for PP-OCR det/cls
  (../shared/rknn/*.noproposal.quantization.cfg; docs/coming-from-rknn.md has the table):
  - asymmetric 8-bit per tensor, min/max (RKNN 'normal'); the graph input likewise (`x_int8`);
  - data movement (`DATA_MOVEMENT`) and selecting ops (`SELECTING`: MaxPool, nearest/linear
    Resize) keep their input's parameters (cls `pool2d_9.tmp_0`, det `nearest_interp_v2_*`);
  - a Concat's inputs keep their own parameters and are requantized into its output's (det
    `p2o.Concat.1`); hybridq shares the output's with the inputs only the Concat reads (the
    same integers), so no other reader of an input gets the coarser grid;
  - a tensor only saturating ops read is calibrated to their saturation interval
    (`patterns.saturation_ranges`: det `conv2d_462.tmp_0` -> [-3, 3] before a HardSigmoid,
    `p2o.Add.281` -> [-7, 7] before the Sigmoid, `p2o.Add.3` -> [-3, max] before a HardSwish);
  - Conv + Relu/Clip, Conv -> Mul/Add by per-channel constants (det `p2o.Add.19`), and the
    elementwise chains of HardSwish, Swish, Gelu and LayerNorm run as one layer each
    (`patterns.inner_tensors`): no Q/DQ inside.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx

from .deployed import as_deployed
from .errors import ConfigError, did_you_mean
from .observers import HistogramObserver
from .patterns import inner_tensors, saturation_ranges
from .plan import CPU_PLACEMENT, QUANTIZABLE, GraphView, Placement, Slots, _all_float_inputs, _first_input, make_plan
from .qparams import NUMPY, QParams, compute_qparams
from .settings import Settings


def _matmul_any(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    """MatMul on an NPU: as on the CPU, but its output is requantized too (the NPU writes int8)."""
    slots = QUANTIZABLE["MatMul"](node, g)
    return Slots(slots.activations, slots.weight, slots.bias, True) if slots else None


def _split(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    """Split: the input and every output quantized."""
    return Slots((0,), all_outputs=True) if g.is_float_activation(node.input[0]) else None


DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
"""Ops that move integers without computing: their output keeps the input's scale and zero point."""

SELECTING = ("MaxPool", "GlobalMaxPool", "Resize")
"""Ops whose outputs are input values (max, nearest) or blends of neighbours (linear): within the input's range,
so they keep its parameters too (RKNN: MaxPool in cls, nearest Resize in det). A cubic Resize, which overshoots, does not."""

NPU_QUANTIZABLE = {
    **QUANTIZABLE,
    "MatMul": _matmul_any,
    "Sub": _all_float_inputs,
    "Div": _all_float_inputs,
    "Pow": _all_float_inputs,
    "Sqrt": _first_input,
    "HardSigmoid": _first_input,
    "HardSwish": _first_input,
    "Tanh": _first_input,
    "Erf": _first_input,
    "Gelu": _first_input,
    "GlobalMaxPool": _first_input,
    "ReduceMean": _first_input,
    "Slice": _first_input,
    "Split": _split,
    "LayerNormalization": _first_input,
    **{op: _first_input for op in DATA_MOVEMENT},
}
"""Every op an integer-only NPU runs in int8 (ConvTranspose and depthwise Convs included: no CPU-speed policy)."""

NPU_PLACEMENT = Placement(
    NPU_QUANTIZABLE, default_ops=tuple(NPU_QUANTIZABLE), cpu_policy=False, fuse_activations=True,
    float_reads_quantized=True, passthrough=DATA_MOVEMENT + SELECTING, share_concat=True, fused_patterns=inner_tensors,
    range_floors=saturation_ranges,
)


@dataclass(frozen=True)
class Target:
    """One target: where Q/DQ go, the model analysis measures, and what the proposal's float layers cost."""

    name: str
    placement: Placement
    deploy: Callable[[onnx.ModelProto], onnx.ModelProto]
    cost_by_layers: bool  # the proposal counts float layers (npu) rather than their share of the compute (cpu)
    doc: str
    fallback: str = "float32"  # the precision the proposal gives a layer it takes out of int8 (--fallback's default)
    rungs: tuple[str, ...] = ()  # cheaper precisions the proposal tries first, without --fallback (SPEC 6: int16 on npu)


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", CPU_PLACEMENT, as_deployed, False,
                  "ONNX Runtime's CPU provider: Q/DQ around Conv/Gemm/MatMul, float where int8 is slower"),
    "npu": Target("npu", NPU_PLACEMENT, as_deployed, True,
                  "an integer-only accelerator (RKNN, QNN HTP, Ethos-U): every activation between operators in int8", "float16",
                  ("int16",)),
}
"""The targets, by the name `settings: target:` takes. The npu's simulation is the exact-int8 QDQ model
(`deployed.as_deployed`; int8 products exact, see `kernels.py`), as for the cpu."""


def get(name: str, where: str = "settings") -> Target:
    """The target called `name`; an unknown name raises ConfigError listing the valid ones."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{where}: target {name!r} is not valid.{did_you_mean(str(name), TARGETS)} Use one of: {', '.join(TARGETS)}."
        ) from None


def shared_params(groups: list[list[str]], params: dict[str, QParams], degenerate: frozenset[str] = frozenset(),
                  edited: frozenset[str] = frozenset()) -> dict[str, QParams]:
    """`params` with every tensor of a group given parameters that cover the union of the members' ranges.

    A Concat's output range is the union of its inputs' (a reshape's is its input's), so sharing clips nothing.
    The member whose range already covers the others' lends its parameters (the Concat's output, usually);
    otherwise they are computed for the union. Members in `degenerate` (all-zero tensors: their scale 1.0 is
    a placeholder, not a range) are given the group's parameters and do not widen them: zero is exact in any.
    Where the cfg edits members' ranges (`edited`), those alone decide: the edit wins over the statistics.
    Without groups, `params` itself is returned.
    """
    if not groups:
        return params
    out = dict(params)
    for group in groups:
        members = [t for t in group if t in params]
        if len(members) < 2:
            continue
        live = [t for t in members if t in edited] or [t for t in members if t not in degenerate] or members
        if any(params[t].scale.size != 1 for t in live):  # per-channel activations: the widest step, as the hardware would
            chosen = params[max(live, key=lambda t: float(np.max(params[t].scale)))]
        else:
            chosen = _covering(live, params)
        for t in members:
            out[t] = chosen
    return out


def shared_edit_messages(
    groups: list[list[str]], before: dict[str, QParams], after: dict[str, QParams], edited: frozenset[str], where: str,
    listed: dict[str, QParams] | None = None,
) -> tuple[list[str], list[str]]:
    """What step2 says of cfg edits to tensors that share one scale (:func:`shared_params`): a note per group where one
    member's edit carries the others, a warning where members were edited to different ranges (their union is used).

    `before` holds each member's parameters with its edit, `listed` (default `before`) what its cfg entry gave before the
    edit; both messages name every member's range as listed and as built, and which bound moved."""
    listed = {**before, **(listed or {})}
    notes, warnings = [], []
    for group in groups:
        mine = [t for t in group if t in edited and t in before]
        if not mine or len(group) < 2:
            continue
        used = _shown(after[mine[0]]) if after[mine[0]].scale.size == 1 else "the widest step"
        moves = _moves([t for t in group if t in listed and t in after], listed, after)
        others = [t for t in group if t not in edited]
        if len(mine) > 1 and len({tuple(np.ravel(before[t].scale)) + tuple(np.ravel(before[t].zero_point)) for t in mine}) > 1:
            ranges = ", ".join(f"{t!r} {_shown(before[t])}" for t in mine)
            warnings.append(f"{where}: {ranges} are edited to different ranges, but they share one scale on this target (data "
                            f"movement, MaxPool/Resize and Concat pass it through): all {len(group)} tensors of the group use {used}, "
                            f"which covers every edit; as listed -> as built: {moves}. Give them the same min/max to choose the "
                            "range yourself.")
        elif others:
            notes.append(f"{where}: {', '.join(repr(t) for t in mine)} edited: the tensors that share its parameters on this "
                         f"target (one scale through data movement, MaxPool/Resize and Concat: {', '.join(repr(t) for t in others)}) "
                         f"take the edited range {used}; as listed -> as built: {moves}")
    return notes, warnings


def _shown(qp: QParams) -> str:
    """A per-tensor QParams' represented range as step2's messages print it ('(per channel)' for per-channel ones)."""
    if qp.scale.size != 1:
        return "(per channel)"
    lo, hi = represented(qp)
    return f"[{lo:.6g}, {hi:.6g}]"


def _moves(members: list[str], listed: dict[str, QParams], after: dict[str, QParams]) -> str:
    """Each member's range before -> after, and which bound moved by more than a step (members alike are listed together)."""
    rows: dict[str, list[str]] = {}
    for t in members:
        a, b = listed[t], after[t]
        what = ""
        if a.scale.size == 1 and b.scale.size == 1:
            step = max(float(np.ravel(a.scale)[0]), float(np.ravel(b.scale)[0]))
            moved = [k for k, x, y in zip(("min", "max"), represented(a), represented(b)) if abs(x - y) > step]
            what = f" ({' and '.join(moved)} moved)" if moved else " (unchanged)"
        rows.setdefault(f"{_shown(a)} -> {_shown(b)}{what}", []).append(repr(t))
    return ", ".join(f"{', '.join(names)} {row}" for row, names in rows.items())


def degenerate(params: dict[str, QParams], observers: dict[str, HistogramObserver]) -> frozenset[str]:
    """Tensors whose parameters are the all-zero placeholder (scale 1.0) because calibration saw a single value."""
    return frozenset(t for t, qp in params.items()
                     if qp.scale.size == 1 and float(qp.scale.reshape(-1)[0]) == 1.0
                     and (t not in observers or observers[t].count == 0 or observers[t].max == observers[t].min))


def represented(qp: QParams) -> tuple[float, float]:
    """The real range a per-tensor QParams maps onto its integer range."""
    info = np.iinfo(NUMPY[qp.dtype])
    s, z = float(qp.scale.reshape(-1)[0]), float(qp.zero_point.reshape(-1)[0])
    return (int(info.min) - z) * s, (int(info.max) - z) * s


def _covering(live: list[str], params: dict[str, QParams]) -> QParams:
    """The parameters of the member whose range holds every other member's, else ones computed for the union."""
    spans = {t: represented(params[t]) for t in live}
    lo, hi = min(s[0] for s in spans.values()), max(s[1] for s in spans.values())
    for t in sorted(live, key=lambda t: spans[t][1] - spans[t][0], reverse=True):
        if spans[t][0] <= lo and spans[t][1] >= hi:
            return params[t]
    widest = params[max(live, key=lambda t: spans[t][1] - spans[t][0])]
    # signed members all at zero point 0 are symmetric (int8 activations); otherwise the union is mapped asymmetrically
    symmetric = np.iinfo(NUMPY[widest.dtype]).min < 0 and all(int(params[t].zero_point.reshape(-1)[0]) == 0 for t in live)
    return compute_qparams(lo, hi, widest.dtype, symmetric)


def check_target_change(
    temp: onnx.ModelProto, settings: Settings, written_settings: dict, observers: dict[str, HistogramObserver],
    layers: dict[str, str], where: str,
) -> None:
    """Refuse a cfg whose target differs from step1's when step1 did not observe what the new target quantizes.

    A change is honoured when every tensor the new target's plan quantizes was observed on every
    calibration sample, with a histogram (from `npu` to `cpu` usually; from `cpu` to `npu` never, as
    step1 for `cpu` observes the other tensors for min/max on the first batches only).
    """
    old = written_settings.get("target", "cpu")
    if settings.target == old:
        return
    plan = make_plan(temp, settings, layer_precision=layers, placement=get(settings.target, where).placement)
    # a tensor without a histogram was observed for min/max on the first batches only (calibration.observe)
    missing = [t for t in plan.tensors if t not in observers or observers[t].count == 0 or not observers[t].bins]
    if missing:
        shown = ", ".join(f"'{t}'" for t in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ConfigError(
            f"{where}: settings target is '{settings.target}' but step1 calibrated this model for '{old}': "
            f"{len(missing)} tensor(s) the {settings.target} target quantizes have no usable statistics ({shown}). "
            f"Run step1 again with --target {settings.target}, or set target back to {old}."
        )


def floored(observers: dict[str, HistogramObserver], floors: dict[str, tuple[float, float]]) -> dict[str, HistogramObserver]:
    """`observers` with each clamped tensor's statistics limited to its [lo, hi] (copies; the mass beyond moved onto the bound).

    Every range algorithm then sees the values the reader distinguishes (HardSwish maps all x < -3 to 0,
    HardSigmoid saturates on both sides). Without clamps that cut a range, `observers` itself is returned.
    """
    hit = {t: (max(lo, observers[t].min), min(hi, observers[t].max)) for t, (lo, hi) in floors.items()
           if t in observers and observers[t].count and observers[t].min < hi and lo < observers[t].max
           and (observers[t].min < lo or hi < observers[t].max)}
    if not hit:
        return observers
    out = dict(observers)
    for t, (lo, hi) in hit.items():
        obs = observers[t]
        new = replace(obs, min=lo, max=hi, counts=obs.counts.copy())
        if obs.bins and len(new.counts):
            last = len(new.counts) - 1
            k_lo = min(max(int(np.floor(lo / obs.width)) - obs.start, 0), last)
            k_hi = min(max(int(np.floor(hi / obs.width)) - obs.start, 0), last)
            new.counts[k_lo] += new.counts[:k_lo].sum()
            new.counts[:k_lo] = 0
            new.counts[k_hi] += new.counts[k_hi + 1:].sum()
            new.counts[k_hi + 1:] = 0
        out[t] = new
    return out
