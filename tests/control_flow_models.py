"""Fixture models with control flow and recurrent layers, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)


def _branch(name: str, nodes: list[onnx.NodeProto], out: str, inits: list[onnx.TensorProto] = ()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, T.FLOAT, None)], list(inits))


def sample_rate_net(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """An audio-export-like net: `If sr == 16000` picks a Conv branch; inside it a nested `If` on x's static width.

    x [1,C,8,16] float, sr [] int64. sr == 16000: Conv(wa)+Relu, then (width 16 > 8) Conv(wb) else Conv(wc);
    otherwise Conv(wd). Then Conv(we) + Relu -> Conv(wf) -> y. Branch tensor 'h' reuses a main-graph name.
    """
    rng = np.random.default_rng(seed)
    c = channels
    inner_then = _branch("inner_then", [helper.make_node("Conv", ["h", "wb"], ["ib"], name="conv_b", pads=[1] * 4)], "ib")
    inner_else = _branch("inner_else", [helper.make_node("Conv", ["h", "wc"], ["ic"], name="conv_c", pads=[1] * 4)], "ic")
    outer_then = _branch("outer_then", [
        helper.make_node("Conv", ["x", "wa"], ["ta"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["ta"], ["h"], name="relu_a"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape_x"),
        helper.make_node("Gather", ["xs", "three"], ["width"], name="width", axis=0),
        helper.make_node("Greater", ["width", "eight"], ["wide"], name="wide"),
        helper.make_node("If", ["wide"], ["inner"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
    ], "inner", [numpy_helper.from_array(np.array(3, np.int64), "three"), numpy_helper.from_array(np.array(8, np.int64), "eight"),
                 _w(rng, "wa", (c, c, 3, 3))])
    outer_else = _branch("outer_else", [helper.make_node("Conv", ["x", "wd"], ["td"], name="conv_d", pads=[1] * 4)], "td")
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is16k"),
        helper.make_node("If", ["is16k"], ["feat"], name="rate_if", then_branch=outer_then, else_branch=outer_else),
        helper.make_node("Conv", ["feat", "we"], ["e"], name="conv_e", pads=[1] * 4),
        helper.make_node("Relu", ["e"], ["h"], name="relu_e"),
        helper.make_node("Conv", ["h", "wf"], ["y"], name="conv_f"),
    ]
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "sr16k"), _w(rng, "wb", (c, c, 3, 3)), _w(rng, "wc", (c, c, 3, 3)),
             _w(rng, "wd", (c, c, 3, 3)), _w(rng, "we", (c, c, 3, 3)), _w(rng, "wf", (4, c, 1, 1))]
    g = helper.make_graph(nodes, "sample_rate_net",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, c, 8, 16]), helper.make_tensor_value_info("sr", T.INT64, [])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m
