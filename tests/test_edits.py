"""cfg edits of algorithm, dtype, qtype and qmethod change exactly the edited tensor, without running a model."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

import hybridq
from hybridq.config import load_cfg
from hybridq.observers import compute_range
from hybridq.artifacts import read_step1


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _edit_entry(text: str, tensor: str, key: str, value: str) -> str:
    """Replace `key:` inside the quantize_parameters entry of `tensor`."""
    start = text.index(f"\n  {tensor}:\n")
    end = text.index("\n  ", text.index("zero_point", start))
    block = text[start:end]
    return text[:start] + re.sub(rf"(\n    {key}: )[^\n]*", rf"\g<1>{value}", block) + text[end:]


@pytest.fixture
def built(cnn_ws):
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    base = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "base.onnx")
    return r1, _inits(base.output)


def _step2_without_running_a_model(r1, out, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("step2 must not run a model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return hybridq.step2(r1.model, r1.data, r1.cfg, out)


def _changed(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> set[str]:
    return {k for k in a.keys() | b.keys() if k not in a or k not in b or a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])}


def test_algorithm_edit_recomputes_that_tensor_from_stored_histograms(built, cnn_ws, monkeypatch):
    r1, base = built
    r1.cfg.write_text(_edit_entry(r1.cfg.read_text(), "r2", "algorithm", "percentile"))
    res = _step2_without_running_a_model(r1, cnn_ws["dir"] / "p.onnx", monkeypatch)
    after = _inits(res.output)
    # Only r2's parameters and the bias that depends on r2's scale (conv3's b3) change.
    assert _changed(base, after) <= {"r2_scale", "r2_zero_point", "b3_quantized", "b3_scale"}
    assert "r2_scale" in _changed(base, after)
    bundle = read_step1(r1.model, r1.data, None, r1.cfg)
    lo, hi = compute_range(bundle.observers["r2"], "percentile", 255, 99.99)
    assert after["r2_scale"] == pytest.approx(np.float32((hi - min(lo, 0)) / 255), rel=1e-6)


def test_dtype_edit_gives_16_bit_qdq_on_that_tensor_only(built, cnn_ws, monkeypatch):
    r1, base = built
    r1.cfg.write_text(_edit_entry(r1.cfg.read_text(), "r1", "dtype", "int16"))
    res = _step2_without_running_a_model(r1, cnn_ws["dir"] / "d.onnx", monkeypatch)
    after = _inits(res.output)
    assert after["r1_zero_point"].dtype == np.int16 and base["r1_zero_point"].dtype == np.uint8
    assert after["r2_zero_point"].dtype == np.uint8
    # Besides r1's own parameters, only conv2's bias (int32 scale = s_r1 * s_w) may change.
    assert {k for k in _changed(base, after) if not k.startswith("ConvBnFusion")} <= {"r1_scale", "r1_zero_point"}


def test_qmethod_edit_makes_a_weight_per_tensor(built, cnn_ws, monkeypatch):
    r1, base = built
    r1.cfg.write_text(_edit_entry(r1.cfg.read_text(), "w3", "qmethod", "layer"))
    res = _step2_without_running_a_model(r1, cnn_ws["dir"] / "l.onnx", monkeypatch)
    after = _inits(res.output)
    assert after["w3_scale"].shape == () and base["w3_scale"].shape == (16,)
    assert after["w3_scale"] == pytest.approx(np.float32(np.abs(base["w3_scale"]).max()), rel=1e-6)


def test_qtype_edit_makes_an_activation_symmetric(built, cnn_ws, monkeypatch):
    r1, base = built
    r1.cfg.write_text(_edit_entry(_edit_entry(r1.cfg.read_text(), "r2", "qtype", "sym"), "r2", "dtype", "int8"))
    res = _step2_without_running_a_model(r1, cnn_ws["dir"] / "s.onnx", monkeypatch)
    after = _inits(res.output)
    assert after["r2_zero_point"].dtype == np.int8 and int(after["r2_zero_point"]) == 0
    cfg = load_cfg(r1.cfg)
    assert after["r2_scale"] == pytest.approx(np.float32(cfg.entries["r2"].values["ori_max"][0] / 127), rel=1e-6)


def test_deleted_entry_falls_back_to_step1_statistics_and_says_so(built, cnn_ws):
    r1, base = built
    text = r1.cfg.read_text()
    start = text.index("\n  r2:\n")
    end = text.index("\n  ", text.index("zero_point", start))
    r1.cfg.write_text(text[:start] + text[end:])
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "del.onnx")
    assert any("'r2'" in n and "fell back" in n for n in res.notes)
    np.testing.assert_array_equal(_inits(res.output)["r2_scale"], base["r2_scale"])


def test_scale_edit_is_honoured_with_a_warning_when_it_contradicts_min_max(built, cnn_ws):
    r1, base = built
    r1.cfg.write_text(_edit_entry(r1.cfg.read_text(), "r2", "scale", "[0.5]"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "sc.onnx")
    assert _inits(res.output)["r2_scale"] == np.float32(0.5)
    assert any("contradicts min/max" in w and "'r2'" in w for w in res.warnings)


def test_scale_and_min_max_edited_together_use_the_scale_and_say_so_when_they_disagree(built, cnn_ws):
    """Both edited: the scale/zero_point edit is honoured (SPEC 3), not dropped for one recomputed from min/max."""
    r1, _ = built
    text = _edit_entry(_edit_entry(r1.cfg.read_text(), "r2", "max", "[3.0]"), "r2", "scale", "[0.1]")
    r1.cfg.write_text(_edit_entry(text, "r2", "zero_point", "[60]"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "both.onnx")
    got = _inits(res.output)
    assert got["r2_scale"] == np.float32(0.1) and int(got["r2_zero_point"]) == 60
    assert any("contradicts min/max" in w and "'r2'" in w for w in res.warnings)
    lo = float(load_cfg(r1.cfg).entries["r2"].values["min"][0])
    r1.cfg.write_text(_edit_entry(_edit_entry(r1.cfg.read_text(), "r2", "scale", f"[{(3.0 - min(lo, 0.0)) / 255:.9g}]"),
                                  "r2", "zero_point", f"[{round(-min(lo, 0.0) * 255 / (3.0 - min(lo, 0.0)))}]"))
    agreed = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "agreed.onnx")
    assert not any("contradicts" in w for w in agreed.warnings)


def test_a_scale_edit_beside_an_algorithm_edit_is_said_to_have_no_effect(built, cnn_ws):
    r1, _ = built
    r1.cfg.write_text(_edit_entry(_edit_entry(r1.cfg.read_text(), "r2", "algorithm", "percentile"), "r2", "scale", "[0.05]"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "alg.onnx")
    assert _inits(res.output)["r2_scale"] != np.float32(0.05)
    assert any("'r2' scale/zero_point edit has no effect" in w and "algorithm" in w for w in res.warnings), res.warnings


def test_a_range_that_misses_every_observed_value_is_built_with_a_warning_naming_the_line(built, cnn_ws):
    """The sweep's edit: a Relu output given [-2, -1] quantized every value to 0, with no word."""
    r1, _ = built
    text = _edit_entry(_edit_entry(r1.cfg.read_text(), "r2", "min", "[-2.0]"), "r2", "max", "[-1.0]")
    r1.cfg.write_text(text)
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "miss.onnx")
    line = text[: text.index("\n  r2:\n") + 1].count("\n") + 1
    assert any(w.startswith(f"{r1.cfg}:{line}: 'r2' min/max give the range [-2, 0]") and "misses the values" in w for w in res.warnings)
    assert _inits(res.output)["r2_scale"] == np.float32(2 / 255)  # applied as written: a warning, not a refusal


