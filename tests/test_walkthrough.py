"""The README's walk-through runs verbatim: a planted failing layer is found by analyze and fixed by propose."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- walkthrough:begin -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no walk-through block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_readme_walkthrough_finds_the_failing_layer_and_fixes_it(tmp_path):
    # Run in a copy of examples/ so the repository's examples stay untouched; paths are the README's own.
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "build_demo.py").write_bytes((ROOT / "examples" / "build_demo.py").read_bytes())
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), COLUMNS="200", PYTHONPATH=str(ROOT))
    outputs = []
    for cmd in _commands():
        args = shlex.split(cmd)
        if args[0] == "python":
            args[0] = sys.executable
        elif args[0] == "hybridq":
            args = [sys.executable, "-m", "hybridq", *args[1:]]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        outputs.append(proc)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    first, propose, last = outputs[2].stdout, outputs[3].stdout, outputs[5].stdout
    assert "CHECK:" in first and "hybridq propose" in first
    assert "clip 'expand_relu'" in propose and "float layers proposed: 0" in propose
    assert "OK:" in last
    cfg = (tmp_path / "examples/outlier/ws/demo_cnn.quantization.cfg").read_text()
    assert "proposal: clipped to" in cfg
