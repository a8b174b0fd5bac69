"""The analysis graph: the fp32 graph, an isolated copy of every quantized layer, the whole quantized graph.

One pass over it gives, per measured tensor, the fp32 tensor, its *single*
view (the layer alone, fed fp32 tensors through copies of its input
adapters) and its *entire* view (the quantized graph embedded unchanged, so
ONNX Runtime fuses its QDQ groups into integer kernels as when deployed).
Neither input model is modified.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._onnx import convert_opset, describe_error, main_opset, subgraphs
from ..errors import ModelError
from ..graph import Namer
from .matching import AnalysisPlan, ComparedTensor, Identity, ModelIndex

_IN_PREFIX = "hybridq.single.in/"
_OUT_PREFIX = "hybridq.single/"


def _merge_opsets(a: onnx.ModelProto, b: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for op in list(a.opset_import) + list(b.opset_import):
        versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    return [helper.make_opsetid(d, v) for d, v in sorted(versions.items())]


def _same_initializer(a: TensorProto, b: TensorProto) -> bool:
    return a.data_type == b.data_type and list(a.dims) == list(b.dims) and a.SerializeToString() == b.SerializeToString()


def _output_info(name: str, types: dict[str, int]) -> onnx.ValueInfoProto:
    et = types.get(name)
    if et:
        return helper.make_tensor_value_info(name, et, None)
    return helper.make_empty_tensor_value_info(name)


def _set_outputs(model: onnx.ModelProto, names: list[str], types: dict[str, int]) -> None:
    existing = {o.name for o in model.graph.output}
    for n in names:
        if n not in existing:
            model.graph.output.append(_output_info(n, types))
            existing.add(n)


def _combined_copy(f: ModelIndex, q: ModelIndex) -> onnx.ModelProto:
    """A copy of the fp32 model that can also hold the quantized model's nodes (merged opsets and functions)."""
    float_model, quant_model = f.model, q.model
    combined = onnx.ModelProto()
    combined.CopyFrom(float_model)
    del combined.opset_import[:]
    combined.opset_import.extend(_merge_opsets(float_model, quant_model))
    combined.ir_version = max(float_model.ir_version, quant_model.ir_version)
    have_funcs = {(fn.domain, fn.name) for fn in combined.functions}
    combined.functions.extend(fn for fn in quant_model.functions if (fn.domain, fn.name) not in have_funcs)
    return combined


def _rescale(graph: tuple[list[onnx.NodeProto], list[TensorProto]], fresh: Namer, types: dict[str, int], name: str,
             eq: tuple[int, list[float]], divide: bool) -> str:
    """``name`` times an equalization's scales along its channel axis (divided by them with ``divide``): a node and an
    initializer added to ``graph``; returns the new tensor's name."""
    axis, scales = eq
    dtype = np.float16 if types.get(name) == TensorProto.FLOAT16 else np.float32
    factor = (1.0 / np.asarray(scales, np.float64) if divide else np.asarray(scales, np.float64)).astype(dtype)
    const = numpy_helper.from_array(factor.reshape([-1] + [1] * (-axis - 1)), fresh("hybridq.equalized/" + name + "/scales"))
    out = fresh("hybridq.equalized/" + name)
    graph[0].append(helper.make_node("Mul", [name, const.name], [out], name=fresh("hybridq.equalized/" + name + "/Mul")))
    graph[1].append(const)
    if name in types:
        types[out] = types[name]
    return out


