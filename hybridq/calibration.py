"""Streaming calibration: run the temp model in ONNX Runtime and feed every float activation to an observer.

One pass over the samples; each batch's tensors are dropped after their
statistics are merged, so memory does not grow with the number of samples.

The sessions use ONNX Runtime's full optimization level, as deployment does: its blocked-layout convolutions run a
calibration pass 7-32 % faster than the basic level (one thread: small detector 12.9 vs 19.1 ms, PP-OCR rec 76 vs
94 ms), and the fetched activations differ from the basic level's by float rounding (1e-6 relative). Where binning is
what a calibration waits on, and enough values are left, it bins by the compiled kernel (:mod:`hybridq.binning`, the
same counts).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import _runtime, binning
from ._onnx import serialized_within
from .errors import DatasetError, ModelError
from .graph import float_activations, tensor_shapes
from .observers import HESSIAN_SUFFIX, HessianObserver, HistogramObserver


def session_for(
    model: onnx.ModelProto, outputs: list[str] | None = None, *, basic: bool = True, lean: bool = False, threads: int = 0,
    nodes: list[onnx.NodeProto] = (),
):
    """An ORT CPU session over `model`, with extra graph outputs (written by the extra `nodes`, if any) when given;
    the model is not modified.

    `lean` turns off ORT's memory pattern: with many fetched activations it reserves one more copy of the
    whole activation set and grows over the first runs (PP-OCR det, 20 samples: peak 1.85 GB instead of 0.93 GB).
    `threads` caps ORT's intra-op threads (0: ORT's default, one per core). int8 products are exact
    (:mod:`hybridq.kernels`) where ONNX Runtime can make them so.
    """
    work = model
    if outputs:  # a copy, not bytes: ONNX Runtime's options for a model depend on its proto (_runtime.float_layer_between_qdq)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        work.graph.node.extend(nodes)
        work.graph.output.extend(_new_outputs(model, outputs))
    return _session(work, basic=basic, lean=lean, threads=threads)


def _new_outputs(model: onnx.ModelProto, outputs: list[str]) -> list[onnx.ValueInfoProto]:
    """Float graph outputs for the names in `outputs` that are not outputs of the model yet."""
    present = {o.name for o in model.graph.output}
    return [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs if name not in present]


def _session(work: onnx.ModelProto | bytes, *, basic: bool, lean: bool, threads: int):
    """:func:`session_for` over the model as it is (a proto or its bytes)."""
    try:
        # a quantized model (proposal candidates) computes the same on every CPU; log level fatal: a run that fails
        # raises, and its caller names the sample, so ONNX Runtime's own error line would only repeat it
        return _runtime.session(
            work, exact_int8=True, threads=threads, optimization="basic" if basic else "all", mem_pattern=not lean, log_level=4
        )
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0]}") from exc


_MIN, _MAX = "__hybridq_min", "__hybridq_max"
KEEP_BYTES = 64 << 20
"""Largest model whose bytes are kept from the first calibration session to the second: a larger one is serialized
again rather than held beside the session and the activations."""
PAIR_BYTES = 16 << 20
"""Largest activations of one batch (bytes fetched) for which two batches run at once on a two-core machine: a second
run in flight also doubles ONNX Runtime's working memory (PP-OCR rec, 65 MB a batch: peak 0.6 -> 0.95 GB; the small detector,
7 MB: 193 -> 225 MB)."""


def _range_nodes(names: list[str]) -> list[onnx.NodeProto]:
    """ReduceMin/ReduceMax nodes of `names` (scalars are cheap to fetch)."""
    return [onnx.helper.make_node(op, [n], [n + suffix], name=n + suffix, keepdims=0)
            for n in names for op, suffix in (("ReduceMin", _MIN), ("ReduceMax", _MAX))]


def _pass_session(model: onnx.ModelProto, base: bytes | None, full: list[str], ranged: list[str], threads: int):
    """The session of calibration runs that fetch `full` whole and the min and max of `ranged`.

    `base` is the model's bytes (None over 2 GB: the proto is copied and extended). Protobuf merges concatenated
    messages, repeated fields appended, so the base bytes followed by a model holding only the new nodes and outputs
    are the extended model: neither copied nor serialized again for each pass (small detector: three 5.8 MB copies and
    one serialization less, ~1400 page faults each on this VM, 10-15 ms of step1). A model whose session must see
    step2's map (an npu model's float layers between Q/DQ, kept float) goes as a proto too."""
    if base is None or _runtime.float_layer_between_qdq(model):
        work = model
        if ranged:
            work = onnx.ModelProto()
            work.CopyFrom(model)
            work.graph.node.extend(_range_nodes(ranged))
        return session_for(work, _fetch(full, ranged), basic=False, lean=True, threads=threads)
    extra = onnx.ModelProto()
    extra.graph.node.extend(_range_nodes(ranged))
    extra.graph.output.extend(_new_outputs(model, _fetch(full, ranged)))
    return _session(base + extra.SerializeToString(), basic=False, lean=True, threads=threads)


def _first_session(model: onnx.ModelProto, full: list[str], ranged: list[str], threads: int) -> tuple[Any, bytes | None]:
    """The first pass's session (:func:`_pass_session`), and the model's bytes when they are kept for the second."""
    base = serialized_within(model)
    return _pass_session(model, base, full, ranged, threads), base if base is not None and len(base) <= KEEP_BYTES else None


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    tensors: list[str] | None = None,
    histograms: set[str] | None = None,
    describe: Callable[[int], str] = lambda i: f"batch {i}",
    on_batch: Callable[[int], None] | None = None,
    range_batches: int | None = 8,
    hessians: Iterable[str] = (),
    hessian_blocks: Iterable[int] = (),
    threads: int = 0,
    expected_batches: int | None = None,
) -> dict[str, HistogramObserver]:
    """Observe every float activation (or `tensors`) over all batches; returns one observer per tensor.

    Tensors in `histograms` (all when None) get a histogram from every batch. The others, which no layer quantizes by
    default, get min/max only, and only from the first `range_batches` batches (None: all): their in-graph reductions
    cost more than the model itself on large models. Tensors in `hessians` (histogram tensors) also get a
    :class:`HessianObserver` under `name + HESSIAN_SUFFIX`, summed in blocks starting at the batches in `hessian_blocks`.
    ONNX Runtime runs batch b+1 in a worker thread while batch b is binned (both release the GIL), so at most two
    batches of activations are alive at a time. `threads` caps ONNX Runtime's threads (0: all cores but one;
    :mod:`hybridq.execution` gives each worker its share). On two cores (threads 0) that leaves ONNX Runtime one
    thread, and the binning half a core idle: once a batch's activations prove small (`PAIR_BYTES`), two one-thread
    runs are in flight beside the binning (three batches alive). `expected_batches` lets the binning switch to the
    compiled kernel where it pays (:class:`_Binner`).
    """
    names = tensors if tensors is not None else float_activations(model)
    if not names:  # nothing to observe (a model with no quantization candidate): the samples are only checked and counted
        return _count_only(model, batches, describe, on_batch)
    full = [n for n in names if histograms is None or n in histograms]
    ranged = [n for n in names if histograms is not None and n not in histograms]
    pair, threads = not threads and _runtime.cores() == 2, threads or _ort_threads()
    sess, base = _first_session(model, full, ranged, threads)
    feeds = {i.name for i in sess.get_inputs()}
    observers, hessian_of = _observers(names, full, hessians)
    cuts = set(hessian_blocks) - {0}
    pending, binner = deque[_Run](), _Binner(expected_batches, binning.kernel_for(None))
    with ExitStack() as stack:
        # batch b runs in pools[b % len(pools)]: one run at a time, or two once `pair` proves the batches small
        pools = [stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridq-calib"))]
        if pair and _static_bytes(model, full) <= PAIR_BYTES:  # known small from the shapes: no need to wait for batch 0
            pools.append(stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridq-calib")))
        later = _open_later(stack, model, base, full, ranged, threads, range_batches, expected_batches)

        def observe(run: _Run) -> None:
            start = time.perf_counter()
            wait([run.future])
            waited = time.perf_counter() - start
            for n in hessian_of if run.index in cuts else ():  # a new block of X^T X starts here
                observers[n + HESSIAN_SUFFIX].close()
            size = _observe(run, observers, full, hessian_of, describe, on_batch, binner.kernel)
            binner.observed(size, waited, time.perf_counter() - start - waited, run.binned)
            if size <= PAIR_BYTES and pair and len(pools) == 1:
                pools.append(stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridq-calib")))

        rest = iter(batches)
        for b, batch in enumerate(rest):
            _check_feeds(feeds, batch, describe, b)
            if ranged and range_batches is not None and b == range_batches:
                while pending and (len(pools) == 1 or not full):  # large batches: free the session's memory before the next allocates
                    observe(pending.popleft())
                del sess  # runs in flight keep it until they end
                if not full:  # min/max tensors only, all observed: a run would fetch nothing (ONNX Runtime reads that as all outputs)
                    _count_only(model, itertools.chain([batch], rest), lambda i: describe(b + i), on_batch)
                    return observers
                sess = later.result() if later is not None else _pass_session(model, base or serialized_within(model), full, [], threads)
                ranged = []
            fetch, feed = _fetch(full, ranged), {k: batch[k] for k in feeds}
            # two runs in flight: each worker bins its own batch (both cores bin); one: the main thread bins beside ORT
            run = pools[b % len(pools)].submit(_run_and_bin, sess, fetch, feed, full, hessian_of, binner) if len(pools) == 2 else (
                pools[0].submit(sess.run, fetch, feed))
            pending.append(_Run(b, run, ranged, _batch_len(batch), len(pools) == 2))
            while len(pending) > len(pools):
                observe(pending.popleft())
        if not pending:
            raise DatasetError("The dataset gave no samples to calibrate on; list at least one sample.")
        while pending:
            observe(pending.popleft())
    return observers


def _check_feeds(feeds: set[str], batch: dict[str, np.ndarray], describe: Callable[[int], str], b: int) -> None:
    """DatasetError naming batch `b` when it lacks one of the model inputs `feeds`."""
    missing = feeds - batch.keys()
    if missing:
        raise DatasetError(f"{describe(b)} has no data for model input(s) {sorted(missing)}.")


def _observers(names: list[str], full: list[str], hessians: Iterable[str]) -> tuple[dict[str, Any], set[str]]:
    """An observer per tensor (a histogram for those in `full`) and per X^T X, and the tensors that have one."""
    observers: dict[str, Any] = {n: HistogramObserver(bins=n in full) for n in names}
    observers.update({n + HESSIAN_SUFFIX: HessianObserver() for n in hessians if n in full})
    return observers, {n for n in full if n + HESSIAN_SUFFIX in observers}


def _open_later(
    stack: ExitStack, model: onnx.ModelProto, base: bytes | None, full: list[str], ranged: list[str], threads: int,
    range_batches: int | None, expected_batches: int | None,
) -> Future | None:
    """The session without the min/max outputs, opening in a thread of `stack` beside the first batches (ONNX Runtime
    releases the GIL meanwhile; small detector, 24 samples: calibration 298 -> 283 ms); None when no switch is expected,
    or the model's bytes were not held (over KEEP_BYTES: it opens when needed)."""
    if not (full and ranged and base is not None and range_batches is not None and (expected_batches or math.inf) > range_batches):
        return None
    opener = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridq-calib-open"))
    return opener.submit(_pass_session, model, base, full, [], threads)


