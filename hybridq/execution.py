"""Where map-reduce work runs: in this process, in local worker processes, or on a Ray cluster (SPEC section 13).

Calibration and the analysis hand a picklable :class:`Job` and a stream of
:class:`Shard` s to :func:`execute`. Each worker starts the job once (its own
ONNX Runtime session, its own view of the dataset), runs shards and returns
partial results; :func:`execute` passes them to the caller in shard order,
whatever worker finished first, then collects each worker's final state. The
back ends are the entries of :data:`BACKENDS`; every one gives the same figures
because the caller merges in shard order and the observers merge exactly.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from . import _runtime
from .errors import HybridqError, InputError, WorkerLost

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Execution:
    """Where samples run: in this process (the default), on `workers` local processes, or on Ray at `ray`."""

    workers: int = 0
    """Local worker processes (0: in this process); with `ray`, the Ray actors (0: one per CPU of the cluster)."""
    ray: str | None = None
    """`auto` (the running cluster), `local` (started and stopped here) or a cluster address (`ray://host:10001`)."""

    @property
    def backend(self) -> str:
        """The :data:`BACKENDS` entry that runs this."""
        return "ray" if self.ray else "workers" if self.workers > 0 else "inprocess"

    def validate(self) -> None:
        """InputError for a negative worker count or an empty Ray address."""
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise InputError(f"--workers must be 0 (this process) or more, got {self.workers!r}.")
        if self.ray is not None and not str(self.ray).strip():
            raise InputError("--ray needs an address: auto, local, or a cluster address such as ray://head:10001.")


@dataclass(frozen=True)
class Shard:
    """A piece of the work: its position in the run, the sample (or batch) indices it covers and their sample count."""

    index: int
    items: tuple[int, ...]
    samples: int
    payload: Any = None  # arrays the caller already holds (the analysis sends its samples); None: the worker reads them


class Job(Protocol):
    """What a worker runs: `start` once, `run` per shard (returns a partial result), `finish` once (its final state)."""

    def start(self, threads: int) -> None: ...

    def run(self, shard: Shard, progress: Progress) -> Any: ...

    def finish(self) -> Any: ...


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """ONNX Runtime threads for each of `workers` workers so that workers x threads <= cores (at least 1)."""
    return max(1, (cores or _runtime.cores()) // max(1, workers))


def execute(
    job: Job, shards: Iterable[Shard], execution: Execution | None, on_result: Callable[[Shard, Any], None],
    on_progress: Progress | None = None,
) -> list[Any]:
    """Run `job` over `shards` where `execution` says; `on_result` gets each partial in shard order.

    Returns every worker's `finish()` value. `on_progress` counts samples as they are done, across workers.
    """
    execution = execution or Execution()
    execution.validate()
    return BACKENDS[execution.backend](job, shards, execution, on_result, on_progress or (lambda k: None))


def _in_process(job: Job, shards: Iterable[Shard], execution: Execution, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Every shard here, one after the other (threads 0: the job's own default)."""
    job.start(0)
    for shard in shards:
        on_result(shard, job.run(shard, on_progress))
    return [job.finish()]


class InOrder:
    """Results that arrive in any order, handed on in shard order."""

    def __init__(self, on_result: Callable[[Shard, Any], None]) -> None:
        self.on_result, self.next, self.ready, self.shards = on_result, 0, {}, {}

    def sent(self, shard: Shard) -> None:
        self.shards[shard.index] = shard

    def arrived(self, index: int, result: Any) -> None:
        self.ready[index] = result
        while self.next in self.ready:
            self.on_result(self.shards.pop(self.next), self.ready.pop(self.next))
            self.next += 1


def worker_lost(what: str, shard: Shard | None, cause: str) -> WorkerLost:
    where = f" while it ran samples {shard.items[0]}-{shard.items[-1]}" if shard is not None and shard.items else ""
    return WorkerLost(
        f"{what} ended abruptly{where} ({cause}): it was killed, ran out of memory, or its machine went away. "
        "Nothing was written and earlier artifacts are as they were; free memory (or fewer --workers) and run the command again."
    )


_PENDING = object()  # a worker's final state not received yet (None is a valid one)


def _child(conn: Connection, job: Job, threads: int) -> None:
    """A local worker: start the job, then run shards sent over `conn` until told to finish."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:  # end with the parent, however it ends (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    shard = None
    try:
        job.start(threads)
        while (shard := conn.recv()) is not None:
            index = shard.index
            conn.send(("result", index, job.run(shard, lambda k: conn.send(("progress", index, k)))))
        conn.send(("final", -1, job.finish()))
    except Exception as exc:  # sent to the parent, which raises it
        conn.send(("error", -1 if shard is None else shard.index, exc if isinstance(exc, HybridqError) else HybridqError(
            f"a worker failed: {type(exc).__name__}: {exc}")))


def _local(job: Job, shards: Iterable[Shard], execution: Execution, on_result: Callable, on_progress: Progress) -> list[Any]:
    """`execution.workers` local processes (forked where the OS can), at most two shards in flight each."""
    n = execution.workers
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    threads = threads_per_worker(n)
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=_child, args=(child, job, threads), daemon=True) for _, child in pipes]
    conns = [parent for parent, _ in pipes]
    flight: list[deque[Shard]] = [deque() for _ in range(n)]
    order, finals = InOrder(on_result), [_PENDING] * n
    try:
        for p in procs:
            p.start()
        for _, child in pipes:
            child.close()
        for shard in shards:
            while min(len(f) for f in flight) >= 2:
                _receive(procs, conns, flight, order, finals, on_progress)
            w = min(range(n), key=lambda k: len(flight[k]))
            order.sent(shard)
            flight[w].append(shard)
            conns[w].send(shard)
        for c in conns:
            c.send(None)
        while any(f is _PENDING for f in finals):
            _receive(procs, conns, flight, order, finals, on_progress)
        return finals
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


def _receive(procs: list, conns: list[Connection], flight: list[deque[Shard]], order: InOrder, finals: list, on_progress: Progress) -> None:
    """Wait for one message from any worker and act on it; a worker that died raises WorkerLost."""
    ready = wait([c for c, f in zip(conns, finals) if f is _PENDING])
    for c in ready:
        w = conns.index(c)
        try:
            kind, index, value = c.recv()
        except (EOFError, OSError):
            procs[w].join(timeout=1)
            code = procs[w].exitcode
            cause = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise worker_lost(f"worker process {procs[w].pid}", flight[w][0] if flight[w] else None, cause) from None
        if kind == "progress":
            on_progress(value)
        elif kind == "result":
            flight[w].popleft()
            order.arrived(index, value)
        elif kind == "final":
            finals[w] = value
        else:
            raise value


def _ray(job: Job, shards: Iterable[Shard], execution: Execution, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Actors on a Ray cluster (see :mod:`hybridq._ray`); Ray is imported only when asked for."""
    from ._ray import run_on_ray

    return run_on_ray(job, shards, execution, on_result, on_progress)


BACKENDS: dict[str, Callable[..., list[Any]]] = {
    "inprocess": _in_process,
    "workers": _local,
    "ray": _ray,
}


def contiguous(count: int, parts: int) -> Iterator[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(count), as even as can be (empty ones left out)."""
    parts = max(1, min(parts, count))
    for k in range(parts):
        start, stop = count * k // parts, count * (k + 1) // parts
        if stop > start:
            yield start, stop
