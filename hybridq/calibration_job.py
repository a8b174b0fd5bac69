"""Calibration as a map-reduce job: shards of batch indices, run wherever :mod:`hybridq.execution` says.

Each worker reads its own batches from the dataset (a :class:`DatasetRef`,
not arrays), calibrates them with :func:`hybridq.calibration.calibrate` and
keeps merging into its own observers; each shard returns its batches' input
figures, folded by the caller in batch order, and the image conversions it read
(counted in the caller's dataset, for its notes) and its X^T X sums, added by
the caller in shard order; each worker's histograms are merged at the end.
Histograms merge exactly and in any order, X^T X are summed in the same blocks
everywhere (HESSIAN_BLOCKS), and a shard is whole batches, so the statistics
are the same bit for bit on any back end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import onnx

from .calibration import calibrate
from .dataset import ConversionRead, Dataset
from .errors import DatasetError
from .execution import Execution, Progress, Shard, contiguous, execute
from .observers import HessianObserver, HistogramObserver
from .recorded import InputStats, batch_figures
from .sources import DatasetRef

SHARDS_PER_WORKER = 2
"""Shards each worker gets on average: a worker that finishes early takes the next one (each shard opens a session)."""
HESSIAN_BLOCKS = 8
"""Blocks of batches whose X^T X are summed apart, then added in block order, on any back end: float64 sums depend on
their grouping, and a grouping by worker made GPTQ's `.data` differ between 1 and 2 workers. With Hessians the
workers' shards are these blocks."""


def describe_batches(ds: Dataset, batch_size: int) -> Callable[[int], str]:
    """Names batch b by its first sample and where it is listed (for error messages)."""
    entries = ds.entries()

    def describe(b: int) -> str:
        first = entries[min(b * batch_size, len(entries) - 1)]
        where = f"line {first[0]} of '{ds.source}'" if first[0] else f"'{first[1][0]}'"
        return f"sample {b * batch_size + 1} ({where})"

    return describe


class CalibrationJob:
    """Calibrate shards of batches of one dataset on one model (a :class:`hybridq.execution.Job`)."""

    def __init__(self, model: onnx.ModelProto, dataset: DatasetRef, batch_size: int, count: int, tensors: list[str],
                 histograms: set[str], range_batches: int | None = 8, hessians: tuple[str, ...] = (),
                 blocks: tuple[int, ...] = ()) -> None:
        self.model, self.dataset, self.batch_size, self.count = model, dataset, batch_size, count
        self.tensors, self.histograms, self.range_batches, self.hessians = tensors, histograms, range_batches, hessians
        self.blocks = blocks  # first batch of each X^T X block (see HESSIAN_BLOCKS)
        self._ds: Dataset | None = None
        self._threads = 0
        self._observers: dict[str, HistogramObserver] = {}

    def start(self, threads: int) -> None:
        self._ds, self._threads = self.dataset.open().log_conversions(), threads

    def run(self, shard: Shard, progress: Progress) -> tuple[list[dict[str, list[float]]], list[ConversionRead], dict[str, HessianObserver]]:
        """Calibrate the shard's batches into this worker's observers; returns each batch's input figures, in order,
        the image conversions read (see `Dataset.take_conversions`) and the shard's X^T X, which the caller adds up
        in shard order."""
        assert self._ds is not None
        ds, first, figures = self._ds, shard.items[0], []

        def batches():
            for b in shard.items:
                batch = ds.batch(b, self.batch_size, self.count)
                figures.append(batch_figures(batch))
                yield batch

        # min/max-only tensors are observed on the first `range_batches` batches of the whole run, as in one process
        ranged = None if self.range_batches is None else max(0, self.range_batches - first)
        tensors = self.tensors if ranged != 0 else [t for t in self.tensors if t in self.histograms]
        describe = describe_batches(ds, self.batch_size)
        # as in one process, one of the worker's cores is left to the binning that runs beside ONNX Runtime
        threads = max(1, self._threads - 1) if self._threads else 0
        observers = calibrate(self.model, batches(), tensors=tensors, histograms=self.histograms, describe=lambda i: describe(first + i),
                              on_batch=progress, range_batches=ranged, threads=threads, hessians=self.hessians,
                              hessian_blocks=[b - first for b in self.blocks], expected_batches=len(shard.items))
        hessians = {}
        for name, obs in observers.items():
            if isinstance(obs, HessianObserver):
                hessians[name] = obs
            else:
                self._observers.setdefault(name, _empty_like(obs)).merge(obs)
        return figures, ds.take_conversions(), hessians

    def finish(self) -> dict[str, HistogramObserver]:
        return self._observers


def calibrate_dataset(
    model: onnx.ModelProto, ds: Dataset, *, batch_size: int, count: int, tensors: list[str], histograms: set[str],
    input_stats: InputStats, execution: Execution | None = None, on_batch: Progress | None = None, hessians: Iterable[str] = (),
) -> dict[str, HistogramObserver]:
    """Observe `tensors` over the first `count` samples of `ds` where `execution` says; one observer per tensor.

    The same observers, and the same `input_stats`, whatever the back end and the number of workers.
    """
    ds.batches(batch_size, limit=count)  # checks the batch size against the inputs before any worker starts
    n_batches = -(-count // batch_size)
    workers = 1 if execution is None or execution.backend == "inprocess" else max(1, execution.workers or 2)
    hessians = tuple(hessians)
    blocks = tuple(a for a, _ in contiguous(n_batches, HESSIAN_BLOCKS)) if hessians else ()
    parts = 1 if workers == 1 else HESSIAN_BLOCKS if hessians else workers * SHARDS_PER_WORKER
    shards = [Shard(k, tuple(range(a, b)), min(b * batch_size, count) - a * batch_size)
              for k, (a, b) in enumerate(contiguous(n_batches, parts))]
    if not shards:
        raise DatasetError("The dataset gave no samples to calibrate on; list at least one sample.")
    job = CalibrationJob(model, DatasetRef.of(ds), batch_size, count, tensors, histograms, hessians=hessians, blocks=blocks)
    summed: dict[str, HessianObserver] = {}

    def folded(shard: Shard, result: tuple[list[dict[str, list[float]]], list[ConversionRead], dict[str, HessianObserver]]) -> None:
        figures, conversions, shard_hessians = result
        for f in figures:
            input_stats.fold(f)
        ds.add_conversions(conversions)  # step1's notes count what every worker read
        for name, obs in shard_hessians.items():  # in shard order: the blocks' sums, added as one process adds them
            summed.setdefault(name, HessianObserver()).merge(obs)

    finals = execute(job, shards, execution, folded, on_batch)
    partials = [f for f in finals if f]
    observers: dict[str, Any] = {n: HistogramObserver(bins=n in histograms) for n in tensors}
    for part in partials:  # histograms merge exactly, in any order
        for name, obs in part.items():
            observers.setdefault(name, _empty_like(obs)).merge(obs)
    observers.update(summed)
    return observers


def _empty_like(obs: Any) -> Any:
    """An empty observer of the same kind, to merge partial ones into."""
    return HessianObserver() if isinstance(obs, HessianObserver) else HistogramObserver(bins=obs.bins)
