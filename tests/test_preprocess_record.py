"""Preprocessing is recorded once by step1 and read back by step2, analyze and propose (issue 14, item 1).

The model is calibrated on PNG images with ImageNet mean/std; every figure is checked against
onnxruntime runs on inputs preprocessed here with numpy, independently of hybridq's loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import hybridq
from hybridq import api
from hybridq.cli import main
from hybridq.dataset import Preprocess
from hybridq.errors import InputError
from tests import models
from tests.conftest import cosine, run

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
FLAGS = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]


def write_images(directory: Path, n: int, seed: int) -> Path:
    """n smooth 16x16 RGB PNGs (gradients plus noise, 0-255) and a dataset.txt listing them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:16, 0:16]
    names = []
    for i in range(n):
        base = rng.uniform(40, 200, 3) + rng.uniform(-4, 4, 3) * (xx[..., None] + yy[..., None])
        img = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(directory / f"img{i}.png")
        names.append(f"img{i}.png")
    listing = directory / "dataset.txt"
    listing.write_text("\n".join(names) + "\n")
    return listing


def numpy_inputs(listing: Path) -> list[np.ndarray]:
    """The model inputs by hand: (pixels - mean) / std, HWC -> NCHW, batch of 1."""
    out = []
    for line in listing.read_text().split():
        pixels = np.asarray(Image.open(listing.parent / line).convert("RGB"), dtype=np.float32)
        x = (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        out.append(x.transpose(2, 0, 1)[None].astype(np.float32))
    return out


@pytest.fixture
def calibrated(tmp_path: Path) -> dict[str, Path]:
    """residual_cnn calibrated with non-trivial mean/std on images, and a step2 model built from its cfg."""
    model = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), model)
    calib = write_images(tmp_path / "calib", 10, seed=1)
    evals = write_images(tmp_path / "eval", 6, seed=2)
    res = api.step1(model, calib, out=tmp_path / "ws", preprocess=Preprocess(mean=MEAN, std=STD))
    q = tmp_path / "cnn.q.onnx"
    api.step2(res.model, res.data, res.cfg, q)
    return {"model": model, "calib": calib, "eval": evals, "cfg": res.cfg, "data": res.data, "temp": res.model, "q": q, "dir": tmp_path}


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def figures(result) -> dict:
    """Every layer's entire and single metrics, the figures a user reads."""
    return {le.tensor: (le.entire.to_dict(), le.single.to_dict() if le.single else None) for le in result.layers}


def test_step2_model_metadata_holds_the_preprocessing_and_input_range(calibrated):
    props = {p.key: p.value for p in onnx.load(str(calibrated["q"])).metadata_props}
    pre = json.loads(props["hybridq.preprocess"])
    assert pre["mean"] == pytest.approx(MEAN) and pre["std"] == pytest.approx(STD) and pre["color"] == "rgb"
    ranges = json.loads(props["hybridq.input_ranges"])
    xs = np.concatenate([x.ravel() for x in numpy_inputs(calibrated["calib"])]).astype(np.float64)
    assert ranges["x"]["min"] == pytest.approx(xs.min(), rel=1e-5) and ranges["x"]["max"] == pytest.approx(xs.max(), rel=1e-5)
    assert ranges["x"]["mean"] == pytest.approx(xs.mean(), rel=1e-4, abs=1e-6)
    assert ranges["x"]["std"] == pytest.approx(xs.std(), rel=1e-4)
    # the cfg header and the .data meta carry the same record
    from hybridq.artifacts import read_meta
    from hybridq.config import load_cfg

    assert dict(load_cfg(calibrated["cfg"]).header["preprocess"]) == pre
    assert read_meta(calibrated["data"])["preprocess"] == pre


@pytest.mark.parametrize("quant", ["cfg", "q"])
def test_analyze_without_flags_equals_with_flags_and_numpy(calibrated, quant):
    plain = api.analyze(calibrated["model"], calibrated[quant], calibrated["eval"])
    flagged = api.analyze(calibrated["model"], calibrated[quant], calibrated["eval"], preprocess={"mean": MEAN, "std": STD})
    assert figures(plain) == figures(flagged)
    assert plain.warnings == []
    # independent: both models in onnxruntime on inputs preprocessed with numpy, mean cosine of the output
    cos = [cosine(run(calibrated["model"], {"x": x})[0], run(calibrated["q"], {"x": x})[0]) for x in numpy_inputs(calibrated["eval"])]
    logits = next(le for le in plain.layers if le.tensor == "logits")
    assert logits.entire.cosine == pytest.approx(float(np.mean(cos)), abs=1e-5)
    # what the issue saw: without the record the figures differ (forced to no mean/std), and the input is flagged
    wrong = api.analyze(calibrated["model"], calibrated[quant], calibrated["eval"], preprocess=Preprocess(), force_preprocess=True)
    assert figures(wrong) != figures(plain)
    assert len(wrong.warnings) == 1 and "input 'x'" in wrong.warnings[0] and "wide" in wrong.warnings[0]


