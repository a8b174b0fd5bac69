"""The verdict scripts and people act on: strict JSON, the --strict exit code, the per-slice output measure,
and a report that shows the verdict first (in headless Chromium, slow)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import hybridq
from hybridq.analysis import AnalysisResult, LayerError, judge
from hybridq.cli import main
from hybridq.errors import ExitCode
from hybridq.metrics import Metrics
from hybridq.report import chart, render_html, write_reports
from tests import models
from tests.conftest import run

SHAPE = (1, 7, 64)  # 4 box channels (0-320) then 3 score channels (sigmoid, 0-1), 64 anchors


def _detector(quant: str | None) -> onnx.ModelProto:
    """A YOLO-style head: y = Concat(320 * sigmoid(x[:, :4]), sigmoid(x[:, 4:])) on axis 1.

    ``quant``: None for the fp32 model; "output" puts one uint8 Q/DQ pair (range 0-320) on y, so the
    score channels lose almost everything while the whole tensor keeps cosine > 0.9999; "input" puts a
    fine uint8 Q/DQ pair (range -6..6) on x only, so every channel stays accurate.
    """
    inits = [
        nh.from_array(np.array([0], np.int64), "s0"), nh.from_array(np.array([4], np.int64), "s4"),
        nh.from_array(np.array([7], np.int64), "s7"), nh.from_array(np.array([1], np.int64), "ax"),
        nh.from_array(np.array(320.0, np.float32), "k320"),
    ]
    nodes = []
    x = "x"
    if quant == "input":
        inits += [nh.from_array(np.array(12.0 / 255, np.float32), "xs"), nh.from_array(np.array(128, np.uint8), "xz")]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["x_q"], name="x_Q"),
                  h.make_node("DequantizeLinear", ["x_q", "xs", "xz"], ["x_dq"], name="x_DQ")]
        x = "x_dq"
    cat = "y_cat" if quant == "output" else "y"
    nodes += [
        h.make_node("Slice", [x, "s0", "s4", "ax"], ["xb"], name="slice_boxes"),
        h.make_node("Slice", [x, "s4", "s7", "ax"], ["xs_"], name="slice_scores"),
        h.make_node("Sigmoid", ["xb"], ["sb"], name="box_sigmoid"),
        h.make_node("Mul", ["sb", "k320"], ["boxes"], name="box_scale"),
        h.make_node("Sigmoid", ["xs_"], ["scores"], name="score_sigmoid"),
        h.make_node("Concat", ["boxes", "scores"], [cat], name="head", axis=1),
    ]
    if quant == "output":
        inits += [nh.from_array(np.array(320.0 / 255, np.float32), "ys"), nh.from_array(np.array(0, np.uint8), "yz")]
        nodes += [h.make_node("QuantizeLinear", ["y_cat", "ys", "yz"], ["y_q"], name="y_Q"),
                  h.make_node("DequantizeLinear", ["y_q", "ys", "yz"], ["y"], name="y_DQ")]
    g = h.make_graph(nodes, "head", [h.make_tensor_value_info("x", TP.FLOAT, SHAPE)],
                     [h.make_tensor_value_info("y", TP.FLOAT, SHAPE)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


@pytest.fixture
def head(tmp_path: Path) -> dict[str, Path]:
    paths = {k: tmp_path / f"{k}.onnx" for k in ("fp32", "output", "input")}
    for k, p in paths.items():
        onnx.save(_detector(None if k == "fp32" else k), p)
    lines = []
    for i in range(5):
        f = tmp_path / f"x_{i}.npy"
        np.save(f, np.random.default_rng(i).uniform(-6, 6, SHAPE).astype(np.float32))
        lines.append(f.name)
    (tmp_path / "dataset.txt").write_text("\n".join(lines) + "\n")
    paths["dataset"] = tmp_path / "dataset.txt"
    return paths


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def _refuse(token: str) -> None:
    raise ValueError(f"not strict JSON: {token}")


def _ort_slices(head: dict[str, Path], which: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Whole-output cosine and per-channel cosine and SNR (samples pooled), from ONNX Runtime and numpy."""
    xs = [np.load(head["dataset"].parent / f"x_{i}.npy") for i in range(5)]
    a = np.concatenate([run(head["fp32"], {"x": x})[0] for x in xs]).astype(np.float64)
    b = np.concatenate([run(head[which], {"x": x})[0] for x in xs]).astype(np.float64)
    whole = np.mean([float((p * q).sum() / np.linalg.norm(p) / np.linalg.norm(q)) for p, q in zip(a, b)])
    x, y = np.moveaxis(a, 1, 0).reshape(7, -1), np.moveaxis(b, 1, 0).reshape(7, -1)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    snr = 10 * np.log10((x * x).sum(1) / ((x - y) ** 2).sum(1))
    return whole, cos, snr


