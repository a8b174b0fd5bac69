"""Valid models of unusual shape that once stopped step1 or built a wrong model (from a sweep over ONNX's
operator test cases): nothing to quantize, IR version 3, an If branch with unnamed nodes, an `npu` Concat with
an all-zero input, and a float16 layer beside an op ONNX cannot type. Each is checked against the fp32 model in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import hybridq
from hybridq.qparams import compute_qparams
from hybridq.targets import shared_params
from tests import models
from tests.conftest import cosine, run


def _build(model: onnx.ModelProto, tmp_path: Path, shapes: dict[str, tuple[int, ...]], **kw) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    ds = models.write_npy_dataset(tmp_path / "data", shapes, 4)
    out = tmp_path / "ws"
    out.mkdir()
    (out / "hybridq.yaml").write_text("speed_check: false\n")
    r1 = hybridq.step1(src, ds, out=out, **kw)
    return hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx").output


def _feeds(shapes: dict[str, tuple[int, ...]], seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()}


def test_a_model_with_nothing_to_quantize_builds_and_matches_fp32(tmp_path):
    # ONNX Runtime reads an empty list of outputs as "all outputs": calibrating nothing used to fail on sample 1
    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 6])
    y = helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 6])
    m = helper.make_model(helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="t")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    q = _build(m, tmp_path, {"x": (1, 4, 6)})
    f = _feeds({"x": (1, 4, 6)})
    np.testing.assert_allclose(run(q, f)[0], np.tanh(f["x"]), rtol=1e-6, atol=1e-6)


def test_ir3_model_with_initializers_as_inputs_builds_for_npu(tmp_path):
    # IR 3 (old PyTorch exports) lists every initializer as a graph input; the scales step2 adds are not inputs
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "b")
    reps = numpy_helper.from_array(np.array([1, 1, 1, 2], np.int64), "reps")
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("w", T.FLOAT, [6, 3, 3, 3]), helper.make_tensor_value_info("b", T.FLOAT, [6])]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["reps"], value=reps),  # lifted into an initializer by step1
             helper.make_node("Tile", ["r", "reps"], ["y"], name="tile")]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", T.FLOAT, [1, 6, 8, 16])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    for target in ("npu", "cpu"):
        q = _build(m, tmp_path / target, {"x": (1, 3, 8, 8)}, settings={"target": target, "float_stem": False})
        assert onnx.load(str(q)).ir_version >= 7
        f = _feeds({"x": (1, 3, 8, 8)})
        assert run(q, f)[0].shape == (1, 6, 8, 16)
        assert cosine(run(q, f)[0], run(m, f)[0]) > 0.99


def test_if_branch_with_two_unnamed_nodes_of_one_type_inlines(tmp_path):
    # the taken branch of a constant If holds two unnamed Relu: inlined, they once both became "If_0/Relu"
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["n"]), helper.make_node("Relu", ["n"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", T.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", T.FLOAT, [1, 4])])
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond")),
             helper.make_node("If", ["cond"], ["i"], then_branch=then, else_branch=other),
             helper.make_node("MatMul", ["i", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])],
                          [numpy_helper.from_array(rng.normal(0, 1, (4, 8)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    q = _build(m, tmp_path, {"x": (1, 4)})
    names = [n.name for n in onnx.load(str(q)).graph.node]
    assert len(names) == len(set(names))
    for seed in range(3):
        f = _feeds({"x": (1, 4)}, seed)
        ref = np.maximum(-np.maximum(f["x"], 0), 0) @ numpy_helper.to_array(g.initializer[0])  # the then branch: zeros
        np.testing.assert_allclose(run(q, f)[0], ref, atol=1e-6)


def test_npu_concat_with_an_all_zero_input_keeps_the_real_range(tmp_path):
    # a zero state concatenated before the input: its placeholder scale 1.0 once became the Concat's shared scale
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"], name="mul"),
             helper.make_node("Concat", ["z", "x"], ["c"], axis=1, name="cat"),
             helper.make_node("Conv", ["c", "w"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8])],
                          [numpy_helper.from_array(rng.normal(0, 1, (8, 8, 1)).astype(np.float32), "w"),
                           numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    q = _build(m, tmp_path, {"x": (1, 4, 8)}, settings={"target": "npu"})
    scales = {i.name: float(numpy_helper.to_array(i).reshape(-1)[0]) for i in onnx.load(str(q)).graph.initializer if i.name.endswith("_scale")}
    assert max(v for k, v in scales.items() if not k.startswith("w")) < 0.1, scales
    for seed in range(3):
        f = _feeds({"x": (1, 4, 8)}, seed)
        assert cosine(run(q, f)[0], run(m, f)[0]) > 0.99  # 0.61 with the placeholder scale


@pytest.mark.parametrize("ranges", [[(0.0, 10.0), (-5.0, 4.0)], [(-1.0, 1.0), (0.0, 3.0), (-2.0, 0.5)]])
def test_shared_params_cover_the_union_of_the_members_ranges(ranges):
    params = {f"t{i}": compute_qparams(lo, hi, "uint8", False) for i, (lo, hi) in enumerate(ranges)}
    shared = shared_params([list(params)], params)
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    qp = shared["t0"]
    s, z = float(qp.scale[0]), int(qp.zero_point[0])
    assert (0 - z) * s <= lo + 1e-6 and (255 - z) * s >= hi - 1e-6  # nothing any member holds is clipped
    assert all(shared[t] is qp for t in params)
    # the largest scale alone would clip: [0, 10] has the largest step and zero point 0, so -5 would clip to 0
    assert ranges != [(0.0, 10.0), (-5.0, 4.0)] or float(params["t0"].scale[0]) > float(params["t1"].scale[0])


def _masked_attention(keys: int = 16) -> onnx.ModelProto:
    """scores = x Wq; a mask computed from the input k, 0 or -inf (Log of a 0/1 tensor, as masked_fill(-inf) exports);
    Softmax(scores + mask) Wv. Sixteen keys: a row is all -inf with probability 2**-16 (and the seed has none)."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n) for n, s in (("wq", (8, keys)), ("wv", (keys, 8)))}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["scores"], name="q"),
             helper.make_node("Greater", ["k", "zero"], ["open"], name="gt"), helper.make_node("Cast", ["open"], ["openf"], name="cast", to=T.FLOAT),
             helper.make_node("Log", ["openf"], ["mask"], name="log"), helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1), helper.make_node("MatMul", ["p", "wv"], ["y"], name="v")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8]), helper.make_tensor_value_info("k", T.FLOAT, [1, 4, keys])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8])],
                          [*w.values(), numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("target", ["cpu", "npu"])
def test_layers_reading_an_infinite_mask_stay_float(tmp_path, target):
    # the mask holds -inf: it once stopped calibration; on npu the Add and Softmax would quantize it
    m = _masked_attention()
    shapes = {"x": (1, 4, 8), "k": (1, 4, 16)}
    q = onnx.load(str(_build(m, tmp_path, shapes, settings={"target": target})))
    cfg = next((tmp_path / "ws").glob("*.quantization.cfg")).read_text()
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not {"mask", "masked"} & quantized
    if target == "npu":
        assert "add_mask: float32" in cfg and "holds +-Inf" in cfg
        assert {"scores", "x"} <= quantized  # the rest of the graph is still quantized
    for seed in range(3):
        f = _feeds(shapes, seed)
        ref = run(m, f)[0]
        assert np.isfinite(ref).all()
        assert cosine(run(q, f)[0], ref) > 0.99


def test_observer_leaves_infinite_values_out_and_keeps_the_flag_through_a_round_trip():
    from hybridq.observers import HistogramObserver

    obs = HistogramObserver()
    obs.update(np.array([0.0, -np.inf, 2.0, -1.0], np.float32))
    obs.update(np.array([3.0, 1.0], np.float32))
    assert obs.infinite and (obs.min, obs.max, obs.count) == (-1.0, 3.0, 5)
    back = HistogramObserver.from_state(obs.state())
    assert back.infinite and (back.min, back.max, back.count) == (-1.0, 3.0, 5)
    plain = HistogramObserver()
    plain.update(np.array([1.0, 2.0], np.float32))
    assert len(plain.state()["ints"]) == 4 and not HistogramObserver.from_state(plain.state()).infinite
    with pytest.raises(ValueError, match="NaN"):
        HistogramObserver().update(np.array([np.nan, 1.0], np.float32))


def test_two_convs_sharing_a_weight_each_get_int8_weights(tmp_path):
    # one weight and bias read by two Convs: the plan keyed them by name, so only the last reader was quantized
    rng = np.random.default_rng(0)
    k = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["a"], name="conv_a", **k), helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("Conv", ["ar", "W", "B"], ["b"], name="conv_b", **k), helper.make_node("Relu", ["b"], ["y"], name="r2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 12, 12])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 12, 12])],
                          [numpy_helper.from_array((rng.normal(0, 1, (8, 8, 3, 3)) / 8).astype(np.float32), "W"),
                           numpy_helper.from_array(np.full(8, 0.1, np.float32), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    q = onnx.load(str(_build(m, tmp_path, {"x": (1, 8, 12, 12)}, settings={"float_stem": False})))
    produced = {o: n for n in q.graph.node for o in n.output}
    int8 = {i.name for i in q.graph.initializer if i.data_type in (T.INT8, T.UINT8)}
    for conv in (n for n in q.graph.node if n.op_type == "Conv"):
        dq = produced[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in int8, conv.name
    f = _feeds({"x": (1, 8, 12, 12)})
    assert cosine(run(q, f)[0], run(m, f)[0]) > 0.99


@pytest.mark.parametrize("option", [{"weight_dtype": "int16"}, {"dtype": "int16"}])
def test_16_bit_on_an_old_opset_model_with_reducemean_builds(tmp_path, option):
    # opset 13 -> 21 for 16-bit Q/DQ turns ReduceMean's axes into an unnamed Constant node; "" meant "graph top"
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("ReduceMean", ["mm"], ["y"], name="rm", axes=[-1], keepdims=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 1])],
                          [numpy_helper.from_array((rng.normal(0, 1, (8, 8)) / 3).astype(np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    q = _build(m, tmp_path, {"x": (1, 4, 8)}, settings=option)
    for seed in range(3):
        f = _feeds({"x": (1, 4, 8)}, seed)
        np.testing.assert_allclose(run(q, f)[0], run(m, f)[0], atol=0.05)


def test_a_matmul_onnx_runtime_fused_with_its_bias_keeps_its_name_in_the_cfg(tmp_path):
    # ONNX Runtime fuses MatMul 'fc1' + its bias Add into 'fc1/MatMulAddFusion'; 'fc1: float32' must still resolve
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc1"), helper.make_node("Add", ["mm", "B"], ["y"], name="bias_add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 16])],
                          [numpy_helper.from_array((rng.normal(0, 1, (16, 16)) / 4).astype(np.float32), "W"),
                           numpy_helper.from_array(np.full(16, 0.1, np.float32), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src, out = tmp_path / "m.onnx", tmp_path / "ws"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 16)}, 4), out=out,
                       settings={"speed_check": False})
    fused = next(n.name for n in onnx.load(str(r1.model)).graph.node if n.name.startswith("fc1"))
    assert r1.fused.get("fc1") == fused != "fc1"
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  fc1: float32"))
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx").output))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.graph.node)
    f = _feeds({"x": (1, 4, 16)})
    np.testing.assert_allclose(run(q, f)[0], run(m, f)[0], rtol=1e-5, atol=1e-5)



