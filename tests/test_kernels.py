"""Exact int8 products whatever the CPU (hybridq.kernels), and analyze running what a plain session runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import hybridq.deployed as deployed
from hybridq.analysis import analyze
from hybridq.api import analyze_samples
from hybridq.kernels import SATURATION_NOTE, int8_product_nodes, saturates, u8s8_saturates
from tests.conftest import exact_options

K, N = 64, 8


def test_which_cpus_saturate() -> None:
    assert saturates("x86_64", {"sse4_2", "avx2", "fma"})
    assert saturates("AMD64", {"avx2", "avx512f", "avx512bw"})  # AVX-512 without VNNI still uses vpmaddubsw
    assert not saturates("x86_64", {"avx2", "avx512f", "avx512_vnni"})
    assert not saturates("x86_64", {"avx2", "avx_vnni"})
    assert saturates("x86_64", None)  # unknown: the exact (slower) kernels, never wrong numbers
    assert not saturates("aarch64", {"asimd", "asimddp"})
    assert not saturates("arm64", None)


def _saturating_pair() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """fp32 Relu -> MatMul and its QDQ model whose uint8 x int8 products are 255 x +-127: each pair overflows int16."""
    rng = np.random.default_rng(0)
    wq = np.where(rng.random((K, N)) < 0.9, 127, -127).astype(np.int8)
    w = wq.astype(np.float32) / np.float32(127)
    x_in = h.make_tensor_value_info("x", TP.FLOAT, [1, K])
    y_out = h.make_tensor_value_info("y", TP.FLOAT, [1, N])
    fg = h.make_graph(
        [h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("MatMul", ["r", "w"], ["y"], name="mm")],
        "f", [x_in], [y_out], [nh.from_array(w, "w")],
    )
    inits = [nh.from_array(np.float32(4.0 / 255), "sx"), nh.from_array(np.uint8(0), "zx"),
             nh.from_array(wq, "wq"), nh.from_array(np.float32(1 / 127), "sw"), nh.from_array(np.int8(0), "zw")]
    qg = h.make_graph(
        [h.make_node("Relu", ["x"], ["r"], name="relu"),
         h.make_node("QuantizeLinear", ["r", "sx", "zx"], ["r_q"], name="r_q"),
         h.make_node("DequantizeLinear", ["r_q", "sx", "zx"], ["r_dq"], name="r_dq"),
         h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_dq"], name="w_dq"),
         h.make_node("MatMul", ["r_dq", "w_dq"], ["y"], name="mm")],
        "q", [x_in], [y_out], inits,
    )
    opset = [h.make_opsetid("", 13)]
    fm, qm = h.make_model(fg, opset_imports=opset, ir_version=8), h.make_model(qg, opset_imports=opset, ir_version=8)
    # every activation quantizes to 255: the exact products, in float64 numpy
    exact = (np.full((1, K), 255.0) * (4.0 / 255)) @ (wq.astype(np.float64) / 127)
    return fm, qm, exact


def _dumped(snap: Path, tensor: str) -> np.ndarray:
    manifest = json.loads((snap / "manifest.json").read_text())
    return np.load(snap / manifest["tensors"][tensor]["quant"])[0]


def test_analyze_measures_exact_int8_products_on_every_cpu(tmp_path: Path) -> None:
    fm, qm, exact = _saturating_pair()
    x = {"x": np.full((1, K), 4.0, np.float32)}
    result = analyze_samples(fm, qm, [x], dump=tmp_path / "snap")
    np.testing.assert_allclose(_dumped(tmp_path / "snap", "y"), exact, rtol=1e-5)
    assert result.output_layers()[0].entire.snr_db > 80
    assert (SATURATION_NOTE in result.notes) == u8s8_saturates()


@pytest.mark.skipif(not u8s8_saturates(), reason="this CPU's default int8 kernels are exact (VNNI or not x86)")
def test_host_int8_shows_this_cpus_saturation(tmp_path: Path) -> None:
    fm, qm, exact = _saturating_pair()
    x = {"x": np.full((1, K), 4.0, np.float32)}
    plain = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(plain - exact).max() > 10  # the default kernels saturate here ...
    result = analyze_samples(fm, qm, [x], dump=tmp_path / "snap", host_int8=True)
    np.testing.assert_array_equal(_dumped(tmp_path / "snap", "y"), plain)  # ... and analyze --host-int8 says so
    # every pair clips alike, so the direction survives (cosine 1.0) and only SNR shows the loss
    assert result.output_layers()[0].entire.snr_db < 20 and SATURATION_NOTE not in result.notes


def _s8_model() -> onnx.ModelProto:
    """x -> Q(int8) -> DQ -> Relu (one reader) and x -> Q(int8) -> DQ, DQ (two readers)."""
    inits = [nh.from_array(np.float32(0.05), "s"), nh.from_array(np.int8(-3), "z")]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["a_q"], name="qa"),
        h.make_node("DequantizeLinear", ["a_q", "s", "z"], ["a"], name="dqa"),
        h.make_node("Relu", ["a"], ["ra"], name="relu"),
        h.make_node("QuantizeLinear", ["x", "s", "z"], ["b_q"], name="qb"),
        h.make_node("DequantizeLinear", ["b_q", "s", "z"], ["b1"], name="dqb1"),
        h.make_node("DequantizeLinear", ["b_q", "s", "z"], ["b2"], name="dqb2"),
        h.make_node("Sub", ["b1", "b2"], ["d"], name="sub"),
    ]
    g = h.make_graph(nodes, "s8", [h.make_tensor_value_info("x", TP.FLOAT, [2, 5])],
                     [h.make_tensor_value_info("ra", TP.FLOAT, [2, 5]), h.make_tensor_value_info("d", TP.FLOAT, [2, 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def test_int8_pairs_become_uint8_as_onnxruntime_turns_them_on_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployed, "is_x86", lambda: True)
    m = _s8_model()
    out = deployed.s8_pairs_to_u8(m)
    onnx.checker.check_model(out)
    inits = {i.name: nh.to_array(i) for i in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    # the pair with one reader: uint8, zero point -3 + 128; the Q read twice keeps int8 (ORT leaves it too)
    assert nodes["qa"].input[2] == nodes["dqa"].input[2] and inits[nodes["qa"].input[2]].dtype == np.uint8
    assert int(inits[nodes["qa"].input[2]]) == 125
    assert all(nodes[k].input[2] == "z" for k in ("qb", "dqb1", "dqb2"))
    # the same real values: both models give identical outputs, Q/DQ unfused (ORT_DISABLE_ALL)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = {"x": np.linspace(-8, 8, 10, dtype=np.float32).reshape(2, 5)}  # clips at both ends
    want = ort.InferenceSession(m.SerializeToString(), so).run(None, x)
    got = ort.InferenceSession(out.SerializeToString(), so).run(None, x)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    assert m.graph.initializer[1].data_type == TP.INT8  # the input model is not modified
    monkeypatch.setattr(deployed, "is_x86", lambda: False)
    assert deployed.s8_pairs_to_u8(m) is m


def test_host_int8_analysis_runs_the_kernels_of_a_plain_session(tmp_path: Path) -> None:
    """ORT's own S8S8 QDQ model: analyze's final output equals a plain default session's, bit for bit."""
    from tests.test_analysis import ort_quantized

    fpath, qpath, data = ort_quantized(tmp_path, 1)
    for host, options in ((True, ort.SessionOptions()), (False, exact_options())):
        snap = tmp_path / f"snap-{host}"
        analyze_samples(fpath, qpath, data, dump=snap, host_int8=host)
        plain = ort.InferenceSession(str(qpath), options)
        np.testing.assert_array_equal(
            np.load(snap / json.loads((snap / "manifest.json").read_text())["tensors"]["conv3_out"]["quant"]),
            np.stack([plain.run(None, s)[0] for s in data]),
        )