def test_propose_without_flags_equals_with_flags(calibrated, tmp_path):
    copies = []
    for name in ("plain", "flagged"):
        shutil.copytree(calibrated["dir"] / "ws", tmp_path / name)
        copies.append(tmp_path / name / "cnn.quantization.cfg")
    opts = api.ProposalOptions(samples=6)
    plain, _ = api.propose_cfg(copies[0], calibrated["eval"], options=opts)
    flagged, _ = api.propose_cfg(copies[1], calibrated["eval"], options=opts, preprocess=Preprocess(mean=MEAN, std=STD))
    for attr in ("baseline", "predicted", "measured"):
        assert getattr(plain, attr).to_dict() == getattr(flagged, attr).to_dict()
    assert plain.layers == flagged.layers and plain.warnings == []
    assert copies[0].read_text() == copies[1].read_text()
    # independent: the baseline is the cfg as step1 wrote it, i.e. the step2 model; its output cosine over the
    # samples the proposal scores on (all outputs as one vector), by numpy/onnxruntime
    xs = numpy_inputs(calibrated["eval"])[: opts.samples]
    ref = np.concatenate([run(calibrated["model"], {"x": x})[0].ravel() for x in xs])
    quant = np.concatenate([run(calibrated["q"], {"x": x})[0].ravel() for x in xs])
    assert plain.baseline.outputs["logits"].cosine == pytest.approx(cosine(ref, quant), abs=1e-4)


def test_conflicting_flag_is_refused_with_exit_2(capsys, calibrated):
    code, out, err = cli(capsys, "analyze", calibrated["model"], calibrated["cfg"], "-d", calibrated["eval"], "--mean", "127.5")
    assert code == 2, err
    assert "Traceback" not in err and str(calibrated["cfg"]) in err
    assert "mean: recorded 123.675,116.28,103.53, given 127.5" in err and "--force-preprocess" in err
    code, out, err = cli(capsys, "propose", "--cfg", calibrated["cfg"], "-d", calibrated["eval"], "--color", "bgr")
    assert code == 2 and "color: recorded rgb, given bgr" in err
    with pytest.raises(InputError, match="std: recorded"):
        api.analyze(calibrated["model"], calibrated["q"], calibrated["eval"], preprocess=Preprocess(mean=MEAN, std=(1.0,)))


def test_agreeing_flags_are_fine_and_forced_flags_warn(capsys, calibrated):
    code, out, err = cli(capsys, "analyze", calibrated["model"], calibrated["q"], "-d", calibrated["eval"], *FLAGS, "--color", "rgb")
    assert code == 0, err
    assert "warning" not in err
    code, out, err = cli(capsys, "analyze", calibrated["model"], calibrated["q"], "-d", calibrated["eval"], "--mean", "0", "--std", "1",
                         "--force-preprocess")
    assert code == 0, err
    assert "warning: input 'x'" in err and "calibrated" in err


def test_without_a_record_flags_are_used_as_given(calibrated):
    # the fp32 model as "quantized" model: no hybridq metadata, so the flags decide (as for an ORT-quantized model)
    res = api.analyze(calibrated["model"], calibrated["model"], calibrated["eval"], preprocess={"mean": MEAN, "std": STD})
    logits = next(le for le in res.layers if le.tensor == "logits")
    assert logits.entire.cosine == pytest.approx(1.0, abs=1e-6) and res.warnings == []


def test_preprocess_round_trips_through_dict():
    pre = Preprocess(mean=MEAN, std=(58.0,), color="bgr", layout="nhwc", resize="letterbox")
    assert Preprocess.from_dict(pre.to_dict(), "here") == pre
    assert Preprocess(mean=(127.5,)).differences(Preprocess(mean=(127.5, 127.5, 127.5))) == []
    with pytest.raises(hybridq.errors.DatasetError, match="Did you mean"):
        Preprocess.from_dict({"meen": [1]}, "here")


def test_rknn_facade_reads_the_preprocessing_from_a_loaded_model(calibrated):
    from hybridq.rknn import RKNN

    # a deploy-only script: no config(), the exported (step2) model's metadata supplies mean/std
    rknn = RKNN()
    assert rknn.load_rknn(str(calibrated["q"])) == 0 and rknn.init_runtime() == 0
    listing = calibrated["eval"]
    first = listing.parent / listing.read_text().split()[0]
    raw = np.asarray(Image.open(first).convert("RGB"))
    got = rknn.inference(inputs=[raw])[0]
    rknn.release()
    np.testing.assert_allclose(got, run(calibrated["q"], {"x": numpy_inputs(listing)[0]})[0], rtol=1e-5, atol=1e-5)


