"""Control flow and recurrent layers: fixed inputs fold If nodes (fold.py), LSTM weights run as DynamicQuantizeLSTM (recurrent.py).

Numbers are checked against ONNX Runtime on the fp32 model and against numpy recomputations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import hybridq
from hybridq import api
from hybridq.errors import InputError
from hybridq.graph import cut_model, prepare
from tests import models
from tests.conftest import cosine, run
from tests.control_flow_models import flag_net, recurrent_net, sample_rate_net
from tests.test_cli import cli

X_SHAPE = (1, 8, 8, 16)


@pytest.fixture
def rate_ws(tmp_path: Path) -> dict[str, Path]:
    """sample_rate_net on disk, with calibration data for x only (sr is fixed)."""
    path = tmp_path / "rate.onnx"
    onnx.save(sample_rate_net(), path)
    return {"model": path, "dataset": models.write_npy_dataset(tmp_path / "data", {"x": X_SHAPE}, 8), "dir": tmp_path}


def _samples(n: int = 4, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, X_SHAPE).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("sr, folded, convs", [
    (16000, {"rate_if": "then_branch", "inner_if": "then_branch"}, {"conv_a", "conv_b", "conv_e"}),
    (8000, {"rate_if": "else_branch"}, {"conv_d", "conv_e"}),
])
def test_fixed_input_folds_nested_ifs_and_their_convs_are_quantized(rate_ws, sr, folded, convs):
    r1 = hybridq.step1(rate_ws["model"], rate_ws["dataset"], out=rate_ws["dir"] / f"ws{sr}", fixed_inputs={"sr": sr})
    assert r1.control_flow == {"fixed_inputs": {"sr": sr}, "folded": folded, "kept": {}}
    assert r1.float_subgraph_nodes == []
    temp = onnx.load(str(r1.model))
    assert "If" not in {n.op_type for n in temp.graph.node} and [i.name for i in temp.graph.input] == ["x"]
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, rate_ws["dir"] / f"q{sr}.onnx")
    # the branch's Convs are quantized (conv_f writes the graph output: float by policy)
    assert {n for n, v in r2.rewrite.layers.items() if v["precision"] == "uint8"} == convs
    assert r2.rewrite.layers["conv_f"]["precision"] == "float32"
    for x in _samples():
        fp32 = run(rate_ws["model"], {"x": x, "sr": np.array(sr, np.int64)})[0]
        # folding is exact: the temp model computes the fp32 function of the original with sr fixed
        np.testing.assert_allclose(run(r1.model, {"x": x})[0], fp32, rtol=1e-4, atol=1e-5)
        assert cosine(run(r2.output, {"x": x})[0], fp32) > 0.99


def test_analyze_fixes_the_input_in_the_fp32_model_and_compares_the_branch_layers(rate_ws):
    r1 = hybridq.step1(rate_ws["model"], rate_ws["dataset"], out=rate_ws["dir"] / "ws", fixed_inputs={"sr": 16000})
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, rate_ws["dir"] / "q.onnx")
    # the dataset holds x only: the fp32 model gets sr = 16000 from the quant model's record
    for quant in (r2.output, r1.cfg):
        result = hybridq.analyze(rate_ws["model"], quant, rate_ws["dataset"], samples=3)
        rows = {r.tensor: r for r in result.layers}
        assert (rows["ta"].layer, rows["ta"].precision) == ("conv_a", "uint8") and rows["feat"].layer == "conv_b"
    xs = [np.load(rate_ws["dataset"].parent / f"x_{i}.npy") for i in range(3)]
    want = np.mean([cosine(run(r2.output, {"x": x})[0], run(rate_ws["model"], {"x": x, "sr": np.array(16000, np.int64)})[0]) for x in xs])
    assert rows["y"].entire.cosine == pytest.approx(want, abs=1e-5)


def test_if_on_an_input_left_free_stays_and_names_the_input_and_the_fix():
    temp, report = prepare(sample_rate_net())
    kept = report.control_flow.kept
    assert report.control_flow.folded == {}
    assert "condition 'is16k'" in kept["rate_if"] and "input(s) 'sr'" in kept["rate_if"] and "--fix-input sr=VALUE" in kept["rate_if"]
    assert kept["inner_if"] == "If 'inner_if' is inside 'rate_if', which stays"
    x = _samples(1)[0]
    for sr in (16000, 8000):  # the temp model still computes both branches as the original does
        feeds = {"x": x, "sr": np.array(sr, np.int64)}
        np.testing.assert_allclose(run(temp, feeds)[0], run(sample_rate_net(), feeds)[0], rtol=1e-4, atol=1e-5)


def test_if_on_a_dynamic_shape_stays_and_says_the_shape_is_not_static():
    # sr fixed: the outer If folds; the inner one reads x's width, which is a named (dynamic) dim
    temp, report = prepare(sample_rate_net(width="W"), {"sr": 16000})
    assert report.control_flow.folded == {"rate_if": "then_branch"}
    assert "depends on the shape of 'x', which is not static" in report.control_flow.kept["inner_if"]
    assert [n.name for n in temp.graph.node if n.op_type == "If"] == ["inner_if"]


@pytest.mark.parametrize("flag, op", [(True, "Relu"), (0, "Neg")])
def test_if_on_the_fixed_input_itself_folds(flag, op):
    temp, report = prepare(flag_net(), {"flag": flag})
    assert report.control_flow.folded == {"flag_if": "then_branch" if flag else "else_branch"}
    assert [n.op_type for n in temp.graph.node] == ["Conv", op, "Conv"]
    x = np.random.default_rng(5).normal(0, 1, (1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(temp, {"x": x})[0], run(flag_net(), {"x": x, "flag": np.array(bool(flag))})[0], rtol=1e-4, atol=1e-5)


def test_bad_fixed_inputs_are_clear_input_errors():
    with pytest.raises(InputError, match=r"'rate' is not an input of the model\..*Its inputs are: x, sr\."):
        prepare(sample_rate_net(), {"rate": 16000})
    with pytest.raises(InputError, match=r"'sr' is an integer input \(int64\), but 1.5 is not a whole number"):
        prepare(sample_rate_net(), {"sr": 1.5})
    with pytest.raises(InputError, match=r"value for 'sr' has shape \[2\], but the input is declared \[\]"):
        prepare(sample_rate_net(), {"sr": [1, 2]})


def test_cli_fix_input_folds_and_reports_in_json_and_refuses_bad_values(capsys, rate_ws):
    code, out, _ = cli(capsys, "step1", rate_ws["model"], "-d", rate_ws["dataset"], "-o", rate_ws["dir"] / "cli", "--fix-input", "sr=8000", "--json")
    assert code == 0
    assert json.loads(out)["control_flow"] == {"fixed_inputs": {"sr": 8000}, "folded": {"rate_if": "else_branch"}, "kept": {}}
    code, _, err = cli(capsys, "step1", rate_ws["model"], "-d", rate_ws["dataset"], "--fix-input", "sr")
    assert code == 2 and "is not NAME=VALUE" in err
    code, _, err = cli(capsys, "step1", rate_ws["model"], "-d", rate_ws["dataset"], "--fix-input", "sample_rate=16000")
    assert code == 2 and "'sample_rate' is not an input of the model" in err and "Traceback" not in err


def test_workspace_fixed_inputs_and_the_given_value_wins(rate_ws):
    config = rate_ws["dir"] / "hybridq.yaml"
    config.write_text("fixed_inputs:\n  sr: 8000\n")
    r1 = hybridq.step1(rate_ws["model"], rate_ws["dataset"], out=rate_ws["dir"] / "a", config=config)
    assert r1.control_flow["folded"] == {"rate_if": "else_branch"}
    r1 = hybridq.step1(rate_ws["model"], rate_ws["dataset"], out=rate_ws["dir"] / "b", config=config, fixed_inputs={"sr": 16000})
    assert r1.control_flow["folded"] == {"rate_if": "then_branch", "inner_if": "then_branch"}


def test_rknn_input_initial_val_makes_the_input_a_constant_that_folds(tmp_path):
    model = sample_rate_net()
    cut = cut_model(model, tmp_path / "rate.onnx", None, None, [None, 16000], None)
    assert [i.name for i in cut.graph.input] == ["x"]
    _, report = prepare(cut)
    assert report.control_flow.folded == {"rate_if": "then_branch", "inner_if": "then_branch"}
    with pytest.raises(InputError, match="input_initial_val: 'sr' is an integer input"):
        cut_model(model, tmp_path / "rate.onnx", None, None, [None, 0.5], None)


# --------------------------------------------------------------------------- LSTM / GRU

R_SHAPE = (12, 1, 16)


@pytest.fixture
def rnn_ws(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "rnn.onnx"
    onnx.save(recurrent_net(), path)
    return {"model": path, "dataset": models.write_npy_dataset(tmp_path / "data", {"x": R_SHAPE}, 8), "dir": tmp_path}


def _lstm_weights_by_numpy(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of W [dirs, 4H, k]: scale = max|w| / 127 per row (or per direction); q = clip(rint(w / scale))."""
    amax = np.abs(w).max(axis=2) if per_channel else np.abs(w).max(axis=(1, 2))
    scale = (amax / 127.0).astype(np.float32)
    s = scale[:, :, None] if per_channel else scale[:, None, None]
    return np.clip(np.rint(w / s), -127, 127).astype(np.int8), scale


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.mark.parametrize("qmethod", ["channel", "layer"])
def test_lstm_runs_as_dynamic_quantize_lstm_with_numpy_weights_and_cosine(rnn_ws, qmethod):
    r1 = hybridq.step1(rnn_ws["model"], rnn_ws["dataset"], out=rnn_ws["dir"] / qmethod, settings={"qmethod": qmethod})
    cfg = r1.cfg.read_text()
    assert "lstm: int8" in cfg and "gru: float32" in cfg and "no integer GRU kernel" in cfg
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, rnn_ws["dir"] / f"{qmethod}.q.onnx")
    q = onnx.load(str(r2.output))
    ops = {n.name: n.op_type for n in q.graph.node}
    assert ops["lstm"] == "DynamicQuantizeLSTM" and ops["gru"] == "GRU" and "LSTM" not in ops.values()
    assert r2.rewrite.layers["lstm"]["precision"] == "int8" and r2.rewrite.layers["gru"]["precision"] == "float32"
    fp32 = onnx.load(str(rnn_ws["model"]))
    for tag in ("W", "R"):
        want_q, want_s = _lstm_weights_by_numpy(_init(fp32, f"lstm_{tag}"), qmethod == "channel")
        np.testing.assert_array_equal(_init(q, f"lstm_{tag}_quantized"), want_q.transpose(0, 2, 1))
        np.testing.assert_allclose(_init(q, f"lstm_{tag}_scale").reshape(want_s.shape), want_s, rtol=1e-6)
    rng = np.random.default_rng(3)
    with_lstm_y = onnx.load(str(r2.output))
    with_lstm_y.graph.output.append(onnx.helper.make_tensor_value_info("lstm_y", onnx.TensorProto.FLOAT, None))
    fp32.graph.output.append(onnx.helper.make_tensor_value_info("lstm_y", onnx.TensorProto.FLOAT, None))
    for _ in range(4):
        x = rng.normal(0, 1, R_SHAPE).astype(np.float32)
        ref, got = run(fp32, {"x": x}), run(with_lstm_y, {"x": x})
        assert cosine(got[2], ref[2]) >= 0.99  # the LSTM's own output
        assert cosine(got[0], ref[0]) >= 0.99
        assert cosine(got[1], ref[1]) >= 0.99  # the float GRU, on the int8 projection's output


