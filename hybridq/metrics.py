"""Error metrics between a reference tensor and a test tensor (pure numpy).

Every function flattens its inputs and computes in float64, so float16 and
float32 tensors give the same answer as their float64 copies. The two
arrays must have the same number of elements (``ValueError`` otherwise).
NaN anywhere in the inputs propagates to NaN in the result.

The per-sample values are averaged over samples by :class:`Accumulator`
(see there for how infinite SNRs are averaged).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._jit import compiled

METRIC_NAMES: tuple[str, ...] = ("cosine", "euclid", "snr_db", "max_abs")
"""The metric names, in the order used by tables, CSV and JSON."""


_CHUNK = 8192  # elements per float64 block: stays in cache, and numpy's BLAS stays single-threaded


def _sums(a: Any, b: Any) -> tuple[float, float, float, float, float]:
    """``(a.a, b.b, a.b, d.d, max|d|)`` with ``d = a - b``, accumulated in float64 block by block.

    Working on fixed blocks keeps memory flat whatever the tensor size and is
    an order of magnitude faster than float64 copies of whole tensors.
    """
    x, y = np.ravel(a), np.ravel(b)
    if x.size != y.size:
        raise ValueError(
            f"cannot compare tensors of {x.size} and {y.size} elements "
            f"(shapes {np.shape(a)} and {np.shape(b)})"
        )
    n = x.size
    m = min(_CHUNK, n)
    xb, yb, db = np.empty(m), np.empty(m), np.empty(m)
    xx = yy = xy = dd = mx = 0.0
    for s in range(0, n, _CHUNK):
        k = min(_CHUNK, n - s)
        xs, ys, ds = xb[:k], yb[:k], db[:k]
        xs[...] = x[s : s + k]
        ys[...] = y[s : s + k]
        np.subtract(xs, ys, out=ds)
        xx += float(xs @ xs)
        yy += float(ys @ ys)
        xy += float(xs @ ys)
        dd += float(ds @ ds)
        np.abs(ds, out=ds)
        big = float(ds.max())
        if math.isnan(big) or big > mx:  # once NaN, stays NaN
            mx = big
    return xx, yy, xy, dd, mx


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
    if noise == 0.0 or (math.isinf(signal) and not math.isinf(noise)):
        return math.inf
    if signal == 0.0 or (math.isinf(noise) and not math.isinf(signal)):
        return -math.inf  # an infinite error (an overflowed activation) drowns any signal
    if math.isinf(signal):
        return math.nan  # both infinite
    return 10.0 * math.log10(signal / noise)


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity ``a.b / (|a| |b|)``, clipped to [-1, 1].

    Degenerate cases: both vectors all zero -> 1.0 (they are identical);
    exactly one all zero -> 0.0 (no direction in common). Two constant
    vectors with the same sign give 1.0, opposite signs -1.0. Empty
    inputs count as zero vectors (-> 1.0).
    """
    xx, yy, xy, _, _ = _sums(a, b)
    return _cosine_from(xy, xx, yy)


def is_distribution(ref: np.ndarray, axis: int) -> bool:
    """Are the values along `axis` probabilities (or log-probabilities) summing to one (a Softmax's output)?"""
    p = np.asarray(ref, dtype=np.float64)
    if p.ndim == 0 or p.shape[axis] < 2:
        return False
    if p.max(initial=0.0) <= 0.0:  # LogSoftmax
        p = np.exp(p)
    return bool(p.min() >= -1e-6 and np.allclose(p.sum(axis=axis), 1.0, atol=1e-3))


def euclid(a: Any, b: Any) -> float:
    """Euclidean distance ``|a - b|_2`` (0.0 for identical or empty inputs)."""
    return math.sqrt(_sums(a, b)[3])


