"""Op patterns an NPU compiler fuses into one integer layer, found in a model's main graph.

Exporters write LayerNorm, HardSwish, Swish and Gelu as chains of elementwise ops. An
integer-only accelerator's compiler (RKNN's, QNN's, TFLite's converter) matches them and runs
each as one layer: int8 in, int8 out, the intermediates never leave the unit. The `npu` target
therefore puts no Q/DQ on a pattern's inner tensors. Each matcher returns those inner tensors
(`conv_affine`: a Conv's per-channel Mul/Add tail, folded into its weights and bias). Also here:
`saturation_ranges`, the tensors whose readers saturate outside an interval, which an NPU
calibrates to that interval; and `pattern_outputs`, each activation pattern by the tensor it
computes, which analyze lists as one layer.
"""

from __future__ import annotations

import weakref
from typing import Callable

import onnx

from ._onnx import outer_reads, scalar_value
from .graph import channel_constant
from .plan import GraphView


def _const(g: GraphView, name: str) -> float | None:
    """The value of a scalar (or one-element) initializer, else None."""
    return scalar_value(name, g.inits, None)


def _sole(g: GraphView, tensor: str) -> onnx.NodeProto | None:
    """The one node reading `tensor`, when exactly one does and it is not a graph output."""
    users = g.consumer_nodes(tensor)
    return users[0] if len(users) == 1 and tensor not in g.outputs else None


def _other(node: onnx.NodeProto, name: str) -> str:
    """The input of a two-input node that is not `name`."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _prod(g: GraphView, tensor: str, op: str) -> onnx.NodeProto | None:
    p = g.producer_node(tensor)
    return p if p is not None and p.op_type == op else None


def _closed(g: GraphView, inner: list[str], end: str, outer: set[str]) -> bool:
    """Is each of `inner` read only by the nodes writing `inner` or `end`, and none a graph output or read by a subgraph
    (`outer`)? Only then is the match one layer: a tensor read outside keeps its own value, quantized on an NPU."""
    members = {g.producer[t] for t in inner + [end] if t in g.producer}
    return all(t not in g.outputs and t not in outer and set(g.consumers.get(t, ())) <= members for t in inner)


def _subgraph_reads(g: GraphView) -> set[str]:
    """Main-graph tensors an If/Loop/Scan body reads (found once per view: every matcher asks)."""
    if g not in _OUTER:
        _OUTER[g] = {r for n in g.nodes for r in outer_reads(n)}
    return _OUTER[g]


_OUTER: weakref.WeakKeyDictionary[GraphView, set[str]] = weakref.WeakKeyDictionary()


def layer_norm(g: GraphView) -> set[str]:
    """ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div [-> Mul(gamma) -> Add(beta)]: all but the last output."""
    inner: set[str] = set()
    outer = _subgraph_reads(g)
    for sqrt in (n for n in g.model.graph.node if n.op_type == "Sqrt"):
        add = _prod(g, sqrt.input[0], "Add")
        v = next((i for i in add.input if i not in g.inits), "") if add is not None else ""
        var = _prod(g, v, "ReduceMean") if v and _other(add, v) in g.inits else None
        sq = _prod(g, var.input[0], "Pow") if var is not None else None
        sub = _prod(g, sq.input[0], "Sub") if sq is not None and _const(g, sq.input[1]) == 2.0 else None
        mean = _prod(g, sub.input[1], "ReduceMean") if sub is not None else None
        div = _sole(g, sqrt.output[0])
        if mean is None or div is None or div.op_type != "Div" or div.input[0] != sub.output[0] or mean.input[0] != sub.input[0]:
            continue
        chain = [mean, sub, sq, var, add, sqrt]
        last = div
        for op in ("Mul", "Add"):  # the affine part, when it follows with constant operands
            nxt = _sole(g, last.output[0])
            if nxt is None or nxt.op_type != op or _other(nxt, last.output[0]) not in g.inits:
                break
            chain.append(last)
            last = nxt
        if _closed(g, [n.output[0] for n in chain], last.output[0], outer):
            inner.update(n.output[0] for n in chain)
    return inner


def hard_swish(g: GraphView) -> set[str]:
    """x * HardSigmoid(x), and x * Clip(x + 3, 0, 6) / 6 in either order: the inner tensors."""
    inner = _self_gated(g, "HardSigmoid")
    outer = _subgraph_reads(g)
    for node in g.model.graph.node:
        if node.op_type == "Clip" and len(node.input) == 3 and (_const(g, node.input[1]), _const(g, node.input[2])) == (0.0, 6.0):
            add = _prod(g, node.input[0], "Add")
            x = next((i for i in add.input if i not in g.inits), None) if add is not None else None
            if x is None or _const(g, _other(add, x)) != 3.0:
                continue
            first = _sole(g, node.output[0])
            second = _sole(g, first.output[0]) if first is not None else None
            if first is None or second is None:
                continue
            ops = {first.op_type, second.op_type}
            tensors = [add.output[0], node.output[0], first.output[0]]
            if ops <= {"Mul", "Div"} and x in (_other(first, node.output[0]), _other(second, first.output[0])) and \
                    _closed(g, tensors, second.output[0], outer):
                inner.update(tensors)
    return inner


def swish(g: GraphView) -> set[str]:
    """x * Sigmoid(x): the sigmoid's output."""
    return _self_gated(g, "Sigmoid")


