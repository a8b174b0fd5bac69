"""What of each model output a candidate is judged on: the output itself, or for an integer output the float tensors
the op deciding it reads (an ArgMax, a threshold, NonMaxSuppression); and how a Softmax output's log-probabilities are read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .._onnx import GraphIndex, tensor_types
from ..errors import ModelError

DECIDERS: dict[str, tuple[int, ...]] = {
    "ArgMax": (0,), "ArgMin": (0,), "TopK": (0,), "NonMaxSuppression": (0, 1),
    "Greater": (0, 1), "GreaterOrEqual": (0, 1), "Less": (0, 1), "LessOrEqual": (0, 1), "Equal": (0, 1),
}
"""Ops whose integer or bool output is a decision on float inputs, and which inputs (a constant threshold is not judged)."""
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
JUDGED = "__hybridq_judged__"
"""Prefix of the graph outputs a scored model gets for the float tensors an integer output is decided from."""


@dataclass(frozen=True)
class Decision:
    """An integer (bool) model output a deciding op (:data:`DECIDERS`: an ArgMax, a threshold, NonMaxSuppression) writes,
    through reshapes and casts, from float tensors: those are judged in the output's place, and the output's values
    are compared with fp32's."""

    output: str
    op: str
    sources: tuple[str, ...]
    """The float tensors the op reads in the fp32 model."""
    positions: tuple[int, ...]
    """Their input positions on the op (the same in every candidate)."""

    @property
    def fetch(self) -> list[str]:
        """The graph outputs the scored models get for the decided tensors (the same names in every candidate)."""
        return [f"{JUDGED}{self.output}/{p}" for p in self.positions]

    @property
    def labels(self) -> list[str]:
        """What each judged tensor is called in the figures: the output's name (with the tensor's, when there are two)."""
        return [self.output] if len(self.sources) == 1 else [f"{self.output} ({s})" for s in self.sources]

    def nodes(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        """The Cast to float32 of each tensor the op reads in `model` (what it decides on there), to :attr:`fetch`."""
        node = _decider(GraphIndex(model.graph), self.output)
        if node is None or node.op_type != self.op:
            raise ModelError(f"the candidate model has no {self.op} writing output '{self.output}', which the fp32 model has")
        return [onnx.helper.make_node("Cast", [node.input[p]], [f], to=onnx.TensorProto.FLOAT, name=f)
                for p, f in zip(self.positions, self.fetch)]

    def note(self) -> str:
        """The report's note on how this output is judged."""
        judged = " and ".join(f"'{s}'" for s in self.sources)
        return (f"output '{self.output}' is integer ({self.op} of {judged}): the proposal judges {judged} in its place and "
                "counts the output's values that differ from fp32's as flipped decisions")


def _decider(index: GraphIndex, output: str) -> onnx.NodeProto | None:
    """The deciding op (:data:`DECIDERS`) writing `output` through reshapes and casts, if one does."""
    node = index.producer_node(output)
    while node is not None and node.op_type in (*RESHAPES, "Cast"):
        node = index.producer_node(node.input[0])
    return node if node is not None and node.op_type in DECIDERS else None


def integer_outputs(model: onnx.ModelProto) -> tuple[dict[str, Decision], list[str]]:
    """The model's integer (and bool) outputs, in graph order; and those a deciding op writes from float tensors that
    are not constants (:class:`Decision`)."""
    index, decided, ints = GraphIndex(model.graph), {}, []
    inits = {i.name for i in model.graph.initializer}
    types: dict[str, int] | None = None
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        if elem in FLOAT_TYPES or elem == onnx.TensorProto.UNDEFINED:
            continue
        ints.append(out.name)
        node = _decider(index, out.name)
        if node is None:
            continue
        types = tensor_types(model) if types is None else types
        positions = tuple(p for p in DECIDERS[node.op_type] if p < len(node.input) and types.get(node.input[p]) in FLOAT_TYPES
                          and not _constant(index, inits, node.input[p]))
        if positions:
            decided[out.name] = Decision(out.name, node.op_type, tuple(node.input[p] for p in positions), positions)
    return decided, ints


def _constant(index: GraphIndex, inits: set[str], tensor: str) -> bool:
    """Is `tensor` an initializer or a Constant's output (a threshold, not a computed tensor)?"""
    node = index.producer_node(tensor)
    return tensor in inits or (node is not None and node.op_type == "Constant")


LOGP_FLOOR = 1e-4
"""Probabilities below this compare as this: a class that unlikely decides nothing, and an int8 Softmax output (an npu
model, steps of 1/255) writes 0 for it. Floored at 1e-12, PP-OCR rec's npu int8 model (char acc 0.983) and a proposal
scoring 0.920 both measured 0.1 dB; at 1e-4, 5.7 and 1.7 dB, and the cpu default model (0.968) still measures below
mse ranges, bias correction and the proposal (0.977-0.981)."""


def log_probabilities(p: np.ndarray, axis: int, is_log: bool = False) -> np.ndarray:
    """float64 log of a distribution (`is_log`: a LogSoftmax's output, already one), floored, centred along `axis`."""
    x = np.asarray(p, dtype=np.float64)
    logp = np.maximum(x if is_log else np.log(np.maximum(x, LOGP_FLOOR)), math.log(LOGP_FLOOR))
    return logp - logp.mean(axis=axis, keepdims=True)


RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
"""Ops that move a Softmax's values without changing them (exporters wrap an N-d Softmax in Flatten ... Reshape)."""


def softmax_axes(model: onnx.ModelProto, outputs: list[str]) -> dict[str, int]:
    """Outputs a Softmax (or LogSoftmax) writes, directly or through reshapes, with the axis its decision is taken along.

    Through a reshape the decision axis is the last one: kept only where the fp32 outputs are a distribution along
    it (see :func:`hybridq.metrics.is_distribution`), since a reshape may move the normalised axis.
    """
    index = GraphIndex(model.graph)
    axes: dict[str, int] = {}
    for name in outputs:
        node, reshaped = index.producer_node(name), False
        while node is not None and node.op_type in RESHAPES:
            node, reshaped = index.producer_node(node.input[0]), True
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            axes[name] = -1 if reshaped else next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axes

