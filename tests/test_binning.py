"""The compiled binning pass against numpy's: the same counts, bit for bit, and calibration gives the same observers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from hybridq import binning, calibration
from hybridq.observers import HistogramObserver, _needed_exponent
from tests import models

kernel = binning._compiled()
pytestmark = pytest.mark.skipif(kernel is None, reason="numba cannot compile on this platform")


def _reference(x: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Exponent, first bin and counts written out with numpy alone: floor(x / 2**e) in float64, then bincount."""
    lo, hi = float(x.min()), float(x.max())
    e = _needed_exponent(lo, hi)
    bins = np.floor(x.astype(np.float64) / 2.0**e).astype(np.int64)
    start = math.floor(lo / 2.0**e)
    return e, start, np.bincount(bins - start)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    relu = np.maximum(rng.normal(0.1, 1.0, 300_001), 0)
    return {
        "normal": rng.normal(0, 3, 100_003),
        "relu zeros": relu,
        "offset": rng.uniform(1000.0, 1001.0, 50_000),  # bins of 2**-14 far from 0: bin numbers near 2**24
        "tiny": rng.normal(0, 1e-30, 10_001),
        "constant": np.full(777, -2.5),
        "wide": rng.normal(0, 1e6, 20_000),  # bins wider than 1: numpy's path (underflow rule)
        "denormal negatives": np.concatenate([[-1e-44, -1e-45, 0.0, -0.0], rng.normal(0, 1, 999)]),
        "odd length": rng.normal(0, 1, 3),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_compiled_counts_equal_numpy_and_a_float64_reference(name: str) -> None:
    x = _cases()[name].astype(np.float32)
    plain, compiled = HistogramObserver.of(x), HistogramObserver.of(x, kernel=kernel)
    e, start, ref = _reference(x)
    assert (compiled.exponent, compiled.start) == (plain.exponent, plain.start) == (e, start)
    np.testing.assert_array_equal(plain.counts, ref)
    np.testing.assert_array_equal(compiled.counts, ref)
    assert compiled.counts.dtype == plain.counts.dtype == np.int64


def test_strided_view_and_lane_overflow_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """A strided subsample view bins as its copy does; values beyond one call's lane limit are added across calls."""
    x = np.random.default_rng(3).normal(0, 1, 40_001).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    e = _needed_exponent(lo, hi)
    start, stop = math.floor(lo / 2.0**e), math.floor(hi / 2.0**e)
    view = x[::3]
    np.testing.assert_array_equal(binning.bin_counts(view, e, start, stop, kernel), binning.numpy_counts(view.copy(), e, start))
    monkeypatch.setattr(binning, "_LANE_LIMIT", 1000)
    np.testing.assert_array_equal(binning.bin_counts(x, e, start, stop, kernel), binning.numpy_counts(x, e, start))


def test_kernel_for_loads_only_when_the_volume_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    assert binning.kernel_for(None) is None
    assert binning.kernel_for(binning.COMPILE_MIN_VALUES / 10) is None
    assert binning.kernel_for(binning.COMPILE_MIN_VALUES) is kernel


def test_the_kernel_is_chosen_where_binning_is_what_the_calibration_waits_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second batch on: where the values left pay for numba and the main thread hardly waited for the run beside
    its binning, or a worker binned; never where ONNX Runtime is the bottleneck, nor for a small calibration."""
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    big = int(binning.COMPILE_MIN_VALUES / 10 * 4)  # bytes of a batch: 10 batches' values reach the threshold
    b = calibration._Binner(100)
    b.observed(big, 0.0, 0.1, False)
    assert b.kernel is None, "the first batch pays the warm-up"
    b.observed(big, 0.08, 0.1, False)
    assert b.kernel is None, "the main thread waited for ONNX Runtime: the runs are the bottleneck"
    b.observed(big, 0.01, 0.1, False)
    assert b.kernel is kernel
    worker = calibration._Binner(100)
    worker.observed(big, 0.5, 0.0, True)
    worker.observed(big, 0.5, 0.0, True)
    assert worker.kernel is kernel
    small = calibration._Binner(100)
    for _ in range(5):
        small.observed(big // 100, 0.0, 0.1, False)
    assert small.kernel is None
    unknown = calibration._Binner(None)
    for _ in range(3):
        unknown.observed(big, 0.0, 0.1, False)
    assert unknown.kernel is None


def test_calibration_by_the_kernel_gives_the_same_observers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A calibration the rule sends to the kernel (threshold lowered, binning taken as the bottleneck) observes what the
    numpy one does."""
    model = models.conv_relu()
    rng = np.random.default_rng(11)
    batches = [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    used: list[object] = []
    real = HistogramObserver.of.__func__

    def spy(cls, x, bins=True, kernel=None):
        used.append(kernel)
        return real(cls, x, bins, kernel)

    monkeypatch.setattr(HistogramObserver, "of", classmethod(spy))
    monkeypatch.delitem(sys.modules, "numba", raising=False)  # as in a process that has not loaded it
    plain = calibration.calibrate(model, batches, expected_batches=None)
    assert used and not any(used)
    used.clear()
    monkeypatch.setattr(binning, "COMPILE_MIN_VALUES", 1.0)
    monkeypatch.setattr(calibration, "WAIT_SHARE", float("inf"))
    fast = calibration.calibrate(model, batches, expected_batches=len(batches))
    assert any(k is kernel for k in used) and used[0] is None
    assert plain.keys() == fast.keys()
    for name in plain:
        a, b = plain[name], fast[name]
        assert (a.min, a.max, a.count, a.exponent, a.start) == (b.min, b.max, b.count, b.exponent, b.start)
        np.testing.assert_array_equal(a.counts, b.counts)
