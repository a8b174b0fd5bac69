"""`hybridq init` workspaces: step1 finds hybridq.yaml, the README names the real model, a wheel install ships the template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import pytest

from hybridq import api
from hybridq import errors as hybridq_errors
from hybridq.config import load_cfg
from hybridq.workspace import find_config
from tests import models
from tests.conftest import cosine, run
from tests.test_preprocess_record import MEAN, STD, cli, numpy_inputs, write_images

REPO = Path(__file__).resolve().parent.parent


def test_init_step1_step2_analyze_from_the_workspace_files_only(capsys, tmp_path, monkeypatch):
    src = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), src)
    code, out, err = cli(capsys, "init", tmp_path / "ws", "--model", src)
    assert code == 0, err
    ws = tmp_path / "ws"
    readme = (ws / "README.md").read_text()
    assert "cnn.onnx" in readme and "cnn.quantization.cfg" in readme and "model.onnx" not in readme
    # the user's edits: images listed in dataset.txt, preprocessing and an algorithm in hybridq.yaml
    write_images(ws / "images", 8, seed=3)
    (ws / "dataset.txt").write_text("".join(f"images/img{i}.png\n" for i in range(8)))
    yaml = (ws / "hybridq.yaml").read_text().replace("algorithm: minmax", "algorithm: percentile")
    (ws / "hybridq.yaml").write_text(yaml + f"mean: {list(MEAN)}\nstd: {list(STD)}\n")
    monkeypatch.chdir(ws)
    # the README's commands, verbatim
    commands = [line.strip().split()[1:] for line in readme.splitlines() if line.strip().startswith("hybridq ")]
    assert [c[0] for c in commands] == ["step1", "step2", "analyze"]
    for command in commands:
        code, out, err = cli(capsys, *command)
        assert code == 0, (command, err)
        assert "warning" not in err
        if command[0] == "step1":
            assert "Workspace config: hybridq.yaml" in out
    header = load_cfg(ws / "cnn.quantization.cfg")
    assert header.settings.algorithm == "percentile"
    assert header.header["preprocess"]["mean"] == pytest.approx(MEAN)
    snap = api.load_snapshot(ws / "snapshot")
    logits = next(le for le in snap.layers if le.tensor == "logits")
    cos = [cosine(run(src, {"x": x})[0], run(ws / "cnn.q.onnx", {"x": x})[0]) for x in numpy_inputs(ws / "dataset.txt")]
    assert logits.entire.cosine == pytest.approx(float(np.mean(cos)), abs=1e-5)


def test_command_line_wins_over_the_workspace_file(capsys, cnn_ws):
    (cnn_ws["dir"] / "hybridq.yaml").write_text("algorithm: mse\nqmethod: layer\n")
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "--algorithm", "percentile")
    assert code == 0, err
    settings = load_cfg(cnn_ws["dir"] / "cnn.quantization.cfg").settings
    assert (settings.algorithm, settings.qmethod) == ("percentile", "layer")


def test_python_api_reads_a_workspace_config(cnn_ws, tmp_path):
    conf = tmp_path / "elsewhere.yaml"
    conf.write_text("dtype: int8\nalgorithm: mse\n")
    res = api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "o", config=conf, settings={"algorithm": "minmax"})
    settings = load_cfg(res.cfg).settings
    assert (settings.dtype, settings.algorithm) == ("int8", "minmax") and res.config == conf


def test_find_config_looks_in_out_then_model_then_dataset(tmp_path):
    for d in ("out", "model", "data"):
        (tmp_path / d).mkdir()
    model, listing = tmp_path / "model" / "m.onnx", tmp_path / "data" / "dataset.txt"
    assert find_config(tmp_path / "out", model, listing) is None
    (tmp_path / "data" / "hybridq.yaml").write_text("")
    assert find_config(tmp_path / "out", model, listing) == tmp_path / "data" / "hybridq.yaml"
    (tmp_path / "model" / "hybridq.yaml").write_text("")
    assert find_config(tmp_path / "out", model, listing) == tmp_path / "model" / "hybridq.yaml"
    (tmp_path / "out" / "hybridq.yaml").write_text("")
    assert find_config(tmp_path / "out", model, listing) == tmp_path / "out" / "hybridq.yaml"


def test_bad_workspace_config_is_a_clear_error(capsys, cnn_ws):
    (cnn_ws["dir"] / "hybridq.yaml").write_text("algoritm: mse\n")
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"])
    assert code == 2 and "Traceback" not in err
    assert "hybridq.yaml" in err and "'algoritm'" in err and "Did you mean: 'algorithm'" in err
    (cnn_ws["dir"] / "hybridq.yaml").write_text("dtype: [uint8\n")
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"])
    assert code == 2 and "YAML syntax error" in err


@pytest.mark.slow
def test_init_works_after_a_plain_wheel_install(tmp_path):
    """Build a wheel, install it (no deps) into a fresh venv that borrows this one's dependencies, run `hybridq init`.

    About 6 s with pip's cache, but the isolated build fetches setuptools from the package index when the cache
    is cold, so it is marked slow to keep the fast suite offline.
    """
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    wheel = next(wheels.glob("hybridq-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, capture_output=True)
    # dependencies from the test venv, appended after the new site-packages (its editable hybridq finder is not loaded)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import hybridq.workspace as w; print(w.__file__, w.template_dir())"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert str(site) in where and str(REPO) not in where
    # every subpackage is in the wheel (pyproject lists them one by one)
    imported = subprocess.run([str(py), "-c", "import hybridq.api, hybridq.analysis, hybridq.proposal, hybridq.rknn"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    model = tmp_path / "net.onnx"
    onnx.save(models.residual_cnn(), model)
    done = subprocess.run([str(py), "-m", "hybridq", "init", str(tmp_path / "ws"), "--model", str(model)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "ws").iterdir()} == {"README.md", "dataset.txt", "hybridq.yaml", "net.onnx"}
    assert "hybridq step1 net.onnx" in (tmp_path / "ws" / "README.md").read_text()
    # the demo loop from the installed wheel: step1 (finding ws/hybridq.yaml), step2, analyze on the workspace files
    ws = tmp_path / "ws"
    listing = models.write_npy_dataset(ws / "data", {"x": (1, 3, 16, 16)}, 8)
    for args in (["step1", "net.onnx", "-d", str(listing), "--out", "."],
                 ["step2", "net.model", "net.data", "net.quantization.cfg", "-o", "net.q.onnx"],
                 ["analyze", "net.onnx", "net.q.onnx", "-d", str(listing), "--json"]):
        run = subprocess.run([str(py), "-m", "hybridq", *args], cwd=ws, env=env, capture_output=True, text=True)
        assert run.returncode == 0, (args, run.stdout, run.stderr)
    verdict = json.loads(run.stdout)["verdict"]
    assert verdict["outputs"][0]["cosine"] > 0.99 if "outputs" in verdict else verdict["worst_outputs"][0]["cosine"] > 0.99


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages by hand (workspace_template is mapped in); a new subpackage must be listed too."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hybridq").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_an_invalid_option_is_blamed_on_the_options_not_on_a_workspace_file_without_it(tmp_path):
    from hybridq.errors import ConfigError
    from hybridq.workspace import merge

    cfg = tmp_path / "hybridq.yaml"
    cfg.write_text("speed_check: false\n")
    with pytest.raises(ConfigError, match=r"^the given options \(on top of .*hybridq.yaml\): dtype 'int4' is not valid"):
        merge(cfg, {"dtype": "int4"})
    cfg.write_text("dtype: int4\n")
    with pytest.raises(ConfigError, match=r"^.*hybridq.yaml: dtype 'int4' is not valid"):
        merge(cfg, {"algorithm": "mse"})
    assert merge(cfg, {"dtype": "int8"}).settings.dtype == "int8"  # a valid option replaces the file's invalid value


def test_seed_draws_the_samples_and_the_workspace_file_can_set_it(cnn_ws, tmp_path, capsys):
    """--samples 4 --seed 3 calibrates on the 4 samples numpy's generator draws, in list order: the recorded input range
    is theirs (numpy over those files), the same with 2 workers and from hybridq.yaml; without a seed, the first 4."""
    from hybridq.artifacts import read_meta
    from hybridq.execution import Execution

    files = [ln.split()[0] for ln in Path(cnn_ws["dataset"]).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    arrays = [np.load(Path(cnn_ws["dataset"]).parent / f) for f in files]
    drawn = sorted(np.random.default_rng(3).choice(len(arrays), 4, replace=False).tolist())
    assert drawn != [0, 1, 2, 3]

    def recorded(out: Path) -> tuple[float, float]:
        r = read_meta(out / "cnn.data")["input_ranges"]["x"]
        return r["min"], r["max"]

    def expected(idx: list[int]) -> tuple[float, float]:
        return float(min(arrays[i].min() for i in idx)), float(max(arrays[i].max() for i in idx))

    api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "a", samples=4, seed=3)
    assert recorded(tmp_path / "a") == pytest.approx(expected(drawn)) and load_cfg(tmp_path / "a" / "cnn.quantization.cfg").header["seed"] == 3
    api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "b", samples=4, seed=3, execution=Execution(workers=2))
    assert (tmp_path / "b" / "cnn.quantization.cfg").read_bytes() == (tmp_path / "a" / "cnn.quantization.cfg").read_bytes()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "hybridq.yaml").write_text("samples: 4\nseed: 3\n")
    assert cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "--out", tmp_path / "c", "-q")[0] == 0
    assert recorded(tmp_path / "c") == recorded(tmp_path / "a")
    api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "d", samples=4)
    assert recorded(tmp_path / "d") == pytest.approx(expected([0, 1, 2, 3]))
    (tmp_path / "c" / "hybridq.yaml").write_text("samples: 0\n")
    code, _, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "--out", tmp_path / "c")
    assert code == 2 and "samples must be a whole number >= 1" in err, err
    with pytest.raises(hybridq_errors.InputError, match="batch_size must be a whole number >= 1"):
        api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "e", batch_size=0)
    r = api.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "e", seed=5)
    assert any("seed 5 drew nothing" in n for n in r.notes) and "seed" not in load_cfg(r.cfg).header
