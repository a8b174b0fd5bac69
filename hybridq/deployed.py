"""The quantized model as ONNX Runtime's CPU provider runs it, for analyze to measure the same kernels.

The analysis graph adds readers to tensors of the quantized model (a view's
DequantizeLinear is copied per reader), which changes what ORT's graph
rewrites do to it, and ORT's exact-int8 rewrite (:mod:`hybridq.kernels`)
fails on weights that share a zero point. Both are mended here first, on
the model alone, with the same real values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ._onnx import GraphIndex
from .graph import Namer
from .kernels import is_x86


def as_deployed(model: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`own_weight_zero_points` of :func:`s8_pairs_to_u8`: ``model`` itself when neither changes anything."""
    return own_weight_zero_points(s8_pairs_to_u8(model))


def s8_pairs_to_u8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 Q -> DQ pairs that ONNX Runtime's CPU provider turns into uint8 on x86, turned here first.

    ORT's ``QDQS8ToU8Transformer`` (x86 builds, where int8 activations do not
    fuse) rewrites a QuantizeLinear with an int8 scalar zero point whose one
    consumer is a DequantizeLinear with the same zero point to uint8, zero
    point + 128: the same real values, but then the pair fuses into U8S8
    kernels. The analysis graph gives each view's DequantizeLinear a second
    reader, which would stop that rewrite and run other kernels than the model
    as deployed; done beforehand, the analysis runs what a plain session runs.
    Elsewhere (ARM), and when no pair qualifies, ``model`` is returned as is.
    """
    if not is_x86():
        return model
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    index = GraphIndex(g, subgraph_reads=True)

    def scalar_s8(name: str) -> int | None:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.INT8:
            return None
        a = onnx.numpy_helper.to_array(t)
        return int(a.reshape(-1)[0]) if a.size == 1 else None

    pairs = []
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) != 3 or not q.output:
            continue
        zq = scalar_s8(q.input[2])
        rs = index.consumer_nodes(q.output[0])
        if zq is None or q.output[0] in outputs or len(rs) != 1:
            continue
        dq = rs[0]
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or dq.input[0] != q.output[0]:
            continue
        zdq = scalar_s8(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else 0
        if zdq == zq:
            pairs.append((q, dq, zq))
    if not pairs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {id(n): k for k, n in enumerate(g.node)}
    used = {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    fresh = Namer(used)
    for q, dq, zp in pairs:
        name = fresh(f"{q.output[0]}/zero_point_u8")
        out.graph.initializer.append(onnx.numpy_helper.from_array(np.array(zp + 128, np.uint8), name))
        nq, ndq = out.graph.node[nodes[id(q)]], out.graph.node[nodes[id(dq)]]
        nq.input[2] = name
        if len(ndq.input) > 2:
            ndq.input[2] = name
        else:  # DequantizeLinear always has x and scale
            ndq.input.append(name)
    # the rewritten Q outputs are uint8 now: drop their stale type annotations
    changed = {q.output[0] for q, _, _ in pairs}
    kept = [vi for vi in out.graph.value_info if vi.name not in changed]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def own_weight_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where each DequantizeLinear of an int8 initializer has its own zero-point initializer.

    ONNX Runtime's exact-int8 rewrite (:mod:`hybridq.kernels`) converts each
    fused layer's weight zero point to uint8 under a name taken from it, and
    fails to load a model where two weights share one (``Attempt to replace
    the existing tensor``; ``quantize_static`` output after
    ``quant_pre_process`` does). Same values, so the same numbers; ``model``
    itself when nothing is shared.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    index = GraphIndex(g)
    shared = [
        k for k, n in enumerate(g.node)
        if n.op_type == "DequantizeLinear" and len(n.input) > 2 and len(index.consumers.get(n.input[2], [])) > 1
        and n.input[2] in inits and getattr(inits.get(n.input[0]), "data_type", None) == TensorProto.INT8
    ]
    if not shared:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = Namer({i.name for i in g.initializer} | {o for n in g.node for o in n.output})
    for k in shared:
        node = out.graph.node[k]
        t = TensorProto()
        t.CopyFrom(inits[node.input[2]])
        t.name = fresh(f"{node.input[0]}/zero_point")
        out.graph.initializer.append(t)
        node.input[2] = t.name
    return out
