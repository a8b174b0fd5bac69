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
snapshot is dumped, so the manifest matches the arrays exactly). The segment
sessions are opened once, on one thread per core; samples run side by side,
one per core, on a thread of this process and in forked worker processes that
inherit those sessions (threads only where fork is missing or the graph is
large); results are added in sample order.

The package, one module per job (data flows down the list):

* :mod:`.results`: what an analysis returns (:class:`LayerError`,
  :class:`OutputMatch`, :class:`AnalysisResult`) and the :class:`SampleSink` a caller passes to
  receive each sample's arrays; plain data, no engine;
* :mod:`.verdict`: :func:`judge` and its thresholds (plain data);
* :mod:`.matching`: which fp32 tensor compares with which quant view
  (:func:`plan_analysis`);
* :mod:`.graphs`: the combined analysis graph;
* :mod:`.running`: sessions, segments and the worker pool
  (:class:`AnalysisOptions`);
* :mod:`.measuring`: per-sample metrics and their accumulation;
* :mod:`.engine`: :func:`analyze`, which ties them together and writes no
  file (``hybridq.api`` writes the snapshot and the reports).
"""

from __future__ import annotations

from ..qdq import QDQ_MAP_KEY
from .engine import analyze
from .matching import AnalysisPlan, ComparedTensor, plan_analysis
from .results import AnalysisResult, LayerError, OutputMatch, RuntimeRow, SampleSink, Tee, badness
from .running import AnalysisOptions
from .verdict import COS_THRESHOLD, SNR_THRESHOLD, Verdict, judge

__all__ = [
    "COS_THRESHOLD",
    "QDQ_MAP_KEY",
    "SNR_THRESHOLD",
    "AnalysisOptions",
    "AnalysisPlan",
    "AnalysisResult",
    "ComparedTensor",
    "LayerError",
    "OutputMatch",
    "RuntimeRow",
    "SampleSink",
    "Tee",
    "Verdict",
    "analyze",
    "badness",
    "judge",
    "plan_analysis",
]
