"""What of each model output a candidate is judged on: the output itself, the float tensor an ArgMax decides from
(an integer output), and how a Softmax output's decisions and log-probabilities are read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .._onnx import GraphIndex
from ..errors import ModelError

DECIDERS = {"ArgMax": 1.0, "ArgMin": -1.0}
"""Ops whose integer output is a decision along an axis of a float tensor (ArgMin's: the argmax of the negated tensor)."""
JUDGED = "__hybridq_judged__"
"""Prefix of the graph output a scored model gets for the float tensor an integer output is decided from."""


@dataclass(frozen=True)
class Decision:
    """An integer model output an ArgMax (ArgMin) writes, through reshapes and casts, from a float tensor: the tensor
    is judged in the output's place and its decisions counted."""

    output: str
    source: str
    """The tensor the ArgMax reads in the fp32 model."""
    op: str
    axis: int

    @property
    def fetch(self) -> str:
        """The graph output the scored models get for the decided tensor (the same name in every candidate)."""
        return JUDGED + self.output

    def nodes(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        """The Cast to float32 of the tensor the ArgMax reads in `model` (what it decides on there), to :attr:`fetch`."""
        node = _decider(GraphIndex(model.graph), self.output)
        if node is None:
            raise ModelError(f"the candidate model has no {self.op} writing output '{self.output}', which the fp32 model has")
        return [onnx.helper.make_node("Cast", [node.input[0]], [self.fetch], to=onnx.TensorProto.FLOAT, name=self.fetch)]

    def note(self) -> str:
        return (f"output '{self.output}' is integer ({self.op} of '{self.source}' along axis {self.axis}): the proposal judges "
                f"'{self.source}' in its place and counts the decisions that differ from fp32's")


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16, onnx.TensorProto.UNDEFINED}


def _decider(index: GraphIndex, output: str) -> onnx.NodeProto | None:
    """The ArgMax/ArgMin writing `output` through reshapes and casts, if one does."""
    node = index.producer_node(output)
    while node is not None and node.op_type in (*RESHAPES, "Cast"):
        node = index.producer_node(node.input[0])
    return node if node is not None and node.op_type in DECIDERS else None


def integer_outputs(model: onnx.ModelProto) -> tuple[dict[str, Decision], list[str]]:
    """The model's integer (and bool) outputs: those an ArgMax/ArgMin decides (:class:`Decision`), and the others."""
    index, decided, others = GraphIndex(model.graph), {}, []
    for out in model.graph.output:
        if out.type.tensor_type.elem_type in FLOAT_TYPES:
            continue
        node = _decider(index, out.name)
        if node is None:
            others.append(out.name)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        decided[out.name] = Decision(out.name, node.input[0], node.op_type, axis)
    return decided, others


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

