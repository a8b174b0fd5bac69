"""Bias correction: the mean output shift of each quantized layer in the model as it runs, and the bias that cancels it.

Rounding weights and activations moves a layer's mean output (per output channel),
and the shifts of earlier layers arrive with its input. Each quantized Conv/Gemm, and
each MatMul whose bias is the Add after it (a Linear as exporters write it: the layers
of a transformer), is corrected in topological order by the mean difference between
its fp32 output and its output in the quantized model with the corrections before it in
place, as NNCF's BiasCorrection does. Measured in isolation instead (the layer alone on
fp32 inputs, NNCF's fast variant), the shifts do not add up to the model's: on PP-OCR
rec the isolated correction lowered character accuracy (0.969 -> 0.938), the
cumulative one raised it (0.983), and held-out output SNR rose 11.8 -> 14.0 dB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._onnx import serialized_within, tensor_types
from .plan import GraphView
from .segments import Segment, split

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


def correctable_layers(nodes: Iterable[str], g: GraphView) -> list[str]:
    """Those of `nodes` (layer names, e.g. the plan's weighted layers) whose bias can take a correction."""
    return [n for n in nodes if n in g.by_name and correctable(g.by_name[n], g)]


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


def channels(node: onnx.NodeProto, g: GraphView) -> int:
    """Output channels of a correctable layer, from its weight: Conv dims[0], Gemm by transB, MatMul dims[1]."""
    dims = list(g.inits[node.input[1]].dims)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return dims[0] if trans_b else dims[1]
    return dims[1] if node.op_type == "MatMul" else dims[0]


def channel_mean(value: np.ndarray, op_type: str) -> np.ndarray:
    """Per-channel mean of a layer output (float64): channels last for MatMul, along axis 1 otherwise."""
    v = np.asarray(value, np.float64)
    if op_type == "MatMul":
        return v.reshape(-1, v.shape[-1]).mean(0)
    return np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]).mean(0)


def cumulative_shifts(fp32: onnx.ModelProto, qdq: onnx.ModelProto, layers: Iterable[str], samples: list[dict[str, np.ndarray]],
                      session: Callable[[onnx.ModelProto], Any], memo: dict[Any, Any] | None = None) -> dict[str, np.ndarray]:
    """Each layer's mean output error (fp32 - quantized, per channel) in the quantized model as it runs, layers in
    topological order, each measured with the corrections of those before it in place (fed as inputs). The model is
    run in segments, one ending at each layer, so the samples go through it once. Layers whose weight is not
    quantized in `qdq` are left out. `memo` (a dict the caller keeps) holds the fp32 means across calls on the same
    `fp32` model and samples (:func:`_fp32_means`).
    """
    f, q = GraphView(fp32), GraphView(qdq)
    wanted = set(layers)
    order = [n.name for n in qdq.graph.node if n.name in wanted and n.name in f.by_name and correctable(f.by_name[n.name], f)
             and _dequantized(q, n.input[1])]
    if not order or not samples:
        return {}
    target = _fp32_means(fp32, f, order, samples, session, memo)
    work, raw, shape = _with_correction_inputs(qdq, order, f)
    corr = {n: np.zeros(shape[n], np.float32) for n in order}
    parts = split(work, [[raw[n]] for n in order], tensor_types(work), [1.0] * len(order), 1.0)
    passes = _Segmented(parts, samples, session) if parts is not None and len(parts) == len(order) else _Whole(work, samples, session)
    shifts: dict[str, np.ndarray] = {}
    for i, n in enumerate(order):
        fed = {f"hybridq_bc/{k}": v for k, v in corr.items()}
        total = sum(channel_mean(v, f.by_name[n].op_type) for v in passes.outputs(i, raw[n], fed))
        shifts[n] = target[n] - total / len(samples)
        corr[n] = shifts[n].astype(np.float32).reshape(shape[n])
    return shifts