@pytest.mark.parametrize("tensor, edits, message", [
    ("r2", {"min": "[0.0]", "max": "[0.0]"}, "'r2' has min = max = 0, an empty range"),
    ("w3", {"dtype": "int16"}, "weight 'w3' has dtype int16, but a weight's dtype is not set per entry"),
    ("w3", {"qtype": "asym"}, "weight 'w3' has qtype asym, but weights are quantized symmetrically"),
    ("r2", {"qmethod": "channel"}, "activation 'r2' has qmethod channel, but activations are quantized per tensor"),
])
def test_per_entry_edits_nothing_can_honour_are_refused_at_their_line(built, cnn_ws, tensor, edits, message):
    """These built a model identical to the unedited one (or scale 1.0 from nowhere), exit 0 and no word."""
    r1, _ = built
    text = r1.cfg.read_text()
    for key, value in edits.items():
        text = _edit_entry(text, tensor, key, value)
    r1.cfg.write_text(text)
    with pytest.raises(hybridq.ConfigError, match=re.escape(message)):
        hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "no.onnx")


def test_edits_another_entry_overrides_or_a_float_layer_makes_moot_are_warned_of(built, cnn_ws):
    r1, _ = built
    text = _edit_entry(_edit_entry(r1.cfg.read_text(), "r1", "algorithm", "mse"), "r1", "max", "[5.0]")
    text = _edit_entry(text, "r2", "max", "[0.5]")  # r2 is read by conv3 alone, kept float below
    r1.cfg.write_text(text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv3: float32"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "moot.onnx")
    assert any("'r1' algorithm mse has no effect: the min/max edited beside it are used" in w for w in res.warnings), res.warnings
    assert any("the edit of 'r2' has no effect: no quantized layer reads or writes it" in w for w in res.warnings), res.warnings
    assert "r2_scale" not in _inits(res.output)
    assert not [w for w in res.warnings if "'r1'" not in w and "'r2'" not in w]  # unedited entries stay quiet


def test_one_bound_of_a_symmetric_range_edited_below_the_other_is_warned_of(built, cnn_ws):
    """A weight (always symmetric) and a qtype sym activation take +-max(|min|, |max|): a clipped max alone did nothing, in silence."""
    r1, base = built
    written = load_cfg(r1.cfg).entries
    w3_max = list(written["w3"].values["max"])
    w3_max[1] = 0.1  # channel 1: min -0.384, so the range stays +-0.384
    text = _edit_entry(r1.cfg.read_text(), "w3", "max", "[" + ", ".join(str(x) for x in w3_max) + "]")
    for key, value in (("qtype", "sym"), ("dtype", "int8"), ("max", "[2.0]")):  # c3: min -5.45, max 5.52
        text = _edit_entry(text, "c3", key, value)
    r1.cfg.write_text(text)
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "sym.onnx")
    after = _inits(res.output)
    w3_min, c3_min = written["w3"].values["min"][1], written["c3"].values["min"][0]
    assert after["w3_scale"][1] == base["w3_scale"][1] == pytest.approx(np.float32(-w3_min / 127), rel=1e-6)  # no effect
    assert after["c3_scale"] == pytest.approx(np.float32(-c3_min / 127), rel=1e-6)
    w3_line = text[: text.index("\n  w3:\n") + 1].count("\n") + 1
    assert f"{r1.cfg}:{w3_line}: weight 'w3' is quantized symmetrically, with the range +-max(|min|, |max|) per channel: the edited max " \
           f"is not used in 1 channel (channel 1: max 0.1, but |min| = {-w3_min:.6g} sets the range +-{-w3_min:.6g}). To clip a " \
           "symmetric range, edit both bounds (min -0.1 and max 0.1)." in res.warnings, res.warnings
    assert any(w.startswith(f"{r1.cfg}:") and "'c3' is quantized symmetrically (qtype sym)" in w and "the edited max is not used (max 2," in w
               and "edit both bounds (min -2 and max 2), or set qtype: asym." in w for w in res.warnings), res.warnings
    # both bounds edited: the clip is what was asked, and nothing is said
    r1.cfg.write_text(_edit_entry(text, "c3", "min", "[-2.0]"))
    both = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "both.onnx")
    assert _inits(both.output)["c3_scale"] == pytest.approx(np.float32(2 / 127), rel=1e-6)
    assert not [w for w in both.warnings if "'c3'" in w], both.warnings


