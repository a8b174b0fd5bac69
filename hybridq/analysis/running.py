"""Running the analysis graph: segment sessions in one arena, and the pool that runs samples side by side.

Sessions come from :mod:`hybridq._runtime` (exact int8, one thread each, a
shared arena so a segment's outputs reuse the blocks the previous segment
freed), opened once, side by side. Samples run one per core: on a thread of
this process and in forked worker processes that inherit the sessions
(:class:`MixedPool`; threads only where fork is missing or the graph is
large). How many, and how the graph is cut, are :class:`AnalysisOptions`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .. import _runtime
from .._onnx import tensor_bytes
from ..execution import Execution
from ..errors import HybridqError, InputError, ModelError, did_you_mean
from ..segments import Segment, split
from .graphs import AnalysisGraph

if TYPE_CHECKING:
    from .measuring import Measure, SampleErrors


@dataclass(frozen=True)
class AnalysisOptions:
    """How the analysis runs (not what it measures: every figure is the same whatever these are)."""

    workers: int = 2
    """Samples in flight at most, each in its own worker (capped by the cores this process may use)."""
    segment_bytes: float = field(default_factory=lambda: 2.0 * _runtime.l2_bytes())
    """Compared bytes per segment session (:mod:`hybridq.segments`): its tensors are measured while in cache. Twice a
    core's L2: 1 MB on the 512 KB L2 of an AMD EPYC, where it was tuned; 4 MB on a Xeon's 2 MB, where rec analyze at 10
    samples took 1.45-1.50 s against 1.62-1.66 s at 1 MB (cls 5.3 against 6.8 ms a sample)."""
    fork_limit: int = 512 << 20
    """Analysis graphs whose tensors take more bytes than this run on threads only (no process that large is forked)."""
    fork_min_samples: int = 0
    """Fewer samples than this (when their number is known) run on threads only, sharing one set of sessions.
    Off by default: at 10 samples on a quiet 2-core EPYC the total was the same either way (cls 0.22 vs 0.23 s,
    rec 1.38 vs 1.37 s, measured when each worker process still opened its own sessions) and threads were slower
    per sample (cls 5.1 vs 6.4 ms, rec 72 vs 78 ms); only a loaded machine favoured them (cls 0.53 -> 0.40 s,
    rec 4.5 -> 3.8 s)."""
    execution: Execution | None = None
    """Run the samples on :mod:`hybridq.execution`'s back ends (in-process, local workers, Ray); None: the pool above."""


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
            # log level fatal: a failed run is reported once, by run()'s own error, not by ONNX Runtime's log line too
            self.sess = _runtime.session(model, exact_int8=not host_int8, threads=1, shared_arena=True, log_level=4)
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


class Runner:
    """The analysis graph as a chain of sessions, one per segment (see :mod:`hybridq.segments`)."""

    def __init__(self, segments: list[Segment], what: str, host_int8: bool, threads: int = 0) -> None:
        self.sessions = _open_all(segments, what, host_int8, threads)
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


def _open_all(segments: list[Segment], what: str, host_int8: bool, threads: int = 0) -> list[_Session]:
    """One session per segment, in order, opened on ``threads`` threads (0: one per core; ONNX Runtime releases
    the GIL for much of the work): rec's 373 segment sessions 205 -> 135 ms on 2 cores."""
    threads = min(threads or _runtime.cores(), len(segments))
    if threads <= 1:
        return [_Session(s.model, what, host_int8) for s in segments]
    _runtime.register_shared_arena()  # once, before the threads race to register it
    with ThreadPoolExecutor(threads, thread_name_prefix="hybridq-sessions") as pool:
        return list(pool.map(lambda s: _Session(s.model, what, host_int8), segments))


def check_feed(sample: dict[str, np.ndarray], names: list[str], index: int) -> None:
    """Does ``sample`` feed exactly the model inputs ``names``? (InputError naming the sample otherwise.)"""
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


def in_flight(options: AnalysisOptions) -> int:
    """Samples to keep in flight: one per core this process may run on, at most ``options.workers``."""
    return max(1, min(options.workers, _runtime.cores()))


