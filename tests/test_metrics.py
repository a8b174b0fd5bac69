"""Each metric against its numpy formula on hand-made arrays, with the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hybridq.metrics import (
    Accumulator,
    Metrics,
    compare,
    cosine,
    decode_float,
    encode_float,
    euclid,
    max_abs,
    mean,
    sample_metrics,
    snr_db,
)

A = np.array([[1.0, -2.0], [3.0, 0.5]], dtype=np.float32)
B = np.array([[0.9, -2.1], [2.5, 0.0]], dtype=np.float32)


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cosine_matches_numpy() -> None:
    assert cosine(A, B) == pytest.approx(np_cos(A, B), rel=1e-12)
    # hand computed: a.b = 0.9 + 4.2 + 7.5 + 0 = 12.6; |a|^2 = 14.25; |b|^2 = 11.47
    assert cosine(A, B) == pytest.approx(12.6 / math.sqrt(14.25 * 11.47), rel=1e-6)


def test_cosine_degenerate() -> None:
    z = np.zeros(5, np.float32)
    one = np.ones(5, np.float32)
    # both zero: identical tensors
    assert cosine(z, z) == 1.0
    # one zero: no direction in common, either side
    assert cosine(z, one) == 0.0
    assert cosine(one, z) == 0.0
    # constant vectors: same sign -> 1, opposite sign -> -1, whatever the magnitudes
    assert cosine(np.full(5, 3.0), np.full(5, 0.001)) == pytest.approx(1.0, abs=1e-15)
    assert cosine(np.full(5, 3.0), np.full(5, -2.0)) == pytest.approx(-1.0, abs=1e-15)
    # empty tensors count as zero vectors
    assert cosine(np.zeros(0), np.zeros(0)) == 1.0
    # never outside [-1, 1] through rounding
    x = np.full(1000, 0.1, np.float32)
    assert cosine(x, x) <= 1.0


def test_euclid_and_max_abs_match_numpy() -> None:
    d = A.astype(np.float64) - B.astype(np.float64)
    assert euclid(A, B) == pytest.approx(float(np.linalg.norm(d)), rel=1e-12)
    assert max_abs(A, B) == pytest.approx(float(np.abs(d).max()), rel=1e-12)
    assert max_abs(A, B) == pytest.approx(0.5, rel=1e-6)  # |3.0 - 2.5| and |0.5 - 0|
    # identical, zero and empty
    assert euclid(A, A) == 0.0 and max_abs(A, A) == 0.0
    assert euclid(np.zeros(3), np.zeros(3)) == 0.0
    assert max_abs(np.zeros(0), np.zeros(0)) == 0.0
    # constant vectors: the distance of two constants c1, c2 over n elements is |c1 - c2| sqrt(n)
    assert euclid(np.full(4, 2.0), np.full(4, 5.0)) == pytest.approx(6.0)
    assert max_abs(np.full(4, 2.0), np.full(4, 5.0)) == 3.0


def test_snr_matches_numpy() -> None:
    r, t = A.astype(np.float64), B.astype(np.float64)
    expected = 10 * np.log10(np.sum(r**2) / np.sum((r - t) ** 2))
    assert snr_db(A, B) == pytest.approx(float(expected), rel=1e-12)
    # an error 10x smaller than the signal in amplitude -> 20 dB
    assert snr_db(np.full(8, 10.0), np.full(8, 9.0)) == pytest.approx(20.0)


def test_snr_degenerate() -> None:
    z = np.zeros(4)
    # identical (no error) -> +inf, also for zero and empty tensors
    assert snr_db(A, A) == math.inf
    assert snr_db(z, z) == math.inf
    assert snr_db(np.zeros(0), np.zeros(0)) == math.inf
    # zero reference with a nonzero error -> -inf
    assert snr_db(z, np.ones(4)) == -math.inf
    # zero test against a nonzero reference: error == signal -> 0 dB
    assert snr_db(np.ones(4), z) == pytest.approx(0.0)


def test_float16_inputs_are_computed_in_float64() -> None:
    a16, b16 = A.astype(np.float16), B.astype(np.float16)
    assert cosine(a16, b16) == pytest.approx(np_cos(a16, b16), rel=1e-12)


def test_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="4 and 3 elements"):
        cosine(np.zeros(4), np.zeros(3))


def test_nan_propagates() -> None:
    a = np.array([1.0, math.nan])
    assert math.isnan(cosine(a, np.ones(2)))
    assert math.isnan(snr_db(a, np.ones(2)))


def test_mean_handles_infinities() -> None:
    assert mean([1.0, 2.0, 6.0]) == 3.0
    # one lossless sample makes the mean SNR infinite
    assert mean([30.0, math.inf]) == math.inf
    assert mean([30.0, -math.inf]) == -math.inf
    # +inf and -inf together have no mean
    assert math.isnan(mean([math.inf, -math.inf]))
    assert math.isnan(mean([]))
    assert math.isnan(mean([1.0, math.nan]))


def test_compare_is_per_sample_then_mean() -> None:
    refs = [A, np.full(3, 2.0)]
    tests = [B, np.full(3, 1.0)]
    m = compare(refs, tests)
    assert m.cosine == pytest.approx((np_cos(A, B) + 1.0) / 2, rel=1e-12)
    assert m.euclid == pytest.approx((euclid(A, B) + math.sqrt(3.0)) / 2, rel=1e-12)
    assert m.snr_db == pytest.approx((snr_db(A, B) + 10 * math.log10(4.0)) / 2, rel=1e-12)
    assert m.max_abs == pytest.approx((0.5 + 1.0) / 2, rel=1e-6)
    assert m.per_sample is not None and len(m.per_sample["cosine"]) == 2
    assert m.n_samples == 2
    with pytest.raises(ValueError):
        compare([A], [])


def test_metrics_dict_round_trip_with_non_finite() -> None:
    acc = Accumulator()
    acc.add(A, A)  # snr +inf
    acc.add(A, B)
    m = acc.result()
    assert m.snr_db == math.inf
    d = m.to_dict()
    assert d["snr_db"] == "inf"  # strict JSON
    back = Metrics.from_dict(d)
    assert back == m and back.per_sample == m.per_sample
    assert [encode_float(x) for x in (1.5, -math.inf)] == [1.5, "-inf"]
    assert math.isnan(decode_float("nan")) and math.isnan(decode_float(None))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 20), elements=finite), st.data())
def test_sample_metrics_agree_with_single_functions(a: np.ndarray, data: st.DataObject) -> None:
    b = data.draw(arrays(np.float32, a.shape, elements=finite))
    c, e, s, m = sample_metrics(a, b)
    assert c == cosine(a, b) and e == euclid(a, b) and m == max_abs(a, b)
    assert s == snr_db(a, b) or (math.isnan(s) and math.isnan(snr_db(a, b)))
    assert -1.0 <= c <= 1.0
    assert cosine(a, b) == cosine(b, a)
    assert snr_db(a, a) == math.inf


def test_metrics_from_sums_match_sample_metrics() -> None:
    from hybridq.metrics import metrics_from_sums

    rng = np.random.default_rng(3)
    for a, b in [
        (rng.normal(size=500), rng.normal(size=500)),
        (np.linspace(-1, 1, 300), np.linspace(-1, 1, 300) + 1e-4 * rng.normal(size=300)),
        (np.zeros(4), np.zeros(4)),
        (np.full(5, 3.0), np.full(5, -2.0)),
        (np.ones(4), np.zeros(4)),
    ]:
        d = a - b
        got = metrics_from_sums(a @ a, b @ b, d @ d, float(np.abs(d).max()))
        want = sample_metrics(a, b)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    nan = metrics_from_sums(1.0, 1.0, math.nan, 0.5)
    assert all(math.isnan(v) for v in (nan[0], nan[1], nan[3]))


@pytest.mark.parametrize("path", ["fused", "numpy"])
def test_metrics_many_matches_sample_metrics(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hybridq.metrics as hm
    from hybridq.metrics import metrics_many

    if path == "numpy":
        monkeypatch.setattr(hm, "_compiled", lambda: None)  # as where numba is missing
    else:
        assert hm.fused_kernel() is not None, "numba is a dependency: the fused kernel must compile"
    rng = np.random.default_rng(5)
    big = rng.normal(size=(3, 70_000)).astype(np.float32)  # several blocks, a partial last one
    near = (big + 1e-3 * rng.normal(size=big.shape)).astype(np.float32)
    cases = [
        (big, [near, rng.normal(size=big.shape).astype(np.float32)]),
        (np.zeros(7, np.float32), [np.zeros(7, np.float32), np.ones(7, np.float32)]),
        (np.full(5, 3.0, np.float32), [np.full(5, -2.0, np.float32)]),
        (np.zeros(0, np.float32), [np.zeros(0, np.float32)]),
        (A.astype(np.float16), [B.astype(np.float16)]),  # not float32: the float64 path
    ]
    for ref, tests in cases:
        got = metrics_many(ref, tests)
        for g, t in zip(got, tests):
            assert g == pytest.approx(sample_metrics(ref, t), rel=1e-6, abs=1e-6)  # cosine from sums: abs error
    nan = B.copy()
    nan[0, 0] = np.nan
    assert all(math.isnan(v) for v in metrics_many(A, [nan])[0])
    inf = B.copy()
    inf[1, 1] = np.inf
    assert metrics_many(A, [inf])[0][3] == math.inf and metrics_many(A, [inf])[0][1] == math.inf
    with pytest.raises(ValueError, match="cannot compare"):
        metrics_many(A, [B.ravel()[:3]])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 33, 100_003])
def test_fused_kernel_sums_equal_float64_numpy(n: int) -> None:
    """Vectorised float64 sums and lane-wise max of the compiled kernel against numpy, every tail length."""
    from hybridq.metrics import fused_kernel

    kernel = fused_kernel()
    assert kernel is not None
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    y = (x + 0.01 * rng.normal(size=n)).astype(np.float32)
    xx, yy, dd, peak = kernel(x, y)
    d32 = x - y  # the kernel subtracts in float32, as ONNX Runtime and the numpy path do
    x64, y64, d64 = x.astype(np.float64), y.astype(np.float64), d32.astype(np.float64)
    assert (xx, yy, dd) == pytest.approx((x64 @ x64, y64 @ y64, d64 @ d64), rel=1e-12)
    assert peak == float(np.abs(d32).max())


@pytest.mark.parametrize("n", [1, 7, 16, 17, 100_003])
def test_three_array_kernel_equals_two_pair_passes_and_numpy(n: int) -> None:
    """A layer's two views against one reference in one pass: the sums of both pairs as numpy computes them in float64,
    the maxima exact, and metrics_many's two-view results those of two pair passes; a NaN or infinity in one view
    leaves the other view's figures alone."""
    from hybridq.metrics import _compiled, metrics_from_sums, metrics_many

    kernels = _compiled()
    assert kernels is not None
    pair, triple = kernels
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    y = (x + 0.01 * rng.normal(size=n)).astype(np.float32)
    z = (x + 0.1 * rng.normal(size=n)).astype(np.float32)
    xx, yy, dd, md, zz, ee, me = triple(x, y, z)
    x64 = x.astype(np.float64)
    for (s2, d2, m2), t in (((yy, dd, md), y), ((zz, ee, me), z)):
        d32 = x - t
        assert (xx, s2, d2) == pytest.approx((x64 @ x64, t.astype(np.float64) @ t.astype(np.float64), d32.astype(np.float64) @ d32.astype(np.float64)), rel=1e-12)
        assert m2 == float(np.abs(d32).max())
    for got, want in zip(metrics_many(x, [y, z]), (metrics_from_sums(*pair(x, y)), metrics_from_sums(*pair(x, z)))):
        assert got == pytest.approx(want, rel=1e-12)
    bad = z.copy()
    bad[-1] = np.nan
    good, nan = metrics_many(x, [y, bad])
    assert good == pytest.approx(metrics_from_sums(*pair(x, y)), rel=1e-12) and all(math.isnan(v) for v in (nan[0], nan[2], nan[3]))
    bad[-1] = np.inf
    assert metrics_many(x, [y, bad])[1][3] == math.inf