def _count_only(
    model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], describe: Callable[[int], str], on_batch: Callable[[int], None] | None,
) -> dict[str, HistogramObserver]:
    """No tensor to observe: each batch is checked for the model's inputs and counted, without running the model
    (ONNX Runtime reads an empty list of outputs as "all of them")."""
    feeds = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    seen = 0
    for b, batch in enumerate(batches):
        missing = feeds - batch.keys()
        if missing:
            raise DatasetError(f"{describe(b)} has no data for model input(s) {sorted(missing)}.")
        seen += 1
        if on_batch:
            on_batch(_batch_len(batch))
    if not seen:
        raise DatasetError("The dataset gave no samples to calibrate on; list at least one sample.")
    return {}


def _static_bytes(model: onnx.ModelProto, names: list[str]) -> float:
    """Bytes of these float32 tensors for one batch, from the model's static shapes (inf when one is not static)."""
    shapes, total = tensor_shapes(model), 0
    for name in names:
        shape = shapes.get(name)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return math.inf
        total += 4 * math.prod(shape)
    return total


def _ort_threads() -> int:
    """Intra-op threads for calibration: one core is left to the numpy binning that runs beside ORT."""
    return max(1, _runtime.cores() - 1)


@dataclass
class _Run:
    """One batch submitted to ONNX Runtime: its index, the future of its outputs (or their statistics), its min/max-only tensors, its size."""

    index: int
    future: Future
    ranged: list[str]
    size: int
    binned: bool = False  # the worker binned the outputs (see _run_and_bin)


