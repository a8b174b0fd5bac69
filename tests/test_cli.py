"""The command line end to end: exit codes, messages, JSON, the workspace template."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from hybridq.cli import main
from tests import models
from tests.conftest import cosine, run


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `hybridq args...` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def test_step1_step2_analyze_propose_from_the_command_line(capsys, cnn_ws):
    ws = cnn_ws["dir"] / "ws"
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "--dataset", cnn_ws["dataset"], "--out", ws)
    assert code == 0, err
    assert "Calibrated on 12 samples" in out and (ws / "cnn.quantization.cfg").exists()
    code, out, err = cli(capsys, "step2", ws / "cnn.model", ws / "cnn.data", ws / "cnn.quantization.cfg", "-o", ws / "q.onnx", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == {"uint8": 3, "float32": 1}
    x = np.load(cnn_ws["dataset"].parent / "x_0.npy")
    assert cosine(run(ws / "q.onnx", {"x": x})[0], run(cnn_ws["model"], {"x": x})[0]) > 0.99
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], ws / "q.onnx", "--dataset", cnn_ws["dataset"], "--dump", ws / "snap")
    assert code == 0, err
    assert (ws / "snap" / "manifest.json").exists() and (ws / "snap" / "report.html").exists()
    code, out2, err = cli(capsys, "analyze", "--from", ws / "snap")
    assert code == 0, err
    # Re-reading the snapshot prints the same table and verdict without running a model.
    assert out2.strip().splitlines() == out.strip().splitlines()[: len(out2.strip().splitlines())]
    assert "conv3" in out2 and "OK:" in out2
    code, out, err = cli(capsys, "propose", ws / "snap", "--cfg", ws / "cnn.quantization.cfg", "--dataset", cnn_ws["dataset"], "--target-cosine", "0.9")
    assert code == 0, err
    assert "measured on the model step2 builds" in out


def test_analyze_accepts_a_cfg_before_step2(capsys, cnn_ws):
    ws = cnn_ws["dir"] / "ws"
    assert cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "-q")[0] == 0
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], ws / "cnn.quantization.cfg", "-d", cnn_ws["dataset"], "--json")
    assert code == 0, err
    assert json.loads(out)["n_samples"] == 12



def test_analyze_on_a_cfg_prints_step2s_warnings_and_names_missing_artifacts(capsys, cnn_ws, tmp_path):
    """A cfg passed to analyze is built as step2 builds it: step2's warnings on its edits are printed too; copied away
    from step1's folder, the error says where the .model was looked for and what to do."""
    ws = cnn_ws["dir"] / "ws"
    assert cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "-q")[0] == 0
    cfg = ws / "cnn.quantization.cfg"
    text = cfg.read_text()
    start = text.index("\n  r2:\n")
    end = text.index("\n  ", text.index("zero_point", start))
    cfg.write_text(text[:start] + re.sub(r"(\n    scale: )[^\n]*", r"\g<1>[0.5]", text[start:end]) + text[end:])
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], cfg, "-d", cnn_ws["dataset"])
    assert code == 0, err
    assert "contradicts min/max" in out + err and "'r2'" in out + err
    away = tmp_path / "away" / "cnn.quantization.cfg"
    away.parent.mkdir()
    away.write_text(cfg.read_text())
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], away, "-d", cnn_ws["dataset"])
    assert code == 2 and "Traceback" not in out + err
    assert str(away.parent / "cnn.model") in err and "Keep the cfg in its step1 folder" in err

def test_bad_usage_exits_2_without_traceback(capsys, cnn_ws):
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "--dataset", cnn_ws["dataset"], "--dtype", "int4")
    assert code == 2 and "int4" in err and "Traceback" not in out + err
    code, out, err = cli(capsys, "step1", cnn_ws["model"])
    assert code == 2 and "Traceback" not in out + err
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "--dataset", cnn_ws["dataset"], "--algorithm", "kll")
    assert code == 2 and "kl" in err


def test_init_copies_the_workspace_template(capsys, tmp_path, cnn_ws):
    code, out, err = cli(capsys, "init", tmp_path / "w", "--model", cnn_ws["model"])
    assert code == 0, err
    assert {p.name for p in (tmp_path / "w").iterdir()} >= {"README.md", "dataset.txt", "hybridq.yaml", "cnn.onnx"}
    code, out, err = cli(capsys, "init", tmp_path / "w")
    assert code == 2 and "not empty" in err


def test_python_module_entry_point(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "hybridq", "--help"], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0 and "step1" in res.stdout


def test_workspace_config_sets_defaults_and_options_win(capsys, cnn_ws):
    conf = cnn_ws["dir"] / "hybridq.yaml"
    conf.write_text("algorithm: percentile\npercentile: 99.9\nqmethod: layer\n")
    ws = cnn_ws["dir"] / "ws"
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "--config", conf, "--qmethod", "channel", "-q")
    assert code == 0, err
    from hybridq.config import load_cfg

    cfg = load_cfg(ws / "cnn.quantization.cfg")
    assert (cfg.settings.algorithm, cfg.settings.percentile, cfg.settings.qmethod) == ("percentile", 99.9, "channel")
    conf.write_text("algorithmm: kl\n")
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "--config", conf)
    assert code == 2 and "algorithm" in err and "Did you mean" in err