def test_an_edited_preprocess_header_is_refused(capsys, calibrated):
    cfg = calibrated["cfg"]
    text = cfg.read_text()
    assert "- 123.675" in text or "123.675," in text
    cfg.write_text(text.replace("123.675", "127.5", 1))
    code, out, err = cli(capsys, "step2", calibrated["temp"], calibrated["data"], cfg, "-o", calibrated["dir"] / "edited.onnx")
    assert code == 2 and "was edited" in err and "mean: calibrated with 123.675,116.28,103.53, header says 127.5" in err
    assert not (calibrated["dir"] / "edited.onnx").exists()


def test_npy_calibration_records_no_preprocessing_but_the_input_range(cnn_ws):
    from hybridq.recorded import read_record

    res = api.step1(cnn_ws["model"], cnn_ws["dataset"])
    record = read_record(res.cfg)
    assert record.preprocess is None  # mean/std never applied to .npy files: flags stay free
    xs = np.concatenate([np.load(cnn_ws["dataset"].parent / p).ravel() for p in cnn_ws["dataset"].read_text().splitlines() if p and not p.startswith("#")])
    assert record.input_ranges["x"]["min"] == pytest.approx(float(xs.min())) and record.input_ranges["x"]["max"] == pytest.approx(float(xs.max()))
    out = api.analyze(cnn_ws["model"], res.cfg, cnn_ws["dataset"], preprocess={"mean": (1.0,), "layout": "nchw"})
    assert out.warnings == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_batch_figures_match_float64_numpy(dtype):
    """Min, max, sum and sum of squares of a batch (non-contiguous here) as numpy computes them on a float64 copy."""
    from hybridq.recorded import ROWS_KEY, batch_figures

    x = (np.random.default_rng(0).normal(3.0, 40.0, (2, 3, 17, 19)).astype(dtype)).transpose(0, 2, 3, 1)
    ref = x.astype(np.float64)
    lo, hi, s, ss, n = batch_figures({"x": x, "ids": np.arange(4)})["x"]
    assert (lo, hi, n) == (ref.min(), ref.max(), ref.size)
    assert (s, ss) == (ref.sum(), np.square(ref).sum())  # the same float64 sums, bit for bit
    # no float input figured, only the batch's rows: axis 0 of its first input, whatever its dtype
    assert batch_figures({"ids": np.arange(4), "e": np.zeros((0, 3), np.float32)}) == {ROWS_KEY: [4.0]}


def test_cli_color_comes_from_the_workspace_and_the_record_when_not_given(capsys, tmp_path: Path) -> None:
    """`color: bgr` in the workspace's hybridq.yaml is what step1 uses when --color is not given (the CLI passed rgb as
    if given), and analyze and propose of that run need no option (they were refused: 'recorded bgr, given rgb')."""
    model = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), model)
    calib = write_images(tmp_path / "calib", 6, seed=1)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hybridq.yaml").write_text("color: bgr\n")
    code, _, err = cli(capsys, "step1", model, "-d", calib, "--out", ws, "-q")
    assert code == 0, err
    cfg = ws / "cnn.quantization.cfg"
    assert "color: bgr" in cfg.read_text()
    assert cli(capsys, "analyze", model, cfg, "-d", calib, "-q")[0] == 0
    assert cli(capsys, "propose", "--cfg", cfg, "-d", calib, "-q")[0] == 0


def test_a_relative_hook_is_recorded_absolute(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--preprocess hooks/pre.py:pre` given relative to step1's directory is recorded as an absolute path, so analyze
    run from another directory finds it with no option (it failed: 'module does not exist'), and the same hook given
    by its absolute path agrees with the record."""
    proj, other = tmp_path / "proj", tmp_path / "other"
    (proj / "hooks").mkdir(parents=True)
    other.mkdir()
    onnx.save(models.conv_relu(), proj / "conv.onnx")
    for i in range(2):
        np.save(proj / f"s{i}.npy", np.random.default_rng(i).normal(size=(3, 16, 16)).astype(np.float32))
    (proj / "ds.txt").write_text("s0.npy\ns1.npy\n")
    (proj / "hooks" / "pre.py").write_text("import numpy as np\n\ndef pre(path, spec):\n    return np.load(path) * 0.5\n")
    monkeypatch.chdir(proj)
    assert cli(capsys, "step1", "conv.onnx", "-d", "ds.txt", "--preprocess", "hooks/pre.py:pre", "--out", "o", "-q")[0] == 0
    cfg = proj / "o" / "conv.quantization.cfg"
    assert f"hook: {proj / 'hooks' / 'pre.py'}:pre" in cfg.read_text()
    monkeypatch.chdir(other)
    args = ["analyze", proj / "conv.onnx", cfg, "-d", proj / "ds.txt", "-q"]
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, *args, "--preprocess", f"{proj / 'hooks' / 'pre.py'}:pre")[0] == 0
