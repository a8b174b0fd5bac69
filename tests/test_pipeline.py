"""step1 -> cfg -> step2 end to end, checked against ONNX Runtime on the fp32 model and numpy formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import hybridq
from hybridq.config import load_cfg
from tests import models
from tests.conftest import cosine, run


def _step1_step2(model_path: Path, dataset: Path, out: Path, edit=None, **kw):
    r1 = hybridq.step1(model_path, dataset, out=out, **kw)
    if edit:
        r1.cfg.write_text(edit(r1.cfg.read_text()))
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx")
    return r1, r2


def _eval_samples(shapes: dict[str, tuple[int, ...]], n: int = 6, seed: int = 99) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def _optimized_ops(path: Path) -> list[onnx.NodeProto]:
    """Nodes of the model as ORT's CPU provider runs it (ORT_ENABLE_ALL), to see which QDQ groups fused."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return list(onnx.load(so.optimized_model_filepath).graph.node)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_temp_model_is_plain_onnx_with_the_fp32_function(cnn_ws):
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    temp = onnx.load(str(r1.model))
    onnx.checker.check_model(temp)
    # BatchNormalization was folded into conv2; the node names that survive are the original ones.
    assert "BatchNormalization" not in {n.op_type for n in temp.graph.node}
    assert {"conv1", "conv2", "conv3", "fc"} <= {n.name for n in temp.graph.node}
    assert r1.fused == {"bn2": "conv2"}
    for feeds in _eval_samples({"x": (1, 3, 16, 16)}):
        np.testing.assert_allclose(run(r1.model, feeds)[0], run(cnn_ws["model"], feeds)[0], rtol=1e-4, atol=1e-5)


def test_default_int8_matches_fp32_and_fuses_into_integer_kernels(cnn_ws):
    _, r2 = _step1_step2(cnn_ws["model"], cnn_ws["dataset"], cnn_ws["dir"] / "ws")
    for feeds in _eval_samples({"x": (1, 3, 16, 16)}):
        assert cosine(run(r2.output, feeds)[0], run(cnn_ws["model"], feeds)[0]) > 0.995
    ops = [n.op_type for n in _optimized_ops(r2.output)]
    # conv2 and conv3 run as QLinearConv, fc as QGemm; the Cin=3 stem stays float by policy.
    assert ops.count("QLinearConv") == 2 and "QGemm" in ops
    assert r2.layers == {"uint8": 3, "float32": 1}