def test_version_and_full_command_summaries_in_help(capsys, monkeypatch):
    from hybridq import __version__
    from hybridq.cli import app

    code, out, err = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"hybridq {__version__}"
    monkeypatch.setenv("COLUMNS", "60")
    code, out, err = cli(capsys, "--help")
    listed = " ".join(out.split("Commands:")[1].split())
    assert code == 0 and "..." not in listed
    for info in app.registered_commands:
        summary = info.callback.__doc__.strip().splitlines()[0]
        assert len(summary) <= 65 and summary.endswith(".")  # 65: what click shows uncut at 80 columns
        assert f"{info.callback.__name__} {summary}" in listed, summary


def test_progress_bar_knows_its_length_and_next_command_is_one_line(capsys, monkeypatch, cnn_ws):
    import io

    from rich.console import Console

    from hybridq import _console as cli_module

    bar = io.StringIO()
    monkeypatch.setattr(cli_module, "err", Console(file=bar, force_terminal=True, width=120))
    monkeypatch.setattr(cli_module, "out", Console(file=io.StringIO(), width=60))
    deep = cnn_ws["dir"] / ("a-rather-long-directory-name-" * 3) / "ws"
    cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", deep)
    assert "12/12" in bar.getvalue() and "12/?" not in bar.getvalue()  # "0/?" may show before the dataset is opened
    printed = cli_module.out.file.getvalue()
    next_line = next(line for line in printed.splitlines() if line.startswith("Next:"))
    assert next_line.endswith(f"-o {deep / 'cnn.q.onnx'}`.")


def test_quiet_prints_no_warnings_and_a_non_positive_target_cosine_is_refused(capsys, monkeypatch, tmp_path):
    """--quiet is "nothing but errors": warnings too; --target-cosine is (0, 1] for propose as for analyze."""
    from hybridq import _console

    monkeypatch.setattr(_console.State, "quiet", True)
    _console.warn(["inputs far outside the calibrated range"])
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_console.State, "quiet", False)
    _console.warn(["inputs far outside the calibrated range"])
    assert "warning: inputs far outside" in capsys.readouterr().err
    model = tmp_path / "m.onnx"
    onnx.save(models.residual_cnn(), model)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 2)
    code, out, err = cli(capsys, "step1", model, "--dataset", listing, "--out", tmp_path / "ws", "--proposal", "--target-cosine", "0")
    assert code == 2 and "--target-cosine must be in (0, 1], got 0.0" in err


def test_proposal_options_without_proposal_are_a_usage_error(capsys, cnn_ws):
    """`step1 --target-snr 30` without --proposal set nothing and said nothing; `propose --max-drop` without --eval is
    refused the same way."""
    code, out, err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", cnn_ws["dir"] / "ws", "--target-snr", "30",
                         "--max-float-layers", "2")
    assert code == 2 and "Traceback" not in out + err
    assert "--target-snr, --max-float-layers set the proposal" in err and "add --proposal" in err
    assert not (cnn_ws["dir"] / "ws").exists()


@pytest.mark.parametrize("given", ["0", "-2"])
def test_analyze_refuses_a_sample_count_below_one_as_step1_does(capsys, cnn_ws, given):
    """--samples 0 is not "all samples" (step1 refuses it, and leaving --samples out already means all): analyze
    refuses it too, exit 2, with step1's message; the Python API refuses it as well."""
    import hybridq

    ws = cnn_ws["dir"] / "ws"
    assert cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "-q")[0] == 0
    code, _, step1_err = cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "--samples", given)
    assert code == 2
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], ws / "cnn.quantization.cfg", "-d", cnn_ws["dataset"], "--samples", given)
    assert code == 2 and "Traceback" not in out + err
    assert f"--samples must be at least 1, got {given}" in err and "0 or more" not in err
    assert f"--samples must be at least 1, got {given}" in step1_err
    with pytest.raises(hybridq.InputError, match="at least 1"):
        hybridq.analyze(cnn_ws["model"], ws / "cnn.quantization.cfg", cnn_ws["dataset"], samples=int(given))
    # With --from, --samples of any value runs nothing, and saying so is the message.
    code, out, err = cli(capsys, "analyze", "--from", ws, "--samples", given)
    assert code == 2 and "--samples" in err and "would do nothing" in err