def test_a_scale_edit_a_custom_layer_dtype_overrides_is_said_to_have_no_effect(built, cnn_ws):
    """custom_quantize_layers {conv2: int16} sets r2 (conv2's output) to int16: its edited scale was dropped in silence."""
    r1, _ = built
    text = _edit_entry(r1.cfg.read_text(), "r2", "scale", "[0.1]")
    r1.cfg.write_text(text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: int16"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "i16.onnx")
    assert _inits(res.output)["r2_zero_point"].dtype == np.int16 and _inits(res.output)["r2_scale"] != np.float32(0.1)
    line = text[: text.index("\n  r2:\n") + 1].count("\n") + 1 + 1  # the section gained a line above the entry
    assert (f"{r1.cfg}:{line}: 'r2' scale/zero_point edit has no effect: custom_quantize_layers sets layer 'conv2' (which writes "
            "'r2') to int16, so 'r2' is quantized to int16 with parameters from its range; edit min/max to set the range instead."
            in res.warnings), res.warnings


def test_settings_only_step1_reads_changed_in_the_cfg_are_said_to_wait_for_step1(built, cnn_ws):
    """bias_correction, speed_check and cost_model: measured edited in the cfg's settings built as before, with no word."""
    r1, base = built
    text = r1.cfg.read_text()
    for old, new in (("  bias_correction: false", "  bias_correction: true"), ("  speed_check: true", "  speed_check: false"),
                     ("  cost_model: macs", "  cost_model: measured"), ("  float_pooled: true", "  float_pooled: true  # as written")):
        assert old in text, old
        text = text.replace(old, new)
    r1.cfg.write_text(text)
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "s.onnx")
    assert not _changed(base, _inits(res.output))
    lines = {k: text[: text.index(f"  {k}: ")].count("\n") + 1 for k in ("bias_correction", "speed_check", "cost_model")}
    said = [w for w in res.warnings if "takes effect when step1 is re-run" in w]
    assert said == [
        f"{r1.cfg}:{lines['speed_check']}: settings speed_check: false has no effect in step2 (step1 ran with true): it is used "
        "by step1 only (step1 times the default int8 model against fp32 and writes the layers where int8 is not faster into "
        "custom_quantize_layers), so the change takes effect when step1 is re-run; the layers its speed check kept float32 are "
        "entries of custom_quantize_layers: delete those entries to quantize them now.",
        f"{r1.cfg}:{lines['bias_correction']}: settings bias_correction: true has no effect in step2 (step1 ran with false): it "
        "is used by step1 only (step1 measures each layer's mean output shift and writes it as bias_correction on the weight "
        "entries), so the change takes effect when step1 is re-run.",
        f"{r1.cfg}:{lines['cost_model']}: settings cost_model: measured has no effect in step2 (step1 ran with macs): measured "
        "places layers by per-layer timings that step1 takes on this CPU with that setting, and this step1 run took none, so the "
        "change takes effect when step1 is re-run.",
    ], res.warnings


def test_a_float32_entry_that_changes_nothing_is_said_to_have_no_effect(built, cnn_ws):
    """SPEC 4: an entry with no effect is never silent. relu1 sits on conv1, a float stem: float32 there builds the very
    same model (checked byte for byte), so step2 says so; conv3 float32 changes the model and gets no such warning."""
    r1, _ = built
    base = (cnn_ws["dir"] / "base.onnx").read_bytes()
    text = r1.cfg.read_text()
    r1.cfg.write_text(text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  relu1: float32"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "moot.onnx")
    assert onnx.load(str(res.output)).graph.SerializeToString() == onnx.load_from_string(base).graph.SerializeToString()
    assert [w for w in res.warnings if "no effect" in w] and "custom_quantize_layers['relu1'] = float32 has no effect" in res.warnings[-1]
    r1.cfg.write_text(text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv3: float32"))
    res = hybridq.step2(r1.model, r1.data, r1.cfg, cnn_ws["dir"] / "real.onnx")
    assert onnx.load(str(res.output)).graph.SerializeToString() != onnx.load_from_string(base).graph.SerializeToString()
    assert not [w for w in res.warnings if "no effect" in w], res.warnings
