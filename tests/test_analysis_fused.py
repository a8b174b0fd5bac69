"""analyze on layers ONNX Runtime writes differently from the fp32 model: a MatMul + Add on a static 3-D input becomes
Reshape -> Gemm -> Reshape in step1's temp model, and an opset-14 HardSwish becomes HardSigmoid and Mul. Each
quantized layer gets its row, its precision and a single error, checked against a numpy computation of the layer
from the QDQ model's own parameters."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import hybridq
from hybridq.analysis import analyze


def _mlp(path: Path) -> None:
    """Two linear layers (MatMul + Add) with a Relu between, on a [1, 16, 64] input."""
    r = np.random.default_rng(0)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    inits = [nh.from_array(f32(r.standard_normal((64, 128)) / 8), "W1"), nh.from_array(f32(r.standard_normal(128) * 0.1), "b1"),
             nh.from_array(f32(r.standard_normal((128, 64)) / 11), "W2"), nh.from_array(f32(r.standard_normal(64) * 0.1), "b2")]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"), h.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             h.make_node("Relu", ["a1"], ["r1"], name="relu"), h.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"),
             h.make_node("Add", ["m2", "b2"], ["y"], name="fc2_bias")]
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", TP.FLOAT, [1, 16, 64])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 64])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("fused")
    _mlp(d / "mlp.onnx")
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((1, 16, 64)).astype(np.float32) for _ in range(8)]
    for i, s in enumerate(samples):
        np.save(d / f"s{i}.npy", s)
    (d / "list.txt").write_text("".join(f"s{i}.npy\n" for i in range(8)))
    s1 = hybridq.step1(d / "mlp.onnx", d / "list.txt", out=d / "ws", settings={"speed_check": False, "float_stem": False})
    assert any("MatMulAddFusion" in v for v in s1.fused.values()), "the temp model is expected to hold the fused Gemms"
    return {"dir": d, "s1": s1, "samples": samples}


def _edit_entry(text: str, tensor: str, key: str, value: str) -> str:
    """Replace `key:` inside the quantize_parameters entry of `tensor`."""
    start = text.index(f"\n  {tensor}:\n")
    end = text.index("\n  ", text.index("zero_point", start))
    block = text[start:end]
    return text[:start] + re.sub(rf"(\n    {key}: )[^\n]*", rf"\g<1>{value}", block) + text[end:]


def _params(q: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: nh.to_array(i) for i in q.graph.initializer}


def _fc2_single(q: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 y, and fc2 alone on fp32 r1 computed in numpy from the QDQ model's scales and integer weights."""
    sess = ort.InferenceSession(_with_output(onnx.load(str(x[1])), "r1").SerializeToString(), providers=["CPUExecutionProvider"])
    y, r1 = sess.run(["y", "r1"], {"x": x[0]})
    p = _params(q)
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm" and n.name.startswith("fc2"))
    dq = next(n for n in q.graph.node if n.output[0] == gemm.input[0])
    qin = next(n for n in q.graph.node if n.output[0] == dq.input[0])
    qout = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0])

    def fake(v: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
        s, z = p[node.input[1]].astype(np.float64), p[node.input[2]].astype(np.float64)
        return (np.clip(np.round(v / s) + z, 0, 255) - z) * s

    w = (p["W2_quantized"].astype(np.float64) - p["W2_zero_point"]) * p["W2_scale"][None, :]
    b = (p["b2_quantized"].astype(np.float64) - p["b2_zero_point"]) * p["b2_scale"]
    out = fake(fake(r1.reshape(16, 128).astype(np.float64), qin) @ w + b, qout)
    return y, out.reshape(y.shape)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model.graph.output.append(h.make_tensor_value_info(name, TP.FLOAT, None))
    return model


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("broken", [False, True], ids=["default", "fc2-input-clipped"])
def test_every_fused_gemm_has_a_row_a_precision_and_a_single_error(fused, broken):
    d, s1 = fused["dir"], fused["s1"]
    cfg = s1.cfg
    if broken:  # clip fc2's input far inside its range: fc2 alone loses most (the tester's repro)
        reader = next(n for n in onnx.load(str(s1.model)).graph.node if n.op_type == "Gemm" and n.name.startswith("fc2"))
        cfg = d / "broken.cfg"
        cfg.write_text(_edit_entry(s1.cfg.read_text(), reader.input[0], "max", "[0.5]"))
    q_path = d / f"q_{broken}.onnx"
    hybridq.step2(s1.model, s1.data, cfg, q_path)
    result = analyze(d / "mlp.onnx", q_path, [{"x": s} for s in fused["samples"]])
    rows = {le.layer: le for le in result.layers}
    gemms = sorted(k for k in rows if "MatMulAddFusion" in k)
    assert gemms == ["fc1/MatMulAddFusion", "fc2/MatMulAddFusion"], list(rows)
    assert all(rows[g].precision == "uint8" and rows[g].single is not None for g in gemms)
    assert rows["fc2/MatMulAddFusion"].tensor == "y" and rows["fc1/MatMulAddFusion"].tensor == "a1"
    q = onnx.load(str(q_path))
    want = np.mean([_cos(*_fc2_single(q, (s, d / "mlp.onnx"))) for s in fused["samples"]])
    assert rows["fc2/MatMulAddFusion"].single.cosine == pytest.approx(want, abs=2e-4)
    if broken:
        assert want < 0.95 and result.worst(1)[0].layer == "fc2/MatMulAddFusion"
    else:
        assert want > 0.999


def test_a_snapshot_of_the_fused_model_matches_its_cfg_for_the_proposal(fused):
    """`propose SNAP --cfg` ranks layers by the snapshot's single errors: the rows analyze lists at the tensor after
    the reshapes are the cfg model's layers, not 'layers of an earlier model'."""
    from hybridq.snapshot import layers_for

    d, s1 = fused["dir"], fused["s1"]
    q = hybridq.step2(s1.model, s1.data, s1.cfg, d / "q_snap.onnx").output
    hybridq.analyze(d / "mlp.onnx", q, d / "list.txt", dump=d / "snap")
    single, warning = layers_for(d / "snap", onnx.load(str(s1.model)), s1.cfg)
    assert warning is None
    assert {"fc1/MatMulAddFusion", "fc2/MatMulAddFusion"} <= set(single)


def test_an_inlined_hardswish_with_a_quantized_output_gets_its_single_error(tmp_path):
    """HardSwish (opset 14) reaches the temp model as HardSigmoid and Mul, whose inner tensor the fp32 model has not:
    the single view computes both again from the fp32 input (through its Q/DQ), as numpy does here."""
    r = np.random.default_rng(0)
    w1 = nh.from_array((r.standard_normal((16, 8, 3, 3)) / 6).astype(np.float32), "W1")
    w2 = nh.from_array((r.standard_normal((16, 16, 3, 3)) / 8.5).astype(np.float32), "W2")
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1] * 4), h.make_node("HardSwish", ["c1"], ["hs"], name="hswish"),
             h.make_node("Conv", ["hs", "W2"], ["c2"], name="conv2", pads=[1] * 4), h.make_node("Sigmoid", ["c2"], ["y"], name="sig")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 16, 16])], [w1, w2])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 14)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "hs.onnx")
    samples = [r.standard_normal((1, 8, 16, 16)).astype(np.float32) for _ in range(6)]
    for i, x in enumerate(samples):
        np.save(tmp_path / f"s{i}.npy", x)
    (tmp_path / "list.txt").write_text("".join(f"s{i}.npy\n" for i in range(6)))
    s1 = hybridq.step1(tmp_path / "hs.onnx", tmp_path / "list.txt", out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False})
    q_path = hybridq.step2(s1.model, s1.data, s1.cfg, tmp_path / "q.onnx").output
    result = analyze(tmp_path / "hs.onnx", q_path, [{"x": x} for x in samples])
    row = next(le for le in result.layers if le.tensor == "hs")
    assert row.single is not None and not any("no fp32 counterpart" in n for n in result.notes), result.notes

    q, p = onnx.load(str(q_path)), _params(onnx.load(str(q_path)))
    quantizer = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}

    def fake(v: np.ndarray, tensor: str) -> np.ndarray:
        node = quantizer[tensor]
        scale, zero = float(p[node.input[1]]), float(p[node.input[2]])
        return (np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale

    fp32 = _with_output(_with_output(onnx.load(str(tmp_path / "hs.onnx")), "c1"), "hs")
    sess = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    want = []
    for x in samples:
        c1, hs = sess.run(["c1", "hs"], {"x": x})
        c = fake(c1.astype(np.float64), "c1")
        want.append(_cos(hs, fake(c * np.clip(c / 6 + 0.5, 0, 1), "hs")))
    assert row.single.cosine == pytest.approx(float(np.mean(want)), abs=2e-4)


def test_a_fused_layer_kept_float_gets_no_single_error(fused):
    """A float32 Gemm wrapped in added reshapes adds no quantization error of its own: its row has no single view (an
    added reshape alone is no adapter)."""
    d, s1 = fused["dir"], fused["s1"]
    cfg = d / "float_fc2.cfg"
    cfg.write_text(s1.cfg.read_text().replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  fc2/MatMulAddFusion: float32\n"))
    q = hybridq.step2(s1.model, s1.data, cfg, d / "q_float_fc2.onnx").output
    rows = {le.tensor: le for le in analyze(d / "mlp.onnx", q, [{"x": s} for s in fused["samples"]]).layers}
    assert rows["y"].precision == "float32" and rows["y"].single is None
    assert rows["a1"].precision == "uint8" and rows["a1"].single is not None


def test_a_gelu_chain_alone_reads_its_quantized_input(tmp_path):
    """npu: a GELU exported as Div, Erf, Add, Mul, Mul (opset 17) is one row; its single error is the chain on the
    quantized input, quantized again, as a native Gelu's is: Q(gelu(Q(a))). It was Q(gelu(a)), about 4 dB too good,
    because the chain's inner tensors were taken from fp32. Checked against numpy from the cfg's parameters."""
    from math import erf

    r = np.random.default_rng(1)
    d = 16
    f32 = lambda name, a: nh.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    inits = [f32("w1", r.normal(0, 0.4, (d, d))), f32("w2", r.normal(0, 0.3, (d, d))), f32("sq", np.sqrt(2.0)), f32("one", 1.0), f32("half", 0.5)]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"), h.make_node("Div", ["a", "sq"], ["gd"], name="gelu_div"),
             h.make_node("Erf", ["gd"], ["ge"], name="gelu_erf"), h.make_node("Add", ["ge", "one"], ["ga"], name="gelu_add"),
             h.make_node("Mul", ["a", "half"], ["gh"], name="gelu_half"), h.make_node("Mul", ["gh", "ga"], ["g"], name="gelu_mul"),
             h.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    graph = h.make_graph(nodes, "gelu", [h.make_tensor_value_info("x", TP.FLOAT, [1, 6, d])], [h.make_tensor_value_info("y", TP.FLOAT, [1, 6, d])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    samples = [{"x": r.normal(0, 1, (1, 6, d)).astype(np.float32)} for _ in range(6)]
    (tmp_path / "d").mkdir()
    for k, s in enumerate(samples):
        np.save(tmp_path / "d" / f"{k}.npy", s["x"])
    (tmp_path / "d" / "dataset.txt").write_text("".join(f"{k}.npy\n" for k in range(6)))
    res = hybridq.step1(tmp_path / "m.onnx", tmp_path / "d" / "dataset.txt", out=tmp_path / "ws", settings={"target": "npu"})
    hybridq.step2(res.model, res.data, res.cfg, tmp_path / "q.onnx")
    entries = hybridq.config.load_cfg(res.cfg).entries

    def fq(v: np.ndarray, t: str) -> np.ndarray:
        e = entries[t].values
        return (np.clip(np.round(v / e["scale"][0]) + e["zero_point"][0], 0, 255) - e["zero_point"][0]) * e["scale"][0]

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2.0))))
    w1 = nh.to_array(inits[0]).astype(np.float64)
    snr = []
    for s in samples:
        a = s["x"][0].astype(np.float64) @ w1
        g, gq = gelu(a), fq(gelu(fq(a, "a")), "g")
        snr.append(10 * np.log10((g**2).sum() / ((g - gq) ** 2).sum()))
    row = next(r for r in analyze(tmp_path / "m.onnx", tmp_path / "q.onnx", samples).layers if r.tensor == "g")
    assert row.single is not None and row.single.snr_db == pytest.approx(np.mean(snr), abs=0.05)
