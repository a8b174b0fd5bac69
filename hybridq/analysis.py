"""Per-layer error of a quantized model against its float model (SPEC 5).

For every float tensor ``t`` written by a compute node of the fp32 model that
the quantized model still has, two errors are measured on each sample and
averaged:

* **entire**: fp32[t] vs the quantized model's *view* of ``t`` (the tensor
  its consumers read: the DequantizeLinear or Cast output after ``t``);
  errors of all upstream layers accumulate;
* **single**: fp32[t] vs the same view computed by that layer alone, fed
  the fp32 model's tensors, so a person sees which layer *adds* error.
  Measured for layers that quantize something (weights, or a Q after them);
  with step2's map, a float layer that only reads dequantized tensors has
  none (its producer's single error holds that quantization).

Identity comes from the ``hybridq.qdq_map`` metadata that step2 writes
(original tensor -> view) and, for QDQ models made elsewhere (ONNX Runtime's
``quantize_static``), from the graph structure: from a tensor forward along
a single-consumer chain of adapter nodes (QuantizeLinear, DequantizeLinear,
inserted Cast). Names are never parsed.

Cost per sample, independent of the number of layers (plan first, then build
the graph once): one pass over one *analysis* graph = the fp32 graph, plus for
each quantized compute node N a copy N' whose inputs are rebuilt from fp32
tensors through copies of N's input adapters and whose output goes through a
copy of N's output adapters (the single views), plus the whole quantized
graph embedded unchanged, so ONNX Runtime fuses its QDQ groups into integer
kernels as when deployed (the entire views). The pass runs as a chain of
small sessions, about a megabyte of compared tensors each
(:mod:`hybridq.segments`), sharing one ONNX Runtime arena, so the tensors are
compared right after they are written, while still in cache, and their
memory is reused by the next segment (:func:`hybridq.metrics.metrics_many`,
one compiled pass per comparison; float64 :class:`Accumulator` sums when a
snapshot is dumped, so the manifest matches the arrays exactly). Samples run
side by side, one per core, in forked worker processes (threads where fork
is missing or the graph is large); results are added in sample order.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import multiprocessing
import os
import signal
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .cost import concrete_shapes
from .errors import HybridqError, InputError, ModelError, did_you_mean
from . import _runtime
from ._onnx import GraphIndex, convert_opset, describe_error, main_opset, model_bytes, subgraphs
from .graph import Namer, tensor_shapes
from .deployed import as_deployed
from .kernels import NOT_EXACT_NOTE, SATURATION_NOTE, u8s8_saturates
from .metrics import (
    Accumulator,
    Metrics,
    SliceAccumulator,
    SliceMetrics,
    channel_axis,
    from_strict_json,
    fused_kernel,
    metrics_many,
    SNR_DEFAULT,
    output_ok,
    sample_metrics,
    slice_sums,
    to_strict_json,
)
from .qdq import QDQ_MAP_KEY, QdqMap
from .segments import Segment, split

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
_SKIP_OPS = frozenset({"Constant", "ConstantOfShape"})
_IN_PREFIX = "hybridq.single.in/"
_OUT_PREFIX = "hybridq.single/"


# --------------------------------------------------------------------------- results


@dataclass
class LayerError:
    """Errors of one fp32 tensor (one row of the table), in graph order.

    ``layer`` and ``op_type`` name the node the cfg names for ``tensor``: the
    fp32 model's node that writes it, or, where step1 folded that node into
    another (a BatchNormalization into its Conv), the node it was folded into,
    with the folded one in ``folded`` (``"BatchNormalization block0.bn1"``).
    ``precision`` is what the layer runs in: the step2 map's precision for
    the layers it quantizes (``uint8``, ``int16``, ``float16``, ``float32``),
    ``float32->uint8`` for a float op whose output is quantized (its single
    error is that quantization), ``float32`` for a float op that only reads
    dequantized tensors; ``None`` when the quantized model has no step2 map.
    ``shape`` and ``dtype`` describe one sample of the fp32 tensor;
    ``quant_tensor`` names the view compared in the quantized model; ``single``
    is ``None`` when the layer is not quantized (nothing to isolate) or could
    not be isolated (see :attr:`AnalysisResult.notes`). ``slices`` holds the
    per-slice measure of a model output (:class:`~hybridq.metrics.SliceMetrics`).
    """

    tensor: str
    layer: str
    op_type: str
    shape: tuple[int, ...]
    dtype: str
    entire: Metrics
    single: Metrics | None
    quant_tensor: str = ""
    precision: str | None = None
    fp32_file: str | None = None
    quant_file: str | None = None
    folded: str | None = None
    slices: SliceMetrics | None = None

    @property
    def label(self) -> str:
        """The one name used everywhere: ``layer [tensor] precision``, e.g. ``block0.conv1 [block0.bn1] uint8``."""
        return f"{self.layer} [{self.tensor}]" + (f" {self.precision}" if self.precision else "")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's per-tensor entry; floats may be non-finite (:meth:`AnalysisResult.to_dict` makes it strict JSON)."""
        return {
            "layer": self.layer,
            "op_type": self.op_type,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quant_tensor": self.quant_tensor,
            "precision": self.precision,
            "label": self.label,
            "folded": self.folded,
            "fp32": self.fp32_file,
            "quant": self.quant_file,
            "entire": self.entire.to_dict(encode=False),
            "single": self.single.to_dict(encode=False) if self.single is not None else None,
            "slices": self.slices.to_dict() if self.slices is not None else None,
        }

    @classmethod
    def from_dict(cls, tensor: str, d: dict[str, Any]) -> LayerError:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tensor=tensor,
            layer=str(d["layer"]),
            op_type=str(d["op_type"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            entire=Metrics.from_dict(d["entire"]),
            single=Metrics.from_dict(d["single"]) if d.get("single") is not None else None,
            quant_tensor=str(d.get("quant_tensor", "")),
            precision=d.get("precision"),
            fp32_file=d.get("fp32"),
            quant_file=d.get("quant"),
            folded=d.get("folded"),
            slices=SliceMetrics.from_dict(d["slices"]) if d.get("slices") is not None else None,
        )


def badness(layer: LayerError) -> tuple[float, float]:
    """Sort key, worst first: the error the layer adds (single cosine), then the accumulated one.

    A layer without a single error adds none (cosine 1.0); NaN sorts first.
    """

    def c(m: Metrics | None) -> float:
        if m is None:
            return 1.0
        return -math.inf if math.isnan(m.cosine) else m.cosine

    return (c(layer.single), c(layer.entire))


@dataclass
class AnalysisResult:
    """Everything the report renders; also what a snapshot's ``manifest.json`` holds."""

    layers: list[LayerError]
    outputs: list[str]
    n_samples: int
    notes: list[str] = field(default_factory=list)
    dumped_samples: int = 0
    dump_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready dict (:func:`~hybridq.metrics.to_strict_json`: non-finite numbers are
        ``null``, listed under ``"nonfinite"``); ``tensors`` is keyed by tensor name in graph order."""
        return to_strict_json({
            "format": "hybridq-snapshot",
            "version": 1,
            "n_samples": self.n_samples,
            "outputs": list(self.outputs),
            "notes": list(self.notes),
            "dumped_samples": self.dumped_samples,
            "dump_message": self.dump_message,
            "tensors": {layer.tensor: layer.to_dict() for layer in self.layers},
        })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisResult:
        """Inverse of :meth:`to_dict` (also reads manifests that wrote non-finite numbers as strings)."""
        d = from_strict_json(d)
        return cls(
            layers=[LayerError.from_dict(t, e) for t, e in d["tensors"].items()],
            outputs=[str(o) for o in d["outputs"]],
            n_samples=int(d["n_samples"]),
            notes=[str(n) for n in d.get("notes", [])],
            dumped_samples=int(d.get("dumped_samples", 0)),
            dump_message=d.get("dump_message"),
        )

    def worst(self, n: int | None = None) -> list[LayerError]:
        """The ``n`` worst layers (all when ``None``), by :func:`badness`; ties keep graph order."""
        ranked = sorted(self.layers, key=badness)
        return ranked if n is None else ranked[:n]

    def output_layers(self) -> list[LayerError]:
        """The rows of the model's outputs, in output order."""
        by_name = {layer.tensor: layer for layer in self.layers}
        return [by_name[o] for o in self.outputs if o in by_name]


# --------------------------------------------------------------------------- verdict

COS_THRESHOLD = 0.99
"""Default cosine below which an output, an output slice or a layer's single error fails the verdict."""
SNR_THRESHOLD = SNR_DEFAULT
"""Default SNR (dB) below which an output slice or a layer's single error fails the verdict."""


def _below(m: Metrics | None, cos_threshold: float, snr_threshold: float) -> bool:
    """Is ``m`` below either threshold (NaN counts as below)?"""
    return m is not None and (not m.cosine >= cos_threshold or not m.snr_db >= snr_threshold)


@dataclass
class Verdict:
    """OK or CHECK for an analysis, why, and what to do next (plain data; the report renders it).

    ``ok`` is true when every model output keeps whole-tensor cosine >=
    ``cos_threshold`` and its worst slice along the channel axis
    (:func:`~hybridq.metrics.channel_axis`) keeps cosine >= ``cos_threshold``
    and SNR >= ``snr_threshold``. ``outputs`` lists every output, worst first;
    ``layers`` the layers whose single error is below a threshold (the ones
    that add error), worst first, at most five. ``next_step`` says what to do
    in one sentence; ``cfg_entry`` is the cfg line to try and ``command`` the
    ``hybridq propose`` command line (None when the verdict is OK).
    """

    ok: bool
    cos_threshold: float
    snr_threshold: float
    n_samples: int
    outputs: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    next_step: str
    cfg_entry: str | None = None
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats may be non-finite: write it through :func:`~hybridq.metrics.to_strict_json`)."""
        return {
            "ok": self.ok,
            "status": "OK" if self.ok else "CHECK",
            "thresholds": {"cosine": self.cos_threshold, "snr_db": self.snr_threshold},
            "n_samples": self.n_samples,
            "worst_outputs": self.outputs,
            "worst_layers": self.layers,
            "next_step": self.next_step,
            "cfg_entry": self.cfg_entry,
            "command": self.command,
        }


def _output_entry(layer: LayerError, cos_threshold: float, snr_threshold: float) -> dict[str, Any]:
    e = layer.entire
    sl = layer.slices
    entry: dict[str, Any] = {
        "tensor": layer.tensor,
        "label": layer.label,
        "cosine": e.cosine,
        "snr_db": e.snr_db,
        "worst_slice": None,
    }
    if sl is not None:
        w = sl.worst
        entry["worst_slice"] = {
            "axis": sl.axis,
            "index": w,
            "slices": len(sl.cosine),
            "cosine": sl.cosine[w],
            "snr_db": sl.snr_db[w],
            "min_cosine": sl.min_cosine,
        }
    entry["ok"] = output_ok(e.cosine, sl, cos_threshold, snr_threshold)
    return entry


def _output_rank(entry: dict[str, Any]) -> tuple[bool, float, float]:
    def num(v: float) -> float:
        return -math.inf if math.isnan(v) else v

    ws = entry["worst_slice"]
    return (entry["ok"], num(ws["snr_db"]) if ws else math.inf, num(entry["cosine"]))


def judge(
    result: AnalysisResult,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    snapshot: str | None = None,
    cfg: str | None = None,
    dataset: str | None = None,
) -> Verdict:
    """The verdict of ``result`` against the thresholds, with the next step.

    ``snapshot``, ``cfg`` and ``dataset`` are the paths put into the suggested
    ``hybridq propose`` command (without a snapshot, propose analyses anew;
    placeholders ``MODEL.quantization.cfg`` and ``DATASET`` when unknown).
    """
    outs = result.output_layers() or result.layers[-1:]
    entries = sorted((_output_entry(o, cos_threshold, snr_threshold) for o in outs), key=_output_rank)
    ok = all(e["ok"] for e in entries)
    adders = [layer for layer in result.worst() if _below(layer.single, cos_threshold, snr_threshold)]
    layers = [
        {
            "label": a.label,
            "layer": a.layer,
            "tensor": a.tensor,
            "op_type": a.op_type,
            "precision": a.precision,
            "single_cosine": a.single.cosine if a.single else math.nan,
            "single_snr_db": a.single.snr_db if a.single else math.nan,
            "entire_cosine": a.entire.cosine,
            "entire_snr_db": a.entire.snr_db,
        }
        for a in adders[:5]
    ]
    if ok:
        return Verdict(True, cos_threshold, snr_threshold, result.n_samples, entries, layers,
                       "nothing to do: every output meets the thresholds")
    import shlex

    command = " ".join(
        ["hybridq", "propose", *([shlex.quote(snapshot)] if snapshot else []),
         "--cfg", shlex.quote(cfg) if cfg else "MODEL.quantization.cfg",
         "--dataset", shlex.quote(dataset) if dataset else "DATASET", "--target-cosine", f"{cos_threshold:g}"]
    )
    cfg_entry = None
    if adders:
        a = adders[0]
        cfg_entry = f"custom_quantize_layers: {{{a.layer}: float32}}"
        step = (
            f"layer {a.label} adds the most error: in the cfg set `{cfg_entry}` (or int16), "
            f"or clip the range (`min`/`max`) of its input tensors under quantize_parameters; "
            f"or let `{command}` find the cheapest fix"
        )
    else:
        worst = entries[0]
        ws = worst["worst_slice"]
        row = next((o for o in outs if o.tensor == worst["tensor"]), None)
        if ws is not None and worst["cosine"] >= cos_threshold and row is not None:
            # the whole tensor passes: a slice is drowned by the range its neighbours set
            prec = row.precision or ""
            if prec.startswith("float32->") or (prec and not prec.startswith(("float32", "float16"))):
                cfg_entry = f"custom_quantize_layers: {{{row.layer}: int16}}"
            step = (
                f"output {row.label} passes as a whole but slice #{ws['index']} on axis {ws['axis']} does not: "
                "its values are small beside the other slices that share one quantization range"
                + (f"; set `{cfg_entry}` in the cfg for a finer step" if cfg_entry else "")
                + f", or run `{command}`"
            )
        else:
            step = f"no single layer is below the thresholds, so the error builds up over many layers: run `{command}`"
    return Verdict(False, cos_threshold, snr_threshold, result.n_samples, entries, layers, step, cfg_entry, command)


# --------------------------------------------------------------------------- graph index


class _Graph(GraphIndex):
    """Read-only index of a model's main graph, with its inputs, outputs, initializers and types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        super().__init__(g)
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.output_set = set(self.outputs)
        self.types = _tensor_types(model)
        # tensors computed at run time: graph inputs and node outputs
        self.values = set(self.inputs) | set(self.producer)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot handle: learn the types at run time
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


