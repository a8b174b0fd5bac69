"""Compute estimates per layer (multiply-accumulates), for float budgets and speed-aware placement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ._onnx import without_weights
from .graph import tensor_shapes

NOMINAL_DIM = 224
"""Size given to an unknown input dimension other than the batch when no sample is at hand."""


def concrete_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model whose inputs take the sample's shapes, with shapes inferred (for compute estimates); its
    large weights hold no data (:func:`~hybridq._onnx.without_weights`), their dims do."""
    work = without_weights(model)
    for vi in work.graph.input:
        if vi.name in sample and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, sample[vi.name].shape):
                d.Clear()
                d.dim_value = int(n)
    del work.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception:
        return model


def layer_macs(model: onnx.ModelProto) -> dict[str, float]:
    """Multiply-accumulates of each Conv/Gemm/MatMul node (weight size x output positions; weight size when shapes are unknown)."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = tensor_shapes(model)
    macs: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        w = next((inits[i] for i in node.input[1:2] if i in inits), None)
        out = shapes.get(node.output[0], ())
        known = [d for d in out if isinstance(d, int) and d > 0]
        if w is not None:
            size = float(np.prod(w.dims))
            if node.op_type in ("Conv", "ConvTranspose"):
                positions = float(np.prod(known[2:])) if len(known) == len(out) and len(out) > 2 else 1.0
            else:
                positions = float(np.prod(known[:-1])) if len(known) == len(out) and len(out) > 1 else 1.0
            macs[node.name] = size * positions
        else:
            a = shapes.get(node.input[0], ())
            dims = [d for d in a if isinstance(d, int) and d > 0]
            macs[node.name] = float(np.prod(dims) * (known[-1] if known else 1)) if dims else 1.0
    return macs


def nominal_sample(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Zero arrays shaped like the float graph inputs, unknown dims set to 1 (batch) or NOMINAL_DIM."""
    inits = {i.name for i in model.graph.initializer}
    sample: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        t = vi.type.tensor_type
        if vi.name in inits or not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if k == 0 else NOMINAL_DIM) for k, d in enumerate(t.shape.dim)]
        sample[vi.name] = np.broadcast_to(np.zeros((), np.float32), dims)
    return sample


PROPOSED = "proposed"
USER = "yours"


@dataclass
class FloatShare:
    """Which multiply-accumulates run float in a built model, and why.

    `cause` maps every float-running Conv/ConvTranspose/Gemm/MatMul to PROPOSED (the proposal
    chose it), USER (the cfg's custom_quantize_layers) or the name of the policy that keeps it
    float (a setting such as float_stem, or an op with no int8 form).
    """

    total: float
    macs: dict[str, float]
    cause: dict[str, str]

    def share(self, causes: set[str] | None = None) -> float:
        """Fraction of all MACs in float layers whose cause is in `causes` (all float layers when None)."""
        if self.total <= 0:
            return 0.0
        return sum(self.macs.get(n, 0.0) for n, c in self.cause.items() if causes is None or c in causes) / self.total

    @property
    def fraction(self) -> float:
        """Fraction of all MACs that runs float."""
        return self.share()

    def policies(self) -> dict[str, int]:
        """Policy name -> number of float layers it keeps float (proposed and user layers excluded)."""
        out: dict[str, int] = {}
        for c in self.cause.values():
            if c not in (PROPOSED, USER):
                out[c] = out.get(c, 0) + 1
        return out

    @property
    def policy_fraction(self) -> float:
        """Fraction of all MACs kept float by policies."""
        return self.share(set(self.policies()))


def float_share(macs: dict[str, float], cause: dict[str, str]) -> FloatShare:
    """The float share of a model whose MAC-counted layers are `macs`, given the cause of each float layer."""
    return FloatShare(float(sum(macs.values())), {n: macs.get(n, 0.0) for n in cause}, dict(cause))
