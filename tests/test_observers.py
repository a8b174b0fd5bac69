"""Histogram observer and range algorithms against independent numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridq.observers import MAX_BINS, HistogramObserver, compute_range


def _observe(*batches: np.ndarray) -> HistogramObserver:
    obs = HistogramObserver()
    for b in batches:
        obs.update(b)
    return obs


def _planted(seed: int = 0, n: int = 200_000) -> np.ndarray:
    """Gaussian activations with a few huge outliers."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n).astype(np.float32)
    x[:5] = [60.0, -55.0, 80.0, 70.0, -65.0]
    return x


def test_histogram_counts_equal_numpy_histogram_on_its_edges():
    x = np.random.default_rng(0).normal(0, 3, 10_000).astype(np.float32)
    obs = _observe(x)
    ref, _ = np.histogram(x.astype(np.float64), bins=obs.edges())
    np.testing.assert_array_equal(obs.counts, ref)
    assert obs.min == x.min() and obs.max == x.max() and obs.counts.sum() == x.size
    assert len(obs.counts) <= MAX_BINS


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=50), min_size=1, max_size=6), st.randoms())
def test_merge_is_order_and_batching_independent(batches, rnd):
    arrays = [np.array(b, dtype=np.float32) for b in batches]
    a = _observe(*arrays)
    shuffled = arrays[:]
    rnd.shuffle(shuffled)
    b = _observe(np.concatenate(shuffled))
    parts = [_observe(x) for x in shuffled]
    c = HistogramObserver()
    for p in parts:
        c.merge(p)
    for other in (b, c):
        assert (a.min, a.max, a.count, a.exponent, a.start) == (other.min, other.max, other.count, other.exponent, other.start)
        np.testing.assert_array_equal(a.counts, other.counts)


def test_state_round_trip():
    obs = _observe(_planted())
    again = HistogramObserver.from_state(obs.state())
    assert again == obs or (np.array_equal(again.counts, obs.counts) and again.exponent == obs.exponent)


def test_minmax_keeps_outliers():
    x = _planted()
    assert compute_range(_observe(x), "minmax", 255) == (float(x.min()), float(x.max()))


def test_percentile_matches_numpy_and_clips_outliers():
    x = _planted()
    obs = _observe(*np.array_split(x, 4))  # batches under SUBSAMPLE elements are binned exactly
    lo, hi = compute_range(obs, "percentile", 255, 99.99)
    ref_lo, ref_hi = np.percentile(x, [0.01, 99.99])
    assert abs(lo - ref_lo) <= 2 * obs.width and abs(hi - ref_hi) <= 2 * obs.width
    assert hi < 10 and lo > -10


def _kl_reference(x: np.ndarray, nq: int = 128, nbins: int = 2048) -> float:
    """TensorRT entropy calibration written directly from its description, on |x| with nbins bins."""
    a = np.abs(x.astype(np.float64))
    hist, edges = np.histogram(a, bins=nbins, range=(0, a.max()))
    best, best_kl = nbins, np.inf
    for t in range(nq, nbins + 1, 8):
        sliced = hist[:t].astype(np.float64)
        p = sliced.copy()
        p[-1] += hist[t:].sum()  # outliers go to P's last bin only
        q = np.zeros(t)
        for chunk in np.array_split(np.arange(t), nq):
            nz = p[chunk] > 0
            if nz.any():
                q[chunk[nz]] = sliced[chunk].sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12)))
        if kl < best_kl:
            best_kl, best = kl, t
    return edges[best]


def test_kl_clips_outliers_like_the_reference():
    x = _planted()
    lo, hi = compute_range(_observe(x), "kl", 255)
    ref = _kl_reference(x)
    assert hi == pytest.approx(ref, rel=0.25) and lo == pytest.approx(-ref, rel=0.25)
    assert hi < 20


def test_mse_minimises_quantization_error_against_brute_force():
    # Heavy (Laplace) tails: clipping them lowers the total squared error.
    x = np.random.default_rng(3).laplace(0, 1, 50_000).astype(np.float32)
    lo, hi = compute_range(_observe(x), "mse", 255)

    def mse(a: float, b: float) -> float:
        s = (b - a) / 255
        q = np.clip(np.rint((np.clip(x, a, b) - a) / s), 0, 255) * s + a
        return float(np.mean((q - x) ** 2))

    assert hi < x.max() and lo > x.min()  # the tails are clipped (brute force puts the optimum near 0.9x)
    brute = min(mse(x.min() * f, x.max() * f) for f in np.linspace(0.05, 1, 200))
    assert mse(lo, hi) <= brute * 1.05


def test_all_zero_and_constant_tensors():
    z = _observe(np.zeros(100, np.float32))
    for algo in ("minmax", "percentile", "kl", "mse"):
        assert compute_range(z, algo, 255) == (0.0, 0.0)
    c = _observe(np.full(100, 3.5, np.float32))
    assert compute_range(c, "minmax", 255) == (3.5, 3.5)
    assert compute_range(c, "percentile", 255) == pytest.approx((3.5, 3.5))


def test_nan_is_refused_and_inf_is_flagged_and_left_out():
    with pytest.raises(ValueError):
        _observe(np.array([1.0, np.nan], np.float32))
    obs = _observe(np.array([1.0, np.inf, -2.0], np.float32))
    assert obs.infinite and (obs.min, obs.max, obs.count) == (-2.0, 1.0, 2)


def test_min_max_only_observer_refuses_histogram_algorithms():
    obs = HistogramObserver(bins=False)
    obs.update(np.array([1.0, -2.0], np.float32))
    assert compute_range(obs, "minmax", 255) == (-2.0, 1.0)
    with pytest.raises(KeyError, match="minmax"):
        compute_range(obs, "kl", 255)


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(KeyError, match="minmax, percentile, kl, mse"):
        compute_range(_observe(np.ones(3, np.float32)), "entropyy", 255)


def test_large_batches_are_subsampled_but_min_max_and_count_stay_exact():
    from hybridq.observers import SUBSAMPLE

    x = np.random.default_rng(4).normal(0, 1, 4 * SUBSAMPLE + 3).astype(np.float32)
    obs = _observe(x)
    assert (obs.min, obs.max, obs.count) == (float(x.min()), float(x.max()), x.size)
    assert abs(int(obs.counts.sum()) - x.size) <= 4
    lo, hi = compute_range(obs, "percentile", 255, 99.0)
    ref_lo, ref_hi = np.percentile(x, [1.0, 99.0])
    assert lo == pytest.approx(ref_lo, rel=0.05) and hi == pytest.approx(ref_hi, rel=0.05)


def test_kl_on_a_post_relu_spike_follows_the_reference_search_range():
    """Unsigned data with a spike near zero: the threshold is searched from nq/2048 of max|x|, as TensorRT does.

    Searching the fine stored histogram from 256 fine bins clipped such a tensor of PP-OCR det to 2 % of its range.
    """
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.exponential(0.002, 180_000), rng.uniform(0, 3.0, 20_000)]).astype(np.float32)
    lo, hi = compute_range(_observe(*np.array_split(x, 4)), "kl", 255)
    ref = _kl_reference(x, nq=256)
    assert lo == float(x.min())
    assert hi >= 256 / 2048 * float(x.max()) * 0.99
    assert hi == pytest.approx(ref, rel=0.25)