class _Identity:
    """Which quant-model tensors stand for which fp32 tensors."""

    def __init__(self, f: _Graph, q: _Graph) -> None:
        self.f, self.q = f, q

    def is_adapter(self, node: onnx.NodeProto) -> bool:
        """Q/DQ always; a Cast only when it is not one of the fp32 model's own Casts."""
        if node.op_type in _QDQ_OPS:
            return True
        if node.op_type == "Cast" and node.output:
            orig = self.f.producer_node(node.output[0])
            return orig is None or orig.op_type != "Cast"
        return False

    def yields_float(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":
            return False
        if node.op_type == "Cast":
            return _attr(node, "to") in _FLOAT_TYPES
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
        """Walk back from a view through adapters: (source tensor, adapter nodes source -> view)."""
        chain: list[int] = []
        cur = view
        while True:
            k = self.q.producer.get(cur)
            if k is None or not self.is_adapter(self.q.nodes[k]):
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


@dataclass
class AnalysisPlan:
    """The tensors to measure, in fp32 graph order, and anything worth telling the user."""

    tensors: list[ComparedTensor]
    notes: list[str] = field(default_factory=list)
    layers_known: bool = False  # the quantized model's hybridq.qdq_map says each layer's precision


_INT_NAMES = {
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
}


def _quantized_to(q: _Graph, chain: Iterable[int]) -> str | None:
    """The integer type of the first QuantizeLinear in ``chain`` (node indices), None when there is none."""
    for k in chain:
        node = q.nodes[k]
        if node.op_type == "QuantizeLinear":
            zp = q.inits.get(node.input[2]) if len(node.input) > 2 else None
            return _INT_NAMES.get(zp.data_type, "int") if zp is not None else "uint8"
    return None


def plan_analysis(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> AnalysisPlan:
    """Decide which fp32 tensors are compared with which quant-model views (no model is run)."""
    return _plan(_Graph(float_model), _Graph(quant_model))


def _plan(f: _Graph, q: _Graph) -> AnalysisPlan:
    quant_model = q.model
    ident = _Identity(f, q)
    qmap = QdqMap.from_model(quant_model)
    mapped: dict[str, str] = qmap.tensors if qmap else {}
    layer_info: dict[str, Any] = qmap.layers if qmap else {}
    notes: list[str] = []
    plans: list[ComparedTensor] = []
    missing_views: list[str] = []
    seen: set[str] = set()
    for k, node in enumerate(f.nodes):
        if node.op_type in _SKIP_OPS or not any(node.input):
            continue
        layer = node.name or node.output[0]
        for t in node.output:
            if not t or t in seen:
                continue
            seen.add(t)
            et = f.types.get(t)
            if et is not None and et not in _FLOAT_TYPES:
                continue
            view = mapped.get(t)
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
                # step1 folded this node into the one the cfg names: the row carries that name
                name, op, folded = qname, q.nodes[qk].op_type, f"{node.op_type} {layer}"
            precision = (info or {}).get("precision")
            if precision is None and layer_info:
                qdtype = _quantized_to(q, out_chain)
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
                )
            )
    if missing_views:
        notes.append(
            f"{len(missing_views)} entries of '{QDQ_MAP_KEY}' name tensors the quantized model does "
            f"not have and were matched structurally instead: {', '.join(missing_views[:5])}"
            + (" ..." if len(missing_views) > 5 else "")
        )
    if not plans:
        raise InputError(
            "the float and quantized models have no float tensor in common to compare; "
            "check that QUANT_MODEL was built from FLOAT_MODEL"
        )
    return AnalysisPlan(plans, notes, layers_known=bool(layer_info))


