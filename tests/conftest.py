"""Shared fixtures: small models on disk with calibration data."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import models


def exact_options() -> ort.SessionOptions:
    """Session options under which int8 products are exact on every x86 CPU.

    Without VNNI, ONNX Runtime's default U8S8 kernels add pairs of products in a
    saturating int16 (outputs of these small random models move to cosine 0.98);
    ``session.x64quantprecision=1`` makes it use exact U8U8 kernels, as VNNI and
    ARM CPUs compute anyway. Set unconditionally: on those it changes no number.
    """
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")
    return so


def run(model: str | Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in ONNX Runtime's CPU provider, int8 products exact (see :func:`exact_options`)."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, exact_options(), providers=["CPUExecutionProvider"]).run(None, feeds)


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run `hybridq ARGS` through cli.main (its SIGTERM handler undone after); returns (exit code, stdout, stderr)."""
    from hybridq import cli

    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity by the textbook formula."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


_MEASURED = [False]
_TIMED = [False]


@pytest.fixture(scope="session", autouse=True)
def _mac_cost_model():
    """step1 places layers by MAC counts in tests (as with --no-measure), so no test depends on this machine's
    timings (module-scoped fixtures' step1 runs included); tests marked ``measured`` run the measured cost model."""
    import dataclasses

    from hybridq import api

    measured = api.step1_costs

    def chosen(model, sample, settings, out_dir, stem):
        return measured(model, sample, settings if _MEASURED[0] else dataclasses.replace(settings, cost_model="macs"), out_dir, stem)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "step1_costs", chosen)
        yield


@pytest.fixture(scope="session", autouse=True)
def _int8_pays():
    """step1's speed check finds that int8 pays in tests (a fixture model of a few small layers is faster in fp32 on
    any CPU, and would be kept float), unless a test is marked ``speed_check``: then the models are timed."""
    from hybridq import speedcheck

    timed = speedcheck.check

    def chosen(*args, **kwargs):
        return timed(*args, **kwargs) if _TIMED[0] else speedcheck.SpeedCheck(1.0, 0.5)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speedcheck, "check", chosen)
        yield


@pytest.fixture(autouse=True)
def _measured_marker(request: pytest.FixtureRequest):
    """Let a test marked ``measured`` run step1's measured cost model, and one marked ``speed_check`` time its models."""
    _MEASURED[0] = request.node.get_closest_marker("measured") is not None
    _TIMED[0] = request.node.get_closest_marker("speed_check") is not None
    yield
    _MEASURED[0] = _TIMED[0] = False


@pytest.fixture
def cnn_ws(tmp_path: Path) -> dict[str, Path]:
    """The residual CNN saved to disk with 12 calibration samples."""
    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 12)
    return {"model": path, "dataset": listing, "dir": tmp_path}
