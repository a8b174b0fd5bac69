"""The npu cfg lists what step2 builds: a shared grid's members carry the group's parameters, and an edit of one member
names every member's move; a quantized tensor that is also a graph output keeps its Q/DQ for a float16 reader."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from ruamel.yaml import YAML

import hybridq
from tests import models
from tests.conftest import run

GROUP = ("mul", "mp", "rs")


def _pooled_product() -> onnx.ModelProto:
    """x [1,4,8,8]: Mul(conv1, conv2) -> MaxPool -> nearest Resize -> Add; the product's negative tail (to ~-200) is one
    MaxPool cuts away, so 'mp' and 'rs' observe a much narrower range than 'mul', whose grid they share on npu."""
    rng = np.random.default_rng(0)
    f = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    inits = [f("w1", rng.normal(0, 0.5, (8, 4, 3, 3))), f("b1", rng.normal(0, 0.1, 8)), f("w2", rng.normal(0, 0.5, (8, 8, 1, 1))),
             f("b2", rng.normal(0, 0.1, 8)), f("scales", [1, 1, 2, 2])]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), n("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2"),
             n("Mul", ["c1", "c2"], ["mul"], name="mul"),
             n("MaxPool", ["mul"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
             n("Resize", ["mp", "", "scales"], ["rs"], name="resize", mode="nearest"), n("Add", ["rs", "c1"], ["y"], name="add")]
    g = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _grid(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point of [lo, hi] (0 included), computed here in float64."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))


def _fake_quant(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """Quantize to uint8 and back, round half to even, as QuantizeLinear/DequantizeLinear define it."""
    s = np.float32(scale)
    return ((np.clip(np.rint(x / s) + zp, 0, 255) - zp) * s).astype(np.float32)


def _qdq(model: onnx.ModelProto) -> dict[str, tuple[float, int, str]]:
    """Each quantized tensor's (scale, zero point, name of its dequantized copy) in a built model."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]), dq[n.output[0]])
            for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs these tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_tensor_value_info(t, T.FLOAT, None) for t in names)
    return out


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """_pooled_product through step1 --target npu: (step1 result, its cfg as YAML, a sample)."""
    tmp = tmp_path_factory.mktemp("pooled")
    onnx.save(_pooled_product(), tmp / "m.onnx")
    listing = models.write_npy_dataset(tmp / "data", {"x": (1, 4, 8, 8)}, 8)
    r1 = hybridq.step1(tmp / "m.onnx", listing, out=tmp / "ws", settings={"target": "npu"})
    return r1, YAML().load(r1.cfg.read_text()), np.load(listing.parent / "x_0.npy")


def _step2(r1, doc, path) -> tuple[object, onnx.ModelProto]:
    """step2 on the cfg `doc` (written to `path`.cfg): its result and the built model."""
    cfg = path.with_suffix(".cfg")
    with cfg.open("w") as f:
        YAML().dump(doc, f)
    res = hybridq.step2(r1.model, r1.data, cfg, path)
    return res, onnx.load(str(res.output))