def _self_gated(g: GraphView, gate: str) -> set[str]:
    """Outputs of `gate` nodes whose sole reader is a Mul by the gate's own input (x * gate(x))."""
    inner: set[str] = set()
    outer = _subgraph_reads(g)
    for node in g.model.graph.node:
        if node.op_type == gate:
            mul = _sole(g, node.output[0])
            if mul is not None and mul.op_type == "Mul" and _other(mul, node.output[0]) == node.input[0] and node.output[0] not in outer:
                inner.add(node.output[0])
    return inner


def gelu(g: GraphView) -> set[str]:
    """x * 0.5 * (1 + Erf(x / sqrt 2)) in the orders exporters write: every tensor but x and the result."""
    inner: set[str] = set()
    outer = _subgraph_reads(g)
    for erf in (n for n in g.model.graph.node if n.op_type == "Erf"):
        scale = g.producer_node(erf.input[0])
        add = _sole(g, erf.output[0])
        if scale is None or scale.op_type not in ("Div", "Mul") or add is None or add.op_type != "Add":
            continue
        x = scale.input[0]
        mul = _sole(g, add.output[0])
        if mul is None or mul.op_type != "Mul":
            continue
        partner = _other(mul, add.output[0])
        half = g.producer_node(partner)
        tensors = [scale.output[0], erf.output[0], add.output[0]]
        if partner == x:  # (x * (1 + erf)) * 0.5
            tail = _sole(g, mul.output[0])
            if tail is None or tail.op_type != "Mul" or _const(g, _other(tail, mul.output[0])) != 0.5:
                continue
            tensors.append(mul.output[0])
            end = tail.output[0]
        elif half is not None and half.op_type == "Mul" and x in half.input and _const(g, _other(half, x)) == 0.5:
            tensors.append(partner)
            end = mul.output[0]
        else:
            continue
        if _closed(g, tensors, end, outer):
            inner.update(tensors)
    return inner


def _per_channel_const(g: GraphView, name: str, channels: int, rank: int) -> bool:
    """Is `name` an initializer broadcasting one value, or one per channel, over a Conv output of `rank` dims
    (:func:`hybridq.graph.channel_constant`, the rule step1's fold follows)?"""
    return channel_constant(g.inits.get(name), channels, rank) is not None


def conv_affine(g: GraphView) -> set[str]:
    """Conv followed by Mul / Add with per-channel constants (a BatchNorm or a learnable affine left unfolded): the
    tensors between, as an NPU compiler folds the constants into the Conv's weights and bias (RKNN's det cfg names
    'p2o.Add.19', the Add after Conv -> Mul -> Add, and no tensor in between)."""
    inner: set[str] = set()
    outer = _subgraph_reads(g)
    for conv in (n for n in g.model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in g.inits):
        w = g.inits[conv.input[1]]
        channels, rank, last = int(w.dims[0]), len(w.dims), conv.output[0]
        nxt = _sole(g, last)
        while nxt is not None and nxt.op_type in ("Mul", "Add") and last in nxt.input and last not in outer and \
                _per_channel_const(g, _other(nxt, last), channels, rank):
            inner.add(last)
            last = nxt.output[0]
            nxt = _sole(g, last)
    return inner


HARD_SWISH_FLOOR = -3.0
"""HardSwish is 0 below -3: a tensor only HardSwish reads needs no codes below it (RKNN's cfg clamps its min so)."""

SIGMOID_BOUND = 7.0
"""Beyond +-7 a Sigmoid is within 1e-3 of 0 or 1, under half a step of an 8-bit [0, 1] output (RKNN's cfg clamps
a Sigmoid's input to [-7, 7]: PP-OCR det's p2o.Add.281, observed [-155, 113])."""

INF = float("inf")


def hard_swish_floors(g: GraphView) -> dict[str, float]:
    """Tensors read only by HardSwish patterns (x of x * HardSigmoid(x), or x * Clip(x + 3, 0, 6) / 6): their range floor."""
    inner = hard_swish(g)
    floors: dict[str, float] = {}
    for t in {i for n in g.model.graph.node for i in n.input}:
        users = g.consumer_nodes(t)
        if len(users) != 2 or t in g.outputs:
            continue
        gate = next((u for u in users if u.output[0] in inner and u.op_type in ("HardSigmoid", "Add")), None)
        mul = next((u for u in users if u.op_type == "Mul"), None)
        if gate is not None and mul is not None and any(i in inner for i in mul.input):
            floor = _gate_floor(gate)
            if floor is not None:
                floors[t] = floor
    return floors


