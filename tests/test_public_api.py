"""The public API: what `import hybridq` offers, that it loads nothing heavy, and the README example run verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import hybridq
from hybridq import api, errors

ROOT = Path(__file__).resolve().parent.parent


def test_import_loads_no_onnx_runtime_and_dir_lists_the_api() -> None:
    code = (
        "import sys, hybridq\n"
        "names = dir(hybridq)\n"
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'numpy', 'typer') if m in sys.modules))\n"
        "print(' '.join(names))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded, names = res.stdout.splitlines()
    assert loaded == "[]"
    for name in ("step1", "step2", "analyze", "propose", "load_snapshot", "Settings", "Preprocess", "ProposalOptions",
                 "Step1Result", "Step2Result", "AnalysisResult", "ProposalResult", "HybridqError", "InputError", "ConfigError"):
        assert name in names.split(), name


def test_every_public_name_resolves_to_its_module_object() -> None:
    for name in hybridq.__all__:
        assert getattr(hybridq, name) is not None, name
    assert hybridq.propose is api.propose and api.propose_cfg is api.propose
    assert hybridq.InputError is errors.InputError and issubclass(hybridq.ConfigError, hybridq.InputError)
    assert set(hybridq.__all__) <= set(dir(hybridq))


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"## Python API\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    subprocess.run([sys.executable, str(ROOT / "examples" / "build_demo.py"), str(tmp_path / "examples" / "demo")],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "samples, worst layer" in res.stdout and "uint8" in res.stdout
    assert (tmp_path / "examples" / "demo" / "out" / "demo_cnn.q.onnx").is_file()