def test_qdq_parameters_are_the_cfg_values_and_weights_follow_numpy(cnn_ws):
    r1, r2 = _step1_step2(cnn_ws["model"], cnn_ws["dataset"], cnn_ws["dir"] / "ws")
    q = onnx.load(str(r2.output))
    cfg = load_cfg(r1.cfg)
    # Activation r1: asymmetric uint8 over [min(0, lo), max(0, hi)] of the calibration data, computed here with numpy.
    temp = onnx.load(str(r1.model))
    acts = []
    sess = ort.InferenceSession(_with_output(temp, "r1").SerializeToString(), providers=["CPUExecutionProvider"])
    for line in cnn_ws["dataset"].read_text().split("\n"):
        if line.endswith(".npy"):
            acts.append(sess.run(["r1"], {"x": np.load(cnn_ws["dataset"].parent / line)})[0])
    lo, hi = min(0.0, min(a.min() for a in acts)), max(0.0, max(a.max() for a in acts))
    scale = np.float32((hi - lo) / 255)
    assert _init(q, "r1_scale") == pytest.approx(scale, rel=1e-6)
    assert int(_init(q, "r1_zero_point")) == int(np.clip(np.rint(-lo / scale), 0, 255))
    assert cfg.entries["r1"].values["scale"] == [pytest.approx(float(scale), rel=1e-6)]
    # Weight w3: int8 symmetric per output channel, scale = max|w_c| / 127, q = round(w / scale).
    w3 = numpy_helper.to_array(next(i for i in temp.graph.initializer if i.name == "w3"))
    s = np.abs(w3).reshape(w3.shape[0], -1).max(axis=1) / 127
    np.testing.assert_allclose(_init(q, "w3_scale"), s, rtol=1e-6)
    np.testing.assert_array_equal(_init(q, "w3_quantized"), np.clip(np.rint(w3 / s[:, None, None, None]), -127, 127).astype(np.int8))
    # Bias b3: int32 with scale = s_input * s_weight.
    np.testing.assert_allclose(_init(q, "b3_scale"), _init(q, "r2_scale") * s, rtol=1e-6)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_cfg_edits_float32_float16_int16_take_effect(cnn_ws):
    def edit(text: str) -> str:
        return text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: float32\n  c3: float16\n  fc: int16")

    _, r2 = _step1_step2(cnn_ws["model"], cnn_ws["dataset"], cnn_ws["dir"] / "ws", edit=edit)
    q = onnx.load(str(r2.output))
    nodes = {n.name: n for n in q.graph.node}
    producer = {o: n for n in q.graph.node for o in n.output}
    # float32: conv2 reads its input and weight directly, no DQ in front of it.
    assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in nodes["conv2"].input)
    # float16 (named by its output tensor c3): Cast in, fp16 weights, Cast back to float.
    conv3 = nodes["conv3"]
    assert producer[conv3.input[0]].op_type == "Cast"
    assert _init(q, conv3.input[1]).dtype == np.float16
    assert {n.op_type for n in q.graph.node if n.input and n.input[0] == conv3.output[0]} == {"Cast"}
    # int16: fc reads 16-bit DQs with explicit int16 zero points.
    dq_in = producer[nodes["fc"].input[0]]
    assert dq_in.op_type == "DequantizeLinear" and _init(q, dq_in.input[2]).dtype in (np.int16, np.uint16)
    assert {r.entry: r.effective for r in r2.resolved} == {"conv2": "float32", "c3": "float16", "fc": "int16"}
    # The hybrid model is closer to fp32 than the all-int8 one on the same inputs.
    _, r_int8 = _step1_step2(cnn_ws["model"], cnn_ws["dataset"], cnn_ws["dir"] / "ws8")
    for feeds in _eval_samples({"x": (1, 3, 16, 16)}, n=3):
        ref = run(cnn_ws["model"], feeds)[0]
        assert cosine(run(r2.output, feeds)[0], ref) >= cosine(run(r_int8.output, feeds)[0], ref) - 1e-6


def test_min_max_edit_recomputes_scale_of_that_tensor_only(cnn_ws):
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    base = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "base.onnx")
    text = r1.cfg.read_text()
    start = text.index("  r2:\n")
    block = text[start:text.index("\n  ", text.index("zero_point", start))]
    new_block = block.replace(block[block.index("    max: ["):].split("\n")[0], "    max: [2.0]")
    r1.cfg.write_text(text.replace(block, new_block))
    edited = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "edited.onnx")
    a, b = onnx.load(str(base.output)), onnx.load(str(edited.output))
    assert _init(b, "r2_scale") == pytest.approx(np.float32(2.0 / 255))
    # Every other scale is untouched; only conv3's bias scale (s_r2 * s_w3) follows r2.
    others = [i.name for i in a.graph.initializer if i.name.endswith("_scale") and i.name not in ("r2_scale", "b3_scale")]
    assert "r1_scale" in others and "w3_scale" in others
    for name in others:
        np.testing.assert_array_equal(_init(a, name), _init(b, name))


def test_matmul_model_with_dynamic_batch(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(models.matmul_mlp(), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (4, 32)}, 6)
    _, r2 = _step1_step2(path, listing, tmp_path / "ws")
    ops = [n.op_type for n in _optimized_ops(r2.output)]
    assert "MatMulIntegerToFloat" in ops or "QLinearMatMul" in ops
    for feeds in _eval_samples({"x": (5, 32)}):
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.999