def _fp32_means(fp32: onnx.ModelProto, f: GraphView, order: list[str], samples: list[dict[str, np.ndarray]],
                session: Callable[[onnx.ModelProto], Any], memo: dict[Any, Any] | None) -> dict[str, np.ndarray]:
    """Each layer's mean fp32 output (per channel) over the samples, by one session fetching them all.

    With `memo`, means an earlier call computed on the same model (by content) and the same sample objects are
    reused: the proposal fits the correction again for each float candidate, on one fp32 model (PP-OCR det: one
    fp32 pass over 8 samples each time). The memo keeps the samples, so their ids stay theirs.
    """
    held: dict[str, np.ndarray] = {}
    data = serialized_within(fp32) if memo is not None else None  # None over 2 GB: measured each time
    if memo is not None and data is not None:
        key = (hashlib.sha256(data).hexdigest(), tuple(id(x) for x in samples))
        held = memo.setdefault(key, ({}, samples))[0]
    missing = [n for n in order if n not in held]
    if missing:
        ref = onnx.ModelProto()
        ref.CopyFrom(fp32)
        del ref.graph.output[:]
        ref.graph.output.extend(helper.make_tensor_value_info(f.by_name[n].output[0], onnx.TensorProto.FLOAT, None) for n in missing)
        sums = {n: 0.0 for n in missing}
        ref_sess = session(ref)
        for feeds in samples:
            for n, v in zip(missing, ref_sess.run(None, feeds)):
                sums[n] = sums[n] + channel_mean(v, f.by_name[n].op_type)
        held.update((n, v / len(samples)) for n, v in sums.items())
    return {n: held[n] for n in order}


class _Whole:
    """Every layer's output by a run of the whole model per sample (where the graph cannot be split)."""

    def __init__(self, work: onnx.ModelProto, samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> None:
        self.sess, self.samples = session(work), samples

    def outputs(self, i: int, name: str, fed: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        for feeds in self.samples:
            yield self.sess.run([name], {**feeds, **fed})[0]


class _Segmented:
    """Layer i's output by running only segment i of the graph on each sample, from the tensors earlier segments
    left: one pass over the model per sample in all, where a whole run per layer cost PP-OCR rec 17 s of its proposal.
    Segment i reads the corrections of the layers before it, which are final by then."""

    def __init__(self, parts: list[Segment], samples: list[dict[str, np.ndarray]], session: Callable[[onnx.ModelProto], Any]) -> None:
        self.parts, self.session = parts, session
        self.held = [dict(feeds) for feeds in samples]
        self.last = {name: i for i, part in enumerate(parts) for name in part.inputs}

    def outputs(self, i: int, name: str, fed: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        part = self.parts[i]
        sess = self.session(part.model)
        for held in self.held:
            held.update(zip(part.outputs, sess.run(part.outputs, {k: fed[k] if k in fed else held[k] for k in part.inputs})))
            value = held[name]
            for k in [k for k in held if self.last.get(k, -1) <= i]:
                del held[k]
            yield value


def _dequantized(q: GraphView, tensor: str) -> bool:
    """Is `tensor` a DequantizeLinear output (the layer's weight quantized)?"""
    producer = q.producer_node(tensor)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _with_correction_inputs(qdq: onnx.ModelProto, order: list[str], f: GraphView) -> tuple[onnx.ModelProto, dict[str, str], dict[str, tuple[int, ...]]]:
    """A copy of `qdq` where each layer writes `<out>/hybridq_raw` and an Add of the input `hybridq_bc/<layer>` gives
    `<out>` (what the bias would add); returns it, layer -> raw output, layer -> correction shape."""
    work = onnx.ModelProto()
    work.CopyFrom(qdq)
    wanted = set(order)
    raw: dict[str, str] = {}
    shape: dict[str, tuple[int, ...]] = {}
    nodes: list[onnx.NodeProto] = []
    for old in work.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(old)
        nodes.append(node)
        if node.name not in wanted:
            continue
        fnode = f.by_name[node.name]
        c = channels(fnode, f)
        rank = len(f.inits[fnode.input[1]].dims) if fnode.op_type == "Conv" else 2
        shape[node.name] = (c,) if fnode.op_type == "MatMul" else (1, c) + (1,) * (rank - 2)
        out = node.output[0]
        raw[node.name] = f"{out}/hybridq_raw"
        node.output[0] = raw[node.name]
        nodes.append(helper.make_node("Add", [raw[node.name], f"hybridq_bc/{node.name}"], [out], name=f"hybridq_bc/{node.name}/add"))
        work.graph.input.append(helper.make_tensor_value_info(f"hybridq_bc/{node.name}", onnx.TensorProto.FLOAT, list(shape[node.name])))
        work.graph.output.append(helper.make_tensor_value_info(raw[node.name], onnx.TensorProto.FLOAT, None))
    del work.graph.node[:]
    work.graph.node.extend(nodes)
    return work, raw, shape


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
        if node.op_type == "MatMul":
            b = linear_bias(node, g)
            if b is None:
                raise ValueError(f"'{layer}' is a MatMul without a bias Add of its own; it cannot be corrected")
        else:
            b = node.input[2] if len(node.input) > 2 and node.input[2] else None
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
