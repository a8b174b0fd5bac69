"""Decide what to quantize: each layer's precision, which tensors get Q/DQ, which weights and biases.

The plan is plain data with no numbers: step1 writes its tensors into the cfg,
step2 fills in parameters and applies it. Placement follows what ONNX Runtime's
CPU provider fuses into integer kernels (see the op table below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from . import recurrent
from .cost import concrete_shapes, layer_macs, nominal_sample
from ._onnx import GraphIndex
from .graph import tensor_types
from .placement import CostTable, Layer, choose_int8, predicted_ms
from .float_reasons import WEIGHTED_OPS, no_form_note, no_quantized_form, nothing_quantized, policy_note
from .settings import Settings

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class Slots:
    """Which inputs of a node are activations to quantize, which is a weight (and its channel axis), which a bias."""

    activations: tuple[int, ...]
    weight: tuple[int, int | None] | None = None  # (input, channel axis; None: per tensor only)
    bias: int | None = None
    quantize_output: bool = True
    all_outputs: bool = False  # every float output gets Q/DQ (Split), not only the first


class GraphView(GraphIndex):
    """A model's main graph for planning: the graph index plus initializers, element types and outputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        super().__init__(g)
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.types = tensor_types(self.model)
        self.outputs = {o.name for o in g.output}

    def is_float_activation(self, name: str) -> bool:
        return bool(name) and name not in self.inits and self.types.get(name) == FLOAT

    def init_array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])