def test_a_shared_grid_is_listed_as_step2_builds_it(pooled, tmp_path):
    """Every member of the MaxPool/Resize group lists the parameters the built model uses (each listed its own: mp and rs
    0.476 / 26 here, where the model used the group's ~1.05 / 151): numpy from the cfg's figures gives the built model's values."""
    r1, doc, x = pooled
    cfg = doc["quantize_parameters"]
    listed = {t: (cfg[t]["scale"][0], cfg[t]["zero_point"][0]) for t in GROUP}
    assert len(set(listed.values())) == 1, listed
    assert cfg["mp"]["ori_min"][0] > cfg["mul"]["ori_min"][0] + 100  # each keeps its own observed range for reference
    for t in GROUP:  # min/max are the range used: its scale and zero point follow from them
        scale, zp = _grid(cfg[t]["min"][0], cfg[t]["max"][0])
        assert (scale, zp) == (pytest.approx(cfg[t]["scale"][0], rel=1e-5), cfg[t]["zero_point"][0]), t
    assert "shares one grid with" in r1.cfg.read_text().split("\n  mp:")[0].rsplit("\n", 1)[1]
    _, q = _step2(r1, doc, tmp_path / "q.onnx")
    built = _qdq(q)
    for t in GROUP:
        assert built[t][:2] == (pytest.approx(listed[t][0], rel=1e-7), listed[t][1]), t
    # the built model's integers, against numpy from the cfg's figures: MaxPool and a 2x nearest Resize of mul's view
    names = ["mul"] + [built[t][2] for t in GROUP]
    mul, *views = run(_with_outputs(q, names), {"x": x})[1:]
    want_mul = _fake_quant(mul, *listed["mul"])
    want_mp = _fake_quant(want_mul.reshape(1, 8, 4, 2, 4, 2).max(axis=(3, 5)), *listed["mp"])
    want_rs = _fake_quant(want_mp.repeat(2, axis=2).repeat(2, axis=3), *listed["rs"])
    for t, got, want in zip(GROUP, views, (want_mul, want_mp, want_rs)):
        np.testing.assert_array_equal(got, want, err_msg=t)
    assert want_mul.min() < cfg["mp"]["ori_min"][0] - 50  # mul's negative tail, beyond mp's own range, is on the listed grid
    # unedited, the listing is what step1's statistics give: the same bytes as with the group's entries deleted
    without = {**doc, "quantize_parameters": {k: v for k, v in cfg.items() if k not in GROUP}}
    _, fallback = _step2(r1, without, tmp_path / "fallback.onnx")
    assert fallback.graph.SerializeToString() == q.graph.SerializeToString()


def _moves(note: str) -> dict[str, tuple[list[float], list[float], str]]:
    """The note's "as listed -> as built" rows: member -> (listed range, built range, what moved)."""
    out = {}
    rows = re.findall(r"((?:'\w+'(?:, )?)+) \[(\S+), (\S+)\] -> \[(\S+), (\S+)\] \(([\w ]+)\)", note.split("as listed -> as built:")[1])
    for names, a, b, c, d, what in rows:
        for t in re.findall(r"'(\w+)'", names):
            out[t] = ([float(a), float(b)], [float(c), float(d)], what)
    return out


@pytest.mark.parametrize("edit, moved", [("max", "max moved"), ("both", "min and max moved")])
def test_an_edit_of_one_member_names_every_member_s_move(pooled, tmp_path, edit, moved):
    """Only mp's max edited to 60: the group keeps its listed min (it took mp's own min, silently, when the cfg listed
    mp's own range); mp's min and max edited (to its observed range): the note says all three mins moved too."""
    r1 = pooled[0]
    doc = YAML().load(r1.cfg.read_text())
    cfg = doc["quantize_parameters"]
    lo = cfg["mp"]["ori_min"][0] if edit == "both" else cfg["mp"]["min"][0]
    cfg["mp"]["min"], cfg["mp"]["max"] = [lo], [60.0]
    s0, z0 = cfg["mul"]["scale"][0], cfg["mul"]["zero_point"][0]
    res, q = _step2(r1, doc, tmp_path / "edited.onnx")
    scale, zp = _grid(lo, 60.0)  # numpy's parameters for the edited range: every member takes them
    built = _qdq(q)
    for t in GROUP:
        assert built[t][:2] == (pytest.approx(scale, rel=1e-6), zp), t
    note = next(n for n in res.notes if "'mp' edited" in n)
    rows = _moves(note)
    assert set(rows) == set(GROUP), note
    for t in GROUP:
        before, after, what = rows[t]
        assert before == pytest.approx([-z0 * s0, (255 - z0) * s0], rel=1e-5), (t, note)
        assert after == pytest.approx([-zp * scale, (255 - zp) * scale], rel=1e-5), (t, note)
        assert what == moved, note
    assert abs(-zp * scale - lo) < scale  # the min step2 used is the one listed for mp (to a step)