class _SingleBuilder:
    """Builds the isolated copy of every quantized compute node, fed from fp32 tensors.

    ``nodes`` and ``inits`` collect what is added (in order), ``single_views``
    maps each fp32 tensor to the tensor holding its single-layer view,
    ``types`` the element types known of the combined graph's tensors and
    ``fresh`` gives fresh names in it.
    """

    def __init__(self, f: ModelIndex, q: ModelIndex, plan: AnalysisPlan) -> None:
        self.f, self.q, self.plan = f, q, plan
        self.ident = Identity(f, q)
        self.fresh = Namer(set(f.values) | set(f.inits) | set(q.values) | set(q.inits))
        self.types = dict(f.types)
        # a quant-model tensor written by a compute node -> the fp32 tensor it stands for
        self.src_to_fp32 = {tp.source: tp.tensor for tp in plan.tensors}
        self.memo: dict[str, str | None] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.single_views: dict[str, str] = {}
        self.not_isolated: list[str] = []

    def fp32_name(self, x: str) -> str | None:
        """The fp32 tensor quant tensor ``x`` (written by a compute node) stands for, if any."""
        if x in self.f.values:
            return x
        if x in self.src_to_fp32:
            return self.src_to_fp32[x]
        for k in self.ident.forward_chain(x):
            o = self.q.nodes[k].output[0]
            if o in self.f.values:
                return o
        return None

    def copy_node(self, node: onnx.NodeProto, inputs: list[str], outputs: list[str], name: str) -> None:
        """Add a copy of ``node`` with new inputs, outputs and name."""
        n = onnx.NodeProto()
        n.CopyFrom(node)
        del n.input[:]
        n.input.extend(inputs)
        del n.output[:]
        n.output.extend(outputs)
        n.name = name
        self.nodes.append(n)

    def _copy_outputs_types(self, originals: list[str], copies: list[str]) -> None:
        for o, c in zip(originals, copies):
            if o in self.q.types:
                self.types[c] = self.q.types[o]

    def rebuild(self, x: str) -> str | None:
        """Name in the combined graph of quant tensor ``x`` computed from fp32 tensors (None: it cannot be)."""
        if x == "":
            return ""
        if x in self.memo:
            return self.memo[x]
        self.memo[x] = None  # guards against cycles
        name: str | None = None
        q = self.q
        if x in q.inits:
            name = self._rebuild_initializer(x)
        elif (node := q.producer_node(x)) is not None:
            # adapters, Constant nodes, and float nodes of the quantized model that the fp32 model has not (reshapes
            # ONNX Runtime adds around a Gemm, HardSwish inlined as HardSigmoid and Mul): computed again from fp32 tensors
            # and the inside of an activation written as a chain: computed from the chain's input as the layer reads it
            if self.ident.is_adapter(node) or not any(node.input) or x in self.plan.inner or (
                    self.fp32_name(x) is None and not subgraphs(node) and not self._reads_quantized_weights(node)):
                ins = [self.rebuild(i) for i in node.input]
                if all(i is not None for i in ins):
                    outs = [self.fresh(_IN_PREFIX + o) if o else "" for o in node.output]
                    self.copy_node(node, ins, outs, self.fresh(_IN_PREFIX + (node.name or x)))  # type: ignore[arg-type]
                    for o, c in zip(node.output, outs):
                        self.memo[o] = c
                    self._copy_outputs_types(list(node.output), outs)
                    name = self.memo[x]
            else:
                name = self.fp32_name(x)
                if name is not None and x in self.plan.equalized:  # the quant layer reads fp32's channels divided
                    name = _rescale((self.nodes, self.inits), self.fresh, self.types, name, self.plan.equalized[x], divide=True)
        elif x in q.inputs and x in self.f.values:
            name = x
        self.memo[x] = name
        return name

    def _reads_quantized_weights(self, node: onnx.NodeProto) -> bool:
        """Does ``node`` read a weight through Q/DQ? Such a node is a quantized layer of its own, not a float op (an
        inlined function's HardSigmoid) to compute again on fp32 inputs."""
        for i in node.input:
            source, chain = self.ident.back_to_source(i) if i else ("", [])
            if source in self.q.inits and self._has_qdq(chain):
                return True
        return False

    def _has_qdq(self, chain: list[int] | tuple[int, ...]) -> bool:
        """Does this chain change values (a Q, DQ or inserted Cast in it), not only reshape them (an added reshape)?"""
        return any(self.ident.is_adapter(self.q.nodes[k]) for k in chain)

    def _rebuild_initializer(self, x: str) -> str:
        """A quant-model initializer: the fp32 model's own when equal, else a renamed copy."""
        init = self.q.inits[x]
        if x in self.f.inits and _same_initializer(init, self.f.inits[x]):
            return x
        name = self.fresh(_IN_PREFIX + x)
        t = TensorProto()
        t.CopyFrom(init)
        t.name = name
        self.inits.append(t)
        self.types[name] = init.data_type
        return name

    def is_quantized(self, node: onnx.NodeProto, tps: list[ComparedTensor]) -> bool:
        """Does ``node`` quantize something (so its single error means something)?"""
        if any(self._has_qdq(tp.out_chain) for tp in tps):
            return True
        if self.plan.layers_known:
            # A float layer that only reads dequantized tensors adds no error of its own: the
            # producer's single error already holds that quantization.
            return any(tp.precision not in (None, "float32", "float16") for tp in tps)
        f, q = self.f, self.q
        for i in node.input:
            if not i:
                continue
            p = q.producer_node(i)
            if p is not None and self.ident.is_adapter(p):
                return True
            if i in q.inits and not (i in f.inits and _same_initializer(q.inits[i], f.inits[i])):
                return True
        return False

    def isolate(self, k: int, tps: list[ComparedTensor]) -> None:
        """Copy quant node ``k`` fed from fp32 tensors, then each measured output's adapters."""
        node = self.q.nodes[k]
        if not self.is_quantized(node, tps):
            return
        if subgraphs(node):
            self.not_isolated.append(f"{node.name or node.output[0]} (has a subgraph)")
            return
        ins = [self.rebuild(i) for i in node.input]
        if any(i is None for i in ins):
            bad = [i for i, c in zip(node.input, ins) if c is None]
            self.not_isolated.append(f"{node.name or node.output[0]} (input {bad[0]!r} has no fp32 counterpart)")
            return
        outs = [self.fresh(_OUT_PREFIX + o) if o else "" for o in node.output]
        self.copy_node(node, ins, outs, self.fresh(_OUT_PREFIX + (node.name or node.output[0])))  # type: ignore[arg-type]
        local = dict(zip(node.output, outs))
        self._copy_outputs_types(list(local), list(local.values()))
        for tp in tps:
            cur = self._output_adapters(local[tp.source], tp)
            if cur and tp.source in self.plan.equalized:  # back to fp32's channels before the comparison
                cur = _rescale((self.nodes, self.inits), self.fresh, self.types, cur, self.plan.equalized[tp.source], divide=False)
            if cur:
                self.single_views[tp.tensor] = cur
            else:
                self.not_isolated.append(f"{tp.tensor} (output adapter parameters are not constant)")

    def _output_adapters(self, cur: str, tp: ComparedTensor) -> str:
        """Copies of ``tp``'s output adapters after ``cur``; the last output, or "" when one cannot be copied."""
        for ck in tp.out_chain:
            a = self.q.nodes[ck]
            rest = [self.rebuild(i) for i in a.input[1:]]
            if any(r is None for r in rest):
                return ""
            out = self.fresh(_OUT_PREFIX + a.output[0])
            self.copy_node(a, [cur, *rest], [out], self.fresh(_OUT_PREFIX + (a.name or a.output[0])))  # type: ignore[list-item]
            self._copy_outputs_types([a.output[0]], [out])
            cur = out
        return cur

    def notes(self) -> list[str]:
        if not self.not_isolated:
            return []
        n = self.not_isolated
        return [
            f"single error not computed for {len(n)} layer(s): " + "; ".join(n[:5]) + (" ..." if len(n) > 5 else "")
        ]