def test_lstm_set_to_float32_in_the_cfg_stays_lstm_and_analysis_covers_it(rnn_ws):
    r1 = hybridq.step1(rnn_ws["model"], rnn_ws["dataset"], out=rnn_ws["dir"] / "ws")
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, rnn_ws["dir"] / "int8.q.onnx")
    samples = [{"x": np.random.default_rng(k).normal(0, 1, R_SHAPE).astype(np.float32)} for k in range(3)]
    result = api.analyze_samples(rnn_ws["model"], r2.output, samples)
    row = next(r for r in result.layers if r.tensor == "lstm_y")
    assert (row.layer, row.op_type, row.precision) == ("lstm", "LSTM", "int8")
    fp32 = onnx.load(str(rnn_ws["model"]))
    fp32.graph.output.append(onnx.helper.make_tensor_value_info("lstm_y", onnx.TensorProto.FLOAT, None))
    quant = onnx.load(str(r2.output))
    quant.graph.output.append(onnx.helper.make_tensor_value_info("lstm_y", onnx.TensorProto.FLOAT, None))
    mean_cos = np.mean([cosine(run(quant, s)[-1], run(fp32, s)[-1]) for s in samples])
    assert row.entire.cosine == pytest.approx(mean_cos, abs=1e-4)
    r1.cfg.write_text(r1.cfg.read_text().replace("  lstm: int8", "  lstm: float32"))
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, rnn_ws["dir"] / "float.q.onnx")
    q = onnx.load(str(r2.output))
    assert next(n.op_type for n in q.graph.node if n.name == "lstm") == "LSTM"
    assert r2.rewrite.layers["lstm"]["precision"] == "float32"