def snr_db(ref: Any, test: Any) -> float:
    """Signal-to-noise ratio of ``test`` against ``ref`` in dB.

    ``10 * log10(sum(ref**2) / sum((ref - test)**2))``. Degenerate cases:
    identical inputs (zero error, including both all zero or empty) ->
    ``+inf``; all-zero ``ref`` with a nonzero error, or an infinite error
    (an overflowed test tensor) with a finite ``ref`` -> ``-inf``.
    """
    xx, _, _, dd, _ = _sums(ref, test)
    return _snr_from(xx, dd)


def max_abs(a: Any, b: Any) -> float:
    """Largest absolute elementwise difference ``max |a - b|`` (0.0 for empty inputs)."""
    return _sums(a, b)[4]


def sample_metrics(ref: Any, test: Any) -> tuple[float, float, float, float]:
    """All four metrics of one sample, ``(cosine, euclid, snr_db, max_abs)``, in one pass.

    Same definitions and degenerate cases as :func:`cosine`, :func:`euclid`,
    :func:`snr_db` and :func:`max_abs`.
    """
    xx, yy, xy, dd, mx = _sums(ref, test)
    return (_cosine_from(xy, xx, yy), math.sqrt(dd), _snr_from(xx, dd), mx)


def metrics_from_sums(xx: float, yy: float, dd: float, max_abs_diff: float) -> tuple[float, float, float, float]:
    """``(cosine, euclid, snr_db, max_abs)`` from ``a.a``, ``b.b``, ``d.d`` and ``max|d|`` (``d = a - b``).

    For sums computed elsewhere (in the analysis graph, see
    :mod:`hybridq.analysis`). ``a.b`` is recovered as ``(a.a + b.b - d.d) / 2``;
    its error is that of the sums times ``1 - cosine`` plus
    ``|(|a| - |b|)| / |b|``, so near-identical tensors lose no digits. Same
    definitions and degenerate cases as :func:`sample_metrics`; a NaN sum
    makes ``max_abs`` NaN too.
    """
    xx, yy, dd, mx = float(xx), float(yy), float(dd), float(max_abs_diff)
    if math.isnan(dd) or math.isnan(xx) or math.isnan(yy):
        mx = math.nan
    if dd == 0.0 and not math.isnan(xx) and not math.isnan(yy):
        cos = 1.0  # identical tensors, including both all zero
    else:
        cos = _cosine_from(0.5 * ((xx + yy) - dd), xx, yy)
    return (cos, math.sqrt(dd) if dd >= 0.0 or math.isnan(dd) else 0.0, _snr_from(xx, dd), mx)


_BLOCK32 = 1 << 16  # float32 elements per block of metrics_many: a few blocks stay in L2
_max, _min, _sub, _dot = np.maximum.reduce, np.minimum.reduce, np.subtract, np.dot


def _sq(v: np.ndarray) -> float:
    """``v.v`` of a float32 block: a float32 BLAS dot, redone in float64 if that overflows or is under 2^-86."""
    r = float(_dot(v, v))
    return r if 2.0**-86 <= r < math.inf or (r == 0.0 and not v.any()) else float(np.square(v, dtype=np.float64).sum())