def test_step2_refuses_a_cfg_that_quantizes_the_infinite_mask(tmp_path):
    m = _masked_attention()
    src, out = tmp_path / "m.onnx", tmp_path / "ws"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8), "k": (1, 4, 16)}, 4), out=out,
                       settings={"target": "npu", "speed_check": False})
    text = r1.cfg.read_text()
    assert "  add_mask: float32" in text
    r1.cfg.write_text("\n".join(line for line in text.splitlines() if not line.startswith("  add_mask: float32")) + "\n")
    with pytest.raises(hybridq.errors.ConfigError, match=r"layer 'add_mask' cannot be quantized \('mask' holds \+-Inf"):
        hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx")


def test_analyze_notes_a_float_model_that_is_not_the_one_step1_quantized(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(models.residual_cnn(seed=0), src)
    other = tmp_path / "other.onnx"
    onnx.save(models.residual_cnn(seed=1), other)  # same graph, other weights: the runs succeed, the figures mislead
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"speed_check": False})
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    mine = hybridq.analyze(src, q, ds)
    theirs = hybridq.analyze(other, q, ds)
    assert not [n for n in mine.notes if "is not the file step1 quantized" in n]
    temp = hybridq.analyze(r1.model, q, ds)  # step1's temp model is the same fp32 function (RKNN scripts compare to it)
    assert not [n for n in temp.notes if "is not the file step1 quantized" in n]
    assert theirs.notes[0].startswith(f"FLOAT_MODEL '{other}' is not the file step1 quantized")
    from hybridq.analysis.verdict import judge

    assert judge(theirs).next_step.startswith("FLOAT_MODEL is not the file step1 quantized")