def test_rknn_facade_input_initial_val_folds_and_quantizes_the_branch(rate_ws, monkeypatch):
    from hybridq.rknn import RKNN

    monkeypatch.chdir(rate_ws["dir"])
    rknn = RKNN()
    assert rknn.config(target_platform="rk3588") == 0
    assert rknn.load_onnx(model=str(rate_ws["model"]), input_initial_val=[None, 16000]) == 0
    assert rknn.build(do_quantization=True, dataset=str(rate_ws["dataset"])) == 0
    assert rknn.export_onnx("rate.q.onnx") == 0
    rknn.release()
    q = onnx.load("rate.q.onnx")
    assert "If" not in {n.op_type for n in q.graph.node} and [i.name for i in q.graph.input] == ["x"]
    assert {"wa_DequantizeLinear", "wb_DequantizeLinear", "we_DequantizeLinear"} <= {n.name for n in q.graph.node}
    for x in _samples(2):
        assert cosine(run(q, {"x": x})[0], run(rate_ws["model"], {"x": x, "sr": np.array(16000, np.int64)})[0]) > 0.99


def test_an_if_whose_inlined_branch_onnx_runtime_cannot_load_is_kept(monkeypatch):
    """Inlining can expose a static shape clash the If hid (ONNX's affine_grid test model: a [1] where Range wants a
    scalar): step1 then keeps the If, says why, and goes on, instead of blaming the model."""
    from hybridq import graph
    from hybridq.errors import ModelError

    real = graph.ort_basic_optimize

    def picky(model):
        if not any(n.op_type == "If" for n in model.graph.node):
            raise ModelError("ONNX Runtime cannot load this model: Node (Range_2) Op (Range) [ShapeInferenceError] shapes clash")
        return real(model)

    monkeypatch.setattr(graph, "ort_basic_optimize", picky)
    temp, report = graph.prepare(flag_net(), {"flag": True})
    assert not report.control_flow.folded  # (ONNX Runtime's own constant folding may still remove it)
    assert report.control_flow.kept["flag_if"].startswith("kept: ONNX Runtime cannot load the graph with this If's branch inlined")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(temp, {"x": x})[0], run(flag_net(), {"x": x, "flag": np.array(True)})[0], rtol=1e-5, atol=1e-5)
