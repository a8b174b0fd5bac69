"""The analysis on :mod:`hybridq.execution`'s back ends: one sample per shard, results added in sample order.

Used when :class:`~hybridq.analysis.running.AnalysisOptions` names an
``execution``. Given :class:`~hybridq.sources.IndexedSamples` on workers of
their own (local processes or Ray), a shard carries only the sample's index and
the worker reads the sample from the dataset; otherwise it carries the arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..dataset import ConversionRead
from ..execution import Execution, Progress, Shard, execute
from ..recorded import batch_figures
from ..sources import DatasetRef, IndexedSamples
from .measuring import Measure, SampleErrors
from .results import SampleSink
from .running import Work, check_feed


class AnalysisJob:
    """Measure samples with a worker's own sessions (a :class:`hybridq.execution.Job`)."""

    def __init__(self, work: Work, inputs: list[str], source: DatasetRef | None) -> None:
        self.work, self.inputs, self.source = work, inputs, source
        self._ds = None

    def start(self, threads: int) -> None:
        self.work.start(threads)  # opened on this worker's threads; each runs on one: samples run side by side, one per worker
        self._ds = self.source.open().log_conversions() if self.source is not None else None

    def run(self, shard: Shard, progress: Progress) -> tuple[SampleErrors, dict[str, list[float]] | None, list[ConversionRead]]:
        """The sample's errors; its input figures and image conversions when this worker read it."""
        n = shard.items[0]
        sample = shard.payload if self._ds is None else self._ds.sample(n)
        check_feed(sample, self.inputs, n)
        read = (batch_figures(sample), self._ds.take_conversions()) if self._ds is not None else (None, [])
        return self.work.sample(sample, n), *read

    def finish(self) -> None:
        return None


def reads_itself(samples: Any, execution: Execution | None) -> IndexedSamples | None:
    """`samples` when workers of their own can read them by index, else None (arrays are sent)."""
    remote = execution is not None and execution.backend != "inprocess"
    return samples if remote and isinstance(samples, IndexedSamples) else None


def run_sharded(
    work: Work, m: Measure, samples: Iterable[dict[str, np.ndarray]] | IndexedSamples, execution: Execution, inputs: list[str],
    sink: SampleSink | None, on_sample: Callable[[], None] | None,
) -> int:
    """Run every sample where `execution` says, adding results (and handing arrays to `sink`) in sample order."""
    indexed = reads_itself(samples, execution)
    count = [0]

    def shards() -> Iterator[Shard]:
        if indexed is not None:
            yield from (Shard(i, (i,), 1) for i in range(indexed.count))
            return
        for i, sample in enumerate(samples):
            yield Shard(i, (i,), 1, sample)

    def added(shard: Shard, result: tuple[SampleErrors, dict[str, list[float]] | None, list[ConversionRead]]) -> None:
        done, figures, conversions = result
        if figures is not None and indexed is not None:
            indexed.stats.fold(figures)
            indexed.dataset.add_conversions(conversions)  # analyze's notes count what every worker read
        m.add(done)
        if sink is not None:
            m.dump(sink, done)
        count[0] += 1
        if on_sample is not None:
            on_sample()

    job = AnalysisJob(work, inputs, indexed.ref if indexed is not None else None)
    execute(job, shards(), execution, added)
    return count[0]
