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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ._workers import Job, Progress, Shard, run_local, threads_per_worker
from .errors import InputError

__all__ = ["BACKENDS", "Execution", "Job", "Progress", "Shard", "contiguous", "execute", "held", "threads_per_worker"]


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


def execute(
    job: Job, shards: Iterable[Shard], execution: Execution | None, on_result: Callable[[Shard, Any], None],
    on_progress: Progress | None = None,
) -> list[Any]:
    """Run `job` over `shards` where `execution` says; `on_result` gets each partial in shard order.

    Returns every worker's `finish()` value. `on_progress` counts samples as they are done, across workers.
    """
    execution = execution or Execution()
    execution.validate()
    return BACKENDS[execution.backend](job, shards, execution.workers, execution.ray, on_result, on_progress or (lambda k: None))


@contextmanager
def held(execution: Execution | None) -> Iterator[None]:
    """Keep the Ray instance `--ray local` starts up across the many runs inside (the proposal's), not one per run.

    Its actors are then kept between runs too; other back ends start their workers per run and need nothing here.
    """
    if execution is None or execution.backend != "ray":
        yield
        return
    execution.validate()
    from ._ray import connected

    with connected(str(execution.ray)):
        yield


def _in_process(job: Job, shards: Iterable[Shard], workers: int, address: str | None, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Every shard here, one after the other (threads 0: the job's own default)."""
    job.start(0)
    for shard in shards:
        on_result(shard, job.run(shard, on_progress))
    return [job.finish()]


def _ray(job: Job, shards: Iterable[Shard], workers: int, address: str | None, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Actors on a Ray cluster (see :mod:`hybridq._ray`); Ray is imported only when asked for."""
    from ._ray import run_on_ray

    return run_on_ray(job, shards, workers, str(address), on_result, on_progress)


BACKENDS: dict[str, Callable[..., list[Any]]] = {
    "inprocess": _in_process,
    "workers": run_local,
    "ray": _ray,
}


def contiguous(count: int, parts: int) -> Iterator[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(count), as even as can be (empty ones left out)."""
    parts = max(1, min(parts, count))
    for k in range(parts):
        start, stop = count * k // parts, count * (k + 1) // parts
        if stop > start:
            yield start, stop