# --------------------------------------------------------------------------- graphs


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


def _build_single(
    f: _Graph, q: _Graph, plan: AnalysisPlan
) -> tuple[onnx.ModelProto, dict[str, str], list[str], dict[str, int], Namer]:
    """The combined graph: the fp32 graph plus an isolated copy of every quantized compute node.

    Returns ``(model, single_views, notes, types, namer)``: ``single_views``
    maps each fp32 tensor to the combined-graph tensor holding its
    single-layer view; ``types`` are the element types known of the combined
    graph's tensors, ``namer`` gives fresh names in it. The outputs are left
    to the caller. Neither input model is modified.
    """
    float_model, quant_model = f.model, q.model
    ident = _Identity(f, q)
    combined = onnx.ModelProto()
    combined.CopyFrom(float_model)
    del combined.opset_import[:]
    combined.opset_import.extend(_merge_opsets(float_model, quant_model))
    combined.ir_version = max(float_model.ir_version, quant_model.ir_version)
    have_funcs = {(fn.domain, fn.name) for fn in combined.functions}
    combined.functions.extend(fn for fn in quant_model.functions if (fn.domain, fn.name) not in have_funcs)
    g = combined.graph
    used = set(f.values) | set(f.inits) | set(q.values) | set(q.inits)
    fresh = Namer(used)
    types = dict(f.types)

    # a quant-model tensor written by a compute node -> the fp32 tensor it stands for
    src_to_fp32 = {tp.source: tp.tensor for tp in plan.tensors}
    memo: dict[str, str | None] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []

    def fp32_name(x: str) -> str | None:
        if x in f.values:
            return x
        if x in src_to_fp32:
            return src_to_fp32[x]
        for k in ident.forward_chain(x):
            o = q.nodes[k].output[0]
            if o in f.values:
                return o
        return None

    def copy_node(node: onnx.NodeProto, inputs: list[str], outputs: list[str], name: str) -> None:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        del n.input[:]
        n.input.extend(inputs)
        del n.output[:]
        n.output.extend(outputs)
        n.name = name
        new_nodes.append(n)

    def rebuild(x: str) -> str | None:
        """Name in the combined graph of quant tensor ``x`` computed from fp32 tensors."""
        if x == "":
            return ""
        if x in memo:
            return memo[x]
        memo[x] = None  # guards against cycles
        name: str | None = None
        if x in q.inits:
            init = q.inits[x]
            if x in f.inits and _same_initializer(init, f.inits[x]):
                name = x
            else:
                name = fresh(_IN_PREFIX + x)
                t = TensorProto()
                t.CopyFrom(init)
                t.name = name
                new_inits.append(t)
                types[name] = init.data_type
        elif (node := q.producer_node(x)) is not None:
            if ident.is_adapter(node) or not any(node.input):  # adapters and Constant nodes
                ins = [rebuild(i) for i in node.input]
                if all(i is not None for i in ins):
                    outs = [fresh(_IN_PREFIX + o) if o else "" for o in node.output]
                    copy_node(node, ins, outs, fresh(_IN_PREFIX + (node.name or x)))  # type: ignore[arg-type]
                    for o, c in zip(node.output, outs):
                        memo[o] = c
                        if o in q.types:
                            types[c] = q.types[o]
                    name = memo[x]
            else:
                name = fp32_name(x)
        elif x in q.inputs and x in f.values:
            name = x
        memo[x] = name
        return name

    def is_quantized(node: onnx.NodeProto, tps: list[ComparedTensor]) -> bool:
        if any(tp.out_chain for tp in tps):
            return True
        if plan.layers_known:
            # A float layer that only reads dequantized tensors adds no error of its own: the
            # producer's single error already holds that quantization.
            return any(tp.precision not in (None, "float32", "float16") for tp in tps)
        for i in node.input:
            if not i:
                continue
            p = q.producer_node(i)
            if p is not None and ident.is_adapter(p):
                return True
            if i in q.inits and not (i in f.inits and _same_initializer(q.inits[i], f.inits[i])):
                return True
        return False

    by_node: dict[int, list[ComparedTensor]] = defaultdict(list)
    for tp in plan.tensors:
        if tp.quant_node is not None:
            by_node[tp.quant_node].append(tp)

    single_views: dict[str, str] = {}
    notes: list[str] = []
    not_isolated: list[str] = []
    for k in sorted(by_node):
        node = q.nodes[k]
        tps = by_node[k]
        if not is_quantized(node, tps):
            continue
        if subgraphs(node):
            not_isolated.append(f"{node.name or node.output[0]} (has a subgraph)")
            continue
        ins = [rebuild(i) for i in node.input]
        if any(i is None for i in ins):
            bad = [i for i, c in zip(node.input, ins) if c is None]
            not_isolated.append(f"{node.name or node.output[0]} (input {bad[0]!r} has no fp32 counterpart)")
            continue
        outs = [fresh(_OUT_PREFIX + o) if o else "" for o in node.output]
        copy_node(node, ins, outs, fresh(_OUT_PREFIX + (node.name or node.output[0])))  # type: ignore[arg-type]
        local = dict(zip(node.output, outs))
        for o, c in local.items():
            if o in q.types:
                types[c] = q.types[o]
        for tp in tps:
            cur = local[tp.source]
            for ck in tp.out_chain:
                a = q.nodes[ck]
                rest = [rebuild(i) for i in a.input[1:]]
                if any(r is None for r in rest):
                    cur = ""
                    break
                out = fresh(_OUT_PREFIX + a.output[0])
                copy_node(a, [cur, *rest], [out], fresh(_OUT_PREFIX + (a.name or a.output[0])))  # type: ignore[list-item]
                if a.output[0] in q.types:
                    types[out] = q.types[a.output[0]]
                cur = out
            if cur:
                single_views[tp.tensor] = cur
            else:
                not_isolated.append(f"{tp.tensor} (output adapter parameters are not constant)")

    if not_isolated:
        notes.append(
            f"single error not computed for {len(not_isolated)} layer(s): "
            + "; ".join(not_isolated[:5])
            + (" ..." if len(not_isolated) > 5 else "")
        )
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    return combined, single_views, notes, types, fresh