def test_mixed_scale_output_is_check_although_whole_cosine_is_high(capsys, head, tmp_path) -> None:
    whole, cos, snr = _ort_slices(head, "output")
    # the premise, measured independently: the whole tensor looks fine, a score channel does not
    assert whole > 0.9995 and snr[:4].min() > 30 and snr[4:].min() < 10
    snap = tmp_path / "snap"
    code, out, err = cli(capsys, "analyze", head["fp32"], head["output"], "-d", head["dataset"], "--dump", snap, "--json")
    assert code == 0, err  # without --strict a CHECK still exits 0
    doc = json.loads(out, parse_constant=_refuse)
    v = doc["verdict"]
    assert v["ok"] is False and v["status"] == "CHECK"
    assert v["thresholds"] == {"cosine": 0.99, "snr_db": 20.0}
    o = v["worst_outputs"][0]
    assert o["tensor"] == "y" and o["ok"] is False
    assert o["cosine"] == pytest.approx(whole, rel=1e-6) and o["cosine"] > 0.9995
    ws = o["worst_slice"]
    assert ws["axis"] == 1 and ws["slices"] == 7 and ws["index"] == int(np.argmin(snr))
    assert ws["snr_db"] == pytest.approx(float(snr.min()), rel=1e-5)
    assert ws["min_cosine"] == pytest.approx(float(cos.min()), rel=1e-6)
    # the next step names real paths: this snapshot (the cfg is unknown for a hand-made model)
    assert v["command"] == (
        f"hybridq propose {snap} --cfg MODEL.quantization.cfg --dataset {head['dataset']} --target-cosine 0.99 --target-snr 20.0"
    )
    assert "propose" in v["next_step"]
    # every number is a number: no "inf" strings anywhere, and non-finite values are listed by pointer
    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [x for k, v in node.items() if k != "nonfinite" for x in strings(v)]
        if isinstance(node, list):
            return [x for v in node for x in strings(v)]
        return [node] if isinstance(node, str) else []

    assert not {"inf", "-inf", "nan", "Infinity", "NaN"} & set(strings(doc))
    for ptr, kind in doc["nonfinite"].items():
        node = doc
        for part in ptr.split("/")[1:]:
            node = node[int(part)] if isinstance(node, list) else node[part.replace("~1", "/").replace("~0", "~")]
        assert node is None and kind in ("inf", "-inf", "nan")
    # the per-slice figure is in the table, the report and the txt too
    code, out, err = cli(capsys, "analyze", "--from", snap)
    assert code == 0 and "CHECK" in out and "axis 1, #" in out and "worst slice" in out
    page = (snap / "report.html").read_text()
    assert page.index("CHECK") < page.index("<img") and "hybridq propose" in page
    assert "worst slice" in (snap / "error_analysis.txt").read_text()