def _conv(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    if len(node.input) < 2 or node.input[1] not in g.inits:
        return None
    bias = 2 if len(node.input) > 2 and node.input[2] in g.inits else None
    return Slots((0,), (1, 0), bias)


def _conv_transpose(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    # Weights are [Cin, Cout / group, kH, kW]: output channels run along axis 1, and only
    # with group == 1 does a per-axis-1 scale line up with the bias (int32 scale s_x * s_w[c]): grouped, per tensor.
    if len(node.input) < 2 or node.input[1] not in g.inits:
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    bias = 2 if len(node.input) > 2 and node.input[2] in g.inits else None
    return Slots((0,), (1, 1 if group == 1 else None), bias)


def _gemm(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        return None
    if node.input[1] in g.inits:
        n_out = g.inits[node.input[1]].dims[0 if attrs.get("transB", 0) else 1]
        bias = None
        if len(node.input) > 2 and node.input[2] in g.inits and list(g.inits[node.input[2]].dims) == [n_out]:
            if attrs.get("beta", 1.0) == 1.0 and attrs.get("alpha", 1.0) == 1.0:
                bias = 2
        return Slots((0,), (1, 0 if attrs.get("transB", 0) else 1), bias)
    acts = tuple(i for i in (0, 1) if g.is_float_activation(node.input[i]))  # A may be a constant with B computed
    return Slots(acts) if acts else None


def _matmul(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    a, b = node.input[0], node.input[1]
    if b in g.inits and len(g.inits[b].dims) == 2 and g.is_float_activation(a):
        return Slots((0,), (1, 1), quantize_output=False)
    if g.is_float_activation(a) and g.is_float_activation(b):
        return Slots((0, 1), quantize_output=False)
    return None


def _all_float_inputs(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    acts = tuple(i for i, t in enumerate(node.input) if g.is_float_activation(t))
    return Slots(acts) if acts else None


def _first_input(node: onnx.NodeProto, g: GraphView) -> Slots | None:
    return Slots((0,)) if g.is_float_activation(node.input[0]) else None


# Op types that can run quantized, and where their Q/DQ go. Conv, Gemm and MatMul
# are quantized by default (Settings.quantize_ops); the others when a user or a
# setting asks, since ORT's QLinear elementwise kernels are slower than fp32.
QUANTIZABLE: dict[str, Callable[[onnx.NodeProto, GraphView], Slots | None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _all_float_inputs,
    "Mul": _all_float_inputs,
    "Concat": _all_float_inputs,
    "AveragePool": _first_input,
    "GlobalAveragePool": _first_input,
    "MaxPool": _first_input,
    "Sigmoid": _first_input,
    "Softmax": _first_input,
    "LeakyRelu": _first_input,
    "Resize": _first_input,
    "Relu": _first_input,
    "Clip": _first_input,
}

# Activations ORT folds into the preceding Q (ReluQuantFusion / ClipQuantFusion).
ABSORBED_ACTIVATIONS = ("Relu", "Clip")

Handler = Callable[[onnx.NodeProto, GraphView], "Slots | None"]


@dataclass(frozen=True)
class Placement:
    """Where a target puts Q/DQ, as data for `make_plan` (the entries live in `targets.py`).

    `quantizable` is the op table; `default_ops` the ops quantized by default (None: Settings.quantize_ops);
    `cpu_policy` keeps the CPU-speed float policies; `fuse_activations` folds a Relu/Clip into the
    layer before it (no Q/DQ between them); `float_reads_quantized` makes float layers read the
    quantized view of their inputs (as a fallback layer on an integer accelerator does); `passthrough`
    ops and Concat (`share_concat`) give their outputs and inputs one set of parameters; tensors inside
    `fused_patterns` (LayerNorm, HardSwish, ... written as elementwise chains) get no Q/DQ.
    """

    quantizable: Mapping[str, Handler]
    default_ops: tuple[str, ...] | None = None
    cpu_policy: bool = True
    fuse_activations: bool = False
    float_reads_quantized: bool = False
    passthrough: tuple[str, ...] = ()
    share_concat: bool = False
    fused_patterns: Callable[[GraphView], set[str]] | None = None  # tensors inside patterns the target runs as one layer
    range_floors: Callable[[GraphView, dict[str, str]], dict[str, tuple[float, float]]] | None = None  # planned tensor -> dtype in; tensors whose readers saturate outside an interval out


CPU_PLACEMENT = Placement(QUANTIZABLE)
"""Today's placement: ONNX Runtime's CPU provider (the `cpu` target)."""

LAYER_PRECISIONS = ("uint8", "int8", "int16", "float16", "float32", "int4")
WEIGHT_ONLY = ("int4",)
WEIGHT_ONLY_ALIASES = {"int4": "int4", "w4a16": "int4", "w4a32": "int4"}
"""Layer precisions built after the QDQ rewrite, weights only (:mod:`hybridq.int4`): the plan gives them no Q/DQ."""


@dataclass
class LayerPlan:
    """One node's precision and why: `default`, a policy name, or `cfg`."""

    node: str
    op: str
    precision: str
    reason: str


@dataclass
class TensorPlan:
    """An activation tensor that gets a Q/DQ pair, and which consumers read the dequantized copy."""

    tensor: str
    dtype: str
    symmetric: bool
    readers: list[str]
    producer: str
    layer_output: bool


@dataclass
class WeightPlan:
    """A weight initializer stored quantized, per channel along `axis` or per tensor (axis None)."""

    tensor: str
    node: str
    dtype: str
    axis: int | None


@dataclass
class BiasPlan:
    """A bias stored as int32 with scale = input scale x weight scale."""

    tensor: str
    node: str
    activation: str
    weight: str


@dataclass
class QuantPlan:
    """Everything step2 will do to the temp model, as data."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    biases: dict[str, BiasPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shared: list[list[str]] = field(default_factory=list)  # tensors that take one set of parameters (the widest)
    floors: dict[str, tuple[float, float]] = field(default_factory=dict)  # calibrated range clamped to [lo, hi] (values beyond, the readers map to one output)
    float_reads_quantized: bool = False  # the placement's: float layers read quantized tensors and stay float (an NPU)

    def precision_counts(self) -> dict[str, int]:
        """Number of layers per effective precision (int8 and uint8 counted as their dtype)."""
        counts: dict[str, int] = {}
        for lp in self.layers.values():
            counts[lp.precision] = counts.get(lp.precision, 0) + 1
        return counts


def _is_depthwise(node: onnx.NodeProto, g: GraphView) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    w = g.inits.get(node.input[1])
    return group > 1 and w is not None and w.dims[1] == 1 and group == w.dims[0]


def _in_channels(node: onnx.NodeProto, g: GraphView) -> int:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return int(g.inits[node.input[1]].dims[1]) * group


DEPTHWISE_SHARE = 0.15
"""float_depthwise: auto keeps depthwise Convs float from this share of the model's MACs. ORT's int8
depthwise runs 0.3-0.6x fp32 speed on x86: PP-OCR cls (depthwise 30 %) gets slower in int8, rec (7 %)
and det (4 %) do not."""


def depthwise_share(model: onnx.ModelProto, g: GraphView | None = None) -> float:
    """Fraction of the Conv/Gemm/MatMul multiply-accumulates in depthwise Convs (nominal shapes when dynamic)."""
    g = g or GraphView(model)
    if not any(n.op_type == "Conv" and n.input[1:2] and n.input[1] in g.inits and _is_depthwise(n, g) for n in model.graph.node):
        return 0.0
    macs = layer_macs(concrete_shapes(model, nominal_sample(model)))
    total = sum(macs.values())
    dw = sum(v for n, v in macs.items() if n in g.by_name and g.by_name[n].op_type == "Conv" and _is_depthwise(g.by_name[n], g))
    return dw / total if total else 0.0


POOLING = ("GlobalAveragePool", "GlobalMaxPool")


def pooled_tensors(g: GraphView) -> set[str]:
    """Tensors with 1x1 spatial extent: outputs of global pooling and of ops that read only such tensors (SE blocks)."""
    pooled: set[str] = set()
    for node in g.model.graph.node:
        acts = [i for i in node.input if g.is_float_activation(i)]
        if node.op_type in POOLING or (acts and all(i in pooled for i in acts) and node.op_type not in ("Reshape", "Flatten", "Expand", "Tile", "Resize")):
            pooled.update(node.output)
    return pooled


SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _feeds_split(tensor: str, g: GraphView, depth: int = 4) -> bool:
    """Is the tensor (possibly through reshapes) cut into channel groups by Split or Slice?"""
    return any(c.op_type in ("Split", "Slice") or depth and c.op_type in SHAPE_OPS and _feeds_split(c.output[0], g, depth - 1)
               for c in g.consumer_nodes(tensor))


def _reaches_output(tensor: str, g: GraphView, depth: int = 4) -> bool:
    """Is the tensor a graph output, directly or through reshapes and Concat (a head exported as Conv -> Reshape -> output)?"""
    return tensor in g.outputs or depth > 0 and any(
        c.op_type in (*SHAPE_OPS, "Concat") and _reaches_output(c.output[0], g, depth - 1) for c in g.consumer_nodes(tensor))


def _policy(
    node: onnx.NodeProto, g: GraphView, settings: Settings, pooled: set[str] = frozenset(), dw_share: float = 0.0
) -> str | None:
    """Why a quantizable node stays float by default, or None."""
    if node.op_type == "ConvTranspose":
        return "ConvTranspose has no int8 kernel in ONNX Runtime CPU"
    if node.op_type == "Conv" and settings.float_stem and _in_channels(node, g) <= 4:
        return "stem Conv with <= 4 input channels (int8 is slower there)"
    if node.op_type == "Conv" and _is_depthwise(node, g):
        if settings.float_depthwise is True:
            return "depthwise Conv (int8 depthwise is slower than fp32 on x86)"
        if settings.float_depthwise == "auto" and dw_share >= DEPTHWISE_SHARE:
            return (
                f"depthwise Conv: depthwise Convs are {dw_share:.0%} of this model's compute, and int8 depthwise "
                "is slower than fp32 on x86 (float_depthwise: auto)"
            )
    if node.op_type == "Conv" and _reaches_output(node.output[0], g):
        return "Conv producing a graph output stays float"
    if node.op_type == "Conv" and _feeds_split(node.output[0], g):
        return "detection-head Conv: its output is split into channels of different ranges (boxes, scores)"
    if node.op_type == "Conv" and settings.float_pooled and node.input[0] in pooled:
        return "Conv on a 1x1 pooled tensor (SE block): too little compute for int8 to pay for its Q/DQ"
    return None


def _absorbed_output(node: onnx.NodeProto, g: GraphView) -> str:
    """The tensor whose Q ends this layer: after a sole following Relu/Clip that ORT folds into the Q."""
    out = node.output[0]
    users = g.consumer_nodes(out)
    if out not in g.outputs and len(users) == 1 and users[0].op_type in ABSORBED_ACTIVATIONS:
        nxt = users[0]
        if nxt.op_type == "Relu" or _clip_min_is_zero(nxt, g):
            return nxt.output[0]
    return out


def absorbed_output(node: onnx.NodeProto, g: GraphView) -> str:
    """The tensor whose Q ends this layer (its output, or that of a sole following Relu/Clip ORT folds into the Q)."""
    return _absorbed_output(node, g)


def _clip_min_is_zero(node: onnx.NodeProto, g: GraphView) -> bool:
    if len(node.input) > 1 and node.input[1] in g.inits:
        return float(g.init_array(node.input[1])) == 0.0
    return any(a.name == "min" and a.f == 0.0 for a in node.attribute)


def _choose_layers(
    model: onnx.ModelProto, g: GraphView, settings: Settings, layer_precision: dict[str, str], plan: QuantPlan,
    placement: Placement = CPU_PLACEMENT,
    costs: CostTable | None = None,
) -> dict[str, Slots]:
    """Each node's precision into ``plan.layers`` (the cfg's choice, else the policy, else the cost model); the quantized nodes' slots."""
    quantized: dict[str, Slots] = {}
    pooled = pooled_tensors(g) if placement.cpu_policy else set()
    dw_share = depthwise_share(model, g) if settings.float_depthwise == "auto" and placement.cpu_policy and costs is None else 0.0
    default_ops = placement.default_ops if placement.default_ops is not None else settings.quantize_ops
    for node in model.graph.node:
        requested = layer_precision.get(node.name)
        recurrent_choice = recurrent.layer_choice(node, g.inits, default_ops, requested)
        if recurrent_choice is not None:  # LSTM/GRU: no Q/DQ slots, rewritten after the QDQ rewrite (recurrent.py)
            plan.layers[node.name] = LayerPlan(node.name, node.op_type, *recurrent_choice)
            continue
        handler = placement.quantizable.get(node.op_type)
        slots = handler(node, g) if handler else None
        if requested is not None:
            if requested in ("float16", "float32") + WEIGHT_ONLY:
                plan.layers[node.name] = LayerPlan(node.name, node.op_type, requested, "cfg")
            elif slots is not None:
                plan.layers[node.name] = LayerPlan(node.name, node.op_type, requested, "cfg")
                quantized[node.name] = slots
            continue
        if slots is None or node.op_type not in default_ops:
            if slots is None and node.op_type in WEIGHTED_OPS and node.op_type in default_ops and g.is_float_activation(node.output[0]):
                # SPEC 2: a layer of quantize_ops stays float, and the summary says which and why
                plan.layers[node.name] = LayerPlan(node.name, node.op_type, "float32", no_quantized_form(node, g.inits))
            continue
        reason = _policy(node, g, settings, pooled, dw_share) if placement.cpu_policy else None
        if reason:
            plan.layers[node.name] = LayerPlan(node.name, node.op_type, "float32", reason)
            continue
        plan.layers[node.name] = LayerPlan(node.name, node.op_type, "default", "default")
        quantized[node.name] = slots
    if costs is not None:
        _place_by_cost(g, settings, plan, quantized, costs)
    if not quantized and not layer_precision and not plan.notes:  # (the cost model says it when it floated them all)
        plan.notes.append(nothing_quantized(plan.layers, default_ops))
    plan.notes.extend(no_form_note(plan.layers) + (policy_note(plan.layers) if quantized else []))
    return quantized


def _place_by_cost(g: GraphView, settings: Settings, plan: QuantPlan, quantized: dict[str, Slots], costs: CostTable) -> None:
    """Keep float the default layers where int8 does not make the model faster on this CPU (the measured cost
    table), or every default layer when int8 does not pay at all; ``float_depthwise: false`` keeps depthwise Convs int8."""
    default = {n for n, lp in plan.layers.items() if lp.reason == "default" and n in quantized}
    free = {n for n in default if settings.float_depthwise == "auto" or not _is_depthwise(g.by_name[n], g)}
    layers, readers = _placement_layers(g, quantized)
    chosen = choose_int8(layers, readers, costs, set(quantized) - free)
    dropped = sorted(n for n in free if n in costs.fp32 and n in costs.int8 and n not in chosen.int8)
    whole = costs.model_fp32 > 0 and chosen.predicted_ms >= chosen.fp32_ms and bool(default)
    for n in sorted(default) if whole else dropped:
        why = ("int8 does not make this model faster on this CPU (measured cost model)" if whole else
               f"int8 is not faster here on this CPU (measured {costs.int8[n]:.3f} ms int8 vs {costs.fp32[n]:.3f} ms fp32)")
        plan.layers[n] = LayerPlan(n, g.by_name[n].op_type, "float32", why)
        del quantized[n]
    if whole:
        plan.notes.append(f"int8 is not faster than fp32 for this model on this CPU: kept {len(default)} layers float.")
    elif costs.model_fp32 > 0:
        plan.notes.append(
            f"cost model ({costs.source}): {len(dropped)} layers kept float where int8 is not faster; predicted "
            f"{chosen.predicted_ms:.2f} ms against {chosen.fp32_ms:.2f} ms in fp32.")


def _placement_layers(g: GraphView, quantized: dict[str, Slots]) -> tuple[dict[str, Layer], dict[str, list[str]]]:
    """The quantized layers as placement sees them (activations read, tensor the Q sits on), and who reads those tensors."""
    layers = {}
    for n, slots in quantized.items():
        node = g.by_name[n]
        layers[n] = Layer(tuple(node.input[i] for i in slots.activations), absorbed_output(node, g) if slots.quantize_output else None)
    readers = {t: [c.name for c in g.consumer_nodes(t)] for lay in layers.values() for t in (*lay.inputs, lay.output) if t}
    return layers, readers


def predicted_latency(model: onnx.ModelProto, plan: QuantPlan, costs: CostTable) -> float:
    """Predicted latency (ms, this CPU, 1 thread) of the model built from `plan`, by the measured cost table."""
    g = GraphView(model)
    quantized = {}
    for n, lp in plan.layers.items():
        handler = QUANTIZABLE.get(lp.op)
        slots = handler(g.by_name[n], g) if handler and n in g.by_name and lp.precision not in ("float16", "float32") else None
        if slots is not None:
            quantized[n] = slots
    layers, readers = _placement_layers(g, quantized)
    return predicted_ms(layers, readers, costs, set(layers))


def make_plan(
    model: onnx.ModelProto,
    settings: Settings,
    layer_precision: dict[str, str] | None = None,
    tensor_dtype: dict[str, str] | None = None,
    weight_method: dict[str, str] | None = None,
    placement: Placement = CPU_PLACEMENT,
    costs: CostTable | None = None,
) -> QuantPlan:
    """Plan the rewrite of `model` (the temp model) for a target's `placement`.

    `layer_precision` maps node names to a precision from the cfg's custom_quantize_layers;
    `tensor_dtype` and `weight_method` carry per-tensor dtype / qmethod edits from the cfg;
    `costs`, this CPU's measured cost table (step1's), keeps float the layers where int8 is not faster.
    """
    layer_precision = layer_precision or {}
    tensor_dtype = tensor_dtype or {}
    weight_method = weight_method or {}
    g = GraphView(model)
    plan = QuantPlan(float_reads_quantized=placement.float_reads_quantized)
    quantized = _choose_layers(model, g, settings, layer_precision, plan, placement, costs)
    fused = _fused_activations(quantized, g) if placement.fuse_activations else set()

    sym = settings.qtype == "sym"

    def want(tensor: str, precision: str, reader: str | None, producer: str, layer_output: bool) -> None:
        dtype = precision if precision in ("uint8", "int8", "int16") else tensor_dtype.get(tensor, settings.dtype)
        tp = plan.tensors.get(tensor)
        if tp is None:
            tp = plan.tensors[tensor] = TensorPlan(tensor, dtype, sym, [], producer, layer_output)
        elif dtype == "int16" or (precision != "default" and tp.dtype != "int16"):
            tp.dtype = dtype
        tp.layer_output = tp.layer_output or layer_output
        if reader and reader not in tp.readers:
            tp.readers.append(reader)

    for name, slots in quantized.items():
        node, lp = g.by_name[name], plan.layers[name]
        for i in () if name in fused else slots.activations:
            t = node.input[i]
            prod = g.producer_node(t)
            want(t, lp.precision, name, prod.name if prod else "", False)
        if slots.weight:
            idx, axis = slots.weight
            w = node.input[idx]
            wdtype = "int16" if lp.precision == "int16" else settings.weight_dtype
            method = weight_method.get(w, settings.qmethod)
            plan.weights[w] = WeightPlan(w, name, wdtype, axis if method == "channel" else None)
            if slots.bias is not None and lp.precision != "int16":
                plan.biases[node.input[slots.bias]] = BiasPlan(node.input[slots.bias], name, node.input[slots.activations[0]], w)
        if slots.quantize_output:
            outs = [o for o in node.output if o] if slots.all_outputs else [_absorbed_output(node, g)]
            for out in outs:
                # a graph output the NPU's next ops read is quantized for them (it stays float as an output); on the cpu
                # an integer kernel writes a graph output float and the readers that quantize it add its Q (cpu models unchanged)
                if (out not in g.outputs or placement.float_reads_quantized) and g.types.get(out) == FLOAT:
                    want(out, lp.precision, None, name, True)

    # A quantized layer's output is read dequantized by every consumer (the integer
    # kernel produces it quantized), except layers the cfg explicitly keeps in float.
    for tp in plan.tensors.values():
        if tp.layer_output:
            explicit_float = set() if placement.float_reads_quantized else {n for n, p in layer_precision.items() if p in ("float16", "float32")}
            tp.readers = [c.name for c in g.consumer_nodes(tp.tensor) if c.name not in explicit_float]
    # MatMul outputs get a Q only when a quantized consumer needs it (MatMulIntegerToFloat otherwise).
    inner = placement.fused_patterns(g) if placement.fused_patterns else set()
    plan.tensors = {k: v for k, v in plan.tensors.items() if v.readers and k not in inner}
    plan.shared = _shared_groups(model, plan, placement)
    if placement.range_floors:
        plan.floors = placement.range_floors(g, {t: tp.dtype for t, tp in plan.tensors.items()})
    return plan


def _fused_activations(quantized: dict[str, Slots], g: GraphView) -> set[str]:
    """Quantized Relu/Clip nodes folded into the weighted layer (Conv, Gemm, MatMul) before them: their input gets no Q/DQ."""
    fused: set[str] = set()
    for name, slots in quantized.items():
        node = g.by_name[name]
        if slots.weight is not None and slots.quantize_output:  # Conv/Gemm/MatMul + Relu/Clip: one NPU layer
            out = _absorbed_output(node, g)
            if out != node.output[0]:
                act = g.producer_node(out)
                if act is not None and act.name in quantized:
                    fused.add(act.name)
    return fused


def _attr_s(node: onnx.NodeProto, name: str) -> str:
    """A string attribute of `node`, '' when absent."""
    return next((a.s.decode() for a in node.attribute if a.name == name), "")


def _shared_groups(model: onnx.ModelProto, plan: QuantPlan, placement: Placement) -> list[list[str]]:
    """Tensors that must share parameters: a passthrough op's input and output, a Concat's output and those of its
    inputs it alone reads (not made by a passthrough op).

    An input other ops read too keeps its own parameters and is requantized into the Concat's, as RKNN does
    (no reader of it gets the Concat's coarser grid); a Concat or passthrough the cfg keeps float shares nothing.
    Union-find over the planned tensors; only tensors of one dtype are joined. Groups are in graph order.
    """
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for t in set(node.input):
            readers[t] = readers.get(t, 0) + 1
    made_by = {o: node.op_type for node in model.graph.node for o in node.output}
    outputs = {o.name for o in model.graph.output}
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    def join(names: list[str]) -> None:
        names = [n for n in names if n in plan.tensors]
        for n in names[1:]:
            if plan.tensors[n].dtype == plan.tensors[names[0]].dtype:
                parent[find(n)] = find(names[0])

    for node in model.graph.node:
        lp = plan.layers.get(node.name)
        if lp is not None and lp.precision in ("float16", "float32"):
            continue  # a float op reads dequantized inputs and has its output quantized anew: no grid to share
        if node.op_type in placement.passthrough and node.input and node.output and _attr_s(node, "mode") != "cubic":
            join([node.input[0], node.output[0]])
        elif node.op_type == "Concat" and placement.share_concat and node.output:
            join([node.output[0], *(t for t in node.input if readers.get(t) == 1 and t not in outputs
                                    and made_by.get(t) not in placement.passthrough)])
    groups: dict[str, list[str]] = {}
    for t in plan.tensors:
        groups.setdefault(find(t), []).append(t)
    return [g for g in groups.values() if len(g) > 1]


def candidate_tensors(model: onnx.ModelProto, placement: Placement = CPU_PLACEMENT) -> list[str]:
    """Float activations any plan could quantize: inputs and outputs of quantizable nodes, in graph order.

    Calibration observes only these, which keeps the per-batch copy of tensors small.
    """
    g = GraphView(model)
    wanted: set[str] = set()
    for node in model.graph.node:
        handler = placement.quantizable.get(node.op_type)
        slots = handler(node, g) if handler else None
        if slots is None:
            continue
        wanted.update(node.input[i] for i in slots.activations)
        wanted.add(_absorbed_output(node, g))
        wanted.update(o for o in node.output if g.types.get(o) == FLOAT)
    ordered = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    return [t for t in ordered if t in wanted and g.is_float_activation(t)]