def test_a_dataset_listing_the_input_fix_input_fixed_still_reads(tmp_path):
    # the list written for the model (x and b per line) serves its --fix-input form too: b's column is skipped
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("b", T.FLOAT, [1]), helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    ds = models.write_npy_dataset(tmp_path / "data", {"b": (1,), "x": (1, 3, 8, 8)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", fixed_inputs={"b": 0.5}, settings={"speed_check": False, "float_stem": False})
    assert r1.samples == 4
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    result = hybridq.analyze(src, q, ds)
    assert result.n_samples == 4
    f = _feeds({"x": (1, 3, 8, 8)})
    assert cosine(run(q, f)[0], run(m, {**f, "b": np.array([0.5], np.float32)})[0]) > 0.99


def test_step1_says_why_no_layer_is_quantized(tmp_path):
    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 6])
    tanh = helper.make_model(helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="t")], "g", [x],
                                               [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 6])]),
                             opset_imports=[helper.make_opsetid("", 13)])
    stem = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="stem", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 13)])
    for name, m, shape, expect in (("tanh", tanh, (1, 4, 6), "the model has no Conv/"), ("stem", stem, (1, 3, 8, 8), "(float_stem: 1 layer)")):
        m.ir_version = 8
        onnx.save(m, tmp_path / f"{name}.onnx")
        ds = models.write_npy_dataset(tmp_path / name, {"x": shape}, 2)
        r1 = hybridq.step1(tmp_path / f"{name}.onnx", ds, out=tmp_path / f"ws_{name}", settings={"speed_check": False})
        assert [n for n in r1.notes if n.startswith("no layer is quantized") and expect in n], r1.notes