@pytest.mark.parametrize("path", ["fused", "numpy"])
def test_metrics_many_sums_float32_extremes_like_float64_numpy(path: str) -> None:
    """Float32 squares that overflow (a Hugging Face causal mask) or vanish (1e-25): numpy's float64 figures."""
    from hybridq.metrics import metrics_many

    rng = np.random.default_rng(11)
    mask = np.triu(np.full((96, 96), np.finfo(np.float32).min, np.float32), 1)  # 2 * 4 * 96 * 96: three blocks
    scores = rng.normal(size=(2, 4, 96, 96)).astype(np.float32)
    masked = scores + mask
    noisy = (masked + np.where(mask == 0, 0.01 * rng.normal(size=masked.shape), 0)).astype(np.float32)
    tiny = (1e-25 * rng.normal(size=50_000)).astype(np.float32)
    for ref, test in ((masked, noisy), (tiny, (tiny * (1 + 0.01 * rng.normal(size=tiny.size))).astype(np.float32))):
        x, y, d = (v.astype(np.float64).ravel() for v in (ref, test, ref - test))
        want = (x @ y / math.sqrt((x @ x) * (y @ y)), math.sqrt(d @ d), 10 * math.log10((x @ x) / (d @ d)), np.abs(d).max())
        assert metrics_many(ref, [test], compiled=path == "fused")[0] == pytest.approx(want, rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------- per-slice output measure


def test_channel_axis_rule() -> None:
    from hybridq.metrics import channel_axis

    # NCHW-like and higher rank: axis 1
    assert channel_axis((1, 84, 20, 20)) == 1
    assert channel_axis((1, 3, 4, 5, 6)) == 1
    # rank 3: the shorter of axes 1 and 2 (YOLOv8 head [N, 84, 8400] -> 1; YOLOv5 [N, 25200, 85] -> 2)
    assert channel_axis((1, 84, 8400)) == 1
    assert channel_axis((1, 25200, 85)) == 2
    # a tie goes to the last axis ([N, T, C])
    assert channel_axis((1, 16, 16)) == 2
    # [N, C] (one number per slice and sample), rank 0/1 and single-slice axes: no slicing
    assert channel_axis((1, 10)) is None
    assert channel_axis((10,)) is None and channel_axis(()) is None
    assert channel_axis((1, 1, 8, 8)) is None


def test_slice_metrics_match_numpy_and_pool_samples() -> None:
    from hybridq.metrics import SliceAccumulator, slice_sums

    rng = np.random.default_rng(0)
    # boxes 0-320 beside sigmoid scores 0-1 along axis 1, the scores with a large relative error
    refs = [np.concatenate([rng.uniform(0, 320, (1, 4, 50)), rng.uniform(0, 1, (1, 3, 50))], 1).astype(np.float32)
            for _ in range(3)]
    tests = [r + np.concatenate([rng.normal(0, 0.5, (1, 4, 50)), rng.normal(0, 0.2, (1, 3, 50))], 1).astype(np.float32)
             for r in refs]
    acc = SliceAccumulator(1)
    for r, t in zip(refs, tests):
        acc.add_sums(slice_sums(r, t, 1))
    sl = acc.result()
    assert sl is not None and sl.axis == 1 and len(sl.cosine) == 7
    # numpy reference: samples pooled, one row per slice
    x = np.concatenate([np.moveaxis(r, 1, 0).reshape(7, -1) for r in refs], 1).astype(np.float64)
    y = np.concatenate([np.moveaxis(t, 1, 0).reshape(7, -1) for t in tests], 1).astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    snr = 10 * np.log10((x**2).sum(1) / ((x - y) ** 2).sum(1))
    assert sl.cosine == pytest.approx(cos.tolist(), rel=1e-12)
    assert sl.snr_db == pytest.approx(snr.tolist(), rel=1e-12)
    assert sl.worst == int(np.argmin(snr)) and sl.worst >= 4  # a score slice
    assert sl.min_cosine == pytest.approx(cos.min(), rel=1e-12)
    # the whole tensor hides it: its cosine stays high
    assert cosine(np.concatenate(refs), np.concatenate(tests)) > 0.9999
    # rank 3 with the channel last
    r3, t3 = refs[0].transpose(0, 2, 1), tests[0].transpose(0, 2, 1)
    assert slice_sums(r3, t3, 2) == pytest.approx(slice_sums(refs[0], tests[0], 1), rel=1e-12)


def test_slice_metrics_degenerate() -> None:
    from hybridq.metrics import SliceAccumulator, slice_sums

    a = np.array([[[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]], np.float32)  # (1, 3, 2)
    b = np.array([[[0.0, 0.0], [1.0, 2.0], [0.5, 0.0]]], np.float32)
    acc = SliceAccumulator(1)
    acc.add_sums(slice_sums(a, b, 1))
    sl = acc.result()
    assert sl is not None
    # slice 0: both zero -> identical; slice 1: identical; slice 2: zero reference with an error
    assert sl.cosine == [1.0, 1.0, 0.0]
    assert sl.snr_db == [math.inf, math.inf, -math.inf]
    assert sl.worst == 2
    assert SliceAccumulator(1).result() is None  # no sample yet
    with pytest.raises(ValueError):
        slice_sums(a, b[:, :2], 1)


def test_strict_json_round_trip_has_no_nonfinite_tokens() -> None:
    import json

    from hybridq.metrics import from_strict_json, to_strict_json

    doc = {"a": {"snr_db": math.inf, "x/y": [1.0, -math.inf, math.nan]}, "n": 3, "s": "inf"}
    strict = to_strict_json(doc)
    text = json.dumps(strict, allow_nan=False)

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["a"]["snr_db"] is None and parsed["a"]["x/y"] == [1.0, None, None]
    # each null is listed by its JSON Pointer ('/' in a key escaped as ~1)
    assert parsed["nonfinite"] == {"/a/snr_db": "inf", "/a/x~1y/1": "-inf", "/a/x~1y/2": "nan"}
    back = from_strict_json(parsed)
    assert back["a"]["snr_db"] == math.inf and back["a"]["x/y"][1] == -math.inf and math.isnan(back["a"]["x/y"][2])
    assert back["s"] == "inf" and back["n"] == 3  # strings stay strings


@pytest.mark.parametrize("shape, axis", [((1, 6, 5, 7), 1), ((1, 50, 9), 2)])
def test_fast_slice_sums_match_numpy(shape: tuple[int, ...], axis: int) -> None:
    from hybridq.metrics import slice_sums

    rng = np.random.default_rng(1)
    a = rng.normal(0, 3, shape).astype(np.float32)
    b = (a + rng.normal(0, 0.05, shape)).astype(np.float32)
    x = np.moveaxis(a.astype(np.float64), axis, 0).reshape(shape[axis], -1)
    y = np.moveaxis(b.astype(np.float64), axis, 0).reshape(shape[axis], -1)
    want = np.stack([(x * x).sum(1), (y * y).sum(1), (x * y).sum(1), ((x - y) ** 2).sum(1)])
    # the fast path (compiled kernel where numba works) is within float32 rounding of the float64 reference
    np.testing.assert_allclose(slice_sums(a, b, axis, fast=True), want, rtol=1e-6)
    np.testing.assert_allclose(slice_sums(a, b, axis), want, rtol=1e-12)


def test_strict_json_keeps_the_nonfinite_map_of_a_document_spread_into_it():
    from hybridq.metrics import from_strict_json, to_strict_json

    inner = to_strict_json({"tensors": {"x": {"snr_db": float("inf")}}})
    outer = to_strict_json({"verdict": {"a": float("nan")}, **inner})
    assert outer["nonfinite"] == {"/tensors/x/snr_db": "inf", "/verdict/a": "nan"}
    back = from_strict_json(outer)
    assert back["tensors"]["x"]["snr_db"] == float("inf")
