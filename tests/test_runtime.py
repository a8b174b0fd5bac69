"""analyze --runtime: each output as another runtime computes it, against fp32 and the exact simulation (RKNN's runtime_error)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hybridq import api
from hybridq.cli import main
from tests import models
from tests.conftest import cosine, exact_options


def _setup(tmp_path):
    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 6)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    return listing


def test_cpu_runtime_against_the_exact_simulation_equals_onnxruntime_by_hand(tmp_path):
    listing = _setup(tmp_path)
    result = api.analyze(tmp_path / "m.onnx", tmp_path / "q.onnx", listing, runtime="cpu")
    (row,) = result.runtime
    assert row.tensor == "logits" and "default int8 kernels" in row.runtime
    # independent: this CPU's default session and an exact one, numpy cosine per sample, then the mean
    default = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    exact = ort.InferenceSession(str(tmp_path / "q.onnx"), exact_options(), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xs = [np.load(listing.parent / ln) for ln in listing.read_text().splitlines() if ln.endswith(".npy")]
    vs_sim = [cosine(exact.run(None, {"x": x})[0], default.run(None, {"x": x})[0]) for x in xs]
    vs_fp32 = [cosine(fp32.run(None, {"x": x})[0], default.run(None, {"x": x})[0]) for x in xs]
    assert row.vs_simulator.cosine == pytest.approx(np.mean(vs_sim), abs=1e-6)
    assert row.vs_fp32.cosine == pytest.approx(np.mean(vs_fp32), abs=1e-6)


def test_runtime_rows_survive_the_snapshot_and_json(tmp_path, capsys):
    listing = _setup(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", "cpu",
              "--dump", str(tmp_path / "snap"), "--json"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["tensor"] for r in doc["runtime"]] == ["logits"]
    again = api.load_snapshot(tmp_path / "snap")
    assert [r.tensor for r in again.runtime] == ["logits"]
    assert again.runtime[0].vs_simulator.cosine == pytest.approx(doc["runtime"][0]["vs_simulator"]["cosine"])


def test_an_unknown_runtime_is_a_clear_error(tmp_path, capsys):
    listing = _setup(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", "tpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cpu, openvino" in err and "Traceback" not in err


def test_l2_bytes_reads_the_level_2_cache_and_falls_back_where_sysfs_has_none(tmp_path):
    from hybridq._runtime import l2_bytes
    from hybridq.analysis import AnalysisOptions

    for index, (level, kind, size) in enumerate((("1", "Data", "48K"), ("1", "Instruction", "64K"), ("2", "Unified", "2048K"), ("3", "Unified", "32M"))):
        d = tmp_path / "cache" / f"index{index}"
        d.mkdir(parents=True)
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert l2_bytes(root=str(tmp_path / "cache")) == 2 << 20
    assert l2_bytes(12345, root=str(tmp_path / "none")) == 12345
    (tmp_path / "cache" / "index2" / "size").write_text("lots\n")
    assert l2_bytes(777, root=str(tmp_path / "cache")) == 777
    assert AnalysisOptions().segment_bytes == 2.0 * l2_bytes()


def _labelled_cnn() -> onnx.ModelProto:
    """Conv-Relu-Conv to 5-class logits; outputs `label` (ArgMax, int64) and `logp` (Log of Relu: -inf where <= 0)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.4, (5, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["logits"], name="conv2"),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, name="argmax"),
             helper.make_node("Relu", ["logits"], ["pos"], name="relu2"),
             helper.make_node("Log", ["pos"], ["logp"], name="log")]
    graph = helper.make_graph(nodes, "labelled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [1, 16, 16]),
                               helper.make_tensor_value_info("logp", TensorProto.FLOAT, [1, 5, 16, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_the_runtime_column_compares_an_integer_output_value_for_value_and_leaves_infinities_out(tmp_path):
    """An ArgMax output is counted in a note (not a cosine of class indices); Log(Relu)'s -inf is left out of the
    cosine (it was NaN), both recomputed here from ONNX Runtime sessions."""
    onnx.save(_labelled_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 6)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"speed_check": False})
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    result = api.analyze(tmp_path / "m.onnx", tmp_path / "q.onnx", listing, runtime="cpu")

    default = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    exact = ort.InferenceSession(str(tmp_path / "q.onnx"), exact_options(), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xs = [np.load(listing.parent / ln) for ln in listing.read_text().splitlines() if ln.endswith(".npy")]
    runs = [(fp32.run(None, {"x": x}), exact.run(None, {"x": x}), default.run(None, {"x": x})) for x in xs]
    vs_fp32 = sum(int(np.count_nonzero(f[0] != d[0])) for f, _, d in runs)
    vs_sim = sum(int(np.count_nonzero(e[0] != d[0])) for _, e, d in runs)
    assert [row.tensor for row in result.runtime] == ["logp"]
    told = [n for n in result.notes if "'label' is integer" in n]
    assert told and f"{vs_fp32} of {6 * 16 * 16} value(s) differ from fp32's, {vs_sim} from the simulation's" in told[0]

    def finite_cos(a: np.ndarray, b: np.ndarray) -> float:
        keep = np.isfinite(a) & np.isfinite(b)
        return cosine(a[keep], b[keep])

    (row,) = result.runtime
    assert np.isfinite(row.vs_fp32.cosine)
    assert row.vs_fp32.cosine == pytest.approx(np.mean([finite_cos(f[1], d[1]) for f, _, d in runs]), abs=1e-6)
    assert any("non-finite values" in n and "'logp'" in n for n in result.notes)