def test_proposal_sessions_compute_exact_int8(tmp_path: Path) -> None:
    from hybridq.calibration import session_for

    _, qm, exact = _saturating_pair()
    x = {"x": np.full((1, K), 4.0, np.float32)}
    np.testing.assert_allclose(session_for(qm, basic=False).run(None, x)[0], exact, rtol=1e-5)


def _two_convs(share_zero_point: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32 Conv -> Conv and its QDQ model; with ``share_zero_point`` both weights dequantize with one zero-point tensor."""
    rng = np.random.default_rng(4)
    weights = [rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8) for _ in range(2)]
    x_in = h.make_tensor_value_info("x", TP.FLOAT, [1, 4, 4, 4])
    out = h.make_tensor_value_info("c1", TP.FLOAT, [1, 4, 4, 4])
    fnodes = [h.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"), h.make_node("Conv", ["c0", "w1"], ["c1"], name="conv1")]
    fm = h.make_graph(fnodes, "f", [x_in], [out], [nh.from_array(w.astype(np.float32) * 0.01, f"w{i}") for i, w in enumerate(weights)])
    inits = [nh.from_array(np.float32(0.02), "sx"), nh.from_array(np.uint8(128), "zx")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]), h.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"])]
    src = "x_dq"
    for i, w in enumerate(weights):
        zp = "zw" if share_zero_point else f"zw{i}"
        inits += [nh.from_array(w, f"w{i}_q"), nh.from_array(np.full(4, 0.01, np.float32), f"sw{i}")]
        if zp not in {t.name for t in inits}:
            inits.append(nh.from_array(np.zeros(4, np.int8), zp))
        nodes += [h.make_node("DequantizeLinear", [f"w{i}_q", f"sw{i}", zp], [f"w{i}"], axis=0),
                  h.make_node("Conv", [src, f"w{i}"], [f"c{i}"], name=f"conv{i}")]
        if i == 0:
            nodes += [h.make_node("QuantizeLinear", ["c0", "sx", "zx"], ["c0_q"]), h.make_node("DequantizeLinear", ["c0_q", "sx", "zx"], ["c0_dq"])]
            src = "c0_dq"
    qm = h.make_graph(nodes, "q", [x_in], [out], inits)
    opset = [h.make_opsetid("", 13)]
    return h.make_model(fm, opset_imports=opset, ir_version=8), h.make_model(qm, opset_imports=opset, ir_version=8)


def test_a_shared_weight_zero_point_still_gets_exact_int8(tmp_path: Path) -> None:
    """ORT cannot load such a model with session.x64quantprecision; analyze gives each weight its own copy first."""
    fm, shared = _two_convs(True)
    _, own = _two_convs(False)
    x = [{"x": np.random.default_rng(i).normal(size=(1, 4, 4, 4)).astype(np.float32)} for i in range(2)]
    if u8s8_saturates():
        with pytest.raises(Exception, match="replace the existing tensor"):
            ort.InferenceSession(shared.SerializeToString(), exact_options())
    result = analyze_samples(fm, shared, x, dump=tmp_path / "snap")
    assert not any("cannot make this model's int8 products exact" in n for n in result.notes)
    plain = ort.InferenceSession(own.SerializeToString(), exact_options())
    np.testing.assert_array_equal(
        np.load(tmp_path / "snap" / json.loads((tmp_path / "snap" / "manifest.json").read_text())["tensors"]["c1"]["quant"]),
        np.stack([plain.run(None, s)[0] for s in x]),
    )


@pytest.mark.skipif(not u8s8_saturates(), reason="exact int8 needs no ORT rewrite on this CPU")
def test_when_onnxruntime_cannot_make_int8_exact_analyze_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridq.kernels import NOT_EXACT_NOTE

    monkeypatch.setattr(deployed, "own_weight_zero_points", lambda m: m)  # leave the shared zero point: ORT's rewrite fails
    fm, shared = _two_convs(True)
    x = [{"x": np.ones((1, 4, 4, 4), np.float32)}]
    result = analyze(fm, shared, x)
    assert NOT_EXACT_NOTE in result.notes and SATURATION_NOTE not in result.notes
    plain = ort.InferenceSession(shared.SerializeToString())  # this CPU's default kernels
    want = plain.run(None, x[0])[0]
    got_cos = result.output_layers()[0].entire.cosine
    ref = ort.InferenceSession(fm.SerializeToString()).run(None, x[0])[0]
    a, b = ref.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    assert got_cos == pytest.approx(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), abs=1e-6)


F, H, STEPS = 8, 12, 6  # LSTM input size, hidden size, time steps


def _lstm_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """An fp32 LSTM and its int8 form as ORT's one integer recurrent kernel, com.microsoft DynamicQuantizeLSTM: W and R
    quantized symmetric per direction in numpy, transposed to [directions, k, 4 * hidden]. No DequantizeLinear at all."""
    rng = np.random.default_rng(7)
    w, r = rng.uniform(-0.5, 0.5, (1, 4 * H, F)).astype(np.float32), rng.uniform(-0.5, 0.5, (1, 4 * H, H)).astype(np.float32)
    b = rng.normal(0, 0.1, (1, 8 * H)).astype(np.float32)
    x_in = h.make_tensor_value_info("x", TP.FLOAT, [STEPS, 1, F])
    outs = [h.make_tensor_value_info("y", TP.FLOAT, [STEPS, 1, 1, H]), h.make_tensor_value_info("yh", TP.FLOAT, [1, 1, H])]
    fg = h.make_graph([h.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh"], name="lstm", hidden_size=H)], "f", [x_in], outs,
                      [nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B")])
    inits = [nh.from_array(b, "B")]
    for name, m in (("W", w), ("R", r)):
        scale = np.abs(m).max() / np.float32(127)
        inits += [nh.from_array(np.clip(np.round(m / scale), -127, 127).astype(np.int8).transpose(0, 2, 1).copy(), f"{name}_q"),
                  nh.from_array(np.array([scale], np.float32), f"{name}_s"), nh.from_array(np.zeros(1, np.int8), f"{name}_z")]
    node = h.make_node("DynamicQuantizeLSTM", ["x", "W_q", "R_q", "B", "", "", "", "", "W_s", "W_z", "R_s", "R_z"], ["y", "yh"],
                       name="lstm", domain="com.microsoft", hidden_size=H)
    qg = h.make_graph([node], "q", [x_in], outs, inits)
    fm = h.make_model(fg, opset_imports=[h.make_opsetid("", 14)], ir_version=8)
    qm = h.make_model(qg, opset_imports=[h.make_opsetid("", 14), h.make_opsetid("com.microsoft", 1)], ir_version=8)
    return fm, qm


def _pooled(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """Cosine and SNR (dB) of ``b`` against ``a``, the samples pooled, in float64."""
    x, y = np.concatenate([v.ravel() for v in a]).astype(np.float64), np.concatenate([v.ravel() for v in b]).astype(np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)), float(10 * np.log10((x @ x) / ((x - y) @ (x - y))))


def test_an_int8_lstm_alone_gets_the_saturation_note_where_a_plain_session_saturates() -> None:
    """The model's only int8 products are DynamicQuantizeLSTM's own int8 inputs (no 8-bit DequantizeLinear): analyze
    measures them exact, as ORT's exact session computes them, and says that a plain session here computes them worse."""
    fm, qm = _lstm_pair()
    data = [{"x": np.random.default_rng(20 + i).normal(0, 1, (STEPS, 1, F)).astype(np.float32)} for i in range(6)]
    ref = [ort.InferenceSession(fm.SerializeToString()).run(["yh"], d)[0] for d in data]
    exact = [ort.InferenceSession(qm.SerializeToString(), exact_options()).run(["yh"], d)[0] for d in data]
    plain = [ort.InferenceSession(qm.SerializeToString()).run(["yh"], d)[0] for d in data]
    result = analyze(fm, qm, data)
    (row,) = [x for x in result.output_layers() if x.tensor == "yh"]
    assert row.pooled == pytest.approx(_pooled(ref, exact), rel=1e-5)  # analyze's figures are the exact kernels'
    assert (SATURATION_NOTE in result.notes) == u8s8_saturates()
    if u8s8_saturates():  # the note is owed: this CPU's default session departs from those figures
        assert _pooled(ref, plain)[1] < row.pooled[1] - 3


def _one_node(op: str, inputs: list[str], weights: dict[str, int], domain: str = "") -> onnx.ModelProto:
    """A model of one ``op`` node whose constant ``weights`` (name -> element type) are initializers of zeros."""
    inits = [h.make_tensor(n, t, [2, 2], [0] * 4) for n, t in weights.items()]
    node = h.make_node(op, inputs, ["y"], name="k", domain=domain)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("a", TP.UINT8, [2, 2])], [h.make_empty_tensor_value_info("y")], inits)
    return h.make_model(g)


