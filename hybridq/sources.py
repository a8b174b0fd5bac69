"""Samples a worker reads itself: the dataset named by path (not arrays), and the samples of a run by index.

A worker of :mod:`hybridq.execution` opens a :class:`DatasetRef` and loads the
samples its shards name, so only indices travel; the list file and the files
it names must be visible at the same paths on every worker (a shared disk on a cluster).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import Dataset, InputSpec, Preprocess, load_dataset
from .recorded import InputStats


@dataclass(frozen=True)
class DatasetRef:
    """What a worker needs to open the dataset itself: the list file (absolute), the inputs and the preprocessing."""

    source: str
    inputs: tuple[InputSpec, ...]
    preprocess: Preprocess
    columns: tuple[str, ...] = ()
    selection: tuple[int, ...] = ()

    @classmethod
    def of(cls, ds: Dataset) -> "DatasetRef":
        """The reference of an open dataset."""
        return cls(str(Path(ds.source).resolve()), tuple(ds.inputs), ds.preprocess, ds.columns, ds.selection)

    def open(self) -> Dataset:
        """The dataset, listed again here (the list file must be visible at the same path on every worker)."""
        return load_dataset(self.source, list(self.inputs), self.preprocess, self.columns).select(self.selection)


@dataclass
class IndexedSamples:
    """The first `count` samples of a dataset: iterated here as arrays, or sent to workers as indices.

    Either way `stats` ends up holding every sample's input figures, folded in sample order.
    """

    dataset: Dataset
    count: int
    stats: InputStats = field(default_factory=InputStats)

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef.of(self.dataset)

    def first(self) -> dict[str, np.ndarray] | None:
        """Sample 0 (not counted in `stats`), or None for an empty run."""
        return self.dataset.sample(0) if self.count else None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.stats.watch(self.dataset.samples(limit=self.count))