def test_a_cfg_without_its_settings_block_builds_for_the_target_step1_ran_for(tmp_path):
    """The missing settings come from step1's record, not from the defaults (target cpu)."""
    src = tmp_path / "m.onnx"
    onnx.save(models.residual_cnn(), src)
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"target": "npu"})
    full = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "full.onnx").output))
    text = r1.cfg.read_text()
    start = text.index("\nsettings:")
    end = text.index("\ncustom_quantize_layers:")
    short = tmp_path / "ws" / "short.quantization.cfg"
    short.write_text(text[:start] + text[end:])
    assert "target:" not in short.read_text()
    cut = onnx.load(str(hybridq.step2(r1.model, r1.data, short, tmp_path / "short.onnx").output))
    assert full.graph.SerializeToString() == cut.graph.SerializeToString()
    # an npu model: the residual Add's output is quantized (a cpu build leaves elementwise ops float)
    add_out = next(n.output[0] for n in cut.graph.node if n.op_type == "Add")
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == add_out for n in cut.graph.node)


def test_a_layer_named_by_its_fused_relu_output_takes_the_precision_whole(tmp_path):
    """The cfg calls a Conv+Relu's output 'output of conv1' and RKNN users name the layer so: `r1: float16` once
    floated the Relu alone and left the Conv int8."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])],
                          [numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), n) for n in ("w1", "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 8, 8)}, 4), out=tmp_path / "ws",
                       settings={"speed_check": False, "float_stem": False})
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  r1: float16"))
    out = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    assert out.rewrite.layers["conv1"]["precision"] == "float16" and out.rewrite.layers["conv2"]["precision"] != "float16"
    q = onnx.load(str(out.output))
    produced = {o: n for n in q.graph.node for o in n.output}
    conv1 = next(n for n in q.graph.node if n.op_type == "Conv" and n.name.startswith("conv1"))
    assert produced.get(conv1.input[1]) is None or produced[conv1.input[1]].op_type != "DequantizeLinear"
    f = _feeds({"x": (1, 8, 8, 8)})
    assert cosine(run(q, f)[0], run(m, f)[0]) > 0.99


def _conv_affine_model(tail: str) -> onnx.ModelProto:
    """x -> Conv 'conv' (bias or none) -> a Mul and an Add by constants (the `tail` case) -> Relu -> y.

    scalar: a learnable affine block as Paddle2ONNX writes it (one-element [1] constants as Constant nodes, which ONNX
    Runtime's own Conv+Mul/Add fusions refuse); channel: [1,C,1,1]; last_axis: a rank-1 [C] (it scales the width, not
    the channels: not foldable); shared: the Conv's output is read twice; fed: the scale is also a graph input (an IR 8
    model's overridable initializer: a constant of the temp model, so it folds too)."""
    rng = np.random.default_rng(1)
    c = 6
    const = {"scalar": ([1], [1]), "channel": ([1, c, 1, 1], [1, c, 1, 1]), "last_axis": ([c], [c]), "shared": ([1], [1]),
             "fed": ([1], [1])}[tail]
    s = rng.uniform(0.3, 1.7, const[0]).astype(np.float32)
    b = rng.normal(0, 0.5, const[1]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"] + (["B"] if tail != "scalar" else []), ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(s)),
             helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b)),
             helper.make_node("Mul", ["c", "s"], ["m"], name="lab_mul"),
             helper.make_node("Add", ["b", "m"], ["a"], name="lab_add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, [1, c, c, c])]
    if tail == "shared":
        nodes.append(helper.make_node("Neg", ["c"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", T.FLOAT, [1, c, c, c]))
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (c, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "B")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, c, c])], outputs, inits)
    if tail == "fed":  # the scale is an initializer and a graph input (IR 3 style): a value the caller may feed
        g.node.remove(g.node[1])
        g.initializer.append(numpy_helper.from_array(s, "s"))
        g.input.append(helper.make_tensor_value_info("s", T.FLOAT, [1]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _conv_mul_with_reader(reader: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Conv(W, B) 'c' -> Mul by a one-element [1] constant 's' -> y, plus one more reader of c, W, B or s: an If
    body ('if_c', 'if_W', 'if_B', 'if_s'), a graph output ('out_W', 'out_B'), or also a graph input, as
    keep_initializers_as_inputs exports write it ('fed_W', 'fed_B'). Returns the model and its feeds."""
    rng = np.random.default_rng(3)
    kind, name = reader.split("_")
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6,)).astype(np.float32), "B"),
             numpy_helper.from_array(np.array([2.5], np.float32), "s")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"), helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, None)]
    feeds = {"x": rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)}
    if kind == "if":
        branch = helper.make_tensor_value_info("o", T.FLOAT, None)
        then_g = helper.make_graph([helper.make_node("Add", [name, "k"], ["o"], name="then_add")], "then", [], [branch])
        else_g = helper.make_graph([helper.make_node("Sub", [name, "k"], ["o"], name="else_sub")], "else", [], [branch])
        nodes.append(helper.make_node("If", ["cond"], ["side"], name="if", then_branch=then_g, else_branch=else_g))
        inputs += [helper.make_tensor_value_info("cond", T.BOOL, []), helper.make_tensor_value_info("k", T.FLOAT, [1])]
        outputs.append(helper.make_tensor_value_info("side", T.FLOAT, None))
        feeds.update(cond=np.array(True), k=np.array([0.5], np.float32))
    elif kind == "out":
        outputs.append(helper.make_tensor_value_info(name, T.FLOAT, None))
    else:
        value = next(i for i in inits if i.name == name)
        inputs.append(helper.make_tensor_value_info(name, T.FLOAT, list(value.dims)))
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m, feeds


@pytest.mark.parametrize("reader", ["if_c", "if_W", "if_B", "if_s", "out_W", "out_B", "fed_W", "fed_B"])
def test_the_conv_tail_fold_respects_every_other_reader(reader: str) -> None:
    """Folding a Conv's constant tail changes its weight and bias: a tensor also read by an If body, or a weight or bias
    that is a graph output, keeps its value; one also listed as a graph input is a constant of the temp model (no
    longer an input, reported) and folds. The temp model computes what ONNX Runtime computes on the original."""
    from hybridq.graph import prepare

    m, feeds = _conv_mul_with_reader(reader)
    temp, report = prepare(m)
    want, got = run(m, feeds), run(temp, feeds)
    assert [o.name for o in temp.graph.output] == [o.name for o in m.graph.output]
    fed = reader.split("_")[1] if reader.startswith("fed") else None
    assert [i.name for i in temp.graph.input] == [i.name for i in m.graph.input if i.name != fed]
    assert report.initializer_inputs == ([fed] if fed else [])
    if fed:
        assert [n.op_type for n in temp.graph.node] == ["Conv"]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail, folds", [("scalar", True), ("channel", True), ("last_axis", False), ("shared", False), ("fed", True)])
def test_a_constant_scale_and_shift_after_a_conv_fold_into_it(tmp_path, tail, folds):
    """step1's temp model folds a Conv's constant Mul/Add tail into its weight and bias when the constants broadcast
    per output channel and the Conv's output has no other reader; its outputs stay ONNX Runtime's fp32 outputs, the
    folded nodes are reported as fused into the Conv, and the cfg may still name them."""
    m = _conv_affine_model(tail)
    src, out = tmp_path / "m.onnx", tmp_path / "ws"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 6, 6)}, 4), out=out,
                       settings={"speed_check": False, "float_stem": False})
    temp = onnx.load(str(r1.model))
    ops = [n.op_type for n in temp.graph.node]
    assert (ops.count("Mul"), ops.count("Add")) == ((0, 0) if folds else (1, 1)), ops
    assert any("1 initializer(s) were also graph inputs ('s'" in n for n in r1.notes) == (tail == "fed")
    assert [i.name for i in temp.graph.input] == ["x"]
    if folds:
        assert r1.fused.get("lab_mul") == r1.fused.get("lab_add") == "conv"
        assert next(n for n in temp.graph.node if n.op_type == "Conv").output[0] == "a"
    for seed in range(3):
        f = _feeds({"x": (1, 3, 6, 6)}, seed)
        for got, want in zip(run(temp, f), run(m, f)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  lab_mul: float32"))
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx").output))
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    assert (conv.input[1] in {i.name for i in q.graph.initializer}) == folds  # the layer the folded Mul names is float


def _weights_read_elsewhere(case: str) -> onnx.ModelProto:
    """x -> Conv(w1, b1) -> Relu -> Conv(w2, b2) -> Relu -> y, with the weights also read elsewhere: 'inputs' lists every
    initializer as a graph input (keep_initializers_as_inputs), 'outputs' makes w1 and b2 graph outputs, 'if_body' has an
    If (its condition computed from x) whose then-branch runs another Conv with w1 and b1."""
    rng = np.random.default_rng(24)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in (("w1", (c, c, 3, 3)), ("b1", (c,)), ("w2", (c, c, 3, 3)), ("b2", (c,)))]
    vi = lambda n, s: helper.make_tensor_value_info(n, T.FLOAT, s)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    inputs, outputs, mid = [vi("x", [1, c, 6, 6])], [vi("y", [1, c, 6, 6])], "r1"
    if case == "if_body":
        then_g = helper.make_graph([helper.make_node("Conv", ["r1", "w1", "b1"], ["t"], name="conv_then", pads=[1] * 4)], "then", [], [vi("t", None)])
        else_g = helper.make_graph([helper.make_node("Neg", ["r1"], ["e"], name="neg_else")], "else", [], [vi("e", None)])
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        nodes += [helper.make_node("ReduceMean", ["x"], ["mx"], name="mean", keepdims=0),
                  helper.make_node("Greater", ["mx", "zero"], ["cond"], name="gt"),
                  helper.make_node("If", ["cond"], ["iv"], name="if", then_branch=then_g, else_branch=else_g)]
        mid = "iv"
    nodes += [helper.make_node("Conv", [mid, "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
              helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    if case == "inputs":
        inputs += [vi(i.name, list(i.dims)) for i in inits]
    if case == "outputs":
        outputs += [vi("w1", [c, c, 3, 3]), vi("b2", [c])]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("case", ["inputs", "outputs", "if_body"])
def test_weights_read_elsewhere_survive_step2(tmp_path: Path, case: str) -> None:
    """A quantized layer's weight that a graph output or an If body also reads stays in the QDQ model, and weights
    listed as graph inputs become its constants (the model is fed x alone): the model loads in ONNX Runtime, keeps its
    outputs, and stays close to fp32."""
    m = _weights_read_elsewhere(case)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 6, 6)}, 8), out=tmp_path / "ws",
                       settings={"speed_check": False, "float_stem": False})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 2
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == [o.name for o in m.graph.output]
    f = {"x": np.random.default_rng(5).normal(0, 1, (1, 8, 6, 6)).astype(np.float32)}
    got, want = run(q, f), run(m, f)
    assert cosine(got[0], want[0]) > 0.99
    for g, w in zip(got[1:], want[1:]):  # the weights themselves, as graph outputs: unchanged
        np.testing.assert_array_equal(g, w)


def test_a_gemm_whose_first_operand_is_the_constant(tmp_path: Path) -> None:
    """Gemm(W, x), the weight first and the activation second: only x is an activation to calibrate and quantize (step1
    took W for one and had no statistics for it); the model built stays close to ONNX Runtime's fp32 outputs."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Gemm", ["wa", "x"], ["g"], name="gemm"), helper.make_node("Relu", ["g"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [16, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [8, 4])],
                          [numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "wa")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (16, 4)}, 8), out=tmp_path / "ws",
                       settings={"speed_check": False})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"x"}
    f = {"x": rng.normal(0, 1, (16, 4)).astype(np.float32)}
    assert cosine(run(q, f)[0], run(m, f)[0]) > 0.99


