"""`from hybridq.rknn import RKNN`: Rockchip-style scripts with only the import line changed.

The scripts below follow RKNN-Toolkit2's examples/functions/hybrid_quant/step1.py,
step2.py and examples/functions/accuracy_analysis/test.py: same calls, same
argument names, same `if ret != 0` checks. Each runs in a fresh directory
(RKNN writes the step1 artifacts into the current directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from hybridq.rknn import RKNN
from tests import models
from tests.conftest import cosine, run

MEAN = [[123.675, 116.28, 103.53]]
STD = [[58.395, 57.12, 57.375]]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cnn.onnx (input x [1,3,16,16]) and dataset.txt of 8 PNG images, as the current directory."""
    monkeypatch.chdir(tmp_path)
    onnx.save(models.residual_cnn(), "cnn.onnx")
    rng = np.random.default_rng(0)
    names = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f"img{i}.png")
        names.append(f"img{i}.png")
    Path("dataset.txt").write_text("\n".join(names) + "\n")
    return tmp_path


def fp32_logits(image: np.ndarray) -> np.ndarray:
    """The fp32 model on an HWC uint8 image normalised by hand: (x - mean) / std, HWC -> NCHW."""
    x = ((image.astype(np.float32) - np.float32(MEAN[0])) / np.float32(STD[0])).transpose(2, 0, 1)[None]
    return run("cnn.onnx", {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


def step1_script(**step1_kwargs) -> int:
    """Rockchip's step1.py, for ONNX."""
    rknn = RKNN(verbose=True)
    rknn.config(mean_values=MEAN, std_values=STD, target_platform="rk3588")
    ret = rknn.load_onnx(model="./cnn.onnx")
    if ret != 0:
        return ret
    ret = rknn.hybrid_quantization_step1(dataset="./dataset.txt", proposal=False, **step1_kwargs)
    rknn.release()
    return ret


def step2_script(analyse: bool = True) -> tuple[int, list[np.ndarray] | None]:
    """Rockchip's step2.py: a new RKNN object, step2, export, accuracy analysis, runtime, inference."""
    rknn = RKNN(verbose=True)
    ret = rknn.hybrid_quantization_step2(model_input="./cnn.model", data_input="./cnn.data", model_quantization_cfg="./cnn.quantization.cfg")
    if ret != 0:
        return ret, None
    ret = rknn.export_rknn("./cnn.rknn")
    if ret != 0:
        return ret, None
    ret = rknn.accuracy_analysis(inputs=["./img1.png"], output_dir=None) if analyse else 0
    if ret != 0:
        return ret, None
    img = np.asarray(Image.open("./img1.png"))
    ret = rknn.init_runtime()
    if ret != 0:
        return ret, None
    outputs = rknn.inference(inputs=[img])
    rknn.release()
    return 0, outputs


def test_step1_twice_in_one_directory_never_changes_the_working_directory(ws, monkeypatch):
    """The second step1 overwrites cnn.data where the first left it, without a process-wide chdir."""
    def no_chdir(path):
        raise AssertionError(f"os.chdir({path!r}) called")

    monkeypatch.setattr(os, "chdir", no_chdir)
    assert step1_script() == 0
    first = Path("cnn.data").read_bytes()
    assert first and step1_script() == 0
    assert Path("cnn.data").read_bytes() == first and Path.cwd() == ws


def test_hybrid_quant_scripts_step1_edit_step2(ws, capsys):
    assert step1_script() == 0
    # RKNN writes the three artifacts into the current directory, named after the model.
    assert {"cnn.model", "cnn.data", "cnn.quantization.cfg"} <= set(os.listdir("."))
    err = capsys.readouterr().err
    assert "I config: target_platform='rk3588': settings target npu" in err
    assert "target: npu" in Path("cnn.quantization.cfg").read_text()
    # The edit Rockchip's step1.py prints as its tip: output tensor name -> float16.
    cfg = Path("cnn.quantization.cfg")
    text = cfg.read_text()
    assert "custom_quantize_layers: {}\n" in text
    cfg.write_text(text.replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  c3: float16\n"))

    ret, outputs = step2_script()
    assert ret == 0
    err = capsys.readouterr().err
    assert "I hybrid_quantization_step2: custom_quantize_layers 'c3': float16 -> node 'conv3' runs float16 (output tensor)" in err
    assert "W export_rknn: ./cnn.rknn is an ONNX model" in err
    # The edit took effect: conv3 runs in fp16 between Casts, with fp16 weights; conv2 stays int8.
    q = onnx.load("cnn.rknn")
    names = {n.name: n.op_type for n in q.graph.node}
    assert names.get("conv3_Cast_input0") == "Cast" and names.get("conv3_Cast_output0") == "Cast"
    assert any(i.name == "w3_fp16" and i.data_type == onnx.TensorProto.FLOAT16 for i in q.graph.initializer)
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[0] == "r1_dequantized" and conv2.input[1].endswith("_dequantized")
    # inference() normalised the raw uint8 HWC image with the cfg's mean/std (step2 ran without config()).
    assert outputs is not None and outputs[0].shape == (1, 10)
    assert cosine(outputs[0], fp32_logits(np.asarray(Image.open("img1.png")))) > 0.99


def test_custom_hybrid_marks_every_layer_between_the_tensors(ws):
    # r1 (relu1's output) -> res (the residual Add): conv2 (BN folded into it), relu2, conv3, add.
    assert step1_script(custom_hybrid=[["r1", "res"]]) == 0
    from hybridq.config import load_cfg

    assert load_cfg("cnn.quantization.cfg").custom == {"conv2": "float16", "relu2": "float16", "conv3": "float16", "add": "float16"}
    assert "# custom_hybrid [r1, res]" in Path("cnn.quantization.cfg").read_text()
    ret, outputs = step2_script(analyse=False)
    assert ret == 0
    q = onnx.load("cnn.rknn")
    casts = {n.name for n in q.graph.node if n.op_type == "Cast"}
    assert {"conv2_Cast_input0", "conv3_Cast_output0", "add_Cast_output0"} <= casts
    # The layers outside the pair keep their default: fc is still quantized.
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("flat") for n in q.graph.node)
    assert cosine(outputs[0], fp32_logits(np.asarray(Image.open("img1.png")))) > 0.99


def test_custom_hybrid_accepts_a_tensor_the_temp_model_fused_away(ws, capsys):
    # c2 (conv2's output before BN) does not exist once BN is folded; its producer conv2 does.
    assert step1_script(custom_hybrid=[["c2", "c3"]]) == 0
    from hybridq.config import load_cfg

    assert load_cfg("cnn.quantization.cfg").custom == {"relu2": "float16", "conv3": "float16"}
    assert "'c2' was fused into 'conv2'" in capsys.readouterr().err


def test_build_accuracy_analysis_export_as_rockchip_example(ws, capsys):
    rknn = RKNN(verbose=True)
    rknn.config(mean_values=MEAN, std_values=STD)
    assert rknn.load_onnx(model="cnn.onnx") == 0
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == 0
    assert rknn.accuracy_analysis(inputs=["./img0.png"], output_dir="./snapshot") == 0
    assert rknn.export_rknn("./cnn.rknn") == 0
    rknn.release()
    # build() writes nothing into the current directory; the snapshot has both layouts.
    assert not any(Path(p).exists() for p in ("cnn.model", "cnn.data", "cnn.quantization.cfg"))
    snap = Path("snapshot")
    assert {"golden", "simulator", "map_name_to_file.txt", "fp32", "quant", "manifest.json", "error_analysis.txt"} <= set(os.listdir(snap))
    assert "[Gemm] fc [logits] uint8" in (snap / "error_analysis.txt").read_text()  # node [tensor] precision
    assert "[Gemm] fc [logits] uint8" in capsys.readouterr().out  # the table is printed, as RKNN does
    # golden/npy/ and simulator/npy/ hold the first (only) sample of hybridq's fp32/ and quant/ arrays.
    for sub, side in (("golden", "fp32"), ("simulator", "quant")):
        assert sorted(os.listdir(snap / side)) == sorted(os.listdir(snap / sub / "npy"))
        np.testing.assert_array_equal(np.load(snap / sub / "npy" / "r2.npy"), np.load(snap / side / "r2.npy")[0])
    # What Rockchip's accuracy_analysis example reads: np.genfromtxt of the output, one value per line.
    golden = np.genfromtxt(snap / "golden" / "logits.txt")
    simulator = np.genfromtxt(snap / "simulator" / "logits.txt")
    assert golden.shape == simulator.shape == (10,)
    np.testing.assert_allclose(golden, fp32_logits(np.asarray(Image.open("img0.png"))).ravel(), atol=2e-6)
    np.testing.assert_allclose(simulator, run("cnn.rknn", {"x": _normalised("img0.png")})[0].ravel(), atol=2e-6)
    assert cosine(golden, simulator) > 0.99


def _normalised(path: str) -> np.ndarray:
    img = np.asarray(Image.open(path)).astype(np.float32)
    return np.ascontiguousarray(((img - np.float32(MEAN[0])) / np.float32(STD[0])).transpose(2, 0, 1)[None])


def test_inference_nchw_and_nhwc_agree_and_load_rknn_reads_the_export(ws):
    rknn = RKNN()
    rknn.config(mean_values=MEAN, std_values=STD)
    rknn.load_onnx(model="cnn.onnx")
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == 0
    assert rknn.export_rknn("cnn.rknn") == 0
    assert rknn.init_runtime() == 0
    img = np.asarray(Image.open("img2.png"))
    nhwc = rknn.inference(inputs=[img])
    nchw = rknn.inference(inputs=[img.transpose(2, 0, 1)], data_format=["nchw"])
    np.testing.assert_array_equal(nhwc[0], nchw[0])
    rknn.release()
    # A script that only deploys: load_rknn + init_runtime + inference on the exported file.
    again = RKNN()
    again.config(mean_values=MEAN, std_values=STD)
    assert again.load_rknn("cnn.rknn") == 0 and again.init_runtime(target="rk3588") == 0
    np.testing.assert_array_equal(again.inference(inputs=[img])[0], nhwc[0])
    again.release()


def test_load_onnx_outputs_cuts_the_model(ws):
    rknn = RKNN()
    assert rknn.load_onnx(model="cnn.onnx", outputs=["gap"]) == 0
    assert rknn.build(do_quantization=False) == 0
    assert rknn.init_runtime() == 0
    out = rknn.inference(inputs=[np.zeros((16, 16, 3), np.uint8)])
    assert [o.shape for o in out] == [(1, 16, 1, 1)]
    rknn.release()


def test_step1_rerun_keeps_the_edited_cfg_as_backup(ws):
    assert step1_script() == 0
    cfg = Path("cnn.quantization.cfg")
    cfg.write_text(cfg.read_text().replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  conv3: float16\n"))
    assert step1_script() == 0
    backups = [p for p in os.listdir(".") if p.startswith("cnn.quantization.cfg.") and p.endswith(".bak")]
    assert len(backups) == 1 and "conv3: float16" in Path(backups[0]).read_text()


# ---------------------------------------------------------------------- common mistakes


def test_no_model_loaded(ws, capsys):
    rknn = RKNN()
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == -1
    assert rknn.hybrid_quantization_step1(dataset="./dataset.txt") == -1
    err = capsys.readouterr().err
    assert "E build: no model is loaded; call rknn.load_onnx(model='model.onnx') first." in err
    assert "E hybrid_quantization_step1: no model is loaded" in err
    assert rknn.init_runtime() == -1
    assert rknn.inference(inputs=[np.zeros((16, 16, 3), np.uint8)]) is None
    err = capsys.readouterr().err
    assert "E init_runtime: no model is built" in err and "E inference: the runtime is not initialised" in err
    assert "Traceback" not in err
    rknn.release()


def test_missing_model_and_missing_dataset(ws, capsys):
    rknn = RKNN()
    assert rknn.load_onnx(model="./missing.onnx") == -1
    assert "E load_onnx:" in capsys.readouterr().err
    assert rknn.load_onnx(model="cnn.onnx") == 0
    assert rknn.hybrid_quantization_step1(dataset="./nothere.txt") == -1
    err = capsys.readouterr().err
    assert "E hybrid_quantization_step1: dataset" in err and "nothere.txt" in err and "does not exist" in err
    assert rknn.build(do_quantization=True) == -1
    assert "E build: do_quantization=True needs a dataset" in capsys.readouterr().err
    Path("bad.txt").write_text("img0.png\nimg_missing.png\n")
    assert rknn.build(do_quantization=True, dataset="bad.txt") == -1
    err = capsys.readouterr().err
    assert "line 2" in err and "img_missing.png" in err
    rknn.release()


def test_bad_cfg_is_named_with_its_line(ws, capsys):
    assert step1_script() == 0
    cfg = Path("cnn.quantization.cfg")
    good = cfg.read_text()
    cfg.write_text(good.replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  conv_3: float16\n"))
    rknn = RKNN()
    assert rknn.hybrid_quantization_step2("./cnn.model", "./cnn.data", "./cnn.quantization.cfg") == -1
    err = capsys.readouterr().err
    assert "E hybrid_quantization_step2: cnn.quantization.cfg:" in err and "'conv_3'" in err and "Did you mean: 'conv3'" in err
    cfg.write_text(good.replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  conv3 float16\n  x: [\n"))
    assert rknn.hybrid_quantization_step2("./cnn.model", "./cnn.data", "./cnn.quantization.cfg") == -1
    assert "YAML syntax error" in capsys.readouterr().err
    assert rknn.export_rknn("x.rknn") == -1 and not Path("x.rknn").exists()
    rknn.release()


def test_config_rejects_unknown_options_and_values(capsys):
    rknn = RKNN()
    assert rknn.config(mean_values=MEAN, quantized_algorithem="normal") == -1
    assert "E config: unknown option 'quantized_algorithem'. Did you mean: 'quantized_algorithm'," in capsys.readouterr().err
    assert rknn.config(quantized_dtype="w4a16") == -1
    assert "4-bit weights per layer" in (err := " ".join(capsys.readouterr().err.split())) and "custom_quantize_layers" in err and "no QDQ form" not in err
    assert rknn.config(quantized_algorithm="kl_divergance") == -1
    assert "Did you mean: 'kl_divergence'" in capsys.readouterr().err
    assert rknn.config(quantized_method="group32") == -1
    assert rknn.config(std_values=[[0, 1, 1]]) == -1
    # NPU-only options: accepted, reported once per RKNN object.
    assert rknn.config(target_platform="rk3588", optimization_level=2) == 0
    assert rknn.config(target_platform="rk3588", optimization_level=2) == 0
    err = capsys.readouterr().err
    assert err.count("optimization_level=2 only matters") == 1
    assert rknn._settings().target == "npu"  # target_platform selects the npu target (SPEC 11)
    assert rknn.config() == 0 and rknn._settings().target == "cpu"
    # RKNN-Toolkit2's names map onto hybridq's settings.
    assert rknn.config(quantized_dtype="w16a16i", quantized_algorithm="mmse", quantized_method="layer", quant_img_RGB2BGR=True) == 0
    s = rknn._settings()
    assert (s.dtype, s.weight_dtype, s.algorithm, s.qmethod) == ("int16", "int16", "mse", "layer")
    assert rknn._preprocess(1).color == "bgr"
    rknn.release()


def test_custom_hybrid_unknown_tensor(ws, capsys):
    assert step1_script(custom_hybrid=[["r_1", "res"]]) == -1
    err = capsys.readouterr().err
    assert "E hybrid_quantization_step1: custom_hybrid input tensor 'r_1' is not a tensor of the model. Did you mean:" in err
    assert step1_script(custom_hybrid=[["res", "r1"]]) == -1
    assert "no layer lies on a path from 'res' to 'r1'" in capsys.readouterr().err


def test_proposal_and_auto_hybrid_use_hybridqs_proposal(ws, capsys):
    # A target the int8 model cannot reach, so the proposal must move layers to float_dtype (float16, as RKNN).
    rknn = RKNN(verbose=True)
    rknn.config(mean_values=MEAN, std_values=STD, auto_hybrid_cos_thresh=0.9999999)
    rknn.load_onnx(model="cnn.onnx")
    assert rknn.hybrid_quantization_step1(dataset="./dataset.txt", proposal=True, proposal_dataset_size=4) == 0
    from hybridq.config import load_cfg

    chosen = load_cfg("cnn.quantization.cfg").custom
    assert chosen and set(chosen.values()) == {"float16"}
    err = capsys.readouterr().err
    assert "I hybrid_quantization_step1: proposal:" in err and "float layers" in err
    assert rknn.build(do_quantization=True, dataset="./dataset.txt", auto_hybrid=True) == 0
    assert "I build: proposal:" in capsys.readouterr().err
    assert rknn.hybrid_quantization_step1(dataset="./dataset.txt", proposal=True, proposal_dataset_size=0) == -1
    assert "proposal_dataset_size must be a positive integer" in capsys.readouterr().err
    rknn.release()


def test_unsupported_rknn_methods_fail_clearly(capsys):
    rknn = RKNN()
    assert rknn.load_tflite(model="m.tflite") == -1
    assert "E load_tflite: load_tflite is not available in hybridq: hybridq reads ONNX only" in capsys.readouterr().err
    with pytest.raises(AttributeError, match="Did you mean: 'load_onnx'"):
        rknn.load_onx  # noqa: B018
    rknn.release()
    assert rknn.config() == -1
    assert "E config: this RKNN object was released; create a new one with RKNN()." in capsys.readouterr().err


def _workspace_state() -> dict[str, bytes]:
    """Every file of the current directory, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(".").iterdir()) if p.is_file()}


def test_step1_with_a_misspelled_custom_hybrid_tensor_changes_nothing(ws, capsys):
    # A workspace from an earlier run, its cfg edited by hand: a failed step1 must leave all of it as it was.
    assert step1_script() == 0
    cfg = Path("cnn.quantization.cfg")
    cfg.write_text(cfg.read_text().replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  conv3: float16\n"))
    before = _workspace_state()
    capsys.readouterr()
    assert step1_script(custom_hybrid=[["r_1", "res"]]) == -1
    err = capsys.readouterr().err
    assert "E hybrid_quantization_step1: custom_hybrid input tensor 'r_1' is not a tensor of the model. Did you mean:" in err
    assert "I hybrid_quantization_step1: wrote" not in err and "Traceback" not in err
    assert _workspace_state() == before  # no new .model/.data/.cfg, no .bak
    # A pair with no layer between its tensors is found before anything is written too.
    assert step1_script(custom_hybrid=[["res", "r1"]]) == -1
    assert "no layer lies on a path from 'res' to 'r1'" in capsys.readouterr().err
    assert step1_script(custom_hybrid=["r1"]) == -1
    assert "custom_hybrid must be a list of [input_tensor, output_tensor] pairs" in capsys.readouterr().err
    assert _workspace_state() == before


def test_failed_load_build_and_step2_keep_the_loaded_model_and_the_build(ws, capsys):
    rknn = RKNN()
    rknn.config(mean_values=MEAN, std_values=STD)
    assert rknn.load_onnx(model="cnn.onnx") == 0
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == 0
    assert rknn.export_onnx("first.onnx") == 0
    Path("bad.txt").write_text("img0.png\nimg_missing.png\n")
    assert rknn.build(do_quantization=True, dataset="bad.txt") == -1
    assert rknn.build(do_quantization=True) == -1
    assert rknn.hybrid_quantization_step2("./nothere.model", "./nothere.data", "./nothere.cfg") == -1
    assert rknn.load_onnx(model="cnn.onnx", outputs=["no_such_tensor"]) == -1
    err = capsys.readouterr().err
    assert err.count("E ") == 4 and "Traceback" not in err
    # Each failed call returned -1 and changed nothing: the first build is still the one exported and run.
    assert rknn.export_onnx("again.onnx") == 0
    assert Path("again.onnx").read_bytes() == Path("first.onnx").read_bytes()
    assert rknn.init_runtime() == 0 and rknn.inference(inputs=[np.zeros((16, 16, 3), np.uint8)])[0].shape == (1, 10)
    # ... and the loaded model is still the whole cnn.onnx, not a cut of it.
    assert rknn.build(do_quantization=False) == 0 and rknn.init_runtime() == 0
    assert rknn.inference(inputs=[np.zeros((16, 16, 3), np.uint8)])[0].shape == (1, 10)
    rknn.release()


@pytest.mark.speed_check
def test_build_where_int8_does_not_pay_says_so_and_export_says_float(ws, capsys, monkeypatch):
    # This CPU "times" the int8 model slower than fp32 (stubbed as tests/test_speedcheck.py does): step1 keeps it float.
    from hybridq import speedcheck

    monkeypatch.setattr(speedcheck, "time_pair", lambda fp32, int8, feed, threads, outputs=None, window=None: (1.0, 1.1))
    rknn = RKNN()  # not verbose: W lines are printed anyway
    rknn.config(mean_values=MEAN, std_values=STD)
    assert rknn.load_onnx(model="cnn.onnx") == 0
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == 0
    assert rknn.export_rknn("./cnn.rknn") == 0
    err = capsys.readouterr().err
    assert ("W build: int8 was not applied: int8 is slower than fp32 for this model on this CPU (1 thread: 1.1 ms int8 vs 1 ms fp32): "
            "kept 3 layers float in the cfg;") in err
    assert "From a script: rknn.config(..., speed_check=False) quantizes anyway" in err
    assert ("W export_rknn: ./cnn.rknn is a float ONNX model (no quantization operators, opset 13), not an RKNN model" in err
            and "QDQ" not in err)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load("cnn.rknn").graph.node}
    # step1 says the same; with speed_check=False (hybridq's option) the model is quantized and exported as QDQ.
    assert rknn.hybrid_quantization_step1(dataset="./dataset.txt") == 0
    assert "W hybrid_quantization_step1: int8 was not applied: int8 is slower than fp32" in capsys.readouterr().err
    assert rknn.config(mean_values=MEAN, std_values=STD, speed_check=False) == 0
    assert rknn.build(do_quantization=True, dataset="./dataset.txt") == 0 and rknn.export_rknn("./cnn.rknn") == 0
    err = capsys.readouterr().err
    assert "int8 was not applied" not in err and "W export_rknn: ./cnn.rknn is an ONNX model (QDQ, opset 13)" in err
    assert rknn.config(speed_check="no") == -1
    assert "E config: speed_check must be True or False, got 'no'." in capsys.readouterr().err
    rknn.release()


def test_step1_notes_and_warnings_are_logged(tmp_path, monkeypatch, capsys):
    # The default int8 model of this classifier answers one class everywhere: step1 warns (tests/test_default_check.py).
    from tests.test_default_check import _collapsing_classifier

    monkeypatch.chdir(tmp_path)
    onnx.save(_collapsing_classifier(), "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (32, 8)}, 4)
    rknn = RKNN(verbose=True)
    assert rknn.load_onnx(model="m.onnx") == 0
    assert rknn.build(do_quantization=True, dataset=str(listing)) == 0
    err = capsys.readouterr().err
    assert "W build: the default int8 model is far from fp32 on the first calibration sample (prob: cosine" in err
    assert "I build: note: speed check: the int8 model is faster than fp32 on this CPU" in err  # conftest's _int8_pays
    assert rknn.hybrid_quantization_step1(dataset=str(listing)) == 0
    assert "W hybrid_quantization_step1: the default int8 model is far from fp32" in capsys.readouterr().err
    rknn.release()


# Tensor names as PaddlePaddle/paddle2onnx exports write them, and two that share RKNN's file name.
RENAMED = {"r1": "block/relu.out", "r2": "relu_2.out", "c3": "conv_3.tmp_0", "res": "p2o.Add.19", "gap": "relu_2_out"}


def _renamed_cnn() -> onnx.ModelProto:
    m = models.residual_cnn()
    for node in m.graph.node:
        for field in (node.input, node.output):
            names = [RENAMED.get(t, t) for t in field]
            del field[:]
            field.extend(names)
    onnx.checker.check_model(m)
    return m


def test_accuracy_analysis_writes_rknns_folder_layout(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from hybridq.dumps import read_name_map
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    onnx.save(_renamed_cnn(), "cnn.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 8)
    rknn = RKNN()
    assert rknn.load_onnx(model="cnn.onnx") == 0
    assert rknn.build(do_quantization=True, dataset=str(listing)) == 0
    assert rknn.accuracy_analysis(inputs=["data/x_0.npy"], output_dir="./snap") == 0
    assert rknn.export_onnx("q.onnx") == 0
    rknn.release()
    snap = Path("snap")
    # map_name_to_file.txt: every analysed tensor in graph order, RKNN's fixed-width table, '/' and '.' -> '_'.
    table = read_name_map(snap / "map_name_to_file.txt")
    assert list(table) == list(json.loads((snap / "manifest.json").read_text())["tensors"])
    assert table["block/relu.out"] == "block_relu_out" and table["p2o.Add.19"] == "p2o_Add_19" and table["logits"] == "logits"
    assert table["relu_2.out"] == "relu_2_out" and table["relu_2_out"] == "relu_2_out_2"  # the later name gives way
    lines = (snap / "map_name_to_file.txt").read_text().splitlines()
    assert lines[0] == "layer_name".ljust(44) + "file_name" and set(lines[1]) == {"-"}
    assert "p2o.Add.19".ljust(44) + "p2o_Add_19.txt" in lines
    # golden/NAME.txt and golden/npy/NAME.npy (simulator/ the same): nothing else directly in the trees.
    x = np.load("data/x_0.npy")
    fp32_out, quant_out = run("cnn.onnx", {"x": x})[0], run("q.onnx", {"x": x})[0]
    for tree, hybridq_side, logits in (("golden", "fp32", fp32_out), ("simulator", "quant", quant_out)):
        assert sorted(p.name for p in (snap / tree).iterdir()) == sorted([f"{s}.txt" for s in table.values()] + ["npy"])
        assert sorted(p.name for p in (snap / tree / "npy").iterdir()) == sorted(f"{s}.npy" for s in table.values())
        for name, stem in table.items():
            arr = np.load(snap / tree / "npy" / f"{stem}.npy")
            # float32 in the model tensor's own shape: hybridq's snapshot stacks samples on axis 0, RKNN's does not
            assert arr.dtype == np.float32
            np.testing.assert_array_equal(arr, np.load(snap / snapshot_file(snap, name, hybridq_side))[0])
            text = (snap / tree / f"{stem}.txt").read_text().splitlines()
            assert text == ["%f" % v for v in arr.ravel().tolist()]  # one %f per line, flattened NCHW
        assert np.load(snap / tree / "npy" / "block_relu_out.npy").shape == (1, 16, 16, 16)
        assert np.load(snap / tree / "npy" / "relu_2_out_2.npy").shape == (1, 16, 1, 1)
        np.testing.assert_allclose(np.load(snap / tree / "npy" / "logits.npy"), logits, atol=1e-6)
    # `hybridq analyze --from` reads the folder: as hybridq's snapshot (manifest.json), and as RKNN's alone.
    rk = Path("rk")
    rk.mkdir()
    for part in ("golden", "simulator"):
        shutil.copytree(snap / part, rk / part)
    shutil.copy(snap / "map_name_to_file.txt", rk)
    for folder in (snap, rk):
        code, out, err = run_cli(capsys, "analyze", "--from", folder, "--json")
        assert code == 0, err
        tensors = json.loads(out.strip().splitlines()[-1])["tensors"]  # the JSON document follows the table
        assert list(tensors) == list(table)
    for name, stem in table.items():
        g, s = (np.load(rk / tree / "npy" / f"{stem}.npy") for tree in ("golden", "simulator"))
        assert tensors[name]["entire"]["cosine"] == pytest.approx(cosine(g, s), abs=1e-9)


def snapshot_file(snap: Path, name: str, side: str) -> str:
    """A tensor's array in hybridq's own snapshot ('fp32' or 'quant'), from its manifest."""
    import json

    return json.loads((snap / "manifest.json").read_text())["tensors"][name][side]
