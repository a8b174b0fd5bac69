"""step1 warns when the default int8 model is far from fp32 (default_model.far_from_fp32), and only then."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hybridq
from hybridq import speedcheck
from tests import models
from tests.conftest import run, run_cli


def _collapsing_classifier() -> onnx.ModelProto:
    """x [32, 8] -> Mul (channel 0 x1000, the others x0.01) -> MatMul -> Softmax over 6 classes.

    The classes are decided by channels 1-7 alone (row 0 of the weight is zero), which a per-tensor uint8 range
    stretched by channel 0 rounds to zero: the int8 model's logits are its bias, the same class everywhere.
    """
    rng = np.random.default_rng(5)
    scale = np.array([1000.0] + [0.01] * 7, np.float32)
    w = (rng.normal(0, 1, (8, 6)) * 100).astype(np.float32)
    w[0] = 0.0
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="stretch"), helper.make_node("MatMul", ["h", "w"], ["z"], name="fc"),
             helper.make_node("Softmax", ["z"], ["prob"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "collapse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [32, 6])],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _first_sample_figures(fp32: str, quant: str, listing) -> tuple[float, float]:
    """(cosine, fraction of the argmax decisions outside fp32's most frequent class that differ) of the first calibration
    sample, from ONNX Runtime and numpy."""
    x = np.load(listing.parent / listing.read_text().split("\n")[1].split()[0])
    a, b = (run(m, {"x": x})[0].astype(np.float64) for m in (fp32, quant))
    want, have = a.argmax(-1), b.argmax(-1)
    rare = want != np.bincount(want).argmax()  # decisions outside fp32's most frequent class
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)), float(np.mean(want[rare] != have[rare]))


@pytest.mark.parametrize("timed", [False, True])
def test_a_collapsed_default_model_is_reported(tmp_path, monkeypatch, timed):
    """Both ways the outputs are compared: the speed check's warm-up run (timed), or a run of its own (speed check off)."""
    path = tmp_path / "m.onnx"
    onnx.save(_collapsing_classifier(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (32, 8)}, 8)
    if timed:
        monkeypatch.setattr(speedcheck, "MARGIN", -100.0)  # int8 "pays" whatever the timings: the check's outputs are used
    r = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": timed})
    q = hybridq.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx").output
    cos, changed = _first_sample_figures(str(path), str(q), listing)
    assert changed > 0.5, "the fixture must collapse"
    [warning] = r.warnings
    assert "prob:" in warning and "--proposal" in warning
    assert f"{100 * changed:.0f} % of its argmax decisions outside fp32's most frequent class differ" in warning
    assert cos < 0.9 and f"cosine {cos:.3f}" in warning


def test_a_close_default_model_gets_no_warning_and_the_cli_prints_one_when_far(tmp_path, capsys, monkeypatch):
    path = tmp_path / "mlp.onnx"
    onnx.save(models.matmul_mlp(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (4, 32)}, 8)
    r = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False})
    assert r.warnings == []
    bad = tmp_path / "bad.onnx"
    onnx.save(_collapsing_classifier(), bad)
    monkeypatch.setattr(speedcheck, "MARGIN", -100.0)  # not kept float by the speed check on this tiny model
    code, out, err = run_cli(capsys, "step1", bad, "--dataset", models.write_npy_dataset(tmp_path / "d2", {"x": (32, 8)}, 4), "--out", tmp_path / "ws2")
    assert code == 0 and "warning: the default int8 model is far from fp32" in err