def _gelu_between_matmuls() -> onnx.ModelProto:
    """MatMul -> com.microsoft Gelu -> MatMul -> Relu -> MatMul: ONNX shape inference types nothing after the Gelu."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Gelu", ["m1"], ["g1"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g1", "w2"], ["m2"], name="mm2"), helper.make_node("Relu", ["m2"], ["r2"], name="relu"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    weights = [numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), n)
               for n, s, shape in (("w1", 0.3, (16, 32)), ("w2", 0.2, (32, 16)), ("w3", 0.2, (16, 8)))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 5, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 5, 8])], weights)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("layer", ["gelu", "mm2", "mm3"])
def test_a_float16_layer_beside_an_op_shape_inference_cannot_type_builds(tmp_path: Path, layer: str) -> None:
    """A float16 layer at or after a com.microsoft Gelu: step2 once gave it fp16 weights but no Cast where ONNX shape
    inference left the tensor untyped, and ONNX Runtime refused the model (MatMul bound to float16 and float).
    step1 now records the types ONNX Runtime gives those tensors, so the Casts are placed and the MatMuls after the Gelu
    are quantized like any other."""
    m = _gelu_between_matmuls()
    src, out = tmp_path / "m.onnx", tmp_path / "ws"
    onnx.save(m, src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (2, 5, 16)}, 4), out=out,
                       settings={"speed_check": False})
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", f"custom_quantize_layers:\n  {layer}: float16"))
    built = hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx")
    assert built.rewrite.layers[layer]["precision"] == "float16"
    f = _feeds({"x": (2, 5, 16)})
    assert cosine(run(built.output, f)[0], run(m, f)[0]) > 0.99
    others = {n: built.rewrite.layers.get(n, {}).get("precision") for n in ("mm2", "mm3") if n != layer}
    assert others == dict.fromkeys(others, "uint8")


def test_a_float16_layer_with_an_untyped_tensor_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a tensor stay untyped (here: step1 made to skip ONNX Runtime's types), step2 names the float16 layer and
    what to do instead of writing a model ONNX Runtime cannot load."""
    monkeypatch.setattr(hybridq.graph, "fill_types", lambda model: None)
    src, out = tmp_path / "m.onnx", tmp_path / "ws"
    onnx.save(_gelu_between_matmuls(), src)
    r1 = hybridq.step1(src, models.write_npy_dataset(tmp_path / "data", {"x": (2, 5, 16)}, 4), out=out,
                       settings={"speed_check": False})
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  gelu: float16"))
    with pytest.raises(hybridq.errors.ConfigError, match=r"sets 'gelu' \(Gelu\) to float16, but the element type of 'g1' is unknown.*float32"):
        hybridq.step2(r1.model, r1.data, r1.cfg, out / "q.onnx")


