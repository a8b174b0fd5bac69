"""Bias correction: the mean output shift each quantized layer adds on its own, and the bias that cancels it.

Rounding weights and inputs moves a layer's mean output (per output channel); the
shift passes through every later layer. It is measured in isolation, as NNCF's fast
bias correction does: each quantized Conv/Gemm, and each MatMul whose bias is the Add
after it (a Linear as exporters write it: the layers of a transformer), is evaluated on the fp32 model's own
input, through the same Q/DQ parameters as in the built model, beside its fp32
original, in one combined graph (one pass per sample for all layers). Isolated
shifts do not double count: correcting one layer does not change another's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._onnx import main_opset
from .graph import tensor_shapes
from .plan import GraphView

CORRECTABLE = ("Conv", "Gemm", "MatMul")
"""Layers whose bias can move: Conv and Gemm (a bias slot, channels along axis 1), MatMul (the Add after it, channels last)."""


def correctable(node: onnx.NodeProto, g: GraphView) -> bool:
    """Can this layer's bias take a correction: a Conv, or a Gemm adding C as it is (beta 1), whose weight is its own
    and whose bias is absent or an initializer of its own; or a MatMul by a 2-D weight of its own followed by its bias Add?"""
    if node.op_type not in CORRECTABLE or len(node.input) < 2 or len(g.consumer_nodes(node.input[1])) != 1:
        return False
    if node.op_type == "MatMul":
        return linear_bias(node, g) is not None
    if node.op_type == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
        return False
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return bias is None or (bias in g.inits and len(g.consumer_nodes(bias)) == 1)


def linear_bias(node: onnx.NodeProto, g: GraphView) -> str | None:
    """The bias of a MatMul (x @ W, W a 2-D initializer [K, N]): the initializer of N values that the Add reading
    only its output adds, used nowhere else; None when the MatMul has no such Add."""
    weight = g.inits.get(node.input[1])
    readers = g.consumer_nodes(node.output[0])
    if weight is None or len(weight.dims) != 2 or len(readers) != 1 or readers[0].op_type != "Add":
        return None
    others = [x for x in readers[0].input if x != node.output[0]]
    if len(others) != 1 or others[0] not in g.inits or len(g.consumer_nodes(others[0])) != 1:
        return None
    dims = list(g.inits[others[0]].dims)
    if not dims or dims[-1] != weight.dims[1] or int(np.prod(dims)) != weight.dims[1]:
        return None
    return others[0]


def _channel_axes(rank: int) -> list[int]:
    return [a for a in range(rank) if a != 1]


def shift_model(fp32: onnx.ModelProto, qdq: onnx.ModelProto, layers: Iterable[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fp32 model plus, per layer, its quantized copy fed the fp32 input and the mean of (fp32 - quantized) per channel.

    Returns the combined model and layer -> output holding its shift (shape [channels]).
    Layers that are not quantized Conv/Gemm/MatMul in `qdq` are left out.
    """
    q = GraphView(qdq)
    f = GraphView(fp32)
    work = onnx.ModelProto()
    work.CopyFrom(fp32)
    del work.opset_import[:]
    work.opset_import.extend(qdq.opset_import)
    opset = main_opset(qdq)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    copied: set[str] = set()
    outputs: dict[str, str] = {}

    def copy_init(name: str, prefix: str) -> str:
        new = f"{prefix}{name}"
        if new not in copied:
            t = onnx.TensorProto()
            t.CopyFrom(q.inits[name])
            t.name = new
            inits.append(t)
            copied.add(new)
        return new

    shapes = tensor_shapes(fp32)
    for layer in layers:
        node = q.by_name.get(layer)
        if node is None or layer not in f.by_name or not correctable(f.by_name[layer], f):
            continue
        rank = {"Gemm": 2, "MatMul": 2}.get(node.op_type) or len(shapes.get(node.output[0]) or ())
        if rank < 2:
            continue  # unknown output rank: the channel mean cannot be taken
        prefix = f"hybridq_bc/{layer}/"
        new_inputs = _quantized_inputs(q, node, prefix, copy_init, nodes)
        if new_inputs is None:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name}"
        del copy.input[:]
        copy.input.extend(new_inputs)
        del copy.output[:]
        copy.output.append(f"{prefix}y")
        diff = f"{prefix}diff"
        nodes += [copy, helper.make_node("Sub", [node.output[0], f"{prefix}y"], [diff], name=f"{prefix}sub")]
        if node.op_type == "MatMul":  # any rank (shape inference often loses it in a transformer): rows x channels, as a Gemm
            rows = numpy_helper.from_array(np.array([-1, f.inits[f.by_name[layer].input[1]].dims[1]], np.int64), f"{prefix}rows")
            inits.append(rows)
            nodes.append(helper.make_node("Reshape", [diff, rows.name], [f"{prefix}diff2d"], name=f"{prefix}rows"))
            diff = f"{prefix}diff2d"
        axes = _channel_axes(rank)
        out = f"{prefix}shift"
        if opset >= 18:
            axes_init = numpy_helper.from_array(np.array(axes, np.int64), f"{prefix}axes")
            inits.append(axes_init)
            nodes.append(helper.make_node("ReduceMean", [diff, axes_init.name], [out], name=f"{prefix}mean", keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMean", [diff], [out], name=f"{prefix}mean", axes=axes, keepdims=0))
        outputs[layer] = out
    work.graph.node.extend(nodes)
    work.graph.initializer.extend(inits)
    del work.graph.output[:]
    work.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs.values())
    return work, outputs


def _quantized_inputs(q: GraphView, node: onnx.NodeProto, prefix: str, copy_init: Callable[[str, str], str],
                      nodes: list[onnx.NodeProto]) -> list[str] | None:
    """The inputs of `node`'s copy: each Q/DQ (or weight DQ) it reads, copied to read the fp32 tensor instead; None
    when the layer reads nothing quantized."""
    new_inputs: list[str] = []
    quantized = False
    for x in node.input:
        dq = q.producer_node(x)
        if dq is None or dq.op_type != "DequantizeLinear":
            new_inputs.append(x)
            continue
        quantized = True
        params = [copy_init(p, prefix) for p in dq.input[1:]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        src = dq.input[0]
        qn = q.producer_node(src)
        if qn is not None and qn.op_type == "QuantizeLinear":
            qparams = [copy_init(p, prefix) for p in qn.input[1:]]
            nodes.append(helper.make_node("QuantizeLinear", [qn.input[0], *qparams], [f"{prefix}{src}"], name=f"{prefix}{qn.name}", domain=qn.domain))
            src = f"{prefix}{src}"
        else:
            src = copy_init(src, prefix)
        nodes.append(helper.make_node("DequantizeLinear", [src, *params], [f"{prefix}{x}"], name=f"{prefix}{dq.name}", domain=dq.domain, **attrs))
        new_inputs.append(f"{prefix}{x}")
    return new_inputs if quantized else None


def mean_shifts(session, outputs: dict[str, str], samples: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Average each layer's per-channel shift over the samples (float64 sums, sample order kept)."""
    names = list(outputs.values())
    sums: dict[str, np.ndarray] = {}
    n = 0
    for feeds in samples:
        for layer, value in zip(outputs, session.run(names, feeds)):
            sums[layer] = sums.get(layer, 0.0) + np.asarray(value, np.float64).reshape(-1)
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def apply(model: onnx.ModelProto, shifts: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model whose layers' biases are moved by their shifts (a zero bias is added where there was none)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    apply_in_place(work, shifts)
    return work


def apply_in_place(work: onnx.ModelProto, shifts: dict[str, np.ndarray]) -> None:
    """`apply` on the model itself (a caller that applies several fixes copies once)."""
    g = GraphView(work)
    new_inits: list[onnx.TensorProto] = []
    for layer, shift in shifts.items():
        node = g.by_name[layer]
        shift = np.asarray(shift, np.float64).reshape(-1)
        b = linear_bias(node, g) if node.op_type == "MatMul" else node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "MatMul" and b is None:
            raise ValueError(f"'{layer}' is a MatMul without a bias Add of its own; it cannot be corrected")
        if b is not None:
            if b not in g.inits:
                raise ValueError(f"bias of '{layer}' is computed, not an initializer; it cannot be corrected")
            if len(g.consumer_nodes(b)) != 1:
                raise ValueError(f"bias '{b}' of '{layer}' is shared with other nodes")
            arr = g.init_array(b)
            if arr.size != shift.size:
                raise ValueError(f"bias '{b}' of '{layer}' has {arr.size} values, the correction {shift.size}")
            g.inits[b].CopyFrom(numpy_helper.from_array((arr.reshape(-1) + shift).astype(arr.dtype).reshape(arr.shape), b))
        else:
            name = f"{layer}_bias_corrected"
            new_inits.append(numpy_helper.from_array(shift.astype(np.float32), name))
            if len(node.input) == 2:
                node.input.append(name)
            else:
                node.input[2] = name
    work.graph.initializer.extend(new_inits)
