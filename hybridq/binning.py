"""Histogram counts in power-of-two bins: numpy, or one compiled pass where the volume pays for loading numba.

Calibration bins every value of every histogram tensor (:meth:`hybridq.observers.HistogramObserver.of`). numpy
reads each tensor five times (scale, floor, shift, integer cast, then ``bincount``, whose scatter is the slow
part); the compiled pass computes a block's bin indices vectorised and counts them into two interleaved lanes, so
a run of equal bins (a ReLU's zeros) does not wait on one counter. The counts are the same, bit for bit.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import numpy as np

from ._jit import compiled

COMPILE_MIN_VALUES = 3e8
"""Values binned in one calibration from which loading numba pays. Loading it and the cached kernel takes 0.1-0.4 s;
the kernel then bins about 1.5 ns a value faster than numpy on one core (small detector, 4.0 M values a sample on an
AVX-512 Xeon: the counts 11.5 -> 4.6-5.7 ms, with the min/max both take 12-14 -> 8-9 ms), which repays the load from
1-3e8 values."""

_BLOCK = 1024  # bin indices computed per block, vectorised, before they are counted
_LANE_LIMIT = 1 << 30  # values per call, so no int32 lane can overflow
_EXACT_INT = 1 << 24  # float32 holds every integer up to this


def numpy_counts(x: np.ndarray, exponent: int, start: int) -> np.ndarray:
    """Counts of floor(x / 2**exponent) - start; scaling by a power of two and floor are exact in float32."""
    x = x.ravel()
    if x.dtype != np.float32 or not -126 <= -exponent <= 127:
        x = x.astype(np.float64)
    scaled = np.multiply(x, x.dtype.type(2.0**-exponent))
    np.floor(scaled, out=scaled)
    if exponent > 0:
        # x * 2**-e can underflow to -0.0 for tiny negative x, whose bin is -1, not 0.
        scaled[(scaled == 0) & np.signbit(scaled) & (x != 0)] = -1
    if start != 0:
        scaled -= x.dtype.type(start)
    return np.bincount(scaled.astype(np.intp)).astype(np.int64)


def _lane_counts(x: np.ndarray, scale: np.float32, start: np.float32, lanes: np.ndarray) -> None:
    """Add the bin floor(x * scale) - start of each float32 value into `lanes` (2, n), alternating lanes.

    Exact where :func:`bin_counts` calls it: the product is a power-of-two scaling that cannot underflow (scale >= 1),
    and the difference of two integers within float32's 2**24 is exact. Indices are clamped into [0, n): they lie
    there whenever n covers the values' range, so the clamp only keeps memory safe.
    """
    top, zero = np.float32(lanes.shape[1] - 1), np.float32(0)
    idx = np.empty(_BLOCK, np.int32)
    for b in range(0, x.size, _BLOCK):
        m = min(_BLOCK, x.size - b)
        for j in range(m):
            idx[j] = np.int32(min(max(np.floor(x[b + j] * scale) - start, zero), top))
        pairs = m & ~1
        for j in range(0, pairs, 2):
            lanes[0, idx[j]] += 1
            lanes[1, idx[j + 1]] += 1
        if pairs < m:
            lanes[0, idx[m - 1]] += 1


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable[..., None] | None:
    """:func:`_lane_counts` compiled by numba (cached on disk), or None where numba is missing or fails."""
    kernels = compiled([(_lane_counts, (np.ones(3, np.float32), np.float32(1.0), np.float32(1.0), np.zeros((2, 1), np.int32)))])
    return kernels[0] if kernels is not None else None


def compiled_counts(kernel: Callable[..., None], x: np.ndarray, exponent: int, start: int, stop: int) -> np.ndarray:
    """:func:`numpy_counts` by the compiled `kernel`, for float32 `x` whose bins lie in [start, stop]; the same array."""
    flat = x.ravel()
    lanes = np.zeros((2, stop - start + 1), np.int32)
    scale, offset = np.float32(2.0**-exponent), np.float32(start)
    total = np.zeros(stop - start + 1, np.int64)
    for a in range(0, flat.size, _LANE_LIMIT):
        if a:
            lanes[:] = 0
        kernel(flat[a:a + _LANE_LIMIT], scale, offset, lanes)
        total += lanes.sum(axis=0, dtype=np.int64)
    used = np.flatnonzero(total)
    return total[: used[-1] + 1] if used.size else total[:0]


def bin_counts(x: np.ndarray, exponent: int, start: int, stop: int, kernel: Callable[..., None] | None = None) -> np.ndarray:
    """Counts of floor(x / 2**exponent) - start for values whose bins lie in [start, stop]: by `kernel` (from
    :func:`kernel_for`) where it is exact (float32 values, bins no wider than 1 and a normal float32 scale, bin
    numbers within 2**24), else by numpy."""
    if kernel is not None and x.dtype == np.float32 and -127 <= exponent <= 0 and max(abs(start), abs(stop)) <= _EXACT_INT:
        return compiled_counts(kernel, x, exponent, start, stop)
    return numpy_counts(x, exponent, start)


def kernel_for(values: float | None) -> Callable[..., None] | None:
    """The compiled kernel when binning this many values pays for loading it (None: unknown, no), or once numba is
    loaded in the process anyway; else None (numpy bins)."""
    if "numba" in sys.modules or (values is not None and values >= COMPILE_MIN_VALUES):
        return _compiled()
    return None