def _build_single(
    f: ModelIndex, q: ModelIndex, plan: AnalysisPlan
) -> tuple[onnx.ModelProto, dict[str, str], list[str], dict[str, int], Namer]:
    """The combined graph: the fp32 graph plus an isolated copy of every quantized compute node.

    Returns ``(model, single_views, notes, types, namer)``: ``single_views``
    maps each fp32 tensor to the combined-graph tensor holding its
    single-layer view; ``types`` are the element types known of the combined
    graph's tensors, ``namer`` gives fresh names in it. The outputs are left
    to the caller. Neither input model is modified.
    """
    combined = _combined_copy(f, q)
    b = _SingleBuilder(f, q, plan)
    by_node: dict[int, list[ComparedTensor]] = defaultdict(list)
    for tp in plan.tensors:
        if tp.quant_node is not None:
            by_node[tp.quant_node].append(tp)
    for k in sorted(by_node):
        b.isolate(k, by_node[k])
    combined.graph.node.extend(b.nodes)
    combined.graph.initializer.extend(b.inits)
    return combined, b.single_views, b.notes(), b.types, b.fresh


# --------------------------------------------------------------------------- analysis graph

_Q_PREFIX = "hybridq.quant/"


def align_opsets(fm: onnx.ModelProto, qm: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both models at the same ai.onnx opset (the older one converted), so their nodes can share a graph.

    step2 upgrades old models to opset 13, so the float model is often older
    than the quantized one; an old node (``Squeeze`` with an ``axes``
    attribute) is invalid under the newer opset.
    """
    a, b = main_opset(fm), main_opset(qm)
    if not a or not b or a == b:
        return fm, qm
    old, target = (fm, b) if a < b else (qm, a)
    try:
        new = convert_opset(old, target)
    except Exception as e:
        raise ModelError(
            f"the float model (opset {a}) and the quantized model (opset {b}) use different opsets and "
            f"the older cannot be converted to opset {target} ({describe_error(e)}); "
            "export the float model with the quantized model's opset"
        ) from None
    return (new, qm) if old is fm else (fm, new)


def _rename_outer(g: onnx.GraphProto, rename: dict[str, str], shadow: frozenset[str] = frozenset()) -> None:
    """In a subgraph, rename the references to outer-scope tensors that ``rename`` maps."""
    local = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    hidden = shadow | local

    def sub(x: str) -> str:
        return rename[x] if x and x not in hidden and x in rename else x

    for n in g.node:
        for j, i in enumerate(n.input):
            n.input[j] = sub(i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_outer(a.g, rename, frozenset(hidden))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _rename_outer(sg, rename, frozenset(hidden))
    for o in g.output:
        o.name = sub(o.name)


def _embed(combined: onnx.ModelProto, q: ModelIndex, fresh: Namer, types: dict[str, int]) -> dict[str, str]:
    """Append a renamed copy of the whole quantized graph (sharing the inputs); return its name map."""
    g = combined.graph
    rename = {i: i for i in q.inputs}
    for init in q.model.graph.initializer:
        if init.name in rename:
            continue
        t = TensorProto()
        t.CopyFrom(init)
        t.name = rename[init.name] = fresh(_Q_PREFIX + init.name)
        g.initializer.append(t)
    for node in q.nodes:
        for o in node.output:
            if o:
                rename[o] = fresh(_Q_PREFIX + o)
    for node in q.nodes:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        for j, i in enumerate(n.input):
            n.input[j] = rename.get(i, i) if i else ""
        for j, o in enumerate(n.output):
            n.output[j] = rename.get(o, o) if o else ""
        n.name = _Q_PREFIX + (node.name or node.output[0])
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_outer(a.g, rename)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _rename_outer(sg, rename)
        g.node.append(n)
    for k, v in rename.items():
        if k in q.types:
            types[v] = q.types[k]
    return rename


@dataclass
class AnalysisGraph:
    model: onnx.ModelProto
    single_views: dict[str, str]  # fp32 tensor -> its single view in the analysis graph
    notes: list[str]
    quant_views: dict[str, str]  # fp32 tensor -> its quant view in the analysis graph
    types: dict[str, int]  # element types of the analysis graph's tensors, where known


def build_analysis_graph(f: ModelIndex, q: ModelIndex, plan: AnalysisPlan) -> AnalysisGraph:
    """One graph for everything: fp32 graph + isolated layers + the whole quantized graph.

    The quantized graph is embedded unchanged (renamed), so ONNX Runtime fuses
    its QDQ groups into integer kernels as when deployed (a view that is also
    an output gets its own DequantizeLinear). The outputs are, per measured
    tensor (``plan.tensors``, then the integer outputs ``plan.exact``), the fp32 tensor, its quant view and its single view.
    """
    combined, single_views, notes, types, fresh = _build_single(f, q, plan)
    rename = _embed(combined, q, fresh, types)
    measured = plan.tensors + plan.exact
    added: tuple[list[onnx.NodeProto], list[TensorProto]] = ([], [])
    views = {tp.tensor: _rescale(added, fresh, types, rename[tp.view], plan.equalized[tp.source], divide=False)
             if tp.source in plan.equalized else rename[tp.view] for tp in measured}  # equalized: back to fp32's channels
    combined.graph.node.extend(added[0])
    combined.graph.initializer.extend(added[1])
    ag = AnalysisGraph(combined, single_views, notes, views, types)
    del combined.graph.output[:]
    _set_outputs(combined, [x for tp in measured for x in compared_names(tp, ag)], types)
    return ag


def compared_names(tp: ComparedTensor, ag: AnalysisGraph) -> list[str]:
    """Analysis-graph tensors compared for ``tp``: the fp32 tensor, its quant view, its single view if any."""
    sv = ag.single_views.get(tp.tensor)
    return [tp.tensor, ag.quant_views[tp.tensor]] + ([sv] if sv else [])