def test_analyze_of_a_step2_model_elsewhere_suggests_a_propose_command_that_runs(capsys, cnn_ws, tmp_path):
    """A step2 model written away from its cfg: analyze finds the cfg step1 wrote (in a folder under the fp32 model's,
    matched by the temp model's sha256 the step2 model records), so the suggested command runs as printed. With no
    such cfg around, the command keeps a placeholder and the next step names the file to pass."""
    import shlex

    ws, away = cnn_ws["dir"] / "ws", tmp_path / "deploy"
    assert cli(capsys, "step1", cnn_ws["model"], "-d", cnn_ws["dataset"], "-o", ws, "-q")[0] == 0
    onnx.save(models.residual_cnn(seed=1), tmp_path / "other.onnx")  # another model's cfg, under the same folder: not it
    assert cli(capsys, "step1", tmp_path / "other.onnx", "-d", cnn_ws["dataset"], "-o", cnn_ws["dir"] / "other", "-q")[0] == 0
    assert cli(capsys, "step2", ws / "cnn.model", ws / "cnn.data", ws / "cnn.quantization.cfg", "-o", away / "q.onnx", "-q")[0] == 0
    code, out, err = cli(capsys, "analyze", cnn_ws["model"], away / "q.onnx", "-d", cnn_ws["dataset"], "--target-cosine", "0.9999999")
    assert code == 0, err
    command = next(line for line in out.splitlines() if line.startswith("Command: "))[len("Command: "):]
    assert f"--cfg {ws / 'cnn.quantization.cfg'} " in command and "MODEL.quantization.cfg" not in out
    code, out, err = cli(capsys, *shlex.split(command)[1:])
    assert code == 0, err
    # the fp32 model copied where no cfg lies: the placeholder, said plainly
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "cnn.onnx").write_bytes(cnn_ws["model"].read_bytes())
    code, out, err = cli(capsys, "analyze", alone / "cnn.onnx", away / "q.onnx", "-d", cnn_ws["dataset"], "--target-cosine", "0.9999999")
    assert code == 0, err
    assert f"(for MODEL.quantization.cfg pass the cfg step1 wrote for {alone / 'cnn.onnx'}, cnn.quantization.cfg in its --out folder)" in out
    assert "# MODEL.quantization.cfg: the cfg step1 wrote, see Next" in out



def test_batched_npy_files_are_counted_as_the_samples_they_hold(capsys, tmp_path):
    """Two .npy files of 4 rows each for a model with a dynamic batch dim: step1 calibrates on 8 samples and says so
    (message, JSON, cfg header with the 2 entries beside), analyze names 8 samples in 2 batched entries, whose
    per-sample figures are one per entry; 8 files of one row each are 8 samples, with no entries named."""
    import hybridq
    from hybridq.report import verdict

    onnx.save(models.matmul_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    for name, rows in (("batched", [4, 4]), ("single", [1] * 8)):
        d = tmp_path / name
        d.mkdir()
        for k, r in enumerate(rows):
            np.save(d / f"b{k}.npy", rng.normal(0, 1, (r, 32)).astype(np.float32))
        (d / "dataset.txt").write_text("".join(f"b{k}.npy\n" for k in range(len(rows))))
    files = sorted((tmp_path / "batched").glob("*.npy"))
    held = sum(np.load(f).shape[0] for f in files)
    assert (held, len(files)) == (8, 2)

    ws = tmp_path / "ws"
    code, out, err = cli(capsys, "step1", tmp_path / "mlp.onnx", "-d", tmp_path / "batched" / "dataset.txt", "-o", ws)
    assert code == 0, err
    assert f"Calibrated on {held} samples in {len(files)} batched dataset entries;" in out
    header = (ws / "mlp.quantization.cfg").read_text()
    assert f"\n  samples: {held}\n  dataset_entries: {len(files)}\n" in header
    code, out, err = cli(capsys, "step1", tmp_path / "mlp.onnx", "-d", tmp_path / "batched" / "dataset.txt", "-o", ws, "--json")
    assert (json.loads(out)["samples"], json.loads(out)["dataset_entries"]) == (held, len(files))

    res = hybridq.analyze(tmp_path / "mlp.onnx", ws / "mlp.quantization.cfg", tmp_path / "batched" / "dataset.txt")
    assert (res.n_samples, res.batched_rows) == (len(files), held)
    assert f"over {held} samples in {len(files)} batched dataset entries" in verdict(res)
    assert any(f"the {len(files)} dataset entries hold {held} samples in batches" in n for n in res.notes)
    assert type(res).from_dict(res.to_dict()).batched_rows == held

    single = hybridq.step1(tmp_path / "mlp.onnx", tmp_path / "single" / "dataset.txt", out=tmp_path / "ws1")
    assert (single.samples, single.dataset_entries) == (8, None)
    assert "\n  samples: 8\n" in single.cfg.read_text() and "dataset_entries" not in single.cfg.read_text()
    res = hybridq.analyze(tmp_path / "mlp.onnx", single.cfg, tmp_path / "single" / "dataset.txt")
    assert (res.n_samples, res.batched_rows) == (8, None) and "over 8 sample(s)" in verdict(res)
