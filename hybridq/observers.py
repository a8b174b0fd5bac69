"""Streaming statistics of one tensor, and the range algorithms that read them.

A `HistogramObserver` sees data only through `update(x)` and can be `merge`d.
Its histogram has power-of-two bin widths aligned at multiples of the width, so
growing the range merges whole bins exactly and the result depends only on the
set of values seen, never on their order or batching. Memory is bounded: at
most `MAX_BINS` counts per tensor, whatever the number of samples.

Range algorithms are pure functions of the statistics, listed in `ALGORITHMS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .binning import bin_counts

MAX_BINS = 16384
# Bin widths never go below 2**-E_SPAN times the largest magnitude seen (nor below
# 2**E_MIN), so bin indices stay well inside int64 even for constant tensors, and
# the chosen width is a monotone function of the data's range (order-independent).
E_SPAN = 40
E_MIN = -160
# Batches larger than this are histogrammed from an evenly strided subsample (counts scaled
# back); min, max and count stay exact. Smaller batches are binned exactly.
SUBSAMPLE = 1 << 18


def _needed_exponent(lo: float, hi: float) -> int:
    """Smallest e such that [lo, hi] spans at most MAX_BINS bins of width 2**e (and not absurdly fine)."""
    mag = max(abs(lo), abs(hi))
    e_floor = max(E_MIN, math.frexp(mag)[1] - E_SPAN) if mag > 0 else E_MIN
    span = hi - lo
    e = math.frexp(span / MAX_BINS)[1] - 1 if span > 0 else e_floor
    e = max(e, e_floor)
    while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) + 1 > MAX_BINS:
        e += 1
    while e - 1 >= e_floor and math.floor(hi / 2.0 ** (e - 1)) - math.floor(lo / 2.0 ** (e - 1)) + 1 <= MAX_BINS:
        e -= 1
    return e


@dataclass
class HistogramObserver:
    """Exact min/max, element count and a bounded power-of-two histogram of everything seen."""

    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    exponent: int = 0
    start: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bins: bool = True  # False: exact min/max and count only (cheap; minmax is then the only algorithm)
    infinite: bool = False  # some value was +-Inf (an attention mask): the statistics hold the finite ones only

    STATE_KEYS = ("scalars", "ints", "counts")

    def update(self, x: np.ndarray) -> None:
        """Add a batch of values; raises ValueError on NaN (the caller names the sample); +-Inf is flagged (see `of`)."""
        self.merge(HistogramObserver.of(x, self.bins))

    @classmethod
    def of(cls, x: np.ndarray, bins: bool = True, kernel: Callable[..., None] | None = None) -> "HistogramObserver":
        """The statistics of one batch alone (`update` merges them); raises ValueError on NaN. +-Inf values are
        left out of the statistics and flag the observer `infinite`. `kernel` (:func:`hybridq.binning.kernel_for`)
        bins by one compiled pass instead of numpy, to the same counts."""
        x = np.asarray(x)
        if x.size == 0:
            return cls(bins=bins)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if math.isnan(lo) or math.isnan(hi) or np.isnan(x).any():
                raise ValueError("non-finite values (NaN)")
            finite = x[np.isfinite(x)]
            other = cls.of(finite, bins, kernel) if finite.size else cls(bins=bins)
            other.infinite = True
            return other
        other = cls(lo, hi, int(x.size), bins=bins)
        if not bins:
            return other
        other.exponent = _needed_exponent(lo, hi)
        other.start = math.floor(lo / 2.0**other.exponent)
        flat = x.ravel()
        step = max(1, flat.size // SUBSAMPLE)
        stop = math.floor(hi / 2.0**other.exponent)
        other.counts = bin_counts(flat[::step], other.exponent, other.start, stop, kernel) * step
        return other

    def update_range(self, lo: float, hi: float, n: int) -> None:
        """Add a batch known only by its min and max (n elements); drops the histogram. A NaN raises ValueError; an
        infinite bound flags the observer `infinite` (its finite range is then unknown: the batch adds nothing else)."""
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("non-finite values (NaN)")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.infinite = True
            return
        self.merge(HistogramObserver(lo, hi, n, bins=False))

    def merge(self, other: "HistogramObserver") -> None:
        """Fold another observer's statistics into this one (exact, order-independent)."""
        self.infinite = self.infinite or other.infinite
        if other.count == 0:
            return
        if self.count == 0:
            self.min, self.max, self.count, self.bins = other.min, other.max, other.count, self.bins and other.bins
            self.exponent, self.start, self.counts = other.exponent, other.start, other.counts.copy()
            return
        lo, hi = min(self.min, other.min), max(self.max, other.max)
        if not (self.bins and other.bins):
            self.min, self.max, self.count, self.bins = lo, hi, self.count + other.count, False
            self.counts = np.zeros(0, dtype=np.int64)
            return
        e = max(self.exponent, other.exponent, _needed_exponent(lo, hi))
        a_start, a = _rebin(self.start, self.counts, self.exponent, e)
        b_start, b = _rebin(other.start, other.counts, other.exponent, e)
        start = min(a_start, b_start)
        end = max(a_start + len(a), b_start + len(b))
        counts = np.zeros(end - start, dtype=np.int64)
        counts[a_start - start : a_start - start + len(a)] += a
        counts[b_start - start : b_start - start + len(b)] += b
        self.min, self.max, self.count = lo, hi, self.count + other.count
        self.exponent, self.start, self.counts = e, start, counts

    @property
    def width(self) -> float:
        """Bin width."""
        return 2.0**self.exponent

    def edges(self) -> np.ndarray:
        """Bin edges (len(counts) + 1 values)."""
        return (self.start + np.arange(len(self.counts) + 1, dtype=np.float64)) * self.width

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that round-trip through `from_state` (stored in the .data artifact)."""
        return {
            "scalars": np.array([self.min, self.max], dtype=np.float64),
            # the flag is stored only when set: every other observer's bytes are as before it existed
            "ints": np.array([self.count, self.exponent, self.start, int(self.bins)] + ([1] if self.infinite else []), dtype=np.int64),
            "counts": self.counts,
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "HistogramObserver":
        """Rebuild an observer saved with `state()`."""
        lo, hi = state["scalars"].tolist()
        count, exponent, start, bins, *flag = (int(v) for v in state["ints"])
        return cls(lo, hi, count, exponent, start, np.asarray(state["counts"], dtype=np.int64), bool(bins), bool(flag and flag[0]))


def _rebin(start: int, counts: np.ndarray, e_from: int, e_to: int) -> tuple[int, np.ndarray]:
    """Merge bins by 2**(e_to - e_from): exact because bins are aligned at multiples of the width."""
    if e_to == e_from:
        return start, counts
    shift = e_to - e_from
    idx = (start + np.arange(len(counts), dtype=np.int64)) >> shift
    new_start = int(idx[0])
    return new_start, np.bincount(idx - new_start, weights=counts, minlength=int(idx[-1] - new_start + 1)).astype(np.int64)


# Range algorithms: (observer, levels, options) -> (lo, hi). `levels` is the number
# of quantization steps of the target dtype (255 for 8 bit), used by kl and mse.

def range_minmax(obs: HistogramObserver, levels: int, percentile: float = 99.99) -> tuple[float, float]:
    """The observed range, as RKNN's `normal` algorithm."""
    return obs.min, obs.max


