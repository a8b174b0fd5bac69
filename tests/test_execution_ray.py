"""The Ray back end (the `hybridq[ray]` extra, which `make test` installs): same bytes as in-process; a killed actor is a clear error.

One local Ray instance for the module (starting one takes seconds); hybridq attaches to it for `--ray local`.
"""

from __future__ import annotations

import pytest

from hybridq.execution import Execution
from tests.test_execution import (  # noqa: F401 (cnn20, concat16: fixtures)
    _analyze_manifest, _digest, _kill_setup, _proposal, _remote_scoring, _step1_digests, cli, cnn20, concat16,
)

import hybridq

ray = pytest.importorskip("ray", reason="the hybridq[ray] extra is not installed (make install installs it)")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_gives_the_same_step1_artifacts_and_analyze_manifest(ray_local, cnn20):
    on_ray = Execution(workers=2, ray="local")
    assert _step1_digests(cnn20, "ray", on_ray) == _step1_digests(cnn20, "inproc", None)
    quant = hybridq.step2(cnn20["dir"] / "inproc" / "cnn.model", cnn20["dir"] / "inproc" / "cnn.data",
                          cnn20["dir"] / "inproc" / "cnn.quantization.cfg", cnn20["dir"] / "q.onnx").output
    assert _analyze_manifest(cnn20, quant, "snap_ray", on_ray)[0] == _analyze_manifest(cnn20, quant, "snap", None)[0]


def test_a_killed_ray_worker_is_a_clear_error_and_leaves_artifacts(ray_local, capsys, cnn20):
    out = cnn20["dir"] / "out"
    hook = ["--preprocess", str(cnn20["dir"] / "hook.py") + ":load"]
    _kill_setup(cnn20, "none")
    assert cli(capsys, "step1", cnn20["model"], "-d", cnn20["dataset"], "--out", out, *hook)[0] == 0
    before = {p.name: _digest(p) for p in out.iterdir()}
    _kill_setup(cnn20, "x_3.npy")
    code, text = cli(capsys, "step1", cnn20["model"], "-d", cnn20["dataset"], "--out", out, "--ray", "local", "--workers", "2", *hook)
    assert code == 1, text
    assert "ended abruptly" in text and "Traceback" not in text
    assert {p.name: _digest(p) for p in out.iterdir()} == before


def test_ray_gives_the_same_proposal_table_and_cfg_and_eval_figure(ray_local, monkeypatch, concat16):
    sent = _remote_scoring(monkeypatch)
    base = _proposal(concat16, "one", None, eval_fn=f"{concat16['eval']}:evaluate")
    assert _proposal(concat16, "ray", Execution(workers=2, ray="local"), eval_fn=f"{concat16['eval']}:evaluate") == base
    assert sent, "candidates were scored on the Ray actors"


def test_a_ray_worker_killed_during_the_proposal_is_a_clear_error(ray_local, capsys, concat16):
    (concat16["dir"] / "kill.eval").write_text("")  # the --eval function kills the actor that runs it
    out = concat16["dir"] / "out"
    code, text = cli(capsys, "step1", concat16["model"], "-d", concat16["dataset"], "--out", out, "--proposal",
                     "--eval", f"{concat16['eval']}:evaluate", "--ray", "local", "--workers", "2")
    assert code == 1, text
    assert "ended abruptly" in text and "Traceback" not in text
    assert not out.exists() or not any(out.iterdir()), "nothing written"
