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


def sample_rate_net(seed: int = 0, channels: int = 8, width: int | str = 16) -> onnx.ModelProto:
    """An audio-export-like net: `If sr == 16000` picks a Conv branch; inside it a nested `If` on x's static width.

    x [1,C,8,width] float (width a dim name: dynamic), sr [] int64. sr == 16000: Conv(wa)+Relu, then (width 16 > 8) Conv(wb) else Conv(wc);
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
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, c, 8, width]), helper.make_tensor_value_info("sr", T.INT64, [])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def recurrent_net(seed: int = 0, steps: int = 12, features: int = 16, hidden: int = 24) -> onnx.ModelProto:
    """MatMul -> bidirectional LSTM -> (Transpose, Reshape) -> MatMul -> y, and a GRU on the same features -> gru_h.

    x [steps, 1, features]; y [steps, 8]; gru_h [1, 1, hidden].
    """
    rng = np.random.default_rng(seed)
    f, h = features, hidden
    inits = [
        _w(rng, "w_in", (f, f), 0.3), _w(rng, "lstm_W", (2, 4 * h, f), 0.25), _w(rng, "lstm_R", (2, 4 * h, h), 0.2),
        _w(rng, "lstm_B", (2, 8 * h), 0.1), _w(rng, "gru_W", (1, 3 * h, f), 0.25), _w(rng, "gru_R", (1, 3 * h, h), 0.2),
        _w(rng, "w_out", (2 * h, 8), 0.3), numpy_helper.from_array(np.array([steps, 2 * h], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["feat"], name="proj"),
        helper.make_node("LSTM", ["feat", "lstm_W", "lstm_R", "lstm_B"], ["lstm_y", "lstm_h"], name="lstm", hidden_size=h,
                         direction="bidirectional"),
        helper.make_node("Transpose", ["lstm_y"], ["lstm_t"], name="lstm_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["lstm_t", "flat_shape"], ["lstm_flat"], name="lstm_flat"),
        helper.make_node("MatMul", ["lstm_flat", "w_out"], ["y"], name="head"),
        helper.make_node("GRU", ["feat", "gru_W", "gru_R"], ["", "gru_h"], name="gru", hidden_size=h),
    ]
    g = helper.make_graph(nodes, "recurrent_net", [helper.make_tensor_value_info("x", T.FLOAT, [steps, 1, f])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [steps, 8]), helper.make_tensor_value_info("gru_h", T.FLOAT, [1, 1, h])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def flag_net(seed: int = 1) -> onnx.ModelProto:
    """Conv -> If(flag: Relu | Neg) -> Conv; the condition is the bool input `flag` itself. x [1,8,8,8]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("If", ["flag"], ["branch"], name="flag_if",
                              then_branch=_branch("then", [helper.make_node("Relu", ["c1"], ["t"], name="then_relu")], "t"),
                              else_branch=_branch("else", [helper.make_node("Neg", ["c1"], ["e"], name="else_neg")], "e")),
             helper.make_node("Conv", ["branch", "w2"], ["out"], name="conv2")]
    g = helper.make_graph(nodes, "flag_net", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 8, 8]),
                                               helper.make_tensor_value_info("flag", T.BOOL, [])],
                          [helper.make_tensor_value_info("out", T.FLOAT, [1, 4, 8, 8])], [_w(rng, "w1", (8, 8, 3, 3)), _w(rng, "w2", (4, 8, 1, 1))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m