def _quantile(obs: HistogramObserver, q: float) -> float:
    """Value below which a fraction q of the elements lie, interpolated linearly inside a bin."""
    cum = np.cumsum(obs.counts, dtype=np.float64)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(cum) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / obs.counts[i] if obs.counts[i] else 0.0
    return float((obs.start + i + frac) * obs.width)


def range_percentile(obs: HistogramObserver, levels: int, percentile: float = 99.99) -> tuple[float, float]:
    """Clip each tail to (100 - percentile) % of the elements; the range still holds 0 and never exceeds min/max."""
    tail = (100.0 - percentile) / 100.0
    lo = max(obs.min, _quantile(obs, tail)) if obs.min < 0 else obs.min
    hi = min(obs.max, _quantile(obs, 1.0 - tail)) if obs.max > 0 else obs.max
    return lo, hi


def _abs_histogram(obs: HistogramObserver) -> np.ndarray:
    """Histogram of |x| on bins [k w, (k+1) w), k >= 0: negative bins fold exactly onto positive ones."""
    idx = obs.start + np.arange(len(obs.counts), dtype=np.int64)
    folded = np.where(idx < 0, -idx - 1, idx)
    return np.bincount(folded, weights=obs.counts).astype(np.float64)


def _clipped_range(obs: HistogramObserver, threshold: float) -> tuple[float, float]:
    """Range [-t, t] intersected with the observed range."""
    return max(obs.min, -threshold), min(obs.max, threshold)


