"""4-bit weights for MatMul/Gemm layers: built as ONNX Runtime's com.microsoft ``MatMulNBits``.

A layer set to ``int4`` in custom_quantize_layers keeps its activations as the
rest of the plan leaves them (float, or the dequantized int8 output of a
quantized producer) and its weight is stored as 4-bit codes with one float
scale per block of ``int4_block_size`` input features (symmetric: no zero
points, ORT's default zero point 8). ``int4_rounding`` picks plain
round-to-nearest or GPTQ on the X^T X step1 recorded (:mod:`hybridq.gptq`).
The rewrite runs after the QDQ rewrite and replaces the node in place (same
name, same output), so the QdqMap stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import gptq
from ._onnx import read_names
from .errors import ConfigError
from .observers import HESSIAN_SUFFIX, HessianObserver
from .plan import GraphView, QuantPlan
from .settings import Settings

MS_DOMAIN = "com.microsoft"
INT4_OPS = ("MatMul", "Gemm")
ACCURACY_LEVEL = {"float": 0, "int8": 4}
"""MatMulNBits ``accuracy_level`` per ``int4_activations``: 0 keeps A float, 4 lets ORT quantize A to int8 per block."""


@dataclass
class Int4Weight:
    """The float weight of an int4 layer as MatMul's B [K, N] (Gemm's transB and alpha applied), its bias [N] or None."""

    node: str
    weight: np.ndarray
    bias: np.ndarray | None
    source: str


def int4_weight(node: onnx.NodeProto, g: GraphView) -> Int4Weight | str:
    """The layer's weight for MatMulNBits, or why it cannot be int4 (a sentence)."""
    if node.op_type not in INT4_OPS:
        return f"it is a {node.op_type}; int4 applies to MatMul and Gemm only"
    if len(node.input) < 2 or node.input[1] not in g.inits or len(g.inits[node.input[1]].dims) != 2:
        return "its second input is not a constant 2-D weight"
    if not g.is_float_activation(node.input[0]):
        return "its first input is not a float activation"
    w = g.init_array(node.input[1]).astype(np.float64)
    if node.op_type == "MatMul":
        return Int4Weight(node.name, w, None, node.input[1])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        return "it is a Gemm with transA=1 (MatMulNBits reads A as [M, K])"
    w = (w.T if attrs.get("transB", 0) else w) * float(attrs.get("alpha", 1.0))
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in g.inits:
            return "its Gemm bias C is not a constant"
        c = g.init_array(node.input[2]).astype(np.float64)
        if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
            return f"its Gemm bias C has shape {list(c.shape)}, not one value per output ([{w.shape[1]}])"
        bias = np.broadcast_to(c.reshape(-1), (w.shape[1],)) * float(attrs.get("beta", 1.0))
    return Int4Weight(node.name, w, bias, node.input[1])


def hessian_inputs(model: onnx.ModelProto) -> list[str]:
    """The input tensors whose X^T X GPTQ needs: the first input of every MatMul/Gemm that could be int4."""
    g = GraphView(model)
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in INT4_OPS and not isinstance(int4_weight(node, g), str) and node.input[0] not in out:
            out.append(node.input[0])
    return out


def int4_layers(plan: QuantPlan) -> list[str]:
    """Nodes the plan sets to int4, in plan order."""
    return [n for n, lp in plan.layers.items() if lp.precision == "int4"]


