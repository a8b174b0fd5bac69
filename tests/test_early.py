"""The CLI's early ONNX Runtime optimization: used only for the very model prepared, same result, nothing left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import pytest

from hybridq import _runtime
from hybridq.graph import ort_basic_optimize
from tests import models


def _prep_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("hybridq-prep-*")}


@pytest.fixture(autouse=True)
def _nothing_pending():
    yield
    _runtime._EARLY.clear()


def test_early_result_is_the_one_preparation_computes(tmp_path):
    # Same bytes, same options: the optimized model taken from the early run equals the one made through temp files.
    model = models.outlier_channel_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    before = _prep_dirs()
    direct = ort_basic_optimize(model)
    _runtime.optimize_early(tmp_path / "m.onnx")
    early = _runtime.early_optimized(model)
    assert early is not None and _runtime._EARLY == []
    _runtime.optimize_early(tmp_path / "m.onnx")
    assert ort_basic_optimize(model).SerializeToString() == direct.SerializeToString() and _runtime._EARLY == []
    assert _prep_dirs() == before


def test_early_result_is_refused_for_another_model(tmp_path):
    # Preparation changed the model (here: another one): the early result is dropped, never used.
    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    _runtime.optimize_early(tmp_path / "m.onnx")
    assert _runtime.early_optimized(models.residual_cnn(seed=5)) is None
    assert _runtime.early_optimized(models.residual_cnn()) is None  # taken once only


@pytest.mark.parametrize("content", [b"not a model", b""])
def test_early_failure_leaves_nothing(tmp_path, content):
    # A file ONNX Runtime cannot load (or an empty one) gives no early result and no temp directory.
    (tmp_path / "bad.onnx").write_bytes(content)
    before = _prep_dirs()
    _runtime.optimize_early(tmp_path / "bad.onnx")
    assert _runtime.early_optimized(models.residual_cnn()) is None
    _runtime.optimize_early(tmp_path / "missing.onnx")
    assert _runtime.early_optimized(models.residual_cnn()) is None and _prep_dirs() == before
