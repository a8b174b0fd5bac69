"""Recurrent layers (LSTM, GRU, RNN): which run with int8 weights, and the rewrite to ONNX Runtime's integer kernel.

ONNX Runtime has one integer recurrent kernel, com.microsoft ``DynamicQuantizeLSTM``: int8 W and R
(stored transposed, [directions, input, 4*hidden] and [directions, hidden, 4*hidden]) with per-channel
or per-direction scales; it quantizes X and the hidden state itself at run time, so calibration has
nothing to give it. GRU and RNN have no integer kernel in ONNX Runtime: they stay float and say so.
The plan gives each recurrent node a precision (`layer_choice`); `apply_in_place` rewrites the int8 ones
after the QDQ rewrite, keeping the node's name and outputs, so analysis compares its outputs as any layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._onnx import read_names
from .qparams import quantize, weight_qparams

MS_DOMAIN = "com.microsoft"
FLOAT_PRECISIONS = ("float16", "float32")


def _lstm_blocker(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> str | None:
    """Why this LSTM cannot become a DynamicQuantizeLSTM, or None."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return "LSTM whose W or R is computed at run time: DynamicQuantizeLSTM needs constant weights; kept float"
    if any(a.name == "layout" and a.i != 0 for a in node.attribute):
        return "LSTM with layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute; kept float"
    if any(len(inits[node.input[k]].dims) != 3 for k in (1, 2)):
        return "LSTM whose W or R is not 3-D; kept float"
    return None


def _no_kernel(op: str) -> Callable[[onnx.NodeProto, Mapping[str, onnx.TensorProto]], str | None]:
    def blocker(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> str | None:
        return f"{op}: ONNX Runtime has no integer {op} kernel (its only one is com.microsoft DynamicQuantizeLSTM); kept float"
    return blocker


RECURRENT: dict[str, Callable[[onnx.NodeProto, Mapping[str, onnx.TensorProto]], str | None]] = {
    "LSTM": _lstm_blocker,
    "GRU": _no_kernel("GRU"),
    "RNN": _no_kernel("RNN"),
}
"""Recurrent op type -> why a node of it stays float (None: it runs with int8 weights)."""


def layer_choice(
    node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], quantize_ops: list[str], requested: str | None,
) -> tuple[str, str] | None:
    """(precision, reason) of a recurrent node for the plan; None when it is not recurrent or not quantized by default."""
    blocker = RECURRENT.get(node.op_type)
    if blocker is None or (requested is None and node.op_type == "LSTM" and "LSTM" not in quantize_ops):
        return None
    if requested in FLOAT_PRECISIONS:
        return requested, "cfg"
    why = blocker(node, inits)
    if why:
        return "float32", why
    if requested == "int16":
        return "float32", "LSTM: DynamicQuantizeLSTM has int8 weights only (int16 was asked); kept float"
    return "int8", "cfg" if requested else "LSTM: int8 weights, DynamicQuantizeLSTM (activations quantized at run time)"


def cfg_layers(layers: Mapping[str, tuple[str, str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """The cfg's custom_quantize_layers entries (and comments) for the recurrent layers of a plan (node -> op, precision, reason).

    They are listed so a person sees them and can set one to float32 (or an LSTM back to int8).
    """
    custom: dict[str, str] = {}
    comments: dict[str, str] = {}
    for name, (op, precision, reason) in layers.items():
        if op in RECURRENT:
            custom[name] = precision
            comments[name] = reason + ("; float32 keeps it float" if precision == "int8" else "")
    return custom, comments


def quantized_weights(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W or R [directions, gates*hidden, k] as DynamicQuantizeLSTM takes it: int8 transposed to [directions, k, gates*hidden],
    scales and zero points [directions, gates*hidden] per channel or [directions] per direction (symmetric)."""
    d, rows, _ = w.shape
    if per_channel:
        qp, _, _ = weight_qparams(w.reshape(d * rows, -1), "int8", axis=0)
        q = quantize(w.reshape(d * rows, -1), qp).reshape(w.shape)
        scale, zp = qp.scale.reshape(d, rows), qp.zero_point.reshape(d, rows)
    else:
        parts = [weight_qparams(w[k], "int8", axis=None)[0] for k in range(d)]
        q = np.stack([quantize(w[k], p) for k, p in enumerate(parts)])
        scale = np.concatenate([p.scale.reshape(1) for p in parts])
        zp = np.concatenate([p.zero_point.reshape(1) for p in parts])
    return np.ascontiguousarray(q.transpose(0, 2, 1)), scale.astype(np.float32), zp.astype(np.int8)


def apply_in_place(model: onnx.ModelProto, layers: Mapping[str, str], per_channel: bool) -> list[str]:
    """Rewrite each LSTM that ``layers`` (node -> precision) sets to int8 as a DynamicQuantizeLSTM; returns their names."""
    g = model.graph
    if not any(n.op_type == "LSTM" and layers.get(n.name) == "int8" for n in g.node):
        return []  # every build passes here (the proposal's candidates too): no graph-wide tables then
    inits = {i.name: i for i in g.initializer}
    readers = {i for n in g.node for i in n.input}
    done: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    for k, node in enumerate(g.node):
        if node.op_type != "LSTM" or layers.get(node.name) != "int8":
            continue
        extra: list[str] = []
        for idx, tag in ((1, "W"), (2, "R")):
            q, scale, zp = quantized_weights(numpy_helper.to_array(inits[node.input[idx]]), per_channel)
            base = f"{node.name}_{tag}"
            new_inits += [numpy_helper.from_array(q, f"{base}_quantized"), numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(zp, f"{base}_zero_point")]
            extra.append(base)
        optional = [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
        inputs = [node.input[0], f"{extra[0]}_quantized", f"{extra[1]}_quantized", *optional,
                  f"{extra[0]}_scale", f"{extra[0]}_zero_point", f"{extra[1]}_scale", f"{extra[1]}_zero_point"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        g.node[k].CopyFrom(helper.make_node("DynamicQuantizeLSTM", inputs, list(node.output), name=node.name, domain=MS_DOMAIN, **attrs))
        done.append(node.name)
    if not done:
        return done
    used = read_names(g)
    keep = [i for i in g.initializer if i.name in used or i.name not in readers] + new_inits  # drop only the float W/R now unread
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done