def test_strict_exit_code(capsys, head) -> None:
    code, out, err = cli(capsys, "analyze", head["fp32"], head["output"], "-d", head["dataset"], "--strict")
    assert code == ExitCode.BELOW_THRESHOLD == 3, err
    assert "Traceback" not in out + err and "CHECK" in out and "Next:" in out
    # a cfg beside the quantized model (what step1 + step2 leave in a workspace) goes into the command
    cfg = head["output"].with_name("output.quantization.cfg")
    cfg.write_text("custom_quantize_layers: {}\nquantize_parameters: {}\n")
    code, out, err = cli(capsys, "analyze", head["fp32"], head["output"], "-d", head["dataset"], "--json")
    want = f"hybridq propose --cfg {cfg} --dataset {head['dataset']} --target-cosine 0.99 --target-snr 20.0"  # no snapshot: analyses anew
    assert json.loads(out)["verdict"]["command"] == want
    # the accurate model passes the same gate
    code, out, err = cli(capsys, "analyze", head["fp32"], head["input"], "-d", head["dataset"], "--strict", "--json")
    assert code == 0, err
    doc = json.loads(out, parse_constant=_refuse)
    assert doc["verdict"]["ok"] is True and doc["verdict"]["command"] is None
    _, _, snr = _ort_slices(head, "input")
    assert doc["verdict"]["worst_outputs"][0]["worst_slice"]["snr_db"] == pytest.approx(float(snr.min()), rel=1e-5)
    # thresholds are options: a stricter slice SNR turns the same model into CHECK
    tight = float(snr.min()) + 1.0
    code, out, err = cli(capsys, "analyze", head["fp32"], head["input"], "-d", head["dataset"], "--strict",
                         "--target-snr", str(tight), "--json")
    assert code == 3 and json.loads(out)["verdict"]["thresholds"]["snr_db"] == tight
    assert f"--target-snr {tight!r}" in json.loads(out)["verdict"]["command"]  # the next step aims at the same threshold
    # a bad threshold is a usage error
    code, out, err = cli(capsys, "analyze", head["fp32"], head["input"], "-d", head["dataset"], "--target-cosine", "1.5")
    assert code == 2 and "--target-cosine" in err and "Traceback" not in err
    for bad in ("nan", "inf"):
        code, out, err = cli(capsys, "analyze", head["fp32"], head["input"], "-d", head["dataset"], "--target-snr", bad)
        assert code == 2 and "--target-snr" in err and "Traceback" not in err


# --------------------------------------------------------------------------- hand-made results


def _m(cos: float, snr: float) -> Metrics:
    return Metrics(cos, 1.0, snr, 0.1)


def _result(n: int, bad: list[int], out_cos: float | None = None) -> AnalysisResult:
    """``n`` layers in graph order, those in ``bad`` with a single error below the thresholds; the
    last is the output, its whole-tensor cosine ``out_cos`` (default: 0.95 when a layer is bad)."""
    layers = []
    for i in range(n):
        single = _m(0.95, 12.0 - i % 5) if i in bad else _m(0.99995, 45.0 - (i % 7))
        layers.append(LayerError(f"t{i}", f"stage{i // 10}.block{i % 10}.conv", "Conv", (1, 8, 4, 4), "float32",
                                 _m(0.9999 - 1e-6 * i, 40.0), single, precision="uint8"))
    layers[-1].entire = _m(out_cos if out_cos is not None else (0.95 if bad else 0.9999), 30.0)
    return AnalysisResult(layers=layers, outputs=[f"t{n - 1}"], n_samples=4)


def _circled(fig) -> list[tuple[float, float]]:
    return [tuple(line.get_xydata()[0]) for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "below-threshold"]


def test_chart_circles_only_layers_below_threshold() -> None:
    # OK everywhere: no circle at all (the old chart always circled five)
    assert _circled(chart(_result(20, []))) == []
    # two failing layers: circled on both panels at their graph index, and nowhere else
    circled = _circled(chart(_result(20, [3, 11])))
    assert sorted({x for x, _ in circled}) == [3.0, 11.0] and len(circled) == 4
    # at 400 layers the axis shows indices, not 400 overlapping names; the failing ones are named
    fig = chart(_result(400, [7, 250]))
    ticks = [t.get_text() for t in fig.axes[1].get_xticklabels() if t.get_text()]
    assert 0 < len(ticks) <= 25
    named = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert named == ["stage25.block0.conv", "stage0.block7.conv"] or sorted(named) == sorted(
        ["stage0.block7.conv", "stage25.block0.conv"]
    )
    # 20 layers: every layer named on the x axis
    fig = chart(_result(20, []))
    assert len([t for t in fig.axes[1].get_xticklabels() if t.get_text()]) == 20