def _attention_readout() -> onnx.ModelProto:
    """x [1,6,64] -> Softmax 'att' (a graph output too) -> MatMul by a [64,16] weight 'mm' -> y."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.normal(0, 10, (64, 16))).astype(np.float32), "w")
    nodes = [helper.make_node("Softmax", ["x"], ["att"], name="softmax", axis=-1), helper.make_node("MatMul", ["att", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "readout", [helper.make_tensor_value_info("x", T.FLOAT, [1, 6, 64])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 6, 16]), helper.make_tensor_value_info("att", T.FLOAT, [1, 6, 64])],
                          [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_float16_layer_reads_the_int8_view_of_a_graph_output(tmp_path):
    """npu, mm float16: the Softmax output 'att', also a graph output, keeps its Q/DQ (it had none once its only int8
    reader went float16), so mm reads its uint8 view as the NPU's float16 fallback does; the graph output stays float."""
    model = _attention_readout()
    onnx.save(model, tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 6, 64)}, 6, scale=2.0)
    r1 = hybridq.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"target": "npu"})
    text = r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  mm: float16")
    (tmp_path / "fp16.cfg").write_text(text)
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, tmp_path / "fp16.cfg", tmp_path / "q.onnx").output))
    cfg = YAML().load(text)["quantize_parameters"]
    built = _qdq(q)
    assert built["att"][:2] == (pytest.approx(cfg["att"]["scale"][0], rel=1e-7), cfg["att"]["zero_point"][0])
    cast = next(n for n in q.graph.node if n.op_type == "Cast" and n.name.startswith("mm"))
    assert cast.input[0] == built["att"][2] and [o.name for o in q.graph.output] == ["y", "att"]
    x = np.load(listing.parent / "x_0.npy")
    y, att = run(q, {"x": x})
    # numpy: x on its uint8 grid, Softmax in float32, att on its grid, then the product in float16 by float16 weights
    xq = _fake_quant(x, cfg["x"]["scale"][0], cfg["x"]["zero_point"][0])
    e = np.exp(xq - xq.max(-1, keepdims=True))
    np.testing.assert_allclose(att, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)  # the graph output is float
    view = _fake_quant(att, cfg["att"]["scale"][0], cfg["att"]["zero_point"][0])
    w16 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float16)
    want = (view.astype(np.float16).astype(np.float32) @ w16.astype(np.float32)).astype(np.float16).astype(np.float32)
    exact = (att.astype(np.float16).astype(np.float32) @ w16.astype(np.float32)).astype(np.float16).astype(np.float32)
    ulp = float(np.spacing(np.float16(np.abs(want).max())))  # float16's step at the largest output
    np.testing.assert_allclose(y, want, atol=2 * ulp)
    # the unquantized Softmax (what mm read without the Q/DQ) is far off: 0.036 on average against 0.0006
    assert np.abs(y - exact).mean() > 20 * np.abs(y - want).mean()


def test_a_proposed_range_fix_moves_a_shared_group_as_one(pooled):
    """The proposal's range candidate on a shared group: the union of the members' ranges, on all of them or none. mp's own
    percentile range is ~3x narrower than the group's listed one, and given to mp alone it would clip mul's negative tail."""
    from hybridq.artifacts import read_step1
    from hybridq.build import Edits, build
    from hybridq.config import load_cfg
    from hybridq.observers import compute_range
    from hybridq.proposal.fixes import WIDER, Context, range_fix

    r1, doc, _ = pooled
    parsed = load_cfg(r1.cfg)
    bundle = read_step1(r1.model, r1.data, None, r1.cfg)
    plan = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).plan
    assert list(GROUP) in plan.shared
    ctx = Context(bundle.model, bundle.observers, parsed.settings, plan, bundle.meta["written_entries"], set())
    own = {t: compute_range(ctx.observers[t], "percentile", 255, parsed.settings.percentile) for t in GROUP}
    listed = doc["quantize_parameters"]["mp"]
    assert (listed["max"][0] - listed["min"][0]) / (own["mp"][1] - min(own["mp"][0], 0.0)) > 2 * WIDER
    entries = {t: e for cand in range_fix(ctx, Edits(), "percentile") for t, e in cand.entries.items() if t in GROUP}
    union = [min(lo for lo, _ in own.values()), max(hi for _, hi in own.values())]
    assert not entries or (set(entries) == set(GROUP) and all([e["min"][0], e["max"][0]] == pytest.approx(union, rel=1e-6)
                                                             for e in entries.values())), entries
