"""Streaming calibration: run the temp model in ONNX Runtime and feed every float activation to an observer.

One pass over the samples; each batch's tensors are dropped after their
statistics are merged, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable

import numpy as np
import onnx

from .errors import DatasetError, ModelError
from .graph import float_activations, is_large, save_external
from .observers import HistogramObserver


def session_for(model: onnx.ModelProto, outputs: list[str] | None = None, *, basic: bool = True):
    """An ORT CPU session over `model`, with extra graph outputs when given (model copied, not modified)."""
    import onnxruntime as ort

    work = model
    if outputs:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        present = {o.name for o in work.graph.output}
        for name in outputs:
            if name not in present:
                work.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        if is_large(work):
            with tempfile.TemporaryDirectory(prefix="hybridq-sess-") as tmp:
                path = os.path.join(tmp, "m.onnx")
                save_external(work, path, "m.data")
                return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(work.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0]}") from exc


_MIN, _MAX = "__hybridq_min", "__hybridq_max"


def _with_range_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also computes ReduceMin/ReduceMax of `names` (scalars are cheap to fetch)."""
    if not names:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for n in names:
        for op, suffix in (("ReduceMin", _MIN), ("ReduceMax", _MAX)):
            work.graph.node.append(onnx.helper.make_node(op, [n], [n + suffix], name=n + suffix, keepdims=0))
    return work


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    tensors: list[str] | None = None,
    histograms: set[str] | None = None,
    describe: Callable[[int], str] = lambda i: f"batch {i}",
    on_batch: Callable[[int], None] | None = None,
    range_batches: int | None = 16,
) -> dict[str, HistogramObserver]:
    """Observe every float activation (or `tensors`) over all batches; returns one observer per tensor.

    Tensors in `histograms` (all when None) get a histogram from every batch. The others, which
    no layer quantizes by default, get min/max only, and only from the first `range_batches`
    batches (None: all): their in-graph reductions cost more than the model itself on large models.
    """
    names = tensors if tensors is not None else float_activations(model)
    full = [n for n in names if histograms is None or n in histograms]
    ranged = [n for n in names if histograms is not None and n not in histograms]
    sess = session_for(_with_range_outputs(model, ranged), full + [f"{n}{_MIN}" for n in ranged] + [f"{n}{_MAX}" for n in ranged])
    fetch = full + [f"{n}{_MIN}" for n in ranged] + [f"{n}{_MAX}" for n in ranged]
    feeds = {i.name for i in sess.get_inputs()}
    observers = {n: HistogramObserver(bins=n in full) for n in names}
    n_batches = 0
    for b, batch in enumerate(batches):
        if ranged and range_batches is not None and b == range_batches:
            sess, fetch, ranged = session_for(model, full), full, []
        missing = feeds - batch.keys()
        if missing:
            raise DatasetError(f"{describe(b)} has no data for model input(s) {sorted(missing)}.")
        try:
            values = sess.run(fetch, {k: batch[k] for k in feeds})
        except Exception as exc:
            raise DatasetError(f"ONNX Runtime failed on {describe(b)}: {str(exc).splitlines()[0]}. Check the sample's shape and dtype against the model input.") from exc
        name = ""
        try:
            for name, value in zip(full, values):
                observers[name].update(value)
            k = len(full)
            for i, name in enumerate(ranged):
                observers[name].update_range(float(values[k + i]), float(values[k + len(ranged) + i]), 1)
        except ValueError:
            raise DatasetError(
                f"Tensor '{name}' holds NaN or Inf on {describe(b)}. Check that sample (its values, preprocessing "
                "and mean/std); calibration needs finite activations."
            ) from None
        del values
        n_batches += 1
        if on_batch:
            on_batch(len(next(iter(batch.values()))) if batch else 1)
    if n_batches == 0:
        raise DatasetError("The dataset gave no samples to calibrate on; list at least one sample.")
    return observers
