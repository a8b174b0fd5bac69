"""What an analysis returns (plain data, no engine): per-layer errors, the whole result, and the sink.

:class:`LayerError` is one row (one fp32 tensor), :class:`AnalysisResult` the
table plus notes, which is also what a snapshot's ``manifest.json`` holds.
:class:`SampleSink` is the interface through which the engine hands each
sample's compared arrays to a writer while it runs (a snapshot's
:class:`~hybridq.snapshot.ArrayDump`), so the arrays are streamed to disk
and never held for all samples at once; the engine itself writes no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..metrics import Metrics, SliceMetrics, from_strict_json, to_strict_json


@dataclass
class LayerError:
    """Errors of one fp32 tensor (one row of the table), in graph order.

    ``layer`` and ``op_type`` name the node the cfg names for ``tensor``: the
    fp32 model's node that writes it, or, where step1 folded that node into
    another (a BatchNormalization into its Conv), the node it was folded into,
    with the folded one in ``folded`` (``"BatchNormalization block0.bn1"``).
    An activation exported as a chain of elementwise ops is one row at its
    output: ``op_type`` is the activation (``HardSwish``), ``layer`` the
    chain's last node and ``folded`` the nodes inside it.
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
    ``bounds``: both tensors were clipped to it before measuring, since every reader saturates beyond
    (``(0, inf)`` before a Relu); the dumped arrays are the raw ones.
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
    bounds: tuple[float, float] | None = None
    pooled: tuple[float, float] | None = None  # a model output's whole-tensor cosine and SNR with the samples pooled
    nonfinite: tuple[int, int] | None = None  # +-inf/NaN left out of the figures: (equal infinities, values that differ)

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
            "compared_within": [v if math.isfinite(v) else None for v in self.bounds] if self.bounds is not None else None,
            "pooled": {"cosine": self.pooled[0], "snr_db": self.pooled[1]} if self.pooled is not None else None,
            "non_finite": {"equal": self.nonfinite[0], "differ": self.nonfinite[1]} if self.nonfinite is not None else None,
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
            bounds=_bounds(d.get("compared_within")),
            pooled=_pooled(d.get("pooled")),
            nonfinite=(int(d["non_finite"]["equal"]), int(d["non_finite"]["differ"])) if d.get("non_finite") else None,
        )


def _bounds(doc: Any) -> tuple[float, float] | None:
    """A manifest's `compared_within` ([low, high]; null was an infinite side in strict JSON) as a tuple."""
    if not isinstance(doc, list) or len(doc) != 2:
        return None
    try:
        return (-math.inf if doc[0] is None else float(doc[0]), math.inf if doc[1] is None else float(doc[1]))
    except (TypeError, ValueError):  # a hand-edited manifest: the range is only a record
        return None


def _pooled(doc: Any) -> tuple[float, float] | None:
    """A manifest's `pooled` ({cosine, snr_db}; a non-finite value is null there) as a tuple; None for older manifests."""
    if not isinstance(doc, dict):
        return None
    try:
        return tuple(math.nan if doc.get(k) is None else float(doc[k]) for k in ("cosine", "snr_db"))  # type: ignore[return-value]
    except (TypeError, ValueError):
        return None


