"""Integer and bool model outputs (an ArgMax, a mask) are compared value for value and judged by the verdict; an output
that cannot be compared is named with the reason, never passed over while the verdict says "every output"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from hybridq.analysis import AnalysisResult, LayerError, analyze, judge
from hybridq.errors import ExitCode
from hybridq.metrics import Metrics
from hybridq.report import verdict
from tests.conftest import run, run_cli

D, C, POS = 16, 8, 32  # features, classes, positions per sample
SAMPLES = 6
OUTPUTS = {"logits": (TP.FLOAT, [1, POS, C]), "cls": (TP.INT64, [1, POS]), "mask": (TP.BOOL, [1, POS, C])}


def _classifier(quant: str | None, outputs: tuple[str, ...] = ("logits", "cls", "mask")) -> onnx.ModelProto:
    """x [1, 32, 16] -> MatMul -> Relu -> MatMul -> logits [1, 32, 8]; cls = ArgMax(logits) (int64), mask = logits > 0.5 (bool).

    ``quant``: None for fp32; "coarse" reads r and logits through uint8 Q/DQ (steps 0.02 and 0.05: the logits keep about
    36 dB, and a decision flips where the top two logits are closer than a step); "lossless" reads x through an int8 Q/DQ
    of step 1/16, which leaves every input on that grid unchanged (so every output equals fp32's).
    """
    rng = np.random.default_rng(3)
    inits = [nh.from_array(rng.normal(0, 0.3, (D, D)).astype(np.float32), "w1"),
             nh.from_array(rng.normal(0, 0.3, (D, C)).astype(np.float32), "w2"), nh.from_array(np.array(0.5, np.float32), "half")]
    nodes, x, logits = [], "x", "logits"
    if quant == "lossless":
        inits += [nh.from_array(np.array(1 / 16, np.float32), "sx"), nh.from_array(np.array(0, np.int8), "zx")]
        nodes += [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]), h.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"])]
        x = "x_dq"
    nodes += [h.make_node("MatMul", [x, "w1"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"], name="relu")]
    r = "r"
    if quant == "coarse":
        inits += [nh.from_array(np.array(0.02, np.float32), "sr"), nh.from_array(np.array(0, np.uint8), "zr"),
                  nh.from_array(np.array(0.05, np.float32), "sl"), nh.from_array(np.array(128, np.uint8), "zl")]
        nodes += [h.make_node("QuantizeLinear", ["r", "sr", "zr"], ["r_q"]), h.make_node("DequantizeLinear", ["r_q", "sr", "zr"], ["r_dq"])]
        r, logits = "r_dq", "logits_f"
    nodes.append(h.make_node("MatMul", [r, "w2"], [logits], name="fc2"))
    if quant == "coarse":
        nodes += [h.make_node("QuantizeLinear", ["logits_f", "sl", "zl"], ["l_q"]),
                  h.make_node("DequantizeLinear", ["l_q", "sl", "zl"], ["logits"])]
    nodes += [h.make_node("ArgMax", ["logits"], ["cls"], name="argmax", axis=2, keepdims=0),
              h.make_node("Greater", ["logits", "half"], ["mask"], name="above")]
    g = h.make_graph(nodes, "classifier", [h.make_tensor_value_info("x", TP.FLOAT, [1, POS, D])],
                     [h.make_tensor_value_info(o, *OUTPUTS[o]) for o in outputs], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _samples(grid: bool = False) -> list[dict[str, np.ndarray]]:
    """Gaussian inputs; on the int8 grid of step 1/16 when ``grid``."""
    rng = np.random.default_rng(11)
    xs = [rng.normal(0, 1, (1, POS, D)).astype(np.float32) for _ in range(SAMPLES)]
    return [{"x": (np.round(x * 16) / 16).astype(np.float32) if grid else x} for x in xs]


def _differ(fm: onnx.ModelProto, qm: onnx.ModelProto, data: list[dict[str, np.ndarray]], name: str) -> tuple[int, int]:
    """Values of output ``name`` that differ between the two models in ONNX Runtime, pooled over ``data``; and how many."""
    k = [o.name for o in fm.graph.output].index(name)
    pairs = [(run(fm, d)[k], run(qm, d)[k]) for d in data]
    return sum(int((a != b).sum()) for a, b in pairs), sum(a.size for a, _ in pairs)


def _write(tmp_path: Path, fm: onnx.ModelProto, qm: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> tuple[Path, Path, Path]:
    """The two models and a dataset listing on disk, for the CLI."""
    fp, qp = tmp_path / "fp32.onnx", tmp_path / "quant.onnx"
    onnx.save(fm, fp)
    onnx.save(qm, qp)
    for i, d in enumerate(data):
        np.save(tmp_path / f"s{i}.npy", d["x"])
    listing = tmp_path / "dataset.txt"
    listing.write_text("".join(f"s{i}.npy\n" for i in range(len(data))))
    return fp, qp, listing


def test_integer_and_bool_outputs_are_counted_value_for_value_and_a_flip_is_check(capsys, tmp_path) -> None:
    fm, qm, data = _classifier(None), _classifier("coarse"), _samples()
    cls, mask = _differ(fm, qm, data, "cls"), _differ(fm, qm, data, "mask")
    assert cls[0] > 0 and mask[0] > 0 and cls[1] == SAMPLES * POS  # the premise, in ONNX Runtime: some decisions flip
    fp, qp, listing = _write(tmp_path, fm, qm, data)
    snap = tmp_path / "snap"
    code, out, err = run_cli(capsys, "analyze", fp, qp, "-d", listing, "--json", "--strict", "--dump", snap)
    assert code == ExitCode.BELOW_THRESHOLD, err
    doc = json.loads(out)
    v = doc["verdict"]
    # the float output passes its thresholds: only the integer and bool outputs make this CHECK
    assert [o["tensor"] for o in v["worst_outputs"]] == ["logits"] and v["worst_outputs"][0]["ok"] is True
    assert v["ok"] is False and v["not_compared"] == []
    got = {x["tensor"]: x for x in v["exact_outputs"]}
    assert (got["cls"]["differ"], got["cls"]["total"]) == cls and got["cls"]["dtype"] == "int64" and got["cls"]["ok"] is False
    assert (got["mask"]["differ"], got["mask"]["total"]) == mask and got["mask"]["dtype"] == "bool"
    assert got["cls"]["share"] == pytest.approx(cls[0] / cls[1]) and got["cls"]["label"] == "argmax [cls] int64"
    assert {x["tensor"]: (x["differ"], x["total"]) for x in doc["exact_outputs"]} == {"cls": cls, "mask": mask}
    # the terminal: a row per integer output and a verdict that names them, never "every output keeps cosine"
    code, out, err = run_cli(capsys, "analyze", fp, qp, "-d", listing)
    pct = f"{100 * cls[0] / cls[1]:.1f} %"
    assert f"{cls[0]} of {cls[1]} values differ ({pct})" in out
    line = next(s for s in out.splitlines() if s.startswith(("OK", "CHECK")))
    assert line.startswith("CHECK: output ") and "every output" not in line
    assert f"output argmax [cls] int64: {cls[0]} of {cls[1]} values differ" in line and f"output above [mask] bool: {mask[0]} of" in line
    assert "passes only when every value equals fp32's" in line and "The float outputs keep cosine >= 0.99" in line
    # the snapshot reads back with the same comparison
    code, out, err = run_cli(capsys, "analyze", "--from", snap, "--json")
    assert {x["tensor"]: (x["differ"], x["total"]) for x in json.loads(out)["verdict"]["exact_outputs"]} == {"cls": cls, "mask": mask}
    assert f"argmax [cls] int64: {cls[0]} of {cls[1]} values differ" in (snap / "error_analysis.txt").read_text()


def test_an_integer_output_alone_is_judged_not_an_internal_tensor(capsys, tmp_path) -> None:
    fm, qm, data = _classifier(None, ("cls",)), _classifier("coarse", ("cls",)), _samples()
    cls = _differ(fm, qm, data, "cls")
    assert cls[0] > 0
    fp, qp, listing = _write(tmp_path, fm, qm, data)
    code, out, err = run_cli(capsys, "analyze", fp, qp, "-d", listing, "--strict", "--json")
    assert code == ExitCode.BELOW_THRESHOLD, err
    v = json.loads(out)["verdict"]
    assert v["worst_outputs"] == [] and [(x["tensor"], x["differ"], x["total"]) for x in v["exact_outputs"]] == [("cls", *cls)]
    assert "argmax [cls] int64" in v["next_step"]


def test_integer_outputs_equal_to_fp32_pass_and_the_verdict_says_how_they_were_judged(capsys, tmp_path) -> None:
    fm, qm, data = _classifier(None), _classifier("lossless"), _samples(grid=True)
    assert _differ(fm, qm, data, "cls") == (0, SAMPLES * POS)  # the premise: x is on the Q/DQ grid, nothing changes
    res = analyze(fm, qm, data)
    v = judge(res)
    assert v.ok and {x.tensor: (x.differ, x.total) for x in res.exact_outputs} == {"cls": (0, SAMPLES * POS), "mask": (0, SAMPLES * POS * C)}
    text = verdict(res, v=v)
    assert text.startswith("OK: every float output keeps cosine >= 0.99") and "every integer or bool output equals fp32's on every value" in text
    assert f"argmax [cls] int64: {SAMPLES * POS} values" in text
    fp, qp, listing = _write(tmp_path, _classifier(None, ("cls",)), _classifier("lossless", ("cls",)), data)
    code, out, err = run_cli(capsys, "analyze", fp, qp, "-d", listing, "--strict")
    assert code == 0, err
    assert next(s for s in out.splitlines() if s.startswith(("OK", "CHECK"))).startswith(
        "OK: every integer or bool output equals fp32's on every value (argmax [cls] int64: ")


def test_an_output_the_quantized_model_lacks_is_named_not_compared() -> None:
    fm, qm = _classifier(None), _classifier("lossless")
    for node in qm.graph.node:  # the quantized model writes its class decisions under another name
        node.output[:] = ["cls_renamed" if o == "cls" else o for o in node.output]
    qm.graph.output[1].name = "cls_renamed"
    res = analyze(fm, qm, _samples(grid=True))
    v = judge(res)
    assert not v.ok and [m["tensor"] for m in v.not_compared] == ["cls"] and "has no tensor of that name" in v.not_compared[0]["reason"]
    text = verdict(res, v=v)
    assert text.startswith("CHECK: output cls not compared: the quantized model has no tensor of that name")
    assert "check it another way" in v.next_step


def test_an_output_whose_shape_differs_on_every_sample_is_named_not_compared() -> None:
    """NonZero keeps fewer scores once x is quantized on both samples: 'kept' is never compared, and the verdict says so
    (it judged an internal tensor as the output before)."""
    from tests.test_analysis import _kept_scores_models

    fm, qm = _kept_scores_models(50)
    near = np.random.default_rng(4).normal(size=(1, 50)).astype(np.float32)
    near[0, :3] = [0.01, 0.02, 0.04]  # quantized to 0: sigmoid 0.5, not above
    data = [{"x": near}, {"x": near[:, ::-1].copy()}]
    shapes = [(run(fm, d)[0].shape, run(qm, d)[0].shape) for d in data]
    assert all(a != b for a, b in shapes)  # the premise, in ONNX Runtime
    v = judge(analyze(fm, qm, data))
    assert not v.ok and v.outputs == [] and [m["tensor"] for m in v.not_compared] == ["kept"]
    assert f"differed on all 2 sample(s) (fp32 {shapes[0][0]} vs quantized {shapes[0][1]} on sample 0)" in v.not_compared[0]["reason"]


def test_a_result_without_figures_for_an_output_is_check_not_the_last_row() -> None:
    """A manifest written before integer outputs were compared: the output has no row, so it is named, not replaced."""
    m = Metrics(0.9999, 0.1, 40.0, 0.01)
    row = LayerError("logits", "fc2", "MatMul", (1, POS, C), "float32", m, m)
    doc = AnalysisResult([row], ["cls"], 3).to_dict()
    del doc["exact_outputs"], doc["not_compared"]  # as such a manifest holds it
    res = AnalysisResult.from_dict(doc)
    v = judge(res)
    assert not v.ok and v.outputs == [] and v.not_compared == [{"tensor": "cls", "reason": "this result holds no figures for it"}]


def _masked_attention(w_noise: float, extra_masked: bool) -> onnx.ModelProto:
    """scores = x @ w @ x^T, causal -inf mask by Where, Softmax; outputs the masked scores and the attention. The
    'quantized' one has noisy weights and, with ``extra_masked``, masks one more position than fp32 (a -inf where
    fp32 is finite: a non-finite value that differs)."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.3, (8, 8)) + w_noise * rng.normal(0, 1, (8, 8))
    causal = np.triu(np.ones((6, 6), bool), 1)
    causal[3, 0] |= extra_masked
    nodes = [h.make_node("MatMul", ["x", "w"], ["xw"], name="mm_w"), h.make_node("Transpose", ["x"], ["xt"], name="tr", perm=[0, 2, 1]),
             h.make_node("MatMul", ["xw", "xt"], ["s"], name="mm_s"), h.make_node("Where", ["cm", "ninf", "s"], ["masked"], name="where"),
             h.make_node("Softmax", ["masked"], ["att"], name="softmax", axis=-1)]
    inits = [nh.from_array(w.astype(np.float32), "w"), nh.from_array(causal[None], "cm"), nh.from_array(np.float32(-np.inf), "ninf")]
    g = h.make_graph(nodes, "mask", [h.make_tensor_value_info("x", TP.FLOAT, [1, 6, 8])],
                     [h.make_tensor_value_info("masked", TP.FLOAT, [1, 6, 6]), h.make_tensor_value_info("att", TP.FLOAT, [1, 6, 6])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("extra_masked", [False, True])
def test_equal_infinities_agree_and_other_non_finite_values_are_counted_apart(tmp_path, extra_masked) -> None:
    """An attention mask's -inf in both models agrees: the Where row is measured on the values finite in both (numpy on
    ORT outputs), not NaN, and a note counts the infinities left out. A -inf in one model only differs: counted, left
    out of the figures too, and the output is CHECK."""
    fm, qm = _masked_attention(0.0, False), _masked_attention(0.01, extra_masked)
    rng = np.random.default_rng(2)
    data = [{"x": rng.normal(0, 1, (1, 6, 8)).astype(np.float32)} for _ in range(3)]
    cos, equal, differ = [], 0, 0
    for d in data:
        a, b = (run(m, d)[0].astype(np.float64) for m in (fm, qm))
        keep = np.isfinite(a) & np.isfinite(b)
        equal += int(((a == b) & ~keep).sum())
        differ += int((~keep).sum() - ((a == b) & ~keep).sum())
        x, y = a[keep], b[keep]
        cos.append(float(x @ y / np.sqrt((x @ x) * (y @ y))))
    assert equal == 3 * 15 and differ == (3 if extra_masked else 0)  # the premise: 15 masked positions a sample

    res = analyze(fm, qm, data)
    row = next(r for r in res.layers if r.tensor == "masked")
    assert row.entire.cosine == pytest.approx(float(np.mean(cos)), abs=1e-9) and np.isfinite(row.entire.snr_db)
    assert row.nonfinite == (equal, differ)
    note = next(n for n in res.notes if n.startswith("non-finite values"))
    assert f"'masked': {equal} equal infinities" + (f", {differ} that differ" if differ else "") + " on 3 sample(s)" in note
    v = judge(res)
    entry = next(o for o in v.outputs if o["tensor"] == "masked")
    assert entry["non_finite"] == {"equal": equal, "differ": differ} and entry["ok"] is (not extra_masked)
    assert v.ok is (not extra_masked)
    if extra_masked:  # the attention, masked one more position too, is the worst output; the masked scores' entry says why
        from hybridq.report import _worst_output

        assert f"{differ} non-finite value(s) differ from fp32's" in _worst_output(entry)
    back = LayerError.from_dict("masked", json.loads(json.dumps(row.to_dict())))
    assert back.nonfinite == row.nonfinite


def test_a_model_input_given_back_as_an_output_is_the_same_in_both_models_not_a_check(tmp_path):
    """Both models take the same inputs, so an input passed through as an output is equal by construction: a note, and
    the verdict judges the other outputs (it said CHECK, "not compared", on a lossless model)."""
    models = []
    for quant in (None, "lossless"):
        m = _classifier(quant, ("logits",))
        m.graph.output.append(h.make_tensor_value_info("x", TP.FLOAT, [1, POS, D]))
        models.append(m)
    onnx.save(models[0], tmp_path / "f.onnx")
    onnx.save(models[1], tmp_path / "q.onnx")
    res = analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", _samples(grid=True))
    assert res.not_compared == {} and any("output x is the model input itself" in n for n in res.notes), res.notes
    assert judge(res).ok


def test_an_output_whose_slice_axis_changes_length_says_it_has_no_worst_slice(tmp_path):
    """[1, T, 16] outputs with T set by each sample: the slices (one per time step) cannot be pooled, so the output is
    judged whole; the worst-slice figure was dropped without a word. Samples of one length keep it, with no note."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.normal(0, 0.3, (D, D)).astype(np.float32), "w1")]
    models = []
    for quant in (False, True):
        nodes, x = [], "x"
        if quant:
            inits_q = [nh.from_array(np.array(1 / 16, np.float32), "sx"), nh.from_array(np.array(0, np.int8), "zx")]
            nodes += [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
            x = "xd"
        nodes.append(h.make_node("MatMul", [x, "w1"], ["y"], name="fc1"))
        g = h.make_graph(nodes, "dyn", [h.make_tensor_value_info("x", TP.FLOAT, [1, "T", D])], [h.make_tensor_value_info("y", TP.FLOAT, [1, "T", D])],
                         inits + (inits_q if quant else []))
        models.append(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    onnx.save(models[0], tmp_path / "f.onnx")
    onnx.save(models[1], tmp_path / "q.onnx")
    ragged = [{"x": rng.normal(0, 1, (1, t, D)).astype(np.float32)} for t in (6, 20, 12)]
    res = analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", ragged)
    row = next(r for r in res.layers if r.tensor == "y")
    assert row.slices is None and any("no worst-slice figure for output(s) y" in n for n in res.notes), res.notes
    even = [{"x": rng.normal(0, 1, (1, 6, D)).astype(np.float32)} for _ in range(3)]
    res = analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", even)
    assert next(r for r in res.layers if r.tensor == "y").slices is not None and not any("worst-slice" in n for n in res.notes)