def test_two_input_model_reads_two_paths_per_line(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(models.two_input(), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, 6)
    r1, r2 = _step1_step2(path, listing, tmp_path / "ws", settings=hybridq.Settings(float_stem=False))
    q = onnx.load(str(r2.output))
    assert [i.name for i in q.graph.input] == ["a", "b"] and [o.name for o in q.graph.output] == ["out", "peak"]
    for feeds in _eval_samples({"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}):
        for got, ref in zip(run(r2.output, feeds), run(path, feeds)):
            assert cosine(got, ref) > 0.99


def test_opset11_constant_weights_become_int8_initializers(tmp_path):
    path = tmp_path / "paddle.onnx"
    onnx.save(models.opset11_constant_weights(), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (1, 3, 8, 8)}, 6)
    r1, r2 = _step1_step2(path, listing, tmp_path / "ws")
    temp = onnx.load(str(r1.model))
    assert temp.opset_import[0].version >= 13 and "Constant" not in {n.op_type for n in temp.graph.node}
    q = onnx.load(str(r2.output))
    # conv2's weight is stored as int8 and fed through a DQ, not quantized as an activation.
    assert _init(q, "w2_quantized").dtype == np.int8
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "w2" for n in q.graph.node)
    for feeds in _eval_samples({"x": (1, 3, 8, 8)}):
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.99


def test_detector_head_that_concatenates_boxes_and_scores_keeps_scores(tmp_path):
    path = tmp_path / "det.onnx"
    onnx.save(models.detector_head(), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (1, 8, 16, 16)}, 12)
    _, r2 = _step1_step2(path, listing, tmp_path / "ws")
    # The head Conv is split into boxes (hundreds of pixels) and score logits: it stays float by policy,
    # so the scores (a tiny part of the concatenated output's energy) are not wiped out.
    assert _layer_precisions(r2)["head"] == "float32"
    for feeds in _eval_samples({"x": (1, 8, 16, 16)}):
        got, ref = run(r2.output, feeds)[0], run(path, feeds)[0]
        assert cosine(got[:, 4:], ref[:, 4:]) > 0.99 and cosine(got[:, :4], ref[:, :4]) > 0.99


@pytest.mark.parametrize("transpose", [False, True])
def test_a_head_conv_that_reaches_the_output_through_reshapes_stays_float(tmp_path, transpose):
    """Conv -> Reshape (-> Transpose) -> output is the same head as Conv -> output: float by policy, so its small
    channels (scores beside 100x larger boxes) keep their precision (int8 on its per-tensor output grid: ~2 dB)."""
    path = tmp_path / "head.onnx"
    onnx.save(models.reshaped_head(transpose=transpose), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (1, 8, 16, 16)}, 16)
    _, r2 = _step1_step2(path, listing, tmp_path / "ws", settings={"speed_check": False})
    assert _layer_precisions(r2)["head"] == "float32"
    for feeds in _eval_samples({"x": (1, 8, 16, 16)}, n=4):
        got, ref = run(r2.output, feeds)[0], run(path, feeds)[0]
        small = (ref.reshape(12, -1) if not transpose else ref.transpose(0, 1, 3, 2).reshape(12, -1))[4:]
        err = small - (got.reshape(12, -1) if not transpose else got.transpose(0, 1, 3, 2).reshape(12, -1))[4:]
        assert 10 * np.log10((small ** 2).sum() / (err ** 2).sum()) > 20


def _layer_precisions(r2) -> dict[str, str]:
    return {k: v["precision"] for k, v in r2.rewrite.layers.items()}


