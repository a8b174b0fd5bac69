"""`python -m hybridq` ends without the interpreter's teardown, yet exits as Python would: status, output, atexit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from tests import models

ROOT = Path(__file__).resolve().parents[1]


def _hq(*args: object, code: str = "") -> subprocess.CompletedProcess:
    """`python -m hybridq args` (after `code`, run in the same process first)."""
    prog = f"{code}\nimport runpy, sys\nsys.argv = ['hybridq', *{[str(a) for a in args]!r}]\nrunpy.run_module('hybridq', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_status_and_messages_are_python_s(tmp_path):
    # An error keeps its exit status and message; --version prints and exits 0.
    bad = _hq("step1", tmp_path / "missing.onnx", "--dataset", tmp_path / "d.txt")
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    version = _hq("--version")
    assert version.returncode == 0 and version.stdout.startswith("hybridq ")


def test_output_is_flushed_and_atexit_callbacks_run(tmp_path):
    # A piped --json report arrives whole; a callback registered with atexit still runs (its file is written).
    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 3)
    flag = tmp_path / "atexit.txt"
    code = f"import atexit, pathlib\natexit.register(lambda: pathlib.Path({str(flag)!r}).write_text('ran'))"
    out = _hq("step1", tmp_path / "m.onnx", "--dataset", listing, "--out", tmp_path / "ws", "--json", code=code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["samples"] == 3 and flag.read_text() == "ran"


def test_a_string_exit_prints_and_fails():
    # sys.exit("text") from the CLI: the text on stderr and status 1, as the interpreter does.
    code = "import hybridq.cli\nhybridq.cli.main = lambda: __import__('sys').exit('stopped here')"
    out = _hq(code=code)
    assert out.returncode == 1 and out.stderr.strip() == "stopped here"