def _fetch(full: list[str], ranged: list[str]) -> list[str]:
    """Output names of one run: whole tensors, then the min outputs, then the max outputs of `ranged`."""
    return full + [f"{n}{_MIN}" for n in ranged] + [f"{n}{_MAX}" for n in ranged]


def _batch_len(batch: dict[str, np.ndarray]) -> int:
    """Samples in a batch (1 for an empty feed)."""
    return len(next(iter(batch.values()))) if batch else 1


class _NonFinite(Exception):
    """A fetched tensor holds NaN (its name as the argument; +-Inf is observed and flagged, see hybridq.infinite)."""


def _non_finite(name: str, where: str) -> DatasetError:
    return DatasetError(
        f"Tensor '{name}' holds NaN on {where}. Check that sample (its values, preprocessing "
        "and mean/std); calibration needs activations that are numbers."
    )


WAIT_SHARE = 0.25
"""The main thread bins beside one ONNX Runtime run: binning is what the calibration waits on when the main thread
waits for the run less than this share of its binning time."""


@dataclass
class _Binner:
    """How the runs bin: by numpy, or by the compiled kernel where it shortens the calibration: once numba is loaded
    anyway, or from the first batch after the first at which the values still to bin (a batch's values times the
    batches left) pay for loading it and binning is what the calibration waits on (the workers bin two runs in flight,
    or the main thread hardly waits for the run beside it). Where ONNX Runtime is the bottleneck the kernel would only
    add numba's load and its memory: PP-OCR det at 16 samples, 4.9-5.8 s either way, peak RSS 0.96 -> 1.17 GB. rec at
    100 samples waits on its binning once the first 8 batches' min/max outputs are dropped: step1 8.2 -> 6.9 s."""

    batches: int | None
    kernel: Callable[..., None] | None = None
    seen: int = 0

    def observed(self, batch_bytes: int, waited: float, binned: float, in_worker: bool) -> None:
        """A batch folded in: its bytes fetched (float32 values), the main thread's wait for it and binning time, and
        whether a worker binned it. The first batch pays the session's warm-up and decides nothing."""
        self.seen += 1
        if self.kernel is not None or self.batches is None or self.seen < 2:
            return
        if in_worker or waited < WAIT_SHARE * binned:
            self.kernel = binning.kernel_for(batch_bytes / 4 * (self.batches - self.seen))