# --------------------------------------------------------------------------- analysis graph

_Q_PREFIX = "hybridq.quant/"


def _align_opsets(fm: onnx.ModelProto, qm: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
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


def _embed(combined: onnx.ModelProto, q: _Graph, fresh: Namer, types: dict[str, int]) -> dict[str, str]:
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
class _AnalysisGraph:
    model: onnx.ModelProto
    single_views: dict[str, str]  # fp32 tensor -> its single view in the analysis graph
    notes: list[str]
    quant_views: dict[str, str]  # fp32 tensor -> its quant view in the analysis graph
    types: dict[str, int]  # element types of the analysis graph's tensors, where known


def _build_analysis_graph(f: _Graph, q: _Graph, plan: AnalysisPlan) -> _AnalysisGraph:
    """One graph for everything: fp32 graph + isolated layers + the whole quantized graph.

    The quantized graph is embedded unchanged (renamed), so ONNX Runtime fuses
    its QDQ groups into integer kernels as when deployed (a view that is also
    an output gets its own DequantizeLinear). The outputs are, per measured
    tensor, the fp32 tensor, its quant view and its single view.
    """
    combined, single_views, notes, types, fresh = _build_single(f, q, plan)
    rename = _embed(combined, q, fresh, types)
    ag = _AnalysisGraph(combined, single_views, notes, {tp.tensor: rename[tp.view] for tp in plan.tensors}, types)
    del combined.graph.output[:]
    _set_outputs(combined, [x for tp in plan.tensors for x in _names(tp, ag)], types)
    return ag


# --------------------------------------------------------------------------- running


def _load(model: str | os.PathLike[str] | onnx.ModelProto, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{what} '{path}' does not exist or is not a file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises several unrelated types on corrupt files
        raise ModelError(f"{what} '{path}' is not a readable ONNX model ({type(e).__name__}: {e})") from None


class _Session:
    """An ONNX Runtime CPU session over an in-memory model, in the process's shared arena."""

    def __init__(self, model: onnx.ModelProto, what: str, host_int8: bool = False) -> None:
        self.what = what
        try:
            # int8 products as the model defines them, whatever this CPU's default kernels do (unless
            # host_int8); one thread per run: samples run side by side, one per core, each measuring its
            # own tensors (ORT's own threads would spin against them); one arena for all segment sessions:
            # a segment's outputs reuse the blocks the previous segment's freed while they are still in
            # cache (rec peak RSS 937 -> 254 MB)
            self.sess = _runtime.session(model, exact_int8=not host_int8, threads=1, shared_arena=True, log_level=3)
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the {what}: {e}") from None
        self.exact_failed = not host_int8 and not _runtime.is_exact(self.sess)  # ORT could not make int8 exact: say so
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feed: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        try:
            values = self.sess.run(None, {n: feed[n] for n in self.input_names})
        except Exception as e:
            cls = InputError if "INVALID_ARGUMENT" in str(e) else HybridqError
            raise cls(f"running the {self.what} on sample {index} failed: {e}") from None
        return dict(zip(self.output_names, values))


_SEGMENT_BYTES = 1 << 20  # compared bytes per segment (hybridq.segments): its tensors are measured while in cache


class _Runner:
    """The analysis graph as a chain of sessions, one per segment (see :mod:`hybridq.segments`)."""

    def __init__(self, segments: list[Segment], what: str, host_int8: bool) -> None:
        self.sessions = [_Session(s.model, what, host_int8) for s in segments]
        self.exact_failed = any(s.exact_failed for s in self.sessions)
        later: set[str] = set()
        self.keep: list[set[str]] = []  # after segment k: the tensors later segments read
        for s in reversed(segments):
            self.keep.append(set(later))
            later.update(s.inputs)
        self.keep.reverse()

    def run(self, sample: dict[str, np.ndarray], index: int) -> Iterator[dict[str, np.ndarray]]:
        """Each segment's outputs in turn; tensors are dropped once no later segment reads them."""
        env = dict(sample)
        for sess, keep in zip(self.sessions, self.keep):
            out = sess.run(env, index)
            yield out
            env.update(out)
            env = {k: v for k, v in env.items() if k in keep}


def _check_feed(sample: dict[str, np.ndarray], names: list[str], index: int) -> None:
    for n in names:
        if n not in sample:
            raise InputError(
                f"sample {index} has no value for model input {n!r} (it has {sorted(sample)!r})"
            )
    extra = [k for k in sample if k not in names]
    if extra:
        raise InputError(
            f"sample {index} has a value for {extra[0]!r}, which is not an input of the model "
            f"(inputs: {names!r}).{did_you_mean(extra[0], names)}"
        )


_WORKERS = 2  # samples in flight at most (capped by the cores this process may use)
_FORK_LIMIT = 512 << 20  # analysis graphs above this size run on threads (a process each would copy it)


def _cores() -> int:
    """Samples to keep in flight: one per core this process may run on, at most ``_WORKERS``."""
    return max(1, min(_WORKERS, _runtime.cores()))


class _Work:
    """What a worker needs to measure a sample; the sessions are made where the samples run."""

    def __init__(
        self, m: _Measure, ag: _AnalysisGraph, targets: list[list[str]], weights: list[float], inputs: list[str], host_int8: bool
    ) -> None:
        self.measure, self.ag, self.host_int8 = m, ag, host_int8
        # cut once, here, before any worker starts (rec: 0.2 s that each worker would repeat)
        segments = split(ag.model, targets, ag.types, weights, _SEGMENT_BYTES)
        self.segments = segments or [Segment(ag.model, inputs, [o.name for o in ag.model.graph.output])]
        self.runner: _Runner | None = None
        self.error: HybridqError | None = None

    def start(self) -> None:
        """Create the segment sessions (raises ModelError when ONNX Runtime cannot load one)."""
        self.runner = _Runner(self.segments, "float and quantized models with the isolated quantized layers", self.host_int8)

    def sample(self, sample: dict[str, np.ndarray], n: int) -> _SampleErrors:
        if self.error is not None:
            raise self.error
        assert self.runner is not None
        return self.measure.sample(self.runner, sample, n)


_CHILD: list[_Work] = []  # in a worker process: its _Work


def _child_start(work: _Work) -> None:
    """Worker process set-up: Ctrl-C is the parent's to handle; a session error waits for the first sample."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: end quietly
    try:  # end with the parent, however it ends (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    try:
        work.start()
    except HybridqError as e:
        work.error = e
    _CHILD.append(work)


def _child_sample(sample: dict[str, np.ndarray], n: int) -> _SampleErrors:
    return _CHILD[0].sample(sample, n)


@contextmanager
def _executor(work: _Work, workers: int) -> Iterator[tuple[Executor, int, Callable[[dict[str, np.ndarray], int], _SampleErrors]]]:
    """A pool running ``workers`` samples at once: ``(pool, workers, function to submit)``.

    Worker processes where fork exists and the graph is small: each runs its
    sample's sessions and metrics without waiting for the other's GIL (cls
    analyze 30 -> 16 ms per sample on 2 cores, before the compiled metrics).
    Otherwise threads, which share the sessions.
    """
    if workers > 1 and sys.platform.startswith("linux") and model_bytes(work.ag.model) <= _FORK_LIMIT:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_child_start, initargs=(work,)) as pool:
            yield pool, workers, _child_sample
        return
    work.start()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hybridq-analyze") as tpool:
        yield tpool, max(1, workers), work.sample


def analyze(
    float_model: str | os.PathLike[str] | onnx.ModelProto,
    quant_model: str | os.PathLike[str] | onnx.ModelProto,
    samples: Iterable[dict[str, np.ndarray]],
    *,
    dump: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    on_sample: Callable[[], None] | None = None,
    host_int8: bool = False,
) -> AnalysisResult:
    """Entire and single error of every layer output both models have, averaged over ``samples``.

    ``samples`` yields ``{input name: array}`` and is consumed once; a
    sample's tensors are measured segment by segment as they are computed
    and dropped (or appended to the snapshot when ``dump`` is a directory,
    see :mod:`hybridq.snapshot`; ``max_bytes`` caps the arrays written
    there). Without ``dump``, up to one sample per core is in flight, each
    in its own worker process (a thread where fork is missing or the graph
    is over 512 MB); results are added in sample order either way.
    With ``dump``, the manifest and the reports are written too.
    ``on_sample`` is called after each sample (for progress bars).
    int8 products are exact (:mod:`hybridq.kernels`) unless ``host_int8``,
    which runs this CPU's default ONNX Runtime kernels, saturating ones included.

    Raises :class:`~hybridq.errors.InputError` for unusable models or
    samples, :class:`~hybridq.errors.OutputError` when the dump cannot be
    written.
    """
    fm = _load(float_model, "float model")
    qm = _load(quant_model, "quantized model")
    fm, qm = _align_opsets(fm, qm)
    qm = as_deployed(qm)  # the kernels a plain session runs, exact where asked
    f, q = _Graph(fm), _Graph(qm)
    if sorted(q.inputs) != sorted(f.inputs):
        raise InputError(
            f"the float and quantized models have different inputs ({f.inputs!r} vs {q.inputs!r}); "
            "check that QUANT_MODEL was built from FLOAT_MODEL"
        )
    plan = _plan(f, q)
    ag = _build_analysis_graph(f, q, plan)
    targets = [_names(tp, ag) for tp in plan.tensors]
    samples = iter(samples)
    first = next(samples, None)
    weights = _target_bytes(fm, plan, targets, first)
    if first is not None:
        samples = itertools.chain([first], samples)
    writer = None
    if dump is not None:
        from .snapshot import ArrayDump

        writer = ArrayDump(Path(dump), [tp.tensor for tp in plan.tensors], max_bytes)
    m = _Measure(plan, ag, exact=writer is not None, outputs=f.outputs)
    if writer is None:
        fused_kernel()  # compiled or loaded once here, before the workers start
    work = _Work(m, ag, targets, weights, f.inputs, host_int8)
    # a snapshot is written in sample order by one worker; otherwise one sample per core
    head = list(itertools.islice(samples, _cores()))
    samples = itertools.chain(head, samples)
    n = 0
    try:
        with _executor(work, 1 if writer is not None else len(head)) as (pool, workers, run):
            pending: deque[Future[_SampleErrors]] = deque()

            def finish_oldest() -> None:
                try:
                    done = pending.popleft().result()
                except BrokenProcessPool as e:
                    raise HybridqError(
                        f"a worker process of the analysis ended abruptly ({e}): it was killed or ran out of "
                        "memory; free memory and re-run, or run on one core (`taskset -c 0 hybridq analyze ...`), "
                        "which measures the samples one after the other in this process"
                    ) from None
                m.add(done)
                if writer is not None:
                    m.dump(writer, done)
                if on_sample is not None:
                    on_sample()

            for sample in samples:
                _check_feed(sample, f.inputs, n)
                pending.append(pool.submit(run, sample, n))
                n += 1
                while len(pending) >= workers:
                    finish_oldest()
            while pending:
                finish_oldest()
        if n == 0:
            raise InputError("no samples to analyse: the dataset is empty")
        notes = plan.notes + ag.notes
        if m.exact_failed:
            notes.append(NOT_EXACT_NOTE)
        elif u8s8_saturates() and not host_int8 and _has_int8(qm):
            notes.append(SATURATION_NOTE)
        result = AnalysisResult(layers=m.layers(), outputs=list(f.outputs), n_samples=n, notes=notes)
        if writer is not None:
            writer.finish(result)
            from .report import write_reports
            from .snapshot import write_snapshot

            write_snapshot(result, Path(dump))  # type: ignore[arg-type]
            write_reports(result, Path(dump))  # type: ignore[arg-type]
            writer = None
        return result
    finally:
        if writer is not None:
            writer.abort()


def _has_int8(model: onnx.ModelProto) -> bool:
    """Does ``model`` dequantize any 8-bit integer tensor (so int8 kernels may run)?"""
    eight = (TensorProto.INT8, TensorProto.UINT8)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return any(n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in eight for n in model.graph.node)


def _target_bytes(
    fm: onnx.ModelProto, plan: AnalysisPlan, targets: list[list[str]], sample: dict[str, np.ndarray] | None
) -> list[float]:
    """Bytes each target's compared arrays take for ``sample`` (shapes inferred; unknown sizes get the mean)."""
    shapes = tensor_shapes(concrete_shapes(fm, sample)) if sample is not None else {}
    sizes: list[float | None] = []
    for tp, names in zip(plan.tensors, targets):
        dims = shapes.get(tp.tensor)
        known = dims is not None and all(isinstance(d, int) and d > 0 for d in dims)
        sizes.append(4.0 * len(names) * float(np.prod(dims)) if known else None)  # type: ignore[arg-type]
    seen = [x for x in sizes if x is not None]
    fill = sum(seen) / len(seen) if seen else float(1 << 20)
    return [fill if x is None else x for x in sizes]


def _names(tp: ComparedTensor, ag: _AnalysisGraph) -> list[str]:
    """Analysis-graph tensors compared for ``tp``: the fp32 tensor, its quant view, its single view if any."""
    sv = ag.single_views.get(tp.tensor)
    return [tp.tensor, ag.quant_views[tp.tensor]] + ([sv] if sv else [])


@dataclass
class _SampleErrors:
    """One sample's measurements, made by a worker and added to the totals in sample order."""

    index: int
    values: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)  # entire[, single]
    shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # shape and dtype
    skipped: set[str] = field(default_factory=set)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # fp32, quant (dump only)
    slices: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # model outputs: axis, slice_sums
    exact_failed: bool = False  # measured on this CPU's default int8 kernels although exact ones were asked for


class _Measure:
    """Per-tensor accumulators; :meth:`sample` runs in the workers, :meth:`add` in the caller, in sample order."""

    def __init__(self, plan: AnalysisPlan, ag: _AnalysisGraph, exact: bool, outputs: Iterable[str] = ()) -> None:
        self.plan, self.ag, self.exact = plan, ag, exact
        self.outputs = frozenset(outputs)  # model outputs get the per-slice measure too
        self.slices: dict[str, SliceAccumulator] = {}
        self.ragged: set[str] = set()
        self.entire = {tp.tensor: Accumulator() for tp in plan.tensors}
        self.single = {t: Accumulator() for t in ag.single_views}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.exact_failed = False
        self.todo = {tp.tensor: (tp, _names(tp, ag)) for tp in plan.tensors}
        self.wanted = {x for _, names in self.todo.values() for x in names}
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for t, (_, names) in self.todo.items():
            for x in names:
                self.by_name[x].append(t)

    def sample(self, runner: _Runner, sample: dict[str, np.ndarray], n: int) -> _SampleErrors:
        """Run one sample segment by segment, measuring each tensor as soon as its arrays exist.

        The arrays are still in cache then, and dropped right after (kept
        for the snapshot in ``exact`` mode).
        """
        res = _SampleErrors(n, exact_failed=runner.exact_failed)
        waiting: dict[str, np.ndarray] = {}
        done: set[str] = set()
        for out in runner.run(sample, n):
            waiting.update((k, v) for k, v in out.items() if k in self.wanted)
            for tp, vals in self.ready(waiting, done):
                self._measure(tp, vals, res)
        return res

    def ready(self, have: dict[str, np.ndarray], done: set[str]) -> list[tuple[ComparedTensor, list[np.ndarray]]]:
        """Tensors not in ``done`` whose compared arrays are all in ``have``, with those arrays.

        Adds them to ``done`` and drops from ``have`` the arrays no other
        pending tensor needs, so a sample's tensors are freed as it goes.
        """
        out = []
        for x in list(have):
            for t in self.by_name.get(x, []):
                tp, names = self.todo[t]
                if t not in done and all(y in have for y in names):
                    done.add(t)
                    out.append((tp, [have[y] for y in names]))
        for tp, _ in out:
            for y in self.todo[tp.tensor][1]:
                if y in have and all(u in done for u in self.by_name[y]):
                    del have[y]
        return out

    def _measure(self, tp: ComparedTensor, vals: list[np.ndarray], res: _SampleErrors) -> None:
        """One tensor of one sample: its metrics against each view (and its arrays for a dump)."""
        t, a, tests = tp.tensor, vals[0], vals[1:]
        if a.dtype.kind != "f":
            res.skipped.add(t)  # not a float tensor after all (types were unknown)
            return
        for b in tests:
            if a.shape != b.shape:
                raise HybridqError(
                    f"tensor {t!r} has shape {a.shape} in the float model but its quantized view "
                    f"{tp.view!r} has shape {b.shape} (sample {res.index}); the models do not match"
                )
        if res.index == 0:  # the totals keep the first sample's shape and dtype
            res.shapes[t] = (tuple(a.shape), str(a.dtype))
        if t in self.outputs and (axis := channel_axis(a.shape)) is not None:
            res.slices[t] = (axis, slice_sums(a, tests[0], axis, fast=not self.exact))
        if self.exact:
            res.values[t] = [sample_metrics(a, b) for b in tests]
            res.arrays[t] = (a, tests[0])
        else:
            res.values[t] = metrics_many(a, tests)

    def add(self, res: _SampleErrors) -> None:
        """Add one sample's measurements to the totals (samples must come in order)."""
        self.exact_failed |= res.exact_failed
        if res.index == 0:
            self.skipped |= res.skipped
            for t, (shape, dtype) in res.shapes.items():
                self.shapes[t], self.dtypes[t] = shape, dtype
        for t, values in res.values.items():
            if t in self.skipped:
                continue
            self.entire[t].add_values(values[0])
            if len(values) > 1:
                self.single[t].add_values(values[1])
        for t, (axis, sums) in res.slices.items():
            acc = self.slices.setdefault(t, SliceAccumulator(axis))
            if t in self.skipped or t in self.ragged:
                continue
            if acc.sums is not None and acc.sums.shape != sums.shape:
                self.ragged.add(t)  # the slice axis changed length between samples: no per-slice measure
                del self.slices[t]
                continue
            acc.add_sums(sums)

    def dump(self, writer: Any, res: _SampleErrors) -> None:
        """Append one sample's arrays, in plan order, to the snapshot."""
        writer.add_sample({tp.tensor: res.arrays[tp.tensor] for tp in self.plan.tensors if tp.tensor in res.arrays})

    def layers(self) -> list[LayerError]:
        """One row per measured tensor, in graph order."""
        return [
            LayerError(
                tensor=tp.tensor,
                layer=tp.layer,
                op_type=tp.op_type,
                shape=self.shapes[tp.tensor],
                dtype=self.dtypes[tp.tensor],
                entire=self.entire[tp.tensor].result(),
                single=self.single[tp.tensor].result() if tp.tensor in self.single else None,
                quant_tensor=tp.view,
                precision=tp.precision,
                folded=tp.folded,
                slices=self.slices[tp.tensor].result() if tp.tensor in self.slices else None,
            )
            for tp in self.plan.tensors
            if tp.tensor not in self.skipped
        ]