def bounds_note(layers: list[LayerError]) -> list[str]:
    """The note that says which tensors were measured clipped to where their readers saturate (none: no note)."""
    within = [x for x in layers if x.bounds is not None]
    if not within:
        return []
    shown = ", ".join(f"{x.tensor} to [{x.bounds[0]:g}, {x.bounds[1]:g}]" for x in within[:4])  # type: ignore[index]
    more = f" and {len(within) - 4} more" if len(within) > 4 else ""
    return [f"{len(within)} tensor(s) are compared within the range their readers tell apart, the fp32 and the quantized "
            f"values both clipped to it ({shown}{more}): every value beyond is one value to the Relu, Clip, Sigmoid or "
            "HardSigmoid/HardSwish that reads it. A snapshot keeps the raw arrays; manifest.json records each range as compared_within."]


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
class OutputMatch:
    """An integer or bool model output (an ArgMax, TopK indices, a mask) compared value for value with fp32's.

    ``differ`` of ``total`` values differ, pooled over ``samples`` samples (the ones whose fp32 and quantized shapes
    agree); ``shape`` and ``dtype`` describe the first sample's fp32 tensor.
    """

    tensor: str
    layer: str
    dtype: str
    shape: tuple[int, ...]
    differ: int
    total: int
    samples: int

    @property
    def label(self) -> str:
        """``layer [tensor] dtype``, as :attr:`LayerError.label` names a row."""
        return f"{self.layer} [{self.tensor}] {self.dtype}"

    @property
    def share(self) -> float:
        """The fraction of values that differ (0.0 when there is none)."""
        return self.differ / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer, "label": self.label, "dtype": self.dtype, "shape": list(self.shape),
                "differ": self.differ, "total": self.total, "share": self.share, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputMatch:
        return cls(str(d["tensor"]), str(d["layer"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["differ"]),
                   int(d["total"]), int(d["samples"]))


@dataclass
class RuntimeRow:
    """One tensor (a model output, or a layer a device dumped) as another runtime computed it: against fp32 and against
    hybridq's (exact) simulation."""

    tensor: str
    runtime: str
    vs_fp32: Metrics
    vs_simulator: Metrics

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "runtime": self.runtime, "vs_fp32": self.vs_fp32.to_dict(encode=False),
                "vs_simulator": self.vs_simulator.to_dict(encode=False)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeRow:
        return cls(str(d["tensor"]), str(d["runtime"]), Metrics.from_dict(d["vs_fp32"]), Metrics.from_dict(d["vs_simulator"]))


@dataclass
class AnalysisResult:
    """Everything the report renders; also what a snapshot's ``manifest.json`` holds.

    ``exact_outputs`` are the integer or bool model outputs, compared value for value (they have no row in ``layers``);
    ``not_compared`` names the model outputs with neither (``{tensor: why}``).
    """

    layers: list[LayerError]
    outputs: list[str]
    n_samples: int
    notes: list[str] = field(default_factory=list)
    dumped_samples: int = 0
    dump_message: str | None = None
    runtime: list[RuntimeRow] = field(default_factory=list)
    exact_outputs: list[OutputMatch] = field(default_factory=list)
    not_compared: dict[str, str] = field(default_factory=dict)
    batched_rows: int | None = None  # the samples the n_samples dataset entries held, where they hold batches

    @property
    def samples_said(self) -> str:
        """How many samples were compared, in words; where the dataset entries held batches, the samples and the entries."""
        if self.batched_rows:
            return f"{self.batched_rows} samples in {self.n_samples} batched dataset entries"
        return f"{self.n_samples} sample(s)"

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready dict (:func:`~hybridq.metrics.to_strict_json`: non-finite numbers are
        ``null``, listed under ``"nonfinite"``); ``tensors`` is keyed by tensor name in graph order."""
        return to_strict_json({
            "format": "hybridq-snapshot",
            "version": 1,
            "n_samples": self.n_samples,
            "batched_rows": self.batched_rows,
            "outputs": list(self.outputs),
            "notes": list(self.notes),
            "dumped_samples": self.dumped_samples,
            "dump_message": self.dump_message,
            "tensors": {layer.tensor: layer.to_dict() for layer in self.layers},
            "runtime": [r.to_dict() for r in self.runtime],
            "exact_outputs": [x.to_dict() for x in self.exact_outputs],
            "not_compared": dict(self.not_compared),
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
            runtime=[RuntimeRow.from_dict(r) for r in d.get("runtime", [])],
            exact_outputs=[OutputMatch.from_dict(x) for x in d.get("exact_outputs", [])],
            not_compared={str(k): str(v) for k, v in d.get("not_compared", {}).items()},
            batched_rows=int(d["batched_rows"]) if d.get("batched_rows") else None,
        )

    def worst(self, n: int | None = None) -> list[LayerError]:
        """The ``n`` worst layers (all when ``None``), by :func:`badness`; ties keep graph order."""
        ranked = sorted(self.layers, key=badness)
        return ranked if n is None else ranked[:n]

    def output_layers(self) -> list[LayerError]:
        """The rows of the model's outputs, in output order."""
        by_name = {layer.tensor: layer for layer in self.layers}
        return [by_name[o] for o in self.outputs if o in by_name]

    def uncompared_outputs(self) -> dict[str, str]:
        """The model outputs with neither a row nor a value-for-value comparison, in output order, and why."""
        done = {layer.tensor for layer in self.layers} | {x.tensor for x in self.exact_outputs}
        return {o: self.not_compared.get(o, "this result holds no figures for it") for o in self.outputs if o not in done}



class SampleSink(Protocol):
    """Receives each sample's compared arrays while the analysis runs (a snapshot writer implements it).

    The engine calls :meth:`start` once with the measured tensors in graph
    order (before the first sample), :meth:`add_sample` once per sample in
    sample order, then :meth:`finish` with the result (the sink may record in
    it what it wrote: file names, a cap message), or :meth:`abort` if the
    analysis fails. The arrays passed to :meth:`add_sample` are not kept by
    the engine: a sink that wants them must write or copy them.
    """

    def start(self, tensors: list[str]) -> None:
        """The tensors that will be measured, in graph order."""

    def add_sample(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """One sample: ``{tensor: (fp32 array, quant view array)}``."""

    def finish(self, result: AnalysisResult) -> None:
        """The analysis ended: complete the output and record it in ``result``."""

    def abort(self) -> None:
        """The analysis failed: remove anything half-written."""


def runtime_departures(rows: list[RuntimeRow], cos_threshold: float, snr_threshold: float) -> list[RuntimeRow]:
    """Rows where the runtime departs from the simulation (cosine or SNR vs simulator below a threshold), worst first."""
    def bad(r: RuntimeRow) -> bool:
        return not (r.vs_simulator.cosine >= cos_threshold and r.vs_simulator.snr_db >= snr_threshold)

    return sorted((r for r in rows if bad(r)), key=lambda r: (r.vs_simulator.cosine if math.isfinite(r.vs_simulator.cosine) else -2.0,
                                                              r.vs_simulator.snr_db if math.isfinite(r.vs_simulator.snr_db) else -1e9))


class Tee:
    """Several sinks as one: each call goes to every sink, in order."""

    def __init__(self, *sinks: SampleSink) -> None:
        self.sinks = sinks

    def start(self, tensors: list[str]) -> None:
        """Pass on."""
        for s in self.sinks:
            s.start(tensors)

    def add_sample(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Pass on."""
        for s in self.sinks:
            s.add_sample(arrays)

    def finish(self, result: AnalysisResult) -> None:
        """Pass on."""
        for s in self.sinks:
            s.finish(result)

    def abort(self) -> None:
        """Pass on."""
        for s in self.sinks:
            s.abort()