def _pair_metrics(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """``(x.x, y.y, d.d, max|d|)`` with ``d = x - y`` (float32, as ONNX Runtime subtracts): float64 sums and the
    float32 maximum in one pass over both arrays.

    Compiled by numba with ``fastmath={"reassoc"}`` only, so LLVM vectorises the sums (the result differs from a
    sequential float64 sum by rounding, ~1e-16 relative) while NaN and infinity keep their semantics. The maximum is
    taken on the bits of ``|d|`` as unsigned integers (the order of non-negative floats), which vectorises where a
    float maximum does not; a NaN difference makes it NaN, as the NaN sums make :func:`metrics_from_sums`'s anyway.
    """
    xx = yy = dd = 0.0
    peak = np.uint32(0)
    for i in range(x.size):
        d = x[i] - y[i]
        fa, fb, fd = np.float64(x[i]), np.float64(y[i]), np.float64(d)
        xx += fa * fa
        yy += fb * fb
        dd += fd * fd
        peak = max(peak, np.float32(d).view(np.uint32) & np.uint32(0x7FFFFFFF))
    return xx, yy, dd, float(np.uint32(peak).view(np.float32))


def _triple_metrics(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    """:func:`_pair_metrics` of ``(x, y)`` and of ``(x, z)`` in one pass over ``x`` (a layer's entire and single views):
    ``(x.x, y.y, d.d, max|d|, z.z, e.e, max|e|)`` with ``d = x - y``, ``e = x - z``."""
    xx = yy = dd = zz = ee = 0.0
    peak_d = peak_e = np.uint32(0)
    for i in range(x.size):
        d, e = x[i] - y[i], x[i] - z[i]
        fa, fb, fc, fd, fe = np.float64(x[i]), np.float64(y[i]), np.float64(z[i]), np.float64(d), np.float64(e)
        xx += fa * fa
        yy += fb * fb
        zz += fc * fc
        dd += fd * fd
        ee += fe * fe
        peak_d = max(peak_d, np.float32(d).view(np.uint32) & np.uint32(0x7FFFFFFF))
        peak_e = max(peak_e, np.float32(e).view(np.uint32) & np.uint32(0x7FFFFFFF))
    return xx, yy, dd, float(np.uint32(peak_d).view(np.float32)), zz, ee, float(np.uint32(peak_e).view(np.float32))


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[Callable[..., tuple[float, ...]], Callable[..., tuple[float, ...]]] | None:
    """:func:`_pair_metrics` and :func:`_triple_metrics` compiled by numba (cached on disk), or None where numba is
    missing or fails."""
    one = np.ones(17, np.float32)
    kernels = compiled([(_pair_metrics, (one, one)), (_triple_metrics, (one, one, one))], fastmath={"reassoc"})
    return (kernels[0], kernels[1]) if kernels is not None else None


def fused_kernel() -> Callable[[np.ndarray, np.ndarray], tuple[float, float, float, float]] | None:
    """``(x.x, y.y, d.d, max|d|)`` of two float32 vectors by :func:`_pair_metrics` compiled by numba, or None where
    numba is missing or fails (its three-array twin, for a layer's two views, compiled with it).

    One vectorised pass: 0.47 ns per element on one core of an AVX-512 Xeon, in cache (0.51 with the maximum kept in
    explicit lanes; the sums and the maximum in two passes took 0.84), the three-array pass 0.36 per pair; without
    numba :func:`metrics_many` falls back to numpy blocks, which read each tensor five times.
    """
    kernels = _compiled()
    return kernels[0] if kernels is not None else None


COMPILE_MIN_PAIRS = 5e8
"""Element pairs from which loading the compiled kernel pays (see :func:`worth_compiling`)."""


def worth_compiling(pairs: float | None) -> bool:
    """Is the compiled kernel worth loading to compare this many element pairs (None: unknown, yes)?

    Loading numba and the cached kernel takes 0.1-0.4 s; the kernel then saves about 0.12 ns of wall time a pair over
    the numpy blocks on two workers (PP-OCR rec: 79 against 94 ms a sample, 1.2e8 pairs), so it pays from 1-3e9 pairs.
    Below 5e8 the numpy blocks surely finish first (`hybridq analyze` on PP-OCR cls at 20 samples, 6e7 pairs: 0.89 ->
    0.60 s on an AVX-512 Xeon). Once numba is loaded in the process, always.
    """
    return "numba" in sys.modules or pairs is None or pairs >= COMPILE_MIN_PAIRS


@np.errstate(over="ignore")  # float32 squares past 3.4e38: _sq sums them again
def metrics_many(ref: Any, tests: Sequence[Any], compiled: bool = True) -> list[tuple[float, float, float, float]]:
    """:func:`sample_metrics` of each of ``tests`` against ``ref``.

    Fast path for float32 arrays: :func:`fused_kernel`, one compiled pass per test with float64 sums; without numba
    (or `compiled` False), numpy blocks: float32 BLAS dots added up in float64 (relative error near 1e-7), in float64
    where float32 squares overflow or may underflow (:func:`_sq`). Other dtypes go through :func:`sample_metrics`.
    """
    x = np.ravel(ref)
    ys = [np.ravel(t) for t in tests]
    for y, t in zip(ys, tests):
        if y.size != x.size:
            raise ValueError(
                f"cannot compare tensors of {x.size} and {y.size} elements (shapes {np.shape(ref)} and {np.shape(t)})"
            )
    if x.dtype != np.float32 or any(y.dtype != np.float32 for y in ys):
        return [sample_metrics(ref, t) for t in tests]
    if not x.size:
        return [metrics_from_sums(0.0, 0.0, 0.0, 0.0) for _ in ys]
    kernels = _compiled() if compiled else None
    if kernels is not None:
        pair, triple = kernels
        if len(ys) == 2:  # a layer's entire and single views: x read once
            xx, yy, dd, md, zz, ee, me = triple(x, ys[0], ys[1])
            return [metrics_from_sums(xx, yy, dd, md), metrics_from_sums(xx, zz, ee, me)]
        return [metrics_from_sums(*pair(x, y)) for y in ys]
    buf, k, xx = np.empty(min(_BLOCK32, x.size), np.float32), len(ys), 0.0
    yy, dd, hi, lo = [0.0] * k, [0.0] * k, [-math.inf] * k, [math.inf] * k
    for s in range(0, x.size, _BLOCK32):
        xs = x[s : s + _BLOCK32]
        d = buf[: xs.size]
        xx += _sq(xs)
        for j, y in enumerate(ys):
            yb = y[s : s + _BLOCK32]
            _sub(xs, yb, out=d)
            yy[j] += _sq(yb)
            h, lw = float(_max(d)), float(_min(d))
            dd[j] += _sq(d) if h or lw else 0.0  # a block with no difference (a NaN one is summed)
            # NaN sticks: a NaN block makes the sums NaN, which metrics_from_sums turns into a NaN max
            hi[j] = h if h > hi[j] or h != h else hi[j]
            lo[j] = lw if lw < lo[j] or lw != lw else lo[j]
    return [metrics_from_sums(xx, yy[j], dd[j], max(hi[j], -lo[j])) for j in range(k)]


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

    ``per_sample`` maps each name in :data:`METRIC_NAMES` to one value per sample (and ``"sample"``, where analyze
    left samples out, to the run's index of each: :meth:`hybridq.analysis.measuring.Measure.layers`).
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

    def to_dict(self, per_sample: bool = True, encode: bool = True) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become the strings 'inf', '-inf', 'nan'
        (kept as floats with ``encode=False``, for :func:`to_strict_json`)."""
        enc = encode_float if encode else float
        d: dict[str, Any] = {k: enc(getattr(self, k)) for k in METRIC_NAMES}
        if per_sample and self.per_sample is not None:
            d["per_sample"] = {k: [enc(v) for v in vs] for k, vs in self.per_sample.items()}
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

    def add_values(self, values: Sequence[float]) -> None:
        """Add one sample's ``(cosine, euclid, snr_db, max_abs)``, computed elsewhere."""
        for k, v in zip(METRIC_NAMES, values):
            self._values[k].append(float(v))

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


# --------------------------------------------------------------------------- per-slice output measure


def channel_axis(shape: Sequence[int]) -> int | None:
    """The axis a model output is compared along, slice by slice (``None``: no slicing).

    Rule (axis 0 is the batch): rank >= 4 -> 1 (NCHW-like: ``[N, C, H, W...]``);
    rank 3 -> the shorter of axes 1 and 2, the last on a tie (``[N, 84, 8400]``
    YOLOv8 heads -> 1, ``[N, 25200, 85]`` YOLOv5 heads -> 2, ``[N, T, classes]``
    OCR outputs -> 1, one slice per time step); rank 2 and lower -> ``None``: a
    slice of ``[N, C]`` (class logits) is one number per sample, whose energy
    can be near zero by chance, so its SNR says nothing and the whole-tensor
    figure stands alone. An axis of length 1 gives no slices either.
    """
    r = len(shape)
    if r >= 4:
        axis: int | None = 1
    elif r == 3:
        axis = 1 if shape[1] < shape[2] else 2
    else:
        axis = None
    return None if axis is None or shape[axis] <= 1 else axis


def slice_sums(ref: np.ndarray, test: np.ndarray, axis: int, fast: bool = False) -> np.ndarray:
    """Per slice along ``axis``: the float64 sums ``(a.a, b.b, a.b, d.d)`` with ``d = a - b``, shape ``(4, C)``.

    Each slice gathers every element with the same index on ``axis``; the
    sums of several samples add up (:class:`SliceAccumulator`). With ``fast``
    and float32 inputs, each slice goes through :func:`fused_kernel` (float64
    sums, ``d`` in float32, ``a.b`` recovered as ``(a.a + b.b - d.d) / 2`` as in
    :func:`metrics_from_sums`): about ten times faster than the float64 copies.
    """
    if ref.shape != test.shape:
        raise ValueError(f"cannot compare slices of shapes {ref.shape} and {test.shape}")
    c = ref.shape[axis]
    kernel = fused_kernel() if fast and ref.dtype == np.float32 and test.dtype == np.float32 else None
    if kernel is not None:
        xs = np.ascontiguousarray(np.moveaxis(ref, axis, 0).reshape(c, -1))
        ys = np.ascontiguousarray(np.moveaxis(test, axis, 0).reshape(c, -1))
        out = np.empty((4, c))
        for i in range(c):
            xx, yy, dd, _ = kernel(xs[i], ys[i])
            out[:, i] = (xx, yy, 0.5 * ((xx + yy) - dd), dd)
        return out
    x = np.moveaxis(np.asarray(ref), axis, 0).reshape(c, -1).astype(np.float64)
    y = np.moveaxis(np.asarray(test), axis, 0).reshape(c, -1).astype(np.float64)
    d = x - y
    return np.stack(
        [np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y), np.einsum("ij,ij->i", x, y), np.einsum("ij,ij->i", d, d)]
    )


@dataclass
class SliceMetrics:
    """Cosine and SNR of each slice of a model output along ``axis``, over all samples.

    Each slice is normalised by its own energy, so a slice of sigmoid scores
    (0-1) counts as much as a slice of box coordinates (0-320) beside it.
    ``cosine[i]`` and ``snr_db[i]`` use the sums of slice ``i`` over every
    sample (degenerate cases as :func:`cosine` and :func:`snr_db`).
    """

    axis: int
    cosine: list[float]
    snr_db: list[float]

    @property
    def worst(self) -> int:
        """Index of the worst slice: lowest SNR, then lowest cosine; NaN counts as worst."""

        def key(i: int) -> tuple[float, float]:
            s, c = self.snr_db[i], self.cosine[i]
            return (-math.inf if math.isnan(s) else s, -math.inf if math.isnan(c) else c)

        return min(range(len(self.snr_db)), key=key)

    @property
    def min_cosine(self) -> float:
        """The lowest slice cosine (NaN if any is NaN)."""
        return math.nan if any(math.isnan(c) for c in self.cosine) else min(self.cosine)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``axis``, ``worst`` (index), ``worst_snr_db``, ``min_cosine``, per-slice lists."""
        w = self.worst
        return {
            "axis": self.axis,
            "slices": len(self.cosine),
            "worst": w,
            "worst_cosine": self.cosine[w],
            "worst_snr_db": self.snr_db[w],
            "min_cosine": self.min_cosine,
            "cosine": list(self.cosine),
            "snr_db": list(self.snr_db),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliceMetrics:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["axis"]), [decode_float(v) for v in d["cosine"]], [decode_float(v) for v in d["snr_db"]])


SNR_DEFAULT = 20.0
"""Default SNR (dB) the worst slice of an output must keep (analyze's verdict, the proposal's target)."""


def output_ok(whole_cosine: float, whole_snr: float, slices: SliceMetrics | None, cos_threshold: float, snr_threshold: float) -> bool:
    """The rule for one model output, shared by analyze's verdict and the proposal's target.

    The whole tensor keeps cosine >= ``cos_threshold``; where the output is sliced
    (:func:`channel_axis`), every slice keeps cosine >= ``cos_threshold`` and the
    worst slice SNR >= ``snr_threshold`` (its worst slice is the SNR that counts),
    else the whole tensor keeps SNR >= ``snr_threshold``. NaN fails.
    """
    ok = whole_cosine >= cos_threshold
    if slices is not None:
        return bool(ok and slices.min_cosine >= cos_threshold and slices.snr_db[slices.worst] >= snr_threshold)
    return bool(ok and whole_snr >= snr_threshold)


def normalised(slices: SliceMetrics) -> tuple[float, float]:
    """Cosine and SNR of the output with every slice scaled to unit energy: the mean slice cosine, the pooled SNR.

    A smooth summary where every slice counts the same; the proposal compares candidates by it.
    """
    cos = float(np.mean(slices.cosine))
    nsr = [10.0 ** (-s / 10.0) for s in slices.snr_db]
    total = float(np.sum(nsr))
    return cos, (math.inf if total == 0 else 10.0 * math.log10(len(nsr) / total))


class SliceAccumulator:
    """Adds the :func:`slice_sums` of each sample; memory is O(slices)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sums: np.ndarray | None = None

    def add_sums(self, sums: np.ndarray) -> None:
        """Add one sample's :func:`slice_sums`."""
        if self.sums is not None and self.sums.shape != sums.shape:
            raise ValueError(f"slice sums of shape {sums.shape} do not match the earlier {self.sums.shape}")
        self.sums = sums.copy() if self.sums is None else self.sums + sums

    def result(self) -> SliceMetrics | None:
        """Per-slice cosine and SNR, or None before any sample."""
        if self.sums is None:
            return None
        xx, yy, xy, dd = (self.sums[k].tolist() for k in range(4))
        cos = [1.0 if d == 0.0 else _cosine_from(p, a, b) for a, b, p, d in zip(xx, yy, xy, dd)]
        return SliceMetrics(self.axis, cos, [_snr_from(a, d) for a, d in zip(xx, dd)])


# --------------------------------------------------------------------------- strict JSON

NONFINITE_KEY = "nonfinite"
"""Top-level key of a strict JSON document listing its non-finite numbers (see :func:`to_strict_json`)."""


def to_strict_json(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every non-finite float written as ``null`` and listed under ``"nonfinite"``.

    ``"nonfinite"`` maps the JSON Pointer (RFC 6901) of each such value to
    ``"inf"``, ``"-inf"`` or ``"nan"`` (for example an infinite SNR, two
    identical tensors: ``{"/tensors/x/entire/snr_db": "inf"}``), so every
    number in the text is a plain JSON number and no string stands for one;
    :func:`from_strict_json` restores the floats. A ``"nonfinite"`` map ``doc``
    already holds (a strict document spread into this one at the top level) is
    kept, so those values are not lost.
    """
    found: dict[str, str] = dict(doc.get(NONFINITE_KEY) or {})

    def esc(k: str) -> str:
        return k.replace("~", "~0").replace("/", "~1")

    def walk(v: Any, ptr: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            found[ptr] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{ptr}/{esc(str(k))}") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{ptr}/{i}") for i, x in enumerate(v)]
        return v

    out = walk({k: v for k, v in doc.items() if k != NONFINITE_KEY}, "")
    out[NONFINITE_KEY] = found
    return out


def from_strict_json(doc: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`to_strict_json` (a document without ``"nonfinite"`` is returned as is)."""
    marks = doc.get(NONFINITE_KEY) or {}
    out = {k: v for k, v in doc.items() if k != NONFINITE_KEY}
    for ptr, text in marks.items():
        parts = [p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]]
        node: Any = out
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = float(text)
        else:
            node[last] = float(text)
    return out
