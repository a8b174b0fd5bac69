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


def test_a_bias_beside_near_zero_weights_fits_int32_by_a_coarser_weight_scale(tmp_path):
    """Channel 3's weights are 1e-9: its int32 bias (scale s_x * s_w) would overflow. step2 raises that channel's weight
    scale instead of keeping the bias float, which ONNX Runtime would quantize (and saturate) itself when it fuses the
    layer: the model then runs the same with or without ORT's WeightBiasQuantization, and as numpy computes it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import hybridq
    from tests import models

    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32)
    w1[3] = 1e-9
    b1 = np.array([0.1, -0.2, 0.3, 5.0], np.float32)
    w2 = rng.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False})
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    assert any("bias fits int32" in n for n in r2.notes) and not any("kept float" in n for n in r2.notes)
    q = onnx.load(str(r2.output))
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    assert conv1.input[2].endswith("_dequantized")  # the bias is read through a DequantizeLinear of int32
    x = np.load(listing.parent / "x_0.npy")
    plain = ort.InferenceSession(str(r2.output), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    unfused = ort.InferenceSession(str(r2.output), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["WeightBiasQuantization", "QDQSelectorActionTransformer"]).run(None, {"x": x})[0]
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    step = float(np.abs(fp32).max()) / 127
    assert np.abs(plain - unfused).max() <= 2 * step  # fused int8 kernels against Q/DQ computed in float: a rounding apart
    cos = float((plain * fp32).sum() / np.linalg.norm(plain) / np.linalg.norm(fp32))
    assert cos > 0.99  # channel 3 (5.0 from its bias alone) survives