def _linear_then_relu(node: onnx.NodeProto, weights: dict[str, tuple[int, ...]], x: list[int], y: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, s).astype(np.float32), n) for n, s in weights.items()]
    graph = helper.make_graph([node, helper.make_node("Relu", ["t"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, x)], [helper.make_tensor_value_info("y", T.FLOAT, y)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("node, weights, x, y, why", [
    (helper.make_node("MatMul", ["W", "x"], ["t"], name="mm"), {"W": (48, 32)}, [1, 32, 24], [1, 48, 24], "W @ x"),
    (helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"), {"W": (1, 24, 40)}, [1, 32, 24], [1, 32, 40], "rank 3"),
    (helper.make_node("Gemm", ["x", "W"], ["t"], name="mm", transA=1), {"W": (32, 16)}, [32, 24], [24, 16], "transA=1"),
    (helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"), {"W": (24, 40)}, [1, 32, 24], [1, 32, 40], None),
])
@pytest.mark.parametrize("target", ["cpu", "npu"])
def test_a_linear_layer_with_no_quantized_form_is_named_float(tmp_path, node, weights, x, y, why, target):
    """SPEC 2: a quantize_ops layer hybridq cannot quantize stays float and the summary says which and why (it was left
    out of the layer counts and notes); the 2-D x @ W beside them is quantized and gets no such note."""
    src = tmp_path / "m.onnx"
    onnx.save(_linear_then_relu(node, weights, x, y), src)
    ds = models.write_npy_dataset(tmp_path / "data", {"x": tuple(x)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"speed_check": False, "target": target})
    noted = [n for n in r1.notes if "no quantized form" in n]
    if why is None:
        assert not noted and "float32" not in r1.layers
        return
    assert r1.layers.get("float32") == 1 and len(noted) == 1 and "'mm'" in noted[0] and why in noted[0], r1.notes
    built = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    assert not [n for n in onnx.load(built).graph.initializer if n.data_type != T.FLOAT and n.name.startswith("W")]
    feeds = _feeds({"x": tuple(x)})
    assert cosine(run(built, feeds)[0], run(src, feeds)[0]) > 0.999


def test_layers_the_placement_rules_keep_float_are_named_with_their_rule(tmp_path):
    """README: each layer kept float by a rule is named in step1's summary with the rule (a stem Conv: float_stem; a
    Conv writing a graph output); the layer that is quantized is not named there."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, s).astype(np.float32), n)
             for n, s in (("w0", (16, 3, 3, 3)), ("w1", (16, 16, 3, 3)), ("w2", (2, 16, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1] * 4), helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="body", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="head", pads=[1] * 4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 16, 16])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"speed_check": False})
    note = next(n for n in r1.notes if "placement rules" in n)
    assert "float_stem: 'stem'" in note and "graph-output Conv: 'head'" in note and "'body'" not in note, note
    assert r1.layers == {"float32": 2, "uint8": 1}


def test_a_cfg_entry_naming_a_node_step1_folded_away_says_so(tmp_path):
    """Shape -> Gather of a static shape folds into a constant (step1 lists 'gather -> (folded)'): an entry naming it is
    refused as a removed node of the original model, not as "neither a node nor a tensor" with a wrong "did you mean"."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"), helper.make_node("Gather", ["s", "i0"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["shp"], name="cat_shape", axis=0),
             helper.make_node("Reshape", ["r", "shp"], ["f"], name="reshape"), helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (10, 512)).astype(np.float32), "wf")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 10])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"speed_check": False})
    assert r1.fused.get("gather") == "", r1.fused
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  gather: float32"))
    with pytest.raises(hybridq.errors.ConfigError, match="'gather' is a node of the original model that step1's graph optimization "
                       "removed") as err:
        hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    assert "Did you mean" not in str(err.value) and "remove the entry" in str(err.value)