def test_conv_transpose_forced_int8_uses_output_channel_scales(tmp_path):
    # ConvTranspose weights are [Cin, Cout, k, k]: per-channel scales must run along axis 1 so the
    # int32 bias (scale s_x * s_w[c]) lines up with the output channels. Default keeps it float.
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 2, 2)).astype(np.float32), "wt")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bt")
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w1")
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             onnx.helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             onnx.helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["up"], name="deconv", strides=[2, 2]),
             onnx.helper.make_node("Sigmoid", ["up"], ["prob"], name="sigmoid")]
    g = onnx.helper.make_graph(nodes, "up", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
                               [onnx.helper.make_tensor_value_info("prob", onnx.TensorProto.FLOAT, [1, 4, 16, 16])], [w, b, w1])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "up.onnx"
    onnx.save(m, path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (1, 8, 8, 8)}, 8)
    _, r2 = _step1_step2(path, listing, tmp_path / "ws", edit=lambda t: t.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  deconv: uint8"))
    q = onnx.load(str(r2.output))
    assert _init(q, "wt_scale").shape == (4,) and _init(q, "bt_scale").shape == (4,)
    np.testing.assert_allclose(_init(q, "bt_scale"), _init(q, "r1_scale") * _init(q, "wt_scale"), rtol=1e-6)
    for feeds in _eval_samples({"x": (1, 8, 8, 8)}):
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.999


def test_if_subgraph_stays_float_and_is_reported(tmp_path):
    rng = np.random.default_rng(6)
    then_g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["c1"], ["t_out"], name="then_relu")], "then", [],
                                    [onnx.helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, None)])
    else_g = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["c1"], ["e_out"], name="else_neg")], "else", [],
                                    [onnx.helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, None)])
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             onnx.helper.make_node("If", ["flag"], ["branch"], name="branch_if", then_branch=then_g, else_branch=else_g),
             onnx.helper.make_node("Conv", ["branch", "w2"], ["out"], name="conv2")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")]
    g = onnx.helper.make_graph(nodes, "cf", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 8]),
                                             onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
                               [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "cf.onnx"
    onnx.save(m, path)
    d = tmp_path / "d"
    d.mkdir()
    lines = []
    for i in range(6):
        np.save(d / f"x{i}.npy", rng.normal(0, 1, (1, 8, 8, 8)).astype(np.float32))
        np.save(d / f"f{i}.npy", np.array(i % 2 == 0))
        lines.append(f"x{i}.npy f{i}.npy")
    (d / "dataset.txt").write_text("\n".join(lines) + "\n")
    r1, r2 = _step1_step2(path, d / "dataset.txt", tmp_path / "ws")
    assert r1.float_subgraph_nodes == ["branch_if"]
    for flag in (True, False):
        feeds = {"x": rng.normal(0, 1, (1, 8, 8, 8)).astype(np.float32), "flag": np.array(flag)}
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.99


def test_large_model_paths_through_external_data(tmp_path, monkeypatch):
    # The > 2 GB code paths (ORT optimisation, calibration session, step2 output with external data),
    # exercised on a small model by lowering the size threshold; the slow test runs a real 2.1 GB model.
    import hybridq._onnx

    monkeypatch.setattr(hybridq._onnx, "LARGE_MODEL_BYTES", 1000)
    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path, save_as_external_data=True, location="cnn.onnx.data", size_threshold=0)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (1, 3, 16, 16)}, 6)
    r1, r2 = _step1_step2(path, listing, tmp_path / "ws")
    assert (tmp_path / "ws" / "q.onnx.data").exists()
    for feeds in _eval_samples({"x": (1, 3, 16, 16)}, n=3):
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.995


def test_generated_names_never_collide_with_the_models_own(tmp_path):
    """A tensor called `x_scale` beside an input `x`: the Q/DQ parameters of `x` get fresh names, both stay right."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.normal(0, 0.2, (32, 64)).astype(np.float32), rng.normal(0, 0.2, (64, 8)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["x_scale"], name="mm1"),
        onnx.helper.make_node("Relu", ["x_scale"], ["r1"], name="relu1"),
        onnx.helper.make_node("MatMul", ["r1", "r1_zero_point"], ["out"], name="mm2"),
    ]
    g = onnx.helper.make_graph(nodes, "names", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 32])],
                               [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4, 8])],
                               [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "r1_zero_point")])
    path = tmp_path / "names.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)]), path)
    listing = models.write_npy_dataset(tmp_path / "d", {"x": (4, 32)}, 6)
    _, r2 = _step1_step2(path, listing, tmp_path / "ws")
    q = onnx.load(str(r2.output))
    onnx.checker.check_model(q, full_check=True)
    produced = [i.name for i in q.graph.initializer] + [o for n in q.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    dq_x = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == next(
        m.output[0] for m in q.graph.node if m.op_type == "QuantizeLinear" and m.input[0] == "x"))
    assert _init(q, dq_x.input[1]).size == 1
    for feeds in _eval_samples({"x": (4, 32)}):
        assert cosine(run(r2.output, feeds)[0], np.maximum(feeds["x"] @ w1, 0) @ w2) > 0.999
