"""calibration.calibrate on edge cases of what it observes, checked against ONNX Runtime's own outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from hybridq import calibration
from tests import models


@pytest.mark.parametrize("threads", [0, 1])
def test_min_max_only_tensors_past_range_batches_are_counted_not_run(threads: int) -> None:
    """Every tensor min/max only (no histogram): past `range_batches` nothing is left to fetch. A run fetching no output
    would return all of them (ONNX Runtime's reading of an empty list), which once failed step1 on PP-OCR cls with a
    cached cost table that kept every layer float; the rest of the samples are now checked and counted."""
    model = models.conv_relu(channels=4, size=8, seed=2)
    rng = np.random.default_rng(4)
    batches = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    seen: list[int] = []
    obs = calibration.calibrate(model, iter(batches), tensors=["c", "y"], histograms=set(), range_batches=2,
                                on_batch=seen.append, threads=threads)
    ref = helper.make_model(model.graph, opset_imports=list(model.opset_import))
    ref.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    c = [sess.run(["c"], b)[0] for b in batches[:2]]
    assert seen == [1] * 5
    assert (obs["c"].min, obs["c"].max) == (float(min(v.min() for v in c)), float(max(v.max() for v in c)))
    assert obs["y"].min == 0.0 and obs["y"].max == obs["c"].max and not obs["c"].bins
    with pytest.raises(Exception, match="no data for model input"):
        calibration.calibrate(model, iter(batches[:3] + [{"z": batches[0]["x"]}]), tensors=["c"], histograms=set(), range_batches=2)