def test_npu_shape_arithmetic_is_not_named_a_layer_without_a_quantized_form(tmp_path):
    """int64 shape ops (Shape -> Gather -> Concat -> Reshape) have no float tensor to quantize: not layers, no note."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"), helper.make_node("Gather", ["s", "i0"], ["n"], name="gather", axis=0),
             helper.make_node("Concat", ["n", "minus1"], ["shp"], name="cat_shape", axis=0),
             helper.make_node("Reshape", ["r", "shp"], ["y"], name="flat")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"), numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],  # dynamic: not folded away
                          [helper.make_tensor_value_info("y", T.FLOAT, ["N", 512])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    r1 = hybridq.step1(src, ds, out=tmp_path / "ws", settings={"speed_check": False, "target": "npu"})
    assert not [n for n in r1.notes if "no quantized form" in n] and "float32" not in r1.layers, (r1.notes, r1.layers)


def test_a_grouped_conv_transpose_gets_int8_weights_per_tensor_on_npu(tmp_path):
    """group > 1: a per-axis-1 scale cannot line up with the bias (Cout/group scales for Cout outputs), so the weight is
    quantized per tensor (it stayed fp32 while step2 called the layer uint8); output checked against fp32 in ORT."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (32, 8, 2, 2)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B")]
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["t"], name="up", group=2, strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    q = onnx.load(str(_build(m, tmp_path, {"x": (1, 32, 8, 8)}, settings={"target": "npu"})))
    weights = {i.name: i for i in q.graph.initializer}
    assert weights["W_quantized"].data_type == T.INT8 and list(weights["W_scale"].dims) == []
    for seed in range(2):
        f = _feeds({"x": (1, 32, 8, 8)}, seed)
        assert cosine(run(q, f)[0], run(m, f)[0]) > 0.999