class Work:
    """What a worker needs to measure a sample; the sessions are made where the samples run."""

    def __init__(
        self, m: Measure, ag: AnalysisGraph, targets: list[list[str]], weights: list[float], inputs: list[str], host_int8: bool,
        options: AnalysisOptions,
    ) -> None:
        self.measure, self.ag, self.host_int8, self.options = m, ag, host_int8, options
        # cut once, here, before any worker starts (rec: 0.2 s that each worker would repeat)
        segments = split(ag.model, targets, ag.types, weights, options.segment_bytes)
        self.segments = segments or [Segment(ag.model, inputs, [o.name for o in ag.model.graph.output])]
        self.runner: Runner | None = None

    def start(self, threads: int = 0) -> None:
        """Create the segment sessions on ``threads`` threads (0: one per core; ModelError when ONNX Runtime cannot load one)."""
        what = "float and quantized models with the isolated quantized layers"
        self.runner = Runner(self.segments, what, self.host_int8, threads)

    def sample(self, sample: dict[str, np.ndarray], n: int) -> SampleErrors:
        assert self.runner is not None
        return self.measure.sample(self.runner, sample, n)


_CHILD: list[Work] = []  # in a worker process: its Work


def _child_start(work: Work) -> None:
    """Worker process set-up: Ctrl-C is the parent's to handle; the sessions come made, with the fork."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: end quietly
    try:  # end with the parent, however it ends (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    _CHILD.append(work)


def _child_sample(sample: dict[str, np.ndarray], n: int) -> SampleErrors:
    return _CHILD[0].sample(sample, n)


def _noop() -> None:
    return None


class MixedPool(Executor):
    """Samples on one thread of this process and on forked worker processes, each to whichever is free.

    This process made the sessions, so its thread starts at once, warm, and one fork fewer is paid; the
    processes are forked first, before that thread runs anything (no session is mid-run at the fork).
    """

    def __init__(self, procs: ProcessPoolExecutor) -> None:
        self.procs = procs
        procs.submit(_noop)  # forks the workers now, while this process runs nothing else
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="hybridq-analyze")
        self.on_thread: Future[SampleErrors] | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """``fn`` on this process' thread when it is free, else its worker-process twin :func:`_child_sample`."""
        if self.on_thread is None or self.on_thread.done():
            self.on_thread = self.thread.submit(fn, *args, **kwargs)
            return self.on_thread
        return self.procs.submit(_child_sample, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.thread.shutdown(wait, cancel_futures=cancel_futures)
        self.procs.shutdown(wait, cancel_futures=cancel_futures)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """After the last sample, the workers are told to end and reaped in the background (rec: 15 ms a
        process takes to exit); on an error, pending samples are cancelled and the workers waited for."""
        if exc_type is None:
            self.thread.shutdown()
            self.procs.shutdown(wait=False)
        else:
            self.shutdown(wait=True, cancel_futures=True)


@contextmanager
def executor(
    work: Work, workers: int, samples: int | None = None,
) -> Iterator[tuple[Executor, int, Callable[[dict[str, np.ndarray], int], SampleErrors]]]:
    """A pool running ``workers`` samples at once: ``(pool, workers, function to submit)``.

    Where fork exists, the graph is small and the samples (``samples``, when known) are many enough, a
    :class:`MixedPool`: one thread here and ``workers - 1`` worker processes, each running its sample's
    sessions and metrics without waiting for the other's GIL (cls analyze 30 -> 16 ms per sample on 2
    cores, before the compiled metrics). The sessions are made once, here, before the fork, and the
    workers inherit them (single-threaded sessions start no thread of their own).
    Otherwise threads, which share the sessions.
    """
    many = samples is None or samples >= work.options.fork_min_samples
    work.start()
    if workers > 1 and many and sys.platform.startswith("linux") and tensor_bytes(work.ag.model) <= work.options.fork_limit:
        ctx = multiprocessing.get_context("fork")
        procs = ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_child_start, initargs=(work,))
        with MixedPool(procs) as pool:
            yield pool, workers, work.sample
        return
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hybridq-analyze") as tpool:
        yield tpool, max(1, workers), work.sample