def _gate_floor(gate: onnx.NodeProto) -> float | None:
    """Below what x a HardSwish gate is 0: -3 for Clip(x + 3, 0, 6); -beta/alpha for HardSigmoid (its attributes,
    ONNX's defaults 0.2 and 0.5 otherwise), at most 0; None when alpha <= 0 (no such point)."""
    if gate.op_type != "HardSigmoid":
        return HARD_SWISH_FLOOR
    alpha, beta = _attr(gate, "alpha", 0.2), _attr(gate, "beta", 0.5)
    return min(-beta / alpha, 0.0) if alpha > 0 else None


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((float(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _clip_bounds(node: onnx.NodeProto, g: GraphView) -> tuple[float, float] | None:
    """A Clip's [min, max] (opset 11+ inputs or opset 6 attributes); None when a bound is not a constant."""
    bounds = []
    for k, attr, default in ((1, "min", -INF), (2, "max", INF)):
        if len(node.input) > k and node.input[k]:
            v = _const(g, node.input[k])
            if v is None:
                return None
            bounds.append(v)
        else:
            bounds.append(_attr(node, attr, default))
    return bounds[0], bounds[1]


def reader_interval(node: onnx.NodeProto, g: GraphView, eight_bit: bool = True) -> tuple[float, float] | None:
    """The input interval outside which `node`'s output no longer changes (its saturation points), or None.

    Relu: [0, inf); Clip: its bounds; HardSigmoid(alpha, beta): [-beta/alpha, (1-beta)/alpha]; HardSwish:
    [-3, inf); Sigmoid: [-7, 7] for an 8-bit tensor (not at int16, whose finer steps still see the tail).
    """
    op = node.op_type
    if op == "Relu":
        return 0.0, INF
    if op == "Clip":
        return _clip_bounds(node, g)
    if op == "HardSigmoid":
        alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
        return (-beta / alpha, (1.0 - beta) / alpha) if alpha > 0 else None
    if op == "HardSwish":
        return HARD_SWISH_FLOOR, INF
    if op == "Sigmoid" and eight_bit:
        return -SIGMOID_BOUND, SIGMOID_BOUND
    return None


def saturation_ranges(g: GraphView, dtypes: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Planned tensors (name -> dtype) whose readers all saturate outside an interval: the interval (union over readers).

    An integer NPU spends no codes on values its reader maps to one output: RKNN's cfgs clamp these ranges
    (PP-OCR det: Conv outputs read by HardSigmoid to [-3, 3] / [-2.5, 2.5], a BatchNormalization output read by
    Relu to [0, max], HardSwish inputs to [-3, max], the Sigmoid's input to [-7, 7]). HardSwish patterns
    (x * HardSigmoid(x), x * Clip(x + 3, 0, 6) / 6) floor x at -3, the rest of x's range is kept.
    """
    out = {t: (lo, INF) for t, lo in hard_swish_floors(g).items() if t in dtypes}
    for t, dtype in dtypes.items():
        users = g.consumer_nodes(t)
        if t in out or t in g.outputs or not users:
            continue
        spans = [reader_interval(u, g, dtype != "int16") for u in users if u.input[0] == t]
        if len(spans) == len(users) and all(spans):
            out[t] = (min(lo for lo, _ in spans), max(hi for _, hi in spans))
    return out


ACTIVATIONS = {"hard_swish": "HardSwish", "swish": "Swish", "gelu": "GELU", "layer_norm": "LayerNorm"}
"""The patterns that stand for one activation or normalisation layer (by PATTERNS key: its name as a layer)."""


def pattern_outputs(g: GraphView, names: dict[str, str] = ACTIVATIONS) -> dict[str, tuple[str, list[onnx.NodeProto]]]:
    """Each match of the `names` patterns by the tensor it computes: (the pattern's name as a layer, the nodes inside
    it, in graph order). A pattern's inner tensors are read inside it only; the node reading one and writing a tensor
    outside ends the match."""
    out: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
    order = {id(n): k for k, n in enumerate(g.model.graph.node)}
    for key, label in names.items():
        inner = PATTERNS[key](g)
        for node in g.model.graph.node:
            if len(node.output) != 1 or node.output[0] in inner or not any(i in inner for i in node.input):
                continue
            group, todo = {}, [i for i in node.input if i in inner]
            while todo:
                p = g.producer_node(todo.pop())
                if p is not None and id(p) not in group:
                    group[id(p)] = p
                    todo += [i for i in p.input if i in inner]
            out.setdefault(node.output[0], (label, sorted(group.values(), key=lambda n: order[id(n)])))
    return out


PATTERNS: dict[str, Callable[[GraphView], set[str]]] = {
    "layer_norm": layer_norm,
    "hard_swish": hard_swish,
    "swish": swish,
    "gelu": gelu,
    "conv_affine": conv_affine,
}
"""The fused patterns, by name; each returns the tensors inside its matches."""


def inner_tensors(g: GraphView) -> set[str]:
    """Every tensor inside a fused pattern of `g` (no Q/DQ on an NPU)."""
    out: set[str] = set()
    for match in PATTERNS.values():
        out |= match(g)
    return out

