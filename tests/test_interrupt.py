"""Ctrl-C and SIGTERM part-way through step1 leave the previous artifacts byte-identical and no temp file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import hybridq
from tests import models

ROOT = Path(__file__).resolve().parent.parent

# A preprocess hook that marks the first sample and is slow enough (20 ms a sample) to be interrupted mid-calibration.
SLOW_HOOK = '''
import pathlib, time
import numpy as np

def load(path, spec):
    pathlib.Path(__file__).with_name("started").touch()
    time.sleep(0.02)
    return np.load(path)
'''


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _leftovers(*directories: Path) -> list[str]:
    return sorted(str(p) for d in directories for p in d.rglob("*") if p.name.startswith((".hybridq-", "hybridq-")))


@pytest.fixture
def earlier(tmp_path: Path) -> dict[str, Path]:
    """A finished step1 run on 200 samples; the model file is then replaced so a new run would change every artifact."""
    model = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), model)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 200)
    out = tmp_path / "ws"
    hybridq.step1(model, listing, out=out, samples=4)
    onnx.save(models.residual_cnn(seed=11), model)
    (tmp_path / "hook.py").write_text(SLOW_HOOK)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return {"model": model, "dataset": listing, "out": out, "root": tmp_path, "tmp": tmpdir}


def _start(earlier: dict[str, Path], *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(earlier["tmp"]))
    env.pop("HYBRIDQ_DEBUG", None)
    cmd = [sys.executable, "-m", "hybridq", "step1", str(earlier["model"]), "--dataset", str(earlier["dataset"]),
           "--out", str(earlier["out"]), "--no-measure", *extra]  # as the in-process earlier run (conftest): no cost cache file
    return subprocess.Popen(cmd, cwd=earlier["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"step1 ended before calibrating: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("step1 did not start calibrating in time")
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_calibration_keeps_earlier_artifacts(earlier, sig):
    before = _snapshot(earlier["out"])
    proc = _start(earlier, "--preprocess", f"{earlier['root'] / 'hook.py'}:load")
    _wait_for(earlier["root"] / "started", proc)
    time.sleep(0.3)
    assert proc.poll() is None, "step1 finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, err
    assert _snapshot(earlier["out"]) == before
    assert _leftovers(earlier["out"], earlier["tmp"]) == []
    assert proc.returncode == 128 + int(sig), (proc.returncode, out, err)  # 130 for SIGINT, 143 for SIGTERM
    assert "interrupted" in err


@pytest.mark.slow
@pytest.mark.parametrize("delay", [round(1.0 + 0.15 * i, 2) for i in range(16)])
def test_signal_at_any_moment_leaves_old_or_new_artifacts_never_a_mix(earlier, delay):
    # Without the slow hook the run takes ~1-2 s; an interrupt lands anywhere, the write phase included.
    # (Not before 1 s: a Ctrl-C while Python imports typer and rich, before cli.main runs, is Python's own.)
    before = _snapshot(earlier["out"])
    proc = _start(earlier)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, err
    assert _leftovers(earlier["out"], earlier["tmp"]) == []
    after = _snapshot(earlier["out"])
    # Old or new, never a mix: either nothing changed, or all three files are the new run's (a held signal may
    # still stop the process right after the last rename).
    # -SIGINT: the signal came while the interpreter was shutting down, after the work was done.
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed in ([], ["cnn.data", "cnn.model", "cnn.quantization.cfg"]), (changed, proc.returncode, err)
    assert set(after) == set(before)
    m, d, c = (earlier["out"] / f"cnn.{s}" for s in ("model", "data", "quantization.cfg"))
    hybridq.step2(m, d, c, earlier["root"] / "q.onnx")


def test_an_aborted_dump_takes_back_the_directories_it_made(tmp_path):
    from hybridq.snapshot import ArrayDump

    dump = ArrayDump(tmp_path / "new" / "snap")
    dump.start(["a"])
    dump.add_sample({"a": (np.zeros(3, np.float32), np.ones(3, np.float32))})
    dump.abort()
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "fp32").mkdir(parents=True)
    (kept / "fp32" / "mine.txt").write_text("x")
    dump = ArrayDump(kept)
    dump.start(["a"])
    dump.abort()
    assert (kept / "fp32" / "mine.txt").is_file() and not (kept / "quant").exists()  # only what it made, only if empty


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> dict[str, Path]:
    """A finished `analyze --dump` snapshot, a file of the user's in it, and a dataset on which a new run changes every file."""
    from tests.test_analysis import float_model, quant_model

    onnx.save(float_model(), tmp_path / "f.onnx")
    onnx.save(quant_model(True), tmp_path / "q.onnx")
    first = models.write_npy_dataset(tmp_path / "first", {"x": (1, 2, 6, 6)}, 20)
    second = models.write_npy_dataset(tmp_path / "second", {"x": (1, 2, 6, 6)}, 300, seed=1)
    snap = tmp_path / "snap"
    hybridq.analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", first, dump=snap)
    (snap / "my_notes.txt").write_text("mine")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return {"root": tmp_path, "snap": snap, "dataset": second, "tmp": tmpdir}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("delay", [round(1.2 + 0.25 * i, 2) for i in range(6)])
def test_signal_during_a_redump_leaves_the_old_snapshot_or_the_new_one_never_a_mix(snapshot_dir, delay):
    """Ctrl-C at any moment of `analyze --dump DIR` over an older snapshot: DIR is the older snapshot byte for byte, or
    wholly the new one; it loads, and no stage is left behind."""
    d = snapshot_dir
    before = _files(d["snap"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(d["tmp"]))
    env.pop("HYBRIDQ_DEBUG", None)
    cmd = [sys.executable, "-m", "hybridq", "analyze", "f.onnx", "q.onnx", "-d", str(d["dataset"]), "--dump", "snap", "-q"]
    proc = subprocess.Popen(cmd, cwd=d["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, err
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err)
    after = _files(d["snap"])
    assert set(after) == set(before)
    changed = sorted(k for k in before if after[k] != before[k])
    assert changed in ([], sorted(set(before) - {"my_notes.txt"})), (changed, proc.returncode, err)
    assert hybridq.api.load_snapshot(d["snap"]).n_samples == (20 if not changed else 300)