def codes_and_scales(w: Int4Weight, settings: Settings, observers: dict, tensor: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The layer's 4-bit codes [K, N] and block scales, by the rounding the settings select."""
    block = settings.int4_block_size
    if settings.int4_rounding == "rtn":
        return gptq.quantize_rtn(w.weight, block)
    obs = observers.get(tensor + HESSIAN_SUFFIX)
    if not isinstance(obs, HessianObserver) or obs.rows == 0:
        raise ConfigError(
            f"{where}: layer '{w.node}' is int4 with int4_rounding gptq, but step1 recorded no X^T X of its input '{tensor}'. "
            "Re-run step1 with `int4_rounding: gptq` in the settings (hybridq.yaml or --setting), or set int4_rounding: rtn."
        )
    if obs.hessian.shape[0] != w.weight.shape[0]:
        raise ConfigError(f"{where}: the X^T X recorded for '{tensor}' is {obs.hessian.shape[0]} wide, layer '{w.node}' reads {w.weight.shape[0]}; re-run step1.")
    return gptq.quantize_gptq(w.weight, obs.hessian, block)


def pack(codes: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' B from codes [K, N] in [-8, 7]: uint8 [N, ceil(K / block), block / 2], stored code + 8, low nibble first."""
    k, n = codes.shape
    blocks = (k + block - 1) // block
    u = np.full((n, blocks * block), 8, dtype=np.uint8)  # padding past K: code 0
    u[:, :k] = (codes.T.astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(n, blocks, block)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits(node: onnx.NodeProto, a: str, w: Int4Weight, codes: np.ndarray, scales: np.ndarray, settings: Settings) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node replacing `node` (same name and output) and its new initializers."""
    k, n = codes.shape
    block = settings.int4_block_size
    b = numpy_helper.from_array(pack(codes, block), f"{node.name}_int4_B")
    s = numpy_helper.from_array(scales.T.astype(np.float32).reshape(-1), f"{node.name}_int4_scales")
    inits = [b, s]
    inputs = [a, b.name, s.name]
    if w.bias is not None:
        bias = numpy_helper.from_array(np.asarray(w.bias, dtype=np.float32), f"{node.name}_int4_bias")
        inits.append(bias)
        inputs += ["", "", bias.name]
    new = helper.make_node(
        "MatMulNBits", inputs, [node.output[0]], name=node.name, domain=MS_DOMAIN,
        K=k, N=n, bits=4, block_size=block, accuracy_level=ACCURACY_LEVEL[settings.int4_activations],
    )
    return new, inits


def apply_int4(model: onnx.ModelProto, source: onnx.ModelProto, plan: QuantPlan, observers: dict, settings: Settings, where: str = "cfg") -> onnx.ModelProto:
    """`model` (the QDQ rewrite, modified in place) with every int4 layer of the plan replaced by MatMulNBits.

    Weights come from `source` (the fixed temp model, float); a layer that cannot be int4 raises a ConfigError naming it.
    """
    names = int4_layers(plan)
    if not names:
        return model
    g_src = GraphView(source)
    by_name = {n.name: i for i, n in enumerate(model.graph.node)}
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    for name in names:
        w = int4_weight(g_src.by_name[name], g_src)
        if isinstance(w, str):
            raise ConfigError(f"{where}: custom_quantize_layers['{name}'] = int4 cannot be built: {w}. Use int8 or float32 for it.")
        node = model.graph.node[by_name[name]]
        codes, scales = codes_and_scales(w, settings, observers, g_src.by_name[name].input[0], where)
        new, inits = matmul_nbits(node, node.input[0], w, codes, scales, settings)
        node.CopyFrom(new)
        new_inits += inits
        replaced.add(w.source)
        if w.bias is not None:
            replaced.add(g_src.by_name[name].input[2])
    still_read = read_names(model.graph)
    keep = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def int4_bytes(k: int, n: int, block: int) -> int:
    """Bytes MatMulNBits stores for a K x N weight: packed codes and one float32 scale per block."""
    blocks = (k + block - 1) // block
    return n * blocks * (block // 2) + 4 * n * blocks


def weight_bytes(layer: str, model: onnx.ModelProto, plan: QuantPlan, block: int) -> int:
    """Bytes the layer's weight takes in a model built from `plan`: int4, int8/int16 per channel, float16 or float32."""
    g = GraphView(model)
    node = g.by_name[layer]
    k, n = (int(d) for d in g.inits[node.input[1]].dims)
    lp = plan.layers.get(layer)
    if lp is not None and lp.precision == "int4":
        return int4_bytes(k, n, block)
    wp = plan.weights.get(node.input[1])
    if wp is not None:
        width = 2 if wp.dtype == "int16" else 1
        return k * n * width + 5 * n  # codes, one scale and zero point per output channel
    return k * n * (2 if lp is not None and lp.precision == "float16" else 4)


def int4_candidates(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm layers that can be int4 (a constant 2-D weight, float input), in graph order."""
    g = GraphView(model)
    return [n.name for n in model.graph.node if n.op_type in INT4_OPS and not isinstance(int4_weight(n, g), str)]