def test_html_table_is_worst_first_and_verdict_first() -> None:
    r = _result(12, [9, 4])
    page = render_html(r, png=b"")
    rows = re.findall(r'<tr><td class="n" data-v="(\d+)">', page)
    assert rows[:2] == ["4", "9"] or rows[:2] == ["9", "4"]
    singles = [r.layers[int(i)].single.cosine for i in rows]
    assert singles == sorted(singles)  # worst first
    v = judge(r)
    assert page.index("CHECK") < page.index("<img") < page.index("sortable")
    assert v.cfg_entry and v.cfg_entry in page  # the cfg line to edit is on the page
    assert v.layers[0]["layer"] in v.cfg_entry


def test_verdict_json_holds_worst_layers_and_next_step() -> None:
    # layers below threshold alone do not fail the verdict: the outputs decide
    assert judge(_result(12, [9, 4], out_cos=0.9999)).ok is True
    v = judge(_result(12, [9, 4]), snapshot="snap", cfg="ws/m.quantization.cfg")
    d = v.to_dict()
    assert d["ok"] is False and [x["tensor"] for x in d["worst_layers"]] == ["t9", "t4"]  # 12-4%5=8 dB < 12-9%5
    assert d["command"] == "hybridq propose snap --cfg ws/m.quantization.cfg --dataset DATASET --target-cosine 0.99 --target-snr 20.0"
    # paths that need quoting are quoted for the shell
    assert "--cfg 'my ws/m.cfg'" in judge(_result(12, [9]), cfg="my ws/m.cfg").command
    assert d["cfg_entry"] == "custom_quantize_layers: {stage0.block9.conv: float32}"
    assert math.isfinite(d["worst_outputs"][0]["cosine"])
    # a cfg written for an NPU falls back to float16: the next step says so
    assert judge(_result(12, [9, 4]), fallback="float16").cfg_entry == "custom_quantize_layers: {stage0.block9.conv: float16}"


def test_analyze_suggests_the_npu_fallback_for_a_cfg_written_for_npu(tmp_path) -> None:
    from hybridq.cli import _fallback_of

    r = hybridq.step1(*_npu_inputs(tmp_path), out=tmp_path / "npu", settings={"target": "npu"})
    c = hybridq.step1(*_npu_inputs(tmp_path), out=tmp_path / "cpu")
    assert (_fallback_of(str(r.cfg)), _fallback_of(str(c.cfg)), _fallback_of(None)) == ("float16", "float32", "float32")
    broken = tmp_path / "broken.quantization.cfg"
    broken.write_text("settings: [\n")
    assert _fallback_of(str(broken)) == "float32"


def _npu_inputs(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "cnn.onnx"
    if not path.exists():
        onnx.save(models.residual_cnn(), path)
        models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    return path, tmp_path / "data" / "dataset.txt"


# --------------------------------------------------------------------------- screenshot


CHROMIUM = Path("/usr/bin/chromium")


def _screenshot(page: Path, png: Path) -> None:
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--screenshot={png}",
         "--window-size=1280,800", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )


def _rows_with(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    """Row indices of the screenshot that hold pixels close to ``rgb``."""
    close = (np.abs(img[:, :, :3].astype(int) - np.array(rgb)) <= tol).all(axis=2)
    return np.nonzero(close.any(axis=1))[0]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
@pytest.mark.parametrize("n", [20, 400])
def test_report_shows_verdict_and_chart_without_scrolling(tmp_path: Path, n: int) -> None:
    from PIL import Image

    write_reports(_result(n, [3, n // 2]), tmp_path)
    shot = tmp_path / "shot.png"
    _screenshot(tmp_path / "report.html", shot)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (800, 1280)
    # the CHECK box (border #c22) is at the top; the chart's series (#1f77b4 entire, #ff7f0e single)
    # and its red circles are all inside the first 800 pixels
    box = _rows_with(img, (0xCC, 0x22, 0x22), tol=30)
    assert len(box) and box.min() < 120
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        rows = _rows_with(img, colour, tol=30)
        assert len(rows) > 10 and rows.max() < 780, colour
    # the chart's lower panel (SNR axis, x labels) ends above the fold: white rows below the image
    blue = _rows_with(img, (0x1F, 0x77, 0xB4), tol=30)
    assert blue.max() < 780


def test_a_failing_slice_points_at_the_output_layer() -> None:
    from hybridq.metrics import SliceMetrics

    r = _result(6, [], out_cos=0.9999)
    out = r.layers[-1]
    # whole tensor fine, slice 2 of 3 at 5 dB: CHECK, and the cfg entry names the output's layer
    out.slices = SliceMetrics(1, [0.99999, 0.99999, 0.9], [45.0, 44.0, 5.0])
    v = judge(r, snapshot="snap")
    assert not v.ok and v.outputs[0]["worst_slice"]["index"] == 2
    assert v.cfg_entry == f"custom_quantize_layers: {{{out.layer}: int16}}"
    assert "slice #2 on axis 1" in v.next_step and "hybridq propose snap" in v.next_step
    # a float32 output layer gets no int16 entry, only the propose command
    out.precision = "float32"
    assert judge(r).cfg_entry is None


def test_the_verdict_names_the_worst_sample_beside_the_means() -> None:
    """A mean of 0.996 over 4 samples hides one at 0.986: the verdict's output entry and paragraph show it."""
    from hybridq.report import verdict as verdict_text

    r = _result(3, [])
    per = {"cosine": [0.9995, 0.9991, 0.986, 0.9994], "euclid": [1.0] * 4, "snr_db": [40.0, 38.0, 18.0, 39.0], "max_abs": [0.1] * 4}
    r.layers[-1].entire = Metrics(float(np.mean(per["cosine"])), 1.0, float(np.mean(per["snr_db"])), 0.1, per_sample=per)
    v = judge(r)
    assert v.outputs[0]["worst_sample"] == {"index": 2, "cosine": 0.986, "snr_db": 18.0}
    assert "worst sample #2: cos 0.986000, SNR 18.00 dB" in verdict_text(r)


def test_analyze_and_the_proposal_judge_an_output_by_the_same_pooled_figures(cnn_ws, tmp_path):
    """A classifier's logits (rank 2, not sliced): the verdict's whole-tensor cosine and SNR are pooled over the samples,
    as numpy computes them from the two models' outputs and as the proposal's target takes them, so at a threshold
    between the pooled SNR and the mean of the per-sample SNRs both say the same. Before, analyze judged the means:
    `propose` said 'target met' where analyze said CHECK and suggested running propose."""
    import numpy as np

    import hybridq
    from hybridq import _runtime
    from hybridq.analysis import analyze, judge
    from hybridq.proposal import Evaluator, Target

    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws")
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    xs = [{"x": np.load(p)} for p in sorted((cnn_ws["dir"] / "data").glob("*.npy"))]
    result = analyze(cnn_ws["model"], q, xs)
    out = next(le for le in result.layers if le.tensor in result.outputs)
    fp32, quant = (_runtime.session(str(m), exact_int8=True) for m in (cnn_ws["model"], q))
    a = np.concatenate([fp32.run(None, x)[0].ravel() for x in xs]).astype(np.float64)
    b = np.concatenate([quant.run(None, x)[0].ravel() for x in xs]).astype(np.float64)
    want = (float(a @ b / np.sqrt((a @ a) * (b @ b))), float(10 * np.log10((a @ a) / ((a - b) @ (a - b)))))
    assert out.slices is None and out.pooled == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert abs(out.entire.snr_db - out.pooled[1]) > 1e-3, "the test needs the mean and the pooled figure to differ"
    threshold = (out.entire.snr_db + out.pooled[1]) / 2
    verdict = judge(result, cos_threshold=-1.0, snr_threshold=threshold)
    evaluator = Evaluator(onnx.load(str(cnn_ws["model"])), xs, Target(cosine=None, snr_db=threshold))
    met = evaluator.met(evaluator.score(onnx.load(str(q))))
    assert verdict.ok == met == (out.pooled[1] >= threshold)


def test_the_worst_sample_is_named_on_each_measure_the_verdict_judges(tmp_path) -> None:
    """The sample lowest in cosine need not be lowest in SNR: one whose error is a pure 15 % gain keeps cosine 1 at
    16.5 dB, one with noise at 1 % of its power reaches cosine 0.995 at 20 dB. The verdict names both samples, each
    with the figures numpy computes from ORT's outputs of the two models."""
    from hybridq.report import verdict as verdict_text

    def model(noise: float) -> onnx.ModelProto:  # y = x[:, 0] + noise * x[:, 1]: fp32 with noise 0, "quant" with 1
        nodes = [h.make_node("Gather", ["x", "i0"], ["x0"], name="g0", axis=1), h.make_node("Gather", ["x", "i1"], ["x1"], name="g1", axis=1),
                 h.make_node("Mul", ["x1", "k"], ["e"], name="mul"), h.make_node("Add", ["x0", "e"], ["y"], name="add")]
        inits = [nh.from_array(np.array(0, np.int64), "i0"), nh.from_array(np.array(1, np.int64), "i1"), nh.from_array(np.float32(noise), "k")]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 64])], [h.make_tensor_value_info("y", TP.FLOAT, [1, 64])], inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    rng = np.random.default_rng(3)
    signals = [rng.normal(0, 1, 64) for _ in range(4)]
    errors = [0.02 * rng.normal(0, 1, 64), 0.15 * signals[1], 0.1 * rng.normal(0, 1, 64), 0.01 * signals[3]]
    data = tmp_path / "d"
    data.mkdir()
    for k, (s, e) in enumerate(zip(signals, errors)):
        np.save(data / f"s{k}.npy", np.stack([s, e])[None].astype(np.float32))
    (data / "dataset.txt").write_text("".join(f"s{k}.npy\n" for k in range(4)))
    onnx.save(model(0.0), tmp_path / "f.onnx")
    onnx.save(model(1.0), tmp_path / "q.onnx")
    cos, snr = [], []
    for k in range(4):
        x = np.load(data / f"s{k}.npy")
        r, q = (run(tmp_path / m, {"x": x})[0].astype(np.float64).ravel() for m in ("f.onnx", "q.onnx"))
        cos.append(float(r @ q / np.sqrt((r @ r) * (q @ q))))
        snr.append(float(10 * np.log10((r @ r) / ((r - q) @ (r - q)))))
    by_cos, by_snr = int(np.argmin(cos)), int(np.argmin(snr))
    assert (by_cos, by_snr) == (2, 1)  # the noisy sample and the scaled one

    result = hybridq.analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", data / "dataset.txt")
    out = judge(result).outputs[0]
    assert out["worst_sample"]["index"] == by_cos and out["worst_sample"]["cosine"] == pytest.approx(cos[by_cos], abs=1e-6)
    assert out["worst_sample_by_snr"]["index"] == by_snr and out["worst_sample_by_snr"]["snr_db"] == pytest.approx(snr[by_snr], abs=1e-3)
    text = verdict_text(result)
    assert (f"worst sample by cosine #{by_cos}: cos {cos[by_cos]:.6f}, SNR {snr[by_cos]:.2f} dB, "
            f"by SNR #{by_snr}: cos {cos[by_snr]:.6f}, SNR {snr[by_snr]:.2f} dB") in text


def test_an_output_without_slices_ranks_by_its_own_snr() -> None:
    """Two failing outputs: `seq` (sliced, worst slice 10.1 dB, cos 0.95) and `logits` (2-D, no slices, cos 0.73,
    1.5 dB). The worst output named first is logits: it used to rank after every sliced output, however bad."""
    from hybridq.metrics import SliceMetrics

    r = _result(6, [], out_cos=0.9999)
    seq, logits = r.layers[-2], r.layers[-1]
    seq.entire, seq.slices = _m(0.95, 12.0), SliceMetrics(1, [0.96, 0.95, 0.94], [12.5, 11.0, 10.1])
    logits.entire, logits.shape = _m(0.73, 1.5), (1, 10)
    r.outputs = [seq.tensor, logits.tensor]
    v = judge(r)
    assert [o["tensor"] for o in v.outputs] == [logits.tensor, seq.tensor]
    # an output whose whole tensor is below its worst slice ranks by the whole tensor's SNR
    logits.slices = SliceMetrics(1, [0.999, 0.998], [25.0, 20.0])
    logits.entire = _m(0.98, 11.0)
    assert [o["tensor"] for o in judge(r).outputs] == [seq.tensor, logits.tensor]
    logits.entire = _m(0.98, 9.0)
    assert [o["tensor"] for o in judge(r).outputs] == [logits.tensor, seq.tensor]
