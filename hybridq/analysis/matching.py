"""Which fp32 tensor is compared with which view of the quantized model (no model is run).

Identity comes from the ``hybridq.qdq_map`` metadata that step2 writes
(original tensor -> view) and, for QDQ models made elsewhere, from the graph
structure: from a tensor forward along a single-consumer chain of adapter
nodes (QuantizeLinear, DequantizeLinear, inserted Cast). Names are never
parsed. :func:`plan_analysis` returns the plan as plain data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

from .._onnx import GraphIndex, tensor_types, without_weights
from ..errors import InputError
from ..graph import lift_constants
from ..patterns import pattern_outputs
from ..plan import GraphView
from ..qdq import QDQ_MAP_KEY, QdqMap

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
"""Ops that only reshape: one the quantized model adds (ONNX Runtime writes a MatMul + Add on a static 3-D input as
Reshape -> Gemm -> Reshape) stands between a layer and the tensor the fp32 model names, and is walked through."""
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
_SKIP_OPS = frozenset({"Constant", "ConstantOfShape"})


class ModelIndex(GraphIndex):
    """Read-only index of a model's main graph, with its inputs, outputs, initializers and types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        super().__init__(g)
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.output_set = set(self.outputs)
        self.types = tensor_types(model)
        # tensors computed at run time: graph inputs and node outputs
        self.values = set(self.inputs) | set(self.producer)


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