KL_BINS = 2048
"""Histogram size of the entropy search (TensorRT's)."""


def range_kl(obs: HistogramObserver, levels: int, percentile: float = 99.99) -> tuple[float, float]:
    """TensorRT-style entropy calibration on |x|: the threshold minimising KL(P || Q) with `levels` bins.

    Like TensorRT, the smallest candidate threshold is nq / KL_BINS of max|x| (nq = quantized bins):
    searched from the stored bins (merged by powers of two, exactly, to KL_BINS..2 KL_BINS bins),
    candidates started at nq fine bins, 2 % of the range, and clipped post-ReLU tensors with a spike
    near zero there (PP-OCR det collapsed to hmean 0).
    """
    hist = _abs_histogram(obs)
    width = obs.width
    factor = 1
    while len(hist) >= factor * 2 * KL_BINS:
        factor *= 2
    if factor > 1:
        hist = np.add.reduceat(hist, np.arange(0, len(hist), factor))
        width *= factor
    nq = (levels + 1) // 2 if obs.min < 0 else levels + 1
    n = len(hist)
    first = max(nq, math.ceil(n * nq / KL_BINS))
    if n <= first or hist.sum() == 0:
        return obs.min, obs.max
    best_t, best_kl = n, math.inf
    step = max(1, (n - first) // 256)
    for t in list(range(first, n, step)) + [n]:
        sliced = hist[:t]
        p = sliced.copy()
        p[-1] += hist[t:].sum()  # P keeps the clipped tail in its last bin; Q is built without it
        nonzero = p > 0
        # Q: each of nq chunks (np.array_split sizes) spreads its mass evenly over its nonzero bins of P.
        sizes = np.full(nq, t // nq)
        sizes[: t % nq] += 1
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums = np.add.reduceat(sliced, starts)
        counts = np.add.reduceat(nonzero.astype(np.int64), starts)
        q = np.repeat(np.divide(sums, counts, out=np.zeros(nq), where=counts > 0), sizes) * nonzero
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        mask = ps > 0
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_t = kl, t
    return _clipped_range(obs, best_t * width)


def range_mse(obs: HistogramObserver, levels: int, percentile: float = 99.99) -> tuple[float, float]:
    """The shrink of the min/max range that minimises the expected squared quantization error (bin centres)."""
    centres = (obs.edges()[:-1] + obs.edges()[1:]) / 2
    weights = obs.counts.astype(np.float64)
    best, best_err = (obs.min, obs.max), math.inf
    for f in np.linspace(0.05, 1.0, 96):
        lo, hi = min(obs.min * f, 0.0), max(obs.max * f, 0.0)
        scale = (hi - lo) / levels
        if scale <= 0:
            continue
        clipped = np.clip(centres, lo, hi)
        err = float(np.sum(weights * ((centres - clipped) ** 2 + scale**2 / 12)))
        if err < best_err:
            best_err, best = err, (max(obs.min, lo), min(obs.max, hi))
    return best


RangeAlgorithm = Callable[[HistogramObserver, int, float], "tuple[float, float]"]

ALGORITHMS: dict[str, RangeAlgorithm] = {
    "minmax": range_minmax,
    "percentile": range_percentile,
    "kl": range_kl,
    "mse": range_mse,
}

# RKNN-Toolkit2's names, accepted on input.
ALGORITHM_ALIASES = {"normal": "minmax", "kl_divergence": "kl", "mmse": "mse", "entropy": "kl"}


def compute_range(obs: HistogramObserver, algorithm: str, levels: int, percentile: float = 99.99) -> tuple[float, float]:
    """Range of the tensor by the named algorithm; an unknown name raises KeyError listing the valid ones."""
    name = ALGORITHM_ALIASES.get(algorithm, algorithm)
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    if obs.count == 0:
        return 0.0, 0.0
    if not obs.bins and name != "minmax":
        raise KeyError(f"only min/max were recorded for this tensor, so algorithm {algorithm!r} cannot run; use minmax")
    return ALGORITHMS[name](obs, levels, percentile)


HESSIAN_SUFFIX = "::xtx"
"""Key suffix of a tensor's :class:`HessianObserver` in the observers dict (beside its histogram under the plain name)."""


@dataclass
class HessianObserver:
    """X^T X of a tensor read as rows of its last axis (a MatMul input [..., K]), summed in float64, and the row count.

    What GPTQ rounding needs (:mod:`hybridq.gptq`); K x K values whatever the number of samples. Float64 sums depend on
    their grouping, so batches are summed in blocks: :meth:`update` adds to the open block, :meth:`close` adds that
    block to the total, and :meth:`merge` adds another observer's closed total. The same blocks, closed and merged in
    the same order, give the same bits on one process or many (:mod:`hybridq.calibration_job`).
    """

    hessian: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    rows: int = 0
    block: "HessianObserver | None" = field(default=None, repr=False, compare=False)

    STATE_KEYS = ("hessian", "rows")

    def update(self, x: np.ndarray) -> None:
        """Add a batch to the open block; raises ValueError on NaN or Inf (the caller names the sample)."""
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(-1, x.shape[-1])
        if not np.all(np.isfinite(x)):
            raise ValueError("non-finite values (NaN or Inf)")
        if self.block is None:
            self.block = HessianObserver()
        self.block.merge(HessianObserver(x.T @ x, x.shape[0]))

    def close(self) -> None:
        """Add the open block to the total (nothing when no batch came since the last close)."""
        if self.block is not None:
            block, self.block = self.block, None
            self.merge(block)

    def merge(self, other: "HessianObserver") -> None:
        """Fold another observer's total (its open block closed first) into this one's."""
        other.close()
        if other.rows == 0:
            return
        if self.rows == 0:
            self.hessian, self.rows = other.hessian.copy(), other.rows
            return
        if other.hessian.shape != self.hessian.shape:
            raise ValueError(f"X^T X of width {other.hessian.shape[0]} cannot merge into one of width {self.hessian.shape[0]}")
        self.hessian = self.hessian + other.hessian
        self.rows += other.rows

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that round-trip through `from_state` (stored in the .data artifact); the open block is closed first."""
        self.close()
        return {"hessian": self.hessian, "rows": np.array([self.rows], dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "HessianObserver":
        """Rebuild an observer saved with `state()`."""
        return cls(np.asarray(state["hessian"], dtype=np.float64), int(state["rows"][0]))


def observer_kind(name: str) -> type:
    """The observer class stored under a key of the observers dict: by its suffix."""
    return HessianObserver if name.endswith(HESSIAN_SUFFIX) else HistogramObserver
