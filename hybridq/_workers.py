"""The parts every back end of :mod:`hybridq.execution` shares, and its local one: worker processes on this machine.

A worker process is forked (spawned where fork is missing), starts the job once
and runs the shards sent to it over a pipe; a worker that dies is seen at once
(its pipe closes) and ends the run with :class:`~hybridq.errors.WorkerLost`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from . import _runtime
from .errors import HybridqError, WorkerLost

Progress = Callable[[int], None]


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


class InOrder:
    """Results that arrive in any order, handed on in shard order."""

    def __init__(self, on_result: Callable[[Shard, Any], None]) -> None:
        self.on_result, self.next, self.ready, self.shards = on_result, 0, {}, {}

    def sent(self, shard: Shard) -> None:
        """Remember a shard handed to a worker."""
        self.shards[shard.index] = shard

    def arrived(self, index: int, result: Any) -> None:
        """Take one shard's result; pass on every result now in order."""
        self.ready[index] = result
        while self.next in self.ready:
            self.on_result(self.shards.pop(self.next), self.ready.pop(self.next))
            self.next += 1


def worker_lost(what: str, shard: Shard | None, cause: str) -> WorkerLost:
    """The one-paragraph error for a worker that went away, naming the samples it was running."""
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


def run_local(job: Job, shards: Iterable[Shard], workers: int, address: str | None, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Up to `workers` local processes (forked where the OS can), at most two shards in flight each; `address` is unused.
    A worker starts when a shard finds every started one busy: never more workers than shards (`--workers 3000` on 8
    samples forked 3000 processes, a minute)."""
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    threads = threads_per_worker(workers)
    procs: list[Any] = []
    conns: list[Connection] = []
    flight: list[deque[Shard]] = []
    order, finals = InOrder(on_result), []
    try:
        for shard in shards:
            if len(procs) < workers and all(flight):
                _start(ctx, job, threads, workers, procs, conns)
                flight.append(deque())
                finals.append(_PENDING)
            while min(len(f) for f in flight) >= 2:
                _receive(procs, conns, flight, order, finals, on_progress)
            w = min(range(len(procs)), key=lambda k: len(flight[k]))
            order.sent(shard)
            flight[w].append(shard)
            conns[w].send(shard)
        for c in conns:
            c.send(None)
        while any(f is _PENDING for f in finals):
            _receive(procs, conns, flight, order, finals, on_progress)
        return finals
    finally:
        for c in conns:
            c.close()  # a worker still waiting for a shard reads the end
        for p in procs:
            if p.pid is None:  # never started
                continue
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
            if p.is_alive():  # terminated before it set its own SIGTERM handler: the parent's caught the signal
                p.kill()
                p.join(timeout=5)


def _start(ctx: Any, job: Job, threads: int, workers: int, procs: list, conns: list[Connection]) -> None:
    """One more worker process, its end of the pipe closed here at once: no other process holds it, so the pipe closes
    the moment the worker dies. One the OS cannot start (out of processes or file descriptors) is a clear error."""
    parent, child = ctx.Pipe()
    procs.append(ctx.Process(target=_child, args=(child, job, threads), daemon=True))
    conns.append(parent)
    try:
        procs[-1].start()
    except OSError as exc:
        raise HybridqError(f"could not start worker {len(procs)} of {workers} ({exc.strerror or exc}): the machine allows no "
                           "more processes or open files here; use fewer --workers.") from None
    finally:
        child.close()


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


