"""Scale / zero point formulas against numpy and ONNX Runtime's QuantizeLinear / DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from hybridq.qparams import ONNX, QParams, compute_qparams, dequantize, quantize, qrange, weight_qparams


def _ort_qdq(x: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """Run QuantizeLinear -> DequantizeLinear in ONNX Runtime with the same parameters."""
    shape = (qp.scale.size,) if qp.axis is not None else ()
    inits = [numpy_helper.from_array(qp.scale.reshape(shape), "s"), numpy_helper.from_array(qp.zero_point.reshape(shape), "z")]
    attrs = {"axis": qp.axis} if qp.axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("q", ONNX[qp.dtype], list(x.shape)), helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    q, y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return q, y


def test_asymmetric_uint8_formula():
    qp = compute_qparams(-1.0, 3.0, "uint8", symmetric=False)
    assert qp.scale[0] == np.float32(4.0 / 255)
    assert qp.zero_point[0] == np.rint(1.0 / np.float32(4.0 / 255))  # qmin - rmin / scale = 63.75 -> 64


def test_range_is_widened_to_hold_zero():
    # A strictly positive range [2, 4] quantizes as [0, 4]: zero point at qmin.
    qp = compute_qparams(2.0, 4.0, "uint8", symmetric=False)
    assert qp.zero_point[0] == 0 and qp.scale[0] == np.float32(4.0 / 255)


def test_symmetric_int8_and_uint8():
    s8 = compute_qparams(-2.0, 1.0, "int8", symmetric=True)
    assert s8.scale[0] == np.float32(2.0 / 127) and s8.zero_point[0] == 0
    u8 = compute_qparams(-2.0, 1.0, "uint8", symmetric=True)
    assert u8.scale[0] == np.float32(4.0 / 255) and u8.zero_point[0] == 128


def test_degenerate_all_zero_range_gives_scale_one():
    # min == max == 0: nothing to represent but zero; scale 1 keeps DequantizeLinear well defined.
    qp = compute_qparams(0.0, 0.0, "uint8", symmetric=False)
    assert qp.scale[0] == 1.0 and qp.zero_point[0] == 0
    assert dequantize(quantize(np.zeros(4, np.float32), qp), qp).tolist() == [0.0] * 4


def test_degenerate_constant_tensor():
    # min == max == 5: the range [0, 5] is used, 5 maps exactly to qmax.
    qp = compute_qparams(5.0, 5.0, "uint8", symmetric=False)
    assert dequantize(quantize(np.array([5.0], np.float32), qp), qp)[0] == pytest.approx(5.0, rel=1e-6)


def test_per_channel_weight_params_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (4, 3, 2, 2)).astype(np.float32)
    qp, lo, hi = weight_qparams(w, "int8", axis=0)
    np.testing.assert_allclose(qp.scale, np.abs(w).reshape(4, -1).max(axis=1) / 127, rtol=1e-6)
    assert (qp.zero_point == 0).all()


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", False), ("int8", True), ("uint8", True), ("int16", True), ("int16", False)])
def test_quantize_matches_onnx_runtime(dtype, symmetric):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 2, 500), [0.0, -3.0, 5.0]]).astype(np.float32)
    qp = compute_qparams(x.min(), x.max(), dtype, symmetric)
    q_ort, y_ort = _ort_qdq(x, qp)
    np.testing.assert_array_equal(quantize(x, qp), q_ort)
    np.testing.assert_array_equal(dequantize(quantize(x, qp), qp), y_ort)


def test_per_channel_quantize_matches_onnx_runtime():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (6, 5)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None]
    qp, _, _ = weight_qparams(w, "int8", axis=0)
    q_ort, y_ort = _ort_qdq(w, qp)
    np.testing.assert_array_equal(quantize(w, qp), q_ort)
    np.testing.assert_allclose(dequantize(quantize(w, qp), qp), y_ort, rtol=0, atol=0)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(lo=finite, hi=finite, dtype=st.sampled_from(["uint8", "int8", "int16"]), symmetric=st.booleans(),
       per_channel=st.booleans(), data=st.lists(finite, min_size=1, max_size=30))
def test_zero_exact_and_every_q_in_range(lo, hi, dtype, symmetric, per_channel, data):
    lo, hi = min(lo, hi), max(lo, hi)
    if per_channel:
        qp = compute_qparams([lo, lo / 2], [hi, hi / 3], dtype, symmetric, axis=0)
        x = np.array([data, data[::-1]], dtype=np.float32)
    else:
        qp = compute_qparams(lo, hi, dtype, symmetric)
        x = np.array(data, dtype=np.float32)
    qmin, qmax = np.iinfo(qp.zero_point.dtype).min, np.iinfo(qp.zero_point.dtype).max
    # zero is exactly representable: it quantizes to the zero point and back to 0.0
    zeros = np.zeros_like(x)
    assert (dequantize(quantize(zeros, qp), qp) == 0).all()
    q = quantize(x, qp)
    assert q.min() >= qmin and q.max() <= qmax
    assert np.all(qp.scale > 0)
    a, b = qrange(dtype, symmetric)
    assert a <= qp.zero_point.min() and qp.zero_point.max() <= b