class Identity:
    """Which quant-model tensors stand for which fp32 tensors."""

    def __init__(self, f: ModelIndex, q: ModelIndex) -> None:
        self.f, self.q = f, q

    def is_adapter(self, node: onnx.NodeProto) -> bool:
        """Q/DQ always; a Cast only when it is not one of the fp32 model's own Casts."""
        if node.op_type in QDQ_OPS:
            return True
        if node.op_type == "Cast" and node.output:
            orig = self.f.producer_node(node.output[0])
            return orig is None or orig.op_type != "Cast"
        return False

    def added_reshape(self, node: onnx.NodeProto) -> bool:
        """A reshape (RESHAPES) of the quantized model that the fp32 model does not compute there: none of its kind
        writes that tensor in fp32, or one does but from another tensor, which a compute node of the quantized model
        writes (the added Reshape merged with the model's own: Gemm -> Reshape into attention heads)."""
        if node.op_type not in RESHAPES or len(node.output) != 1 or not node.input:
            return False
        orig = self.f.producer_node(node.output[0])
        if orig is None or orig.op_type != node.op_type:
            return True
        cur = node.input[0]  # through its input's adapters to the tensor a compute node writes
        while (src := self.q.producer_node(cur)) is not None and self.is_adapter(src):
            cur = src.input[0]
        return cur not in self.f.values and src is not None

    def yields_float(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":
            return False
        if node.op_type == "Cast":
            return _attr(node, "to") in FLOAT_TYPES
        return True

    def forward_chain(self, t: str) -> list[int]:
        """Adapter nodes after ``t`` along a single-consumer chain, cut after the last float view."""
        q, chain, last_float, cur = self.q, [], 0, t
        while cur not in q.output_set:
            cons = q.consumers.get(cur, [])
            if len(cons) != 1:
                break
            node = q.nodes[cons[0]]
            if not self.is_adapter(node) or node.input[0] != cur or len(node.output) != 1:
                break
            chain.append(cons[0])
            if self.yields_float(node):
                last_float = len(chain)
            cur = node.output[0]
        return chain[:last_float]

    def back_to_source(self, view: str) -> tuple[str, list[int]]:
        """Walk back from a view through adapters and added reshapes: (source tensor, those nodes source -> view)."""
        chain: list[int] = []
        cur = view
        while True:
            k = self.q.producer.get(cur)
            if k is None or not (self.is_adapter(self.q.nodes[k]) or self.added_reshape(self.q.nodes[k])):
                return cur, chain[::-1]
            chain.append(k)
            cur = self.q.nodes[k].input[0]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ComparedTensor:
    """How one fp32 tensor is measured (plain data; see :func:`plan_analysis`).

    ``source`` is the quant-model tensor written by the compute node
    ``quant_node`` (index into the quant graph) before the output adapters
    ``out_chain`` (node indices) that lead to ``view``.
    """

    tensor: str
    layer: str
    op_type: str
    view: str
    source: str
    out_chain: tuple[int, ...]
    quant_node: int | None
    precision: str | None = None
    folded: str | None = None
    bounds: tuple[float, float] | None = None  # compared within: its readers saturate beyond (HardSwish below -3)


@dataclass
class AnalysisPlan:
    """The tensors to measure, in fp32 graph order, and anything worth telling the user."""

    tensors: list[ComparedTensor]
    notes: list[str] = field(default_factory=list)
    layers_known: bool = False  # the quantized model's hybridq.qdq_map says each layer's precision
    equalized: dict[str, tuple[int, list[float]]] = field(default_factory=dict)
    """quant-model tensor -> (channel axis from the end, scales): fp32's channel c divided by scales[c] (QdqMap.equalized)."""
    inner: frozenset[str] = frozenset()
    """Tensors inside activations written as chains of elementwise ops: a layer alone computes them again from the
    chain's (quantized) input, not from fp32's (see :func:`folded_patterns`)."""
    exact: list[ComparedTensor] = field(default_factory=list)  # integer or bool model outputs: compared value for value
    uncompared: dict[str, str] = field(default_factory=dict)  # model outputs left out of the plan, and why


_INT_NAMES = {
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
}


def _quantized_to(q: ModelIndex, chain: Iterable[int]) -> str | None:
    """The integer type of the first QuantizeLinear in ``chain`` (node indices), None when there is none."""
    for k in chain:
        node = q.nodes[k]
        if node.op_type == "QuantizeLinear":
            zp = q.inits.get(node.input[2]) if len(node.input) > 2 else None
            return _INT_NAMES.get(zp.data_type, "int") if zp is not None else "uint8"
    return None


def _plan_notes(folds: dict[str, tuple[str, list[onnx.NodeProto]]], missing_views: list[str]) -> list[str]:
    """What the plan tells the reader: activations listed as one row, map entries matched by structure instead."""
    notes = []
    if folds:
        kinds = sorted({label for label, _ in folds.values()})
        notes.append(f"{len(folds)} activation(s) written as chains of elementwise ops ({', '.join(kinds)}) are one row each, "
                     f"at their output; the {sum(len(n) for _, n in folds.values())} tensors inside them are not listed (float "
                     "in both models, they carry their input's error).")
    if missing_views:
        notes.append(
            f"{len(missing_views)} entries of '{QDQ_MAP_KEY}' name tensors the quantized model does "
            f"not have and were matched structurally instead: {', '.join(missing_views[:5])}"
            + (" ..." if len(missing_views) > 5 else "")
        )
    return notes


def folded_patterns(f: ModelIndex, q: ModelIndex) -> dict[str, tuple[str, list[onnx.NodeProto]]]:
    """The fp32 model's activations written as chains of elementwise ops (HardSwish as x * Clip(x + 3, 0, 6) / 6,
    Swish, GELU, LayerNorm) that the quantized model computes in float inside (no QuantizeLinear reads an inner
    tensor), by output tensor: (the activation's name, its inner nodes). Each is one row, at its output, as
    RKNN-Toolkit2 lists them: the inner tensors carry their input's error and no quantization of their own."""
    light = without_weights(f.model)
    lift_constants(light)  # exporters write the chains' constants as Constant nodes
    return {t: (label, nodes) for t, (label, nodes) in pattern_outputs(GraphView(light)).items()
            if not any(c.op_type == "QuantizeLinear" for n in nodes for c in q.consumer_nodes(n.output[0]))}


def plan_analysis(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> AnalysisPlan:
    """Decide which fp32 tensors are compared with which quant-model views (no model is run)."""
    return plan_tensors(ModelIndex(float_model), ModelIndex(quant_model))


def plan_tensors(f: ModelIndex, q: ModelIndex, written: ModelIndex | None = None) -> AnalysisPlan:
    """The compared tensors of `f` and their views in `q`; precisions named after `written` (the quantized model as
    given, when `q` is its form as deployed: int8 pairs that x86 runs as uint8 keep their int8 name)."""
    written = written or q
    quant_model = q.model
    ident = Identity(f, q)
    qmap = QdqMap.from_model(quant_model)
    mapped: dict[str, str] = qmap.tensors if qmap else {}
    layer_info: dict[str, Any] = qmap.layers if qmap else {}
    bounds = qmap.bounds if qmap else {}
    plans: list[ComparedTensor] = []
    missing_views: list[str] = []
    folds = folded_patterns(f, q)
    seen: set[str] = {n.output[0] for _, nodes in folds.values() for n in nodes}  # inner tensors: their pattern's row
    exact: list[ComparedTensor] = []  # integer or bool outputs (an ArgMax, TopK indices, a mask): value for value, no single view
    for k, node in enumerate(f.nodes):
        if (node.op_type in _SKIP_OPS or not any(node.input)) and f.output_set.isdisjoint(node.output):
            continue
        layer = node.name or node.output[0]
        for t in node.output:
            if not t or t in seen:
                continue
            seen.add(t)
            et = f.types.get(t)
            if et is not None and et not in FLOAT_TYPES:
                if t in f.output_set and t in q.values:
                    exact.append(ComparedTensor(tensor=t, layer=layer, op_type=node.op_type, view=t, source=t, out_chain=(), quant_node=None))
                continue
            # a model output is compared as the quantized model returns it (not as a quantized reader sees it)
            view = t if t in f.output_set and t in q.output_set else mapped.get(t)
            if view is not None and view not in q.values:
                missing_views.append(f"{t!r} -> {view!r}")
                view = None
            if view is None:
                if t not in q.values:
                    continue  # fused away or renamed by the quantizer: nothing to compare
                chain = ident.forward_chain(t)
                view = q.nodes[chain[-1]].output[0] if chain else t
            source, out_chain = ident.back_to_source(view)
            qk = q.producer.get(source)
            # The quantized model's producer names the layer in the map (a fused BatchNormalization's
            # tensor is written by the Conv it was folded into).
            qname = q.nodes[qk].name if qk is not None else ""
            info = next((layer_info[k] for k in (qname, layer) if isinstance(layer_info.get(k), dict)), None)
            name, op, folded = layer, node.op_type, None
            if qk is not None and qname and qname != layer and qname in layer_info and layer not in layer_info:
                # the row carries the name the cfg uses: step1 folded this node into that one, or named it (unnamed here)
                name = qname
                if node.name or q.nodes[qk].op_type != node.op_type:
                    op, folded = q.nodes[qk].op_type, f"{node.op_type} {layer}"
            if t in folds and folded is None:  # the activation's row: named as a layer of its own, as RKNN-Toolkit2 lists it
                op, inner = folds[t]
                folded = ", ".join(f"{n.op_type} {n.name or n.output[0]}" for n in inner)
            precision = (info or {}).get("precision")
            if precision is None and layer_info:
                qdtype = _quantized_to(written, out_chain)
                precision = f"float32->{qdtype}" if qdtype else "float32"
            plans.append(
                ComparedTensor(
                    tensor=t,
                    layer=name,
                    op_type=op,
                    view=view,
                    source=source,
                    out_chain=tuple(out_chain),
                    quant_node=qk,
                    precision=precision,
                    folded=folded,
                    bounds=bounds.get(t),
                )
            )
    planned = {tp.tensor for tp in plans + exact}
    uncompared = {o: _MISSING for o in f.outputs if o not in planned and o not in q.values}
    if not plans and not exact:
        raise InputError(
            "the float and quantized models have no float tensor in common to compare; "
            "check that QUANT_MODEL was built from FLOAT_MODEL"
        )
    return AnalysisPlan(plans, _plan_notes(folds, missing_views), layers_known=bool(layer_info), exact=exact, uncompared=uncompared,
                        equalized=qmap.equalized if qmap else {}, inner=frozenset(n.output[0] for _, ns in folds.values() for n in ns) - set(folds))


_MISSING = "the quantized model has no tensor of that name (check that QUANT_MODEL was built from FLOAT_MODEL)"
