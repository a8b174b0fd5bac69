"""The analysis: plan, build the analysis graph once, run the samples, return an :class:`AnalysisResult`.

Writes no file: each sample's arrays go to the :class:`SampleSink` the caller
passes (``hybridq.api`` passes a snapshot writer), and the caller writes the
manifest and the reports.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from .. import _runtime
from ..deployed import as_deployed
from ..errors import HybridqError, InputError, ModelError
from ..kernels import NOT_EXACT_NOTE, SATURATION_NOTE, int8_product_nodes, u8s8_saturates
from ..metrics import fused_kernel, worth_compiling
from .graphs import align_opsets, build_analysis_graph, compared_names
from .matching import AnalysisPlan, ModelIndex, plan_tensors
from .measuring import Measure, SampleErrors, target_bytes
from .results import AnalysisResult, SampleSink, bounds_note
from .running import AnalysisOptions, Work, check_feed, executor, in_flight
from .sharded import reads_itself, run_sharded


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


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused meanwhile (re-enabled after, when it was on).

    The analysis builds many objects (graph indexes, the plan, segment models) and frees them by
    reference counting; a full collection over them and the interpreter's own cost rec 40-70 ms a run.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@_cyclic_gc_paused()
def analyze(
    float_model: str | os.PathLike[str] | onnx.ModelProto,
    quant_model: str | os.PathLike[str] | onnx.ModelProto,
    samples: Iterable[dict[str, np.ndarray]],
    *,
    sink: SampleSink | None = None,
    on_sample: Callable[[], None] | None = None,
    host_int8: bool = False,
    options: AnalysisOptions | None = None,
) -> AnalysisResult:
    """Entire and single error of every layer output both models have, averaged over ``samples``.

    ``samples`` yields ``{input name: array}`` and is consumed once; a
    sample's tensors are measured segment by segment as they are computed
    and dropped (or handed to ``sink``, in sample order, when one is given:
    :class:`~hybridq.analysis.results.SampleSink`; the metrics are then
    summed in float64 so a snapshot's manifest matches its arrays exactly).
    Without a sink, up to one sample per core is in flight (at most
    ``options.workers``), one on a thread here and the others in forked worker processes (threads only
    where fork is missing, the graph is over ``options.fork_limit`` or the samples are few); results are added in sample order either way. Nothing is written here: the
    caller writes the manifest and the reports (:func:`hybridq.api.analyze_samples`).
    ``on_sample`` is called after each sample (for progress bars).
    int8 products are exact (:mod:`hybridq.kernels`) unless ``host_int8``,
    which runs this CPU's default ONNX Runtime kernels, saturating ones included.

    Raises :class:`~hybridq.errors.InputError` for unusable models or
    samples; whatever the sink raises (an :class:`~hybridq.errors.OutputError`
    when the snapshot cannot be written) is passed on, after ``sink.abort()``.
    """
    options = options or AnalysisOptions()
    fm, qm = _models(float_model, quant_model)
    deployed = as_deployed(qm)  # the kernels a plain session runs, exact where asked
    f, q, written = ModelIndex(fm), ModelIndex(deployed), ModelIndex(qm) if deployed is not qm else None  # rows: the model's own precisions
    if sorted(q.inputs) != sorted(f.inputs):
        raise InputError(
            f"the float and quantized models have different inputs ({f.inputs!r} vs {q.inputs!r}); "
            "check that QUANT_MODEL was built from FLOAT_MODEL"
        )
    plan = plan_tensors(f, q, written)
    ag = build_analysis_graph(f, q, plan)
    targets = [compared_names(tp, ag) for tp in plan.tensors + plan.exact]
    count = _known_count(samples)
    if reads_itself(samples, options.execution) is not None:
        first = samples.first()  # workers read the samples themselves: only the first is read here
    else:
        samples = iter(samples)
        first = next(samples, None)
        if first is not None:
            samples = itertools.chain([first], samples)
    weights, shapes = target_bytes(fm, plan, targets, first)
    if sink is not None:
        sink.start([tp.tensor for tp in plan.tensors])
    compiled = sink is None and worth_compiling(None if count is None else count * sum(weights) / 8)  # pairs ~ bytes / 8
    m = Measure(plan, ag, exact=sink is not None, outputs=f.outputs, compiled=compiled, shapes=shapes)
    if compiled:
        fused_kernel()  # loaded here, before the workers start
    work = Work(m, ag, targets, weights, f.inputs, host_int8, options)
    try:
        if options.execution is not None:
            n = run_sharded(work, m, samples, options.execution, f.inputs, sink, on_sample)
        else:
            # a snapshot is written in sample order by one worker; otherwise one sample per core
            head = list(itertools.islice(samples, in_flight(options)))
            samples = itertools.chain(head, samples)
            try:
                n = _run(work, m, samples, 1 if sink is not None else len(head), f.inputs, sink, on_sample, count)
            except HybridqError as exc:  # a sample's run failed (not a load or a feed): the samples may not suit the model
                raise (exc if isinstance(exc, (ModelError, InputError)) else _input_error(fm, first) or exc) from None
        if n == 0:
            raise InputError("no samples to analyse: the dataset is empty")
        result = _result(f, plan, m, n, _notes(plan.notes + ag.notes, m, deployed, host_int8, q.types))
        if sink is not None:
            sink.finish(result)
            sink = None
        return result
    finally:
        if sink is not None:
            sink.abort()


def _run(
    work: Work, m: Measure, samples: Iterable[dict[str, np.ndarray]], workers: int, inputs: list[str],
    sink: SampleSink | None, on_sample: Callable[[], None] | None, count: int | None = None,
) -> int:
    """Run every sample on ``workers`` workers, adding results (and handing arrays to ``sink``) in sample order."""
    n = 0
    with executor(work, workers, count) as (pool, workers, run):
        pending: deque[Future[SampleErrors]] = deque()

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
            if sink is not None:
                m.dump(sink, done)
            if on_sample is not None:
                on_sample()

        for sample in samples:
            check_feed(sample, inputs, n)
            pending.append(pool.submit(run, sample, n))
            n += 1
            while len(pending) >= workers:
                finish_oldest()
        while pending:
            finish_oldest()
    return n


def _models(float_model: str | os.PathLike[str] | onnx.ModelProto, quant_model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both models loaded at one opset; an InputError when they are given the other way round."""
    fm, qm = align_opsets(_load(float_model, "float model"), _load(quant_model, "quantized model"))
    if _quantized(fm) and not _quantized(qm):
        raise InputError("the float model holds quantized operators (QuantizeLinear/DequantizeLinear or integer kernels) and "
                         "the quantized model none: the two are given the other way round. Give the fp32 model first, then the quantized one.")
    if _quantized(fm):  # two quantized models: every error would be measured against a quantized reference (q vs q: "OK")
        raise InputError("the float model holds quantized operators (QuantizeLinear/DequantizeLinear or integer kernels): analyze "
                         "measures a quantized model against its fp32 original. Give the fp32 model step1 was given first.")
    return fm, qm


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits",
                           "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


def _quantized(model: onnx.ModelProto) -> bool:
    """Does the main graph hold a quantization operator (Q/DQ, a QLinear or integer kernel, int4 weights)?"""
    return any(n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def _input_error(fm: onnx.ModelProto, first: dict[str, np.ndarray] | None) -> InputError | None:
    """An InputError when the float model alone cannot run on the first sample (the samples do not suit the model), else None."""
    try:
        sess = _runtime.session(fm, log_level=4)
        feed = {i.name: first[i.name] for i in sess.get_inputs()} if first is not None else None
    except Exception:  # the float model does not load alone, or the sample lacks an input: not this diagnosis
        return None
    if feed is None:
        return None
    try:
        sess.run(None, feed)
    except Exception as exc:  # whatever ONNX Runtime raises: the user's model and samples disagree
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feed.items())
        return InputError(f"the float model itself fails on the first sample ({shapes}): {str(exc).splitlines()[0][:300]}. "
                          "Give analyze samples shaped as the model input, as step1 was given (the same dataset format and preprocessing).")
    return None


def _known_count(samples: object) -> int | None:
    """How many samples there are, when that is known before iterating (a list, or a dataset's first N)."""
    if isinstance(samples, Sized):
        return len(samples)
    count = getattr(samples, "count", None)
    return count if isinstance(count, int) else None


def _notes(notes: list[str], m: Measure, qm: onnx.ModelProto, host_int8: bool, types: dict[str, int]) -> list[str]:
    """The plan's notes, then what the figures rest on: inexact kernels or their saturation, shapes set by the data."""
    if not _quantized(qm):
        notes.append("the quantized model holds no quantization operator (QuantizeLinear/DequantizeLinear or an integer "
                     "kernel): check that QUANT_MODEL is the model step2 wrote")
    if m.exact_failed:
        notes.append(NOT_EXACT_NOTE)
    elif u8s8_saturates() and not host_int8 and int8_product_nodes(qm, types):
        notes.append(SATURATION_NOTE)
    return notes + m.notes()


def _result(f: ModelIndex, plan: AnalysisPlan, m: Measure, n: int, notes: list[str]) -> AnalysisResult:
    """The rows, the integer outputs compared value for value, and the model outputs with no figures and why (the plan's
    reason or the samples'). A model input given back as an output is the same in both models (they take the same
    inputs): a note, not a CHECK."""
    layers, exact = m.layers(), m.exact_outputs()
    done = {x.tensor for x in layers} | {x.tensor for x in exact}
    echoed = [o for o in f.outputs if o not in done and o in f.inputs]
    missing = {o: plan.uncompared.get(o) or m.why_not(o) or "no tensor of the quantized model could be matched with it"
               for o in f.outputs if o not in done and o not in echoed}
    notes = notes + [f"output {o} is the model input itself, the same in both models: not compared" for o in echoed]
    return AnalysisResult(layers=layers, outputs=[o for o in f.outputs if o not in echoed], n_samples=n,
                          notes=notes + bounds_note(layers), exact_outputs=exact, not_compared=missing)
