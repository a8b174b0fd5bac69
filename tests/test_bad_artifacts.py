"""Artifacts a user damaged, renamed or named by their original names: a clear exit 2, or the right resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import hybridq
from hybridq.snapshot import ArrayDump
from tests import models
from tests.conftest import run_cli

USAGE = 2


def hq(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    return run_cli(capsys, *args)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step1 + step2 of the residual CNN (conv2 absorbs a BatchNorm) on 4 samples."""
    root = tmp_path_factory.mktemp("built")
    models.residual_cnn_step1(root)
    hybridq.step2(root / "ws" / "cnn.model", root / "ws" / "cnn.data", root / "ws" / "cnn.quantization.cfg", root / "q.onnx")
    return root


@pytest.fixture
def ws(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built, tmp_path / "w")
    return tmp_path / "w"


def _edit(cfg: Path, old: str, new: str) -> None:
    text = cfg.read_text()
    assert old in text, old
    cfg.write_text(text.replace(old, new, 1))


def _clean(code: int, out: str, err: str, *named: str) -> str:
    text = out + err
    assert code == USAGE, text
    assert "Traceback" not in text and "internal error" not in text, text
    for n in named:
        assert n in text, text
    return text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "png"])
def test_analyze_names_a_quantized_model_that_is_not_onnx(ws, capsys, damage):
    q = ws / "bad.q.onnx"
    good = (ws / "q.onnx").read_bytes()
    q.write_bytes({"truncated": good[: len(good) // 3], "garbage": b"garbage\n", "png": b"\x89PNG\r\n\x1a\n" + bytes(64)}[damage])
    _clean(*hq(capsys, "analyze", ws / "cnn.onnx", q, "-d", ws / "data" / "dataset.txt"), "bad.q.onnx")


def test_a_renamed_cfg_is_known_by_its_header(ws, capsys):
    mine = ws / "ws" / "mine.cfg"
    shutil.copy(ws / "ws" / "cnn.quantization.cfg", mine)
    code, out, err = hq(capsys, "analyze", ws / "cnn.onnx", mine, "-d", ws / "data" / "dataset.txt", "--json")
    assert code == 0, out + err
    code, out, err = hq(capsys, "propose", "--cfg", mine, "-d", ws / "data" / "dataset.txt", "-q")
    assert code == 0, out + err
    # a YAML error in a renamed cfg is reported at its line, not as "not a cfg"
    _edit(mine, "settings:\n", "settings:\n  dtype: [uint8\n")
    text = mine.read_text()
    line = text.splitlines().index("  dtype: [uint8") + 1
    out = _clean(*hq(capsys, "propose", "--cfg", mine, "-d", ws / "data" / "dataset.txt"), "mine.cfg:")
    assert "YAML syntax error" in out and any(f"mine.cfg:{n}:" in out for n in (line, line + 1)), out
    other = ws / "notes.txt"
    other.write_text("not a cfg\n")
    _clean(*hq(capsys, "propose", "--cfg", other, "-d", ws / "data" / "dataset.txt"), "notes.txt", "hybridq:")
    _clean(*hq(capsys, "propose", "--cfg", ws / "nope.cfg", "-d", ws / "data" / "dataset.txt"), "nope.cfg", "does not exist")


def test_a_truncated_temp_model_is_called_corrupt_not_from_another_run(ws, capsys):
    model = ws / "ws" / "cnn.model"
    model.write_bytes(model.read_bytes()[:300])
    text = _clean(*hq(capsys, "step2", model, ws / "ws" / "cnn.data", ws / "ws" / "cnn.quantization.cfg", "-o", ws / "o.onnx"),
                  "cnn.model", "truncated or corrupt")
    assert "different step1 runs" not in text


def test_init_refuses_a_model_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "m.onnx"
    bad.write_text("garbage\n")
    _clean(*hq(capsys, "init", tmp_path / "w", "--model", bad), "m.onnx", "could not be read as ONNX")
    assert not (tmp_path / "w").exists()


def test_init_copies_a_models_external_data_and_a_missing_data_file_is_named(tmp_path, capsys):
    """A model whose weights live in external data (sub/net.weights beside it) is copied with them, so step1 on the
    workspace's copy runs; without the data file, init and step1 name it as missing (not the model as corrupt)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    onnx.save(models.conv_relu(), src / "net.onnx", save_as_external_data=True, location="sub/net.weights", size_threshold=0)
    assert hq(capsys, "init", tmp_path / "w", "--model", src / "net.onnx")[0] == 0
    assert (tmp_path / "w" / "sub" / "net.weights").read_bytes() == (src / "sub" / "net.weights").read_bytes()
    ds = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 2)
    assert hq(capsys, "step1", tmp_path / "w" / "net.onnx", "-d", ds, "--out", tmp_path / "w" / "out")[0] == 0
    (src / "sub" / "net.weights").unlink()
    _clean(*hq(capsys, "init", tmp_path / "w2", "--model", src / "net.onnx"), "net.weights", "missing")
    assert not (tmp_path / "w2").exists()
    text = _clean(*hq(capsys, "step1", src / "net.onnx", "-d", ds, "--out", tmp_path / "o"), "net.weights", "missing")
    assert "corrupt" not in text
    (tmp_path / "w.bin").write_bytes(b"")  # through '..': onnx refuses it, and init must not write beside the workspace
    m = onnx.load(src / "net.onnx", load_external_data=False)
    for t in m.graph.initializer:
        next(e for e in t.external_data if e.key == "location").value = "../w.bin"
    onnx.save(m, src / "dots.onnx")
    _clean(*hq(capsys, "init", tmp_path / "w3" / "ws", "--model", src / "dots.onnx"), "w.bin", "'..'")
    assert not (tmp_path / "w3").exists()


def test_debug_keeps_the_usage_exit_code_and_shows_the_traceback(ws):
    cfg = ws / "ws" / "cnn.quantization.cfg"
    _edit(cfg, "custom_quantize_layers: {}", "custom_quantize_layers:\n  conv_2: float32")
    run = subprocess.run([sys.executable, "-m", "hybridq", "--debug", "step2", ws / "ws" / "cnn.model", ws / "ws" / "cnn.data", cfg,
                          "-o", ws / "o.onnx"], capture_output=True, text=True)
    assert run.returncode == USAGE and "Traceback" in run.stderr and "conv_2" in run.stderr, run.stderr


def test_step2_quiet_prints_no_warning_but_json_keeps_it(ws, capsys):
    cfg = ws / "ws" / "cnn.quantization.cfg"
    text = cfg.read_text()
    i = text.index("scale:", text.index("\n  r1:"))
    cfg.write_text(text[:i] + "scale: [0.1]" + text[text.index("\n", i):])
    args = ["step2", ws / "ws" / "cnn.model", ws / "ws" / "cnn.data", cfg, "-o", ws / "o.onnx"]
    code, out, err = hq(capsys, *args)
    assert code == 0 and "warning:" in err, out + err
    code, out, err = hq(capsys, *args, "-q")
    assert code == 0 and out == "" and err == "", out + err
    code, out, err = hq(capsys, *args, "-q", "--json")
    assert code == 0 and "scale" in " ".join(json.loads(out)["warnings"]), out


def test_the_original_output_of_a_conv_that_absorbed_a_batchnorm_names_that_conv(ws, capsys):
    """conv2 wrote `c2` in the original model; the temp model's conv2 writes the BatchNorm's `bn2`."""
    temp = onnx.load(str(ws / "ws" / "cnn.model"), load_external_data=False)
    assert "c2" not in {o for n in temp.graph.node for o in n.output}
    cfg = ws / "ws" / "cnn.quantization.cfg"
    _edit(cfg, "custom_quantize_layers: {}", "custom_quantize_layers:\n  c2: float16")
    res = hybridq.step2(ws / "ws" / "cnn.model", ws / "ws" / "cnn.data", cfg, ws / "o.onnx")
    assert [(r.entry, r.node, r.effective) for r in res.resolved] == [("c2", "conv2", "float16")]
    q = onnx.load(str(ws / "o.onnx"))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    weight = next(i for i in q.graph.initializer if i.name == conv2.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT16


def test_a_dump_sweeps_the_temp_files_a_killed_dump_left(tmp_path):
    """SIGKILL skips cleanup: the next dump into the directory removes the dead process's temp files, not a live one's."""
    for sub in ("fp32", "quant"):
        (tmp_path / sub).mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / "fp32" / f".c1.npy.{dead.pid}.tmp"
    orphan.write_bytes(b"x" * 100)
    live = tmp_path / "quant" / f".c1.npy.{os.getppid()}.tmp"
    live.write_bytes(b"y")
    recent = tmp_path / "quant" / f".c2.npy.{dead.pid}.tmp"  # another host's live dump sharing the disk: still written to
    recent.write_bytes(b"z")
    old = time.time() - 3600
    for f in (orphan, live):
        os.utime(f, (old, old))
    dump = ArrayDump(tmp_path)
    dump.start(["c1"])
    dump.add_sample({"c1": (np.ones(3, np.float32), np.ones(3, np.float32))})
    dump.abort()
    assert not orphan.exists() and live.exists() and recent.exists()


def test_a_name_several_original_nodes_shared_is_listed_and_refused_in_the_cfg(tmp_path, capsys):
    model = models.residual_cnn()
    for node in model.graph.node[:4]:
        node.name = "dup"
    onnx.save(model, tmp_path / "d.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 2)
    code, out, err = hq(capsys, "step1", tmp_path / "d.onnx", "-d", listing, "--out", tmp_path / "ws", "--json")
    renamed = json.loads(out)["renamed"]["dup"]
    temp = onnx.load(str(tmp_path / "ws" / "d.model"), load_external_data=False)
    assert code == 0 and len(renamed) == 4 and set(renamed) <= {n.name for n in temp.graph.node} | set(json.loads(out)["fused"])
    cfg = tmp_path / "ws" / "d.quantization.cfg"
    text = cfg.read_text()
    head, _, tail = text.partition("\ncustom_quantize_layers:")
    cfg.write_text(head + "\ncustom_quantize_layers:\n  dup: float32\n" + tail.split("\n", 1)[1])
    _clean(*hq(capsys, "step2", tmp_path / "ws" / "d.model", tmp_path / "ws" / "d.data", cfg, "-o", tmp_path / "o.onnx"),
           "'dup' named", "dup_0", "name the one you mean")


@pytest.mark.parametrize("value", ["0 null", "[1, 2]", "{mean: [1, 2, 3]}"])
def test_a_preprocess_header_edited_on_array_data_is_refused_at_the_header(ws, capsys, value):
    """step1 calibrated on .npy arrays and recorded no preprocessing; a value typed into the header is an input error."""
    cfg = ws / "ws" / "cnn.quantization.cfg"
    _edit(cfg, "\n  preprocess:\n", f"\n  preprocess: {value}\n")
    _clean(*hq(capsys, "step2", ws / "ws" / "cnn.model", ws / "ws" / "cnn.data", cfg, "-o", ws / "o.onnx"), "preprocess", "Restore the header")
