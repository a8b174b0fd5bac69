"""A tensor whose readers saturate beyond an interval (HardSwish's input below -3) is compared within it: analyze's
figures and the proposal's ranking see the error those readers see, not the clamped tail (target npu)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import hybridq
from hybridq.qdq import QdqMap
from hybridq.snapshot import load_arrays
from tests import models, npu_models


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_analyze_compares_a_floored_tensor_above_its_floor(tmp_path):
    path = tmp_path / "patterns.onnx"
    onnx.save(npu_models.exported_patterns(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16)}, 4, scale=3.0)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    assert QdqMap.from_model(onnx.load(str(q))).bounds == {"ln": (-3.0, math.inf)}  # step2 records the floor it calibrated with
    result = hybridq.analyze(path, q, listing, samples=4, dump=tmp_path / "snap")
    rows = {layer.tensor: layer for layer in result.layers}
    a, b = load_arrays(tmp_path / "snap", "ln")  # the dump keeps the values as they are
    assert (a < -3.0).any()
    want = np.mean([_cos(np.maximum(a[i], -3.0), np.maximum(b[i], -3.0)) for i in range(4)])
    raw = np.mean([_cos(a[i], b[i]) for i in range(4)])
    assert rows["ln"].entire.cosine == pytest.approx(want, rel=1e-9) and want > raw
    assert "hs_add" not in rows and "Add hs_add" in rows["hs"].folded  # inside the HardSwish, which the NPU runs as one layer
    a, b = load_arrays(tmp_path / "snap", "hs")  # a tensor with no floor: compared as it is
    assert rows["hs"].entire.cosine == pytest.approx(np.mean([_cos(a[i], b[i]) for i in range(4)]), rel=1e-9)