@pytest.mark.parametrize(("op", "inputs", "weights", "domain", "runs"), [
    ("MatMulInteger", ["a", "w"], {"w": TP.INT8}, "", True),
    ("MatMulInteger", ["a", "w"], {"w": TP.UINT8}, "", False),  # U8U8: exact on every CPU
    ("ConvInteger", ["a", "w"], {"w": TP.UINT8}, "", False),  # ORT's ConvInteger takes no int8 weight
    ("QLinearConv", ["a", "s", "z", "w", "s", "wz", "s", "z"], {"w": TP.INT8, "s": TP.FLOAT, "z": TP.UINT8, "wz": TP.INT8}, "", True),
    ("QLinearMatMul", ["a", "s", "z", "w", "s", "wz", "s", "z"], {"w": TP.INT8, "s": TP.FLOAT, "z": TP.UINT8, "wz": TP.INT8}, "", True),
    ("DynamicQuantizeMatMul", ["x", "w", "s", "wz"], {"w": TP.INT8, "s": TP.FLOAT, "wz": TP.INT8}, "com.microsoft", True),
    ("MatMulIntegerToFloat", ["a", "w", "s", "s"], {"w": TP.INT8, "s": TP.FLOAT}, "com.microsoft", True),
    ("DequantizeLinear", ["w", "s", "wz"], {"w": TP.INT8, "s": TP.FLOAT, "wz": TP.INT8}, "", True),
    ("DequantizeLinear", ["a", "s", "z"], {"s": TP.FLOAT, "z": TP.UINT8}, "", False),  # an activation, not a weight
])
def test_which_kernels_run_int8_products(op: str, inputs: list[str], weights: dict[str, int], domain: str, runs: bool) -> None:
    assert bool(int8_product_nodes(_one_node(op, inputs, weights, domain))) is runs
