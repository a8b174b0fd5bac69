"""The Ray back end of :mod:`hybridq.execution`: one actor per worker, each holding its own started job.

Imported only for ``--ray``; Ray is the optional extra ``hybridq[ray]``. ``local``
starts a Ray instance in this process and stops it at the end; ``auto`` or an
address attaches to a running cluster (left running). A Ray instance this
process already started (``ray.init`` by a host program or a test) is used as is.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from . import _runtime
from .errors import HybridqError, InputError
from ._workers import InOrder, Job, Progress, Shard, threads_per_worker, worker_lost


class _Actor:
    """A worker on the cluster: it starts each run's job once; a start failure is raised by the run's first shard."""

    def __init__(self) -> None:
        self.job, self.error = None, None

    def start(self, job: Job, threads: int) -> None:
        self.job, self.error = job, None
        try:
            job.start(threads)
        except HybridqError as exc:
            self.error = exc

    def run(self, shard: Shard) -> Any:
        if self.error is not None:
            raise self.error
        return self.job.run(shard, lambda k: None)

    def finish(self) -> Any:
        final, self.job = self.job.finish(), None
        return final


_ACTORS: dict[tuple[str, int], list[Any]] = {}
"""Actors kept between runs of this process on a Ray instance it did not start (the proposal analyses many times)."""


def _actors(ray: Any, n: int) -> list[Any]:
    """`n` actors on the connected cluster: the ones a previous run left, or new ones."""
    context = ray.get_runtime_context()
    key = (f"{context.get_node_id()}:{context.get_job_id()}", n)  # the node id is new with every Ray instance
    if key not in _ACTORS:
        remote = ray.remote(num_cpus=1, max_restarts=0)(_Actor)
        _release(ray, keep=False)  # actors of another size are not needed
        _ACTORS[key] = [remote.remote() for _ in range(n)]
    return _ACTORS[key]


def _release(ray: Any, keep: bool) -> None:
    """Stop the kept actors unless `keep` (a run that ended well on a cluster this process did not start)."""
    if keep:
        return
    for actors in _ACTORS.values():
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # the cluster is gone already: nothing left to stop
                pass
    _ACTORS.clear()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, an optional extra: install it with `pip install 'hybridq[ray]'` "
                         "(on this machine and on every node of the cluster), or run without --ray.") from None
    return ray


REACH_S = 5.0
"""Seconds a cluster address may take to accept a TCP connection before --ray gives up: ray.init itself retries an
address nothing listens on for ever, deaf to Ctrl-C."""


def _check_reachable(address: str) -> None:
    """Refuse a `host:port` (or `ray://host:port`) address where nothing accepts a connection, naming it."""
    where = address.split("://", 1)[-1]
    host, sep, port = where.rpartition(":")
    if address in ("local", "auto") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=REACH_S).close()
    except OSError as exc:
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: nothing accepts a connection at {where} "
                         f"({exc.strerror or exc}). Start it (`ray start --head` on the head node), check the address, "
                         "or use --ray local.") from None


def _restore_sigterm(handler: Any) -> None:
    """Put back the SIGTERM handler ray.init replaced (its own dumps a C++ trace and exits 15): the CLI's ends the run
    cleanly, artifacts untouched, with exit 143 and its one paragraph, as it does without Ray."""
    if handler is not None and threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not handler:
        signal.signal(signal.SIGTERM, handler)


@contextmanager
def connected(address: str) -> Iterator[tuple[Any, bool]]:
    """(Ray, started here): started for `local`, else attached to (`auto`, an address); stopped on exit only when started here."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray, False
        return
    _check_reachable(address)
    own = signal.getsignal(signal.SIGTERM)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=_runtime.cores(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                         "Start it (`ray start --head` on the head node), check the address, or use --ray local.") from None
    finally:
        _restore_sigterm(own)
    try:
        yield ray, True
    finally:
        _ACTORS.clear()
        ray.shutdown()


def run_on_ray(job: Job, shards: Iterable[Shard], workers: int, address: str, on_result: Callable[[Shard, Any], None],
               on_progress: Progress) -> list[Any]:
    """:func:`hybridq.execution.execute` on `workers` Ray actors (0: one per CPU); progress is counted as each shard comes back."""
    with connected(address) as (ray, started):
        ok = False
        try:
            finals = _run(ray, job, shards, workers, on_result, on_progress)
            ok = True
            return finals
        except ray.exceptions.RayTaskError as exc:  # the job raised: pass its own error on
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HybridqError):
                raise cause from None
            raise HybridqError(f"a Ray worker failed: {cause or exc}") from None
        except (ray.exceptions.RayError, ConnectionError) as exc:
            raise worker_lost("a Ray worker (or the cluster)", None, type(exc).__name__) from None
        finally:
            _release(ray, keep=ok and not started)


def _run(ray: Any, job: Job, shards: Iterable[Shard], workers: int, on_result: Callable, on_progress: Progress) -> list[Any]:
    """Start the job on every actor, keep two shards in flight on each, hand results on in shard order."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = workers or max(1, cpus)
    threads = threads_per_worker(n, cpus) if workers else 1
    actors = _actors(ray, n)
    shipped = ray.put(job)  # once, not once per actor
    ray.get([a.start.remote(shipped, threads) for a in actors])
    flight: dict[Any, tuple[int, Shard]] = {}
    load = [0] * n
    order = InOrder(on_result)

    def collect_one() -> None:
        done, _ = ray.wait(list(flight), num_returns=1)
        w, shard = flight.pop(done[0])
        load[w] -= 1
        result = ray.get(done[0])
        on_progress(shard.samples)
        order.arrived(shard.index, result)

    for shard in shards:
        while min(load) >= 2:
            collect_one()
        w = min(range(n), key=lambda k: load[k])
        order.sent(shard)
        flight[actors[w].run.remote(shard)] = (w, shard)
        load[w] += 1
    while flight:
        collect_one()
    return ray.get([a.finish.remote() for a in actors])