def _run_and_bin(sess, fetch: list[str], feeds: dict[str, np.ndarray], full: list[str], hessian_of: set[str], binner: _Binner) -> tuple:
    """One run, binned in the worker thread that ran it (see :func:`_binned`)."""
    return _binned(sess.run(fetch, feeds), full, hessian_of, binner.kernel)


def _binned(values: list[np.ndarray], full: list[str], hessian_of: set[str], kernel: Callable[..., None] | None = None) -> tuple:
    """One run's outputs as each full tensor's batch statistics, the arrays the Hessians need, the min/max outputs,
    and the bytes fetched; the caller merges them in batch order. Raises _NonFinite naming the first bad tensor."""
    size = sum(v.nbytes for v in values)
    stats = []
    for name, value in zip(full, values):
        try:
            stats.append(HistogramObserver.of(value, kernel=kernel))
        except ValueError:
            raise _NonFinite(name) from None
    return stats, {n: v for n, v in zip(full, values) if n in hessian_of}, [float(v) for v in values[len(full):]], size


def _observe(
    run: _Run,
    observers: dict[str, HistogramObserver],
    full: list[str],
    hessian_of: set[str],
    describe: Callable[[int], str],
    on_batch: Callable[[int], None] | None,
    kernel: Callable[..., None] | None = None,
) -> int:
    """Wait for one run and fold its statistics into the observers (binned here by `kernel` or numpy unless the
    worker binned them); returns the bytes of its outputs."""
    try:
        result = run.future.result()
    except Exception as exc:
        if isinstance(exc, _NonFinite):
            raise _non_finite(exc.args[0], describe(run.index)) from None
        raise DatasetError(
            f"ONNX Runtime failed on {describe(run.index)}: {str(exc).splitlines()[0]}. "
            "Check the sample's shape and dtype against the model input."
        ) from exc
    try:
        stats, hessian_values, ranges, size = result if run.binned else _binned(result, full, hessian_of, kernel)
    except _NonFinite as exc:
        raise _non_finite(exc.args[0], describe(run.index)) from None
    del result
    name = ""
    try:
        for name, batch_stats in zip(full, stats):
            observers[name].merge(batch_stats)
            if name in hessian_values:
                observers[name + HESSIAN_SUFFIX].update(hessian_values[name])
        r = len(run.ranged)
        for i, name in enumerate(run.ranged):
            observers[name].update_range(ranges[i], ranges[r + i], 1)
    except ValueError:
        raise _non_finite(name, describe(run.index)) from None
    del stats, hessian_values
    if on_batch:
        on_batch(run.size)
    return size