def test_the_temp_model_is_plain_onnx_that_onnx_runtime_runs(tmp_path):
    """SPEC 3: step1's temp model runs in ONNX Runtime as it is. A Resize's scales stored as external data made ORT's
    shape inference refuse it ("Cannot parse data from external tensors"); small tensors stay inline now."""
    import onnxruntime as ort

    r = np.random.default_rng(0)
    f32 = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    inits = [f32("w1", r.normal(0, 0.5, (16, 3, 3, 3))), f32("b1", r.normal(0, 0.1, 16)), f32("scales", [1, 1, 2, 2])]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], name="resize", mode="nearest")]
    graph = helper.make_graph(nodes, "rs", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "rs.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    res = hybridq.step1(tmp_path / "rs.onnx", listing, out=tmp_path / "ws")
    stored = onnx.load(res.model, load_external_data=False)
    assert [i.name for i in stored.graph.initializer if i.data_location == T.EXTERNAL] == ["w1"]  # the weights are in .data
    x = {"x": r.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(tmp_path / "rs.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(res.model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_float16_reducemean_beside_an_int16_layer_builds_after_the_opset_21_conversion(tmp_path):
    """An int16 layer makes step2 convert the graph to opset 21, where ReduceMean's axes become an untyped Constant
    output; a float16 ReduceMean then failed ("element type of '_v_9' is unknown"). A Constant's type is its value's."""
    import onnxruntime as ort

    r, d = np.random.default_rng(1), 16
    inits = [numpy_helper.from_array(r.normal(0, 0.3, (d, d)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"), helper.make_node("ReduceMean", ["a"], ["m"], name="reducemean", axes=[1], keepdims=1),
             helper.make_node("Sub", ["a", "m"], ["c"], name="center"), helper.make_node("MatMul", ["c", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "rm", [helper.make_tensor_value_info("x", T.FLOAT, [1, 6, d])], [helper.make_tensor_value_info("y", T.FLOAT, [1, 6, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "rm.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 6, d)}, 6)
    res = hybridq.step1(tmp_path / "rm.onnx", listing, out=tmp_path / "ws", settings={"target": "npu"})
    res.cfg.write_text(res.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  fc2: int16\n  reducemean: float16"))
    built = hybridq.step2(res.model, res.data, res.cfg, tmp_path / "q.onnx")
    q = onnx.load(str(built.output))
    producer = {o: n for n in q.graph.node for o in n.output}
    rm = next(n for n in q.graph.node if n.op_type == "ReduceMean")
    feed = producer[rm.input[0]]
    assert feed.op_type == "Cast" and feed.attribute[0].i == T.FLOAT16  # the ReduceMean runs in float16, as the cfg asks
    x = {"x": r.normal(0, 1, (1, 6, d)).astype(np.float32)}
    want = ort.InferenceSession(str(tmp_path / "rm.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(built.output), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert cosine(want, got) > 0.99


def test_nodes_the_opset_upgrade_adds_are_named_after_the_node_they_serve(tmp_path):
    """An opset-11 Softmax(axis=1) on 4-D becomes Flatten -> Softmax -> Reshape at opset 13; the model output was then
    written by 'Reshape_0', a name the user never had, in the cfg and in analyze's rows. They are 'softmax_...' now
    (no '/': ONNX Runtime's fusions are named so, and step1 reads such names as fusions)."""
    from hybridq.analysis import analyze

    r = np.random.default_rng(12)
    inits = [numpy_helper.from_array(r.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(r.normal(0, 0.1, 8).astype(np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["c1"], ["y"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "op11", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.save(model, tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    res = hybridq.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"speed_check": False})
    temp = onnx.load(res.model)
    names = {n.op_type: n.name for n in temp.graph.node}
    assert names["Flatten"] == "softmax_Flatten" and names["Reshape"] == "softmax_Reshape" and names["Softmax"] == "softmax", names
    built = hybridq.step2(res.model, res.data, res.cfg, tmp_path / "q.onnx")
    x = [{"x": r.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    rows = {row.tensor: row for row in analyze(tmp_path / "m.onnx", built.output, x).layers}
    assert rows["y"].layer == "softmax_Reshape"
    # an unnamed original node keeps its (empty) name: only the nodes the converter adds are named
    from hybridq._onnx import convert_opset

    model.graph.node[0].name = ""
    assert [n.name for n in convert_opset(model, 13).graph.node if n.op_type == "Conv"] == [""]
