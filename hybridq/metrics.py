"""Error metrics between a reference tensor and a test tensor (pure numpy).

Every function flattens its inputs and computes in float64, so float16 and
float32 tensors give the same answer as their float64 copies. The two
arrays must have the same number of elements (``ValueError`` otherwise).
NaN anywhere in the inputs propagates to NaN in the result.

The per-sample values are averaged over samples by :class:`Accumulator`
(see there for how infinite SNRs are averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("cosine", "euclid", "snr_db", "max_abs")
"""The metric names, in the order used by tables, CSV and JSON."""


def _flat_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(
            f"cannot compare tensors of {x.size} and {y.size} elements "
            f"(shapes {np.shape(a)} and {np.shape(b)})"
        )
    return x, y


def _cosine_from(dot: float, na2: float, nb2: float) -> float:
    if na2 == 0.0 and nb2 == 0.0:
        return 1.0
    if na2 == 0.0 or nb2 == 0.0:
        return 0.0
    c = dot / (math.sqrt(na2) * math.sqrt(nb2))
    return min(1.0, max(-1.0, c)) if not math.isnan(c) else c


def _snr_from(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity ``a.b / (|a| |b|)``, clipped to [-1, 1].

    Degenerate cases: both vectors all zero -> 1.0 (they are identical);
    exactly one all zero -> 0.0 (no direction in common). Two constant
    vectors with the same sign give 1.0, opposite signs -1.0. Empty
    inputs count as zero vectors (-> 1.0).
    """
    x, y = _flat_pair(a, b)
    return _cosine_from(float(x @ y), float(x @ x), float(y @ y))


def euclid(a: Any, b: Any) -> float:
    """Euclidean distance ``|a - b|_2`` (0.0 for identical or empty inputs)."""
    x, y = _flat_pair(a, b)
    d = x - y
    return math.sqrt(float(d @ d))


def snr_db(ref: Any, test: Any) -> float:
    """Signal-to-noise ratio of ``test`` against ``ref`` in dB.

    ``10 * log10(sum(ref**2) / sum((ref - test)**2))``. Degenerate cases:
    identical inputs (zero error, including both all zero or empty) ->
    ``+inf``; all-zero ``ref`` with a nonzero error -> ``-inf``.
    """
    x, y = _flat_pair(ref, test)
    d = x - y
    return _snr_from(float(x @ x), float(d @ d))


def max_abs(a: Any, b: Any) -> float:
    """Largest absolute elementwise difference ``max |a - b|`` (0.0 for empty inputs)."""
    x, y = _flat_pair(a, b)
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - y)))


def sample_metrics(ref: Any, test: Any) -> tuple[float, float, float, float]:
    """All four metrics of one sample, ``(cosine, euclid, snr_db, max_abs)``, in one pass.

    Same definitions and degenerate cases as :func:`cosine`, :func:`euclid`,
    :func:`snr_db` and :func:`max_abs`.
    """
    x, y = _flat_pair(ref, test)
    d = x - y
    xx, yy, dd = float(x @ x), float(y @ y), float(d @ d)
    mx = float(np.max(np.abs(d))) if d.size else 0.0
    return (_cosine_from(float(x @ y), xx, yy), math.sqrt(dd), _snr_from(xx, dd), mx)


def mean(values: Sequence[float]) -> float:
    """Mean of per-sample values, exact for infinities.

    ``+inf`` and ``-inf`` together -> NaN; any NaN -> NaN; otherwise any
    infinity wins (a mean with one infinite SNR is infinite); empty -> NaN.
    """
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    pos = any(v == math.inf for v in values)
    neg = any(v == -math.inf for v in values)
    if pos and neg:
        return math.nan
    if pos:
        return math.inf
    if neg:
        return -math.inf
    return math.fsum(values) / len(values)


@dataclass
class Metrics:
    """Mean over samples of each metric, plus the per-sample values when kept.

    ``per_sample`` maps each name in :data:`METRIC_NAMES` to one value per sample.
    """

    cosine: float
    euclid: float
    snr_db: float
    max_abs: float
    per_sample: dict[str, list[float]] | None = field(default=None, compare=False)

    @property
    def n_samples(self) -> int:
        """Number of samples behind the means (0 when the per-sample values were dropped)."""
        return len(self.per_sample["cosine"]) if self.per_sample else 0

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become the strings 'inf', '-inf', 'nan'."""
        d: dict[str, Any] = {k: encode_float(getattr(self, k)) for k in METRIC_NAMES}
        if per_sample and self.per_sample is not None:
            d["per_sample"] = {k: [encode_float(v) for v in vs] for k, vs in self.per_sample.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict`."""
        ps = d.get("per_sample")
        return cls(
            *(decode_float(d[k]) for k in METRIC_NAMES),
            per_sample=(
                {k: [decode_float(v) for v in vs] for k, vs in ps.items()} if ps is not None else None
            ),
        )


class Accumulator:
    """Collects per-sample metrics for one tensor; memory is O(samples), not O(tensor)."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}

    def add(self, ref: Any, test: Any) -> None:
        """Add one sample."""
        for k, v in zip(METRIC_NAMES, sample_metrics(ref, test)):
            self._values[k].append(v)

    def result(self) -> Metrics:
        """Means (see :func:`mean`) and the per-sample values."""
        return Metrics(
            *(mean(self._values[k]) for k in METRIC_NAMES),
            per_sample={k: list(v) for k, v in self._values.items()},
        )


def compare(ref_batch: Sequence[Any], test_batch: Sequence[Any]) -> Metrics:
    """Metrics of each pair ``(ref_batch[i], test_batch[i])``, then their mean."""
    if len(ref_batch) != len(test_batch):
        raise ValueError(f"batches differ in length: {len(ref_batch)} and {len(test_batch)}")
    acc = Accumulator()
    for r, t in zip(ref_batch, test_batch):
        acc.add(r, t)
    return acc.result()


def encode_float(v: float) -> float | str:
    """A float as strict JSON allows: finite as is, otherwise 'inf', '-inf' or 'nan'."""
    if math.isfinite(v):
        return float(v)
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def decode_float(v: float | int | str | None) -> float:
    """Inverse of :func:`encode_float` (``None`` reads as NaN)."""
    return math.nan if v is None else float(v)
