"""Models built in fixtures for the proposal: each has one quantization problem with a known cheapest fix."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper

from tests.models import _init, _model


def uninformative_outlier_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv1 writes one channel ~300x larger than the rest, and no later layer reads it (input x [1,8,16,16]).

    Per-tensor uint8 on conv1's output wipes the 15 small channels conv2 needs; clipping that
    tensor's max to the small channels' range loses nothing, since channel 0's weights in conv2 are zero.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 8, 3, 3))
    w1[0] *= 300
    w2 = rng.normal(0, 0.2, (16, 16, 3, 3))
    w2[:, 0] = 0.0
    inits = [_init("w1", w1), _init("b1", rng.normal(0, 0.1, 16)), _init("w2", w2), _init("b2", rng.normal(0, 0.1, 16)),
             _init("w3", rng.normal(0, 0.2, (16, 16, 1, 1))), _init("w4", rng.normal(0, 0.2, (8, 16, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"), helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4"], ["out"], name="conv4"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, 8, 16, 16])], inits)


def informative_outlier_gemm(seed: int = 0, rows: int = 16) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Relu -> Gemm on x [rows, 32]; fc1's channel 0 is 300x larger and fc2 reads it at 1/300.

    Every channel matters to fc2, so clipping channel 0 destroys information: the fix is to move
    its scale into fc2's weights (equalization), which leaves the fp32 function unchanged.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (32, 32))
    b1 = rng.normal(0.2, 0.1, 32)
    w1[0] *= 300
    b1[0] = abs(b1[0]) * 300
    w2 = rng.normal(0, 0.2, (32, 32))
    w2[:, 0] /= 300
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", rng.normal(0, 0.1, 32)),
             _init("w3", rng.normal(0, 0.2, (8, 32))), _init("b3", rng.normal(0, 0.1, 8))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1), helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1), helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["out"], name="fc3", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [rows, 32])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [rows, 8])], inits)


def yolo_concat(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """A YOLO-style head: boxes in pixels (0-320) and sigmoid class scores (0-1) concatenated along channels.

    Output `det` [1, 4 + classes, 64]. The shared feature r2 carries a box channel ~100x larger
    than the class features, so per-tensor uint8 on r2 costs the scores most of their resolution
    while the whole-output cosine, dominated by the boxes, stays near 1. Input x [1,8,16,16].
    """
    rng = np.random.default_rng(seed)
    w2 = rng.normal(0, 0.2, (16, 16, 3, 3))
    w2[:4] *= 60
    wb = rng.normal(0, 0.3, (4, 16, 1, 1))
    wb[:, 4:] = 0.0
    wc = rng.normal(0, 0.8, (classes, 16, 1, 1))
    wc[:, :4] = 0.0
    grid = (np.arange(64, dtype=np.float32) % 8 * 40 + 20)[None, None, :]
    inits = [
        _init("w1", rng.normal(0, 0.3, (16, 8, 3, 3))), _init("b1", rng.normal(0, 0.1, 16)),
        _init("w2", w2), _init("b2", rng.normal(0, 0.1, 16)),
        _init("wb", wb), _init("bb", rng.normal(0, 0.1, 4)), _init("wc", wc), _init("bc", rng.normal(-1.0, 0.3, classes)),
        _init("box_scale", np.array(0.05)), _init("grid", np.concatenate([grid, grid, np.full_like(grid, 20), np.full_like(grid, 20)], 1)),
        onnx.numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape_b"),
        onnx.numpy_helper.from_array(np.array([1, classes, 64], np.int64), "shape_c"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "wb", "bb"], ["box_raw"], name="box_head"),
        helper.make_node("Reshape", ["box_raw", "shape_b"], ["box_flat"], name="box_flat"),
        helper.make_node("Mul", ["box_flat", "box_scale"], ["box_off"], name="box_scale"),
        helper.make_node("Add", ["box_off", "grid"], ["boxes"], name="box_decode"),
        helper.make_node("Conv", ["r2", "wc", "bc"], ["cls_raw"], name="cls_head"),
        helper.make_node("Reshape", ["cls_raw", "shape_c"], ["cls_flat"], name="cls_flat"),
        helper.make_node("Sigmoid", ["cls_flat"], ["scores"], name="scores"),
        helper.make_node("Concat", ["boxes", "scores"], ["det"], name="concat", axis=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("det", T.FLOAT, [1, 4 + classes, 64])], inits)


def masked_culprit_mlp(seed: int = 0, rows: int = 16, side: int = 8, gain: float = 30.0) -> onnx.ModelProto:
    """A layer with a tiny local error that does the damage, hidden behind layers with large local errors that do none.

    fc_a maps x [rows, 32] into an 8-dim subspace S (rank-8 weights): its own output is off by weight rounding alone
    (local cosine near 1), but that rounding leaks outside S, where fc_amp multiplies everything by `gain`. `side`
    Gemms read x cubed (heavy tails: per-tensor uint8 keeps a few levels for most values), so each has a large
    local error, and they reach the output scaled by 1e-4. Only fc_a and fc_amp matter; floating both fixes it.
    """
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(32, 8)))[0]
    wa = u @ rng.normal(0, 0.5, (8, 32))
    w_amp = u @ u.T + gain * (np.eye(32) - u @ u.T)
    inits = [_init("wa", wa), _init("ba", np.zeros(32)), _init("wamp", w_amp), _init("bamp", np.zeros(32)), _init("tiny", np.array(1e-4))]
    nodes = [
        helper.make_node("Gemm", ["x", "wa", "ba"], ["h"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["h", "wamp", "bamp"], ["y"], name="fc_amp", transB=1),
        helper.make_node("Mul", ["x", "x"], ["x2"], name="sq"), helper.make_node("Mul", ["x2", "x"], ["x3"], name="cube"),
    ]
    for i in range(side):
        inits += [_init(f"wb{i}", rng.normal(0, 0.2, (32 // side, 32))), _init(f"bb{i}", np.zeros(32 // side))]
        nodes.append(helper.make_node("Gemm", ["x3", f"wb{i}", f"bb{i}"], [f"s{i}"], name=f"fc_side{i}", transB=1))
    nodes += [helper.make_node("Concat", [f"s{i}" for i in range(side)], ["s"], name="cat", axis=1),
              helper.make_node("Mul", ["s", "tiny"], ["st"], name="scale"), helper.make_node("Add", ["y", "st"], ["out"], name="add")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [rows, 32])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [rows, 32])], inits)


def _outlier_ln(rng: np.random.Generator) -> list[onnx.TensorProto]:
    """gamma (40 on channel 5), beta, and q and k weights reading channel 5 at 1/40, drawn in this order."""
    gamma = 1 + 0.1 * rng.normal(size=32)
    gamma[5] = 40.0
    wq, wk = rng.normal(0, 0.2, (32, 32)), rng.normal(0, 0.2, (32, 32))
    wq[5] /= 40
    wk[5] /= 40
    return [_init("gamma", gamma), _init("beta", 0.1 * rng.normal(size=32)), _init("wq", wq), _init("wk", wk)]


def layernorm_outlier(native: bool = True, seed: int = 0, rows: int = 16) -> onnx.ModelProto:
    """x [rows, 32] -> LayerNorm whose gamma is 40 on channel 5 (a transformer's 'massive activation') -> q and k
    MatMuls reading it (weights on channel 5 at 1/40) -> Relu -> MatMul. Per-tensor uint8 on the LayerNorm's output
    leaves the other channels a handful of codes; SmoothQuant moves gamma's outlier into the MatMuls' weights.
    `native`: LayerNormalization (opset 17); else written out (ReduceMean, Sub, Pow, Sqrt, Div, Mul gamma, Add beta)."""
    rng = np.random.default_rng(seed)
    inits = _outlier_ln(rng) + [_init("wo", rng.normal(0, 0.2, (32, 8)))]
    if native:
        ln = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5)]
    else:
        inits += [_init("two", np.array(2.0)), _init("eps", np.array(1e-5))]
        ln = [helper.make_node("ReduceMean", ["x"], ["mu"], name="mean", axes=[-1]), helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"),
              helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"), helper.make_node("ReduceMean", ["d2"], ["var"], name="var", axes=[-1]),
              helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"), helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
              helper.make_node("Div", ["d", "sd"], ["n"], name="div"), helper.make_node("Mul", ["n", "gamma"], ["ng"], name="ln_gamma"),
              helper.make_node("Add", ["ng", "beta"], ["ln"], name="ln_beta")]
    nodes = ln + [helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k"),
                  helper.make_node("Add", ["q", "k"], ["s"], name="qk_sum"), helper.make_node("Relu", ["s"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "wo"], ["out"], name="o")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [rows, 32])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [rows, 8])], inits, opset=17 if native else 13)


def layernorm_outlier_3d(seed: int = 0, tokens: int = 16) -> onnx.ModelProto:
    """:func:`layernorm_outlier` on a static [1, tokens, 32] input, q and k with biases: ONNX Runtime fuses each
    MatMul + Add into Reshape -> Gemm -> Reshape, so the quantized tensors are two 2-D views of the LayerNorm's
    output, one before each Gemm, and the LayerNorm output itself is not quantized."""
    rng = np.random.default_rng(seed)
    inits = _outlier_ln(rng) + [_init("bq", 0.1 * rng.normal(size=32)), _init("bk", 0.1 * rng.normal(size=32)),
                                _init("wo", rng.normal(0, 0.2, (32, 8)))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["ln", "wq"], ["q0"], name="q"), helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
             helper.make_node("MatMul", ["ln", "wk"], ["k0"], name="k"), helper.make_node("Add", ["k0", "bk"], ["k"], name="k_bias"),
             helper.make_node("Add", ["q", "k"], ["s"], name="qk_sum"), helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wo"], ["out"], name="o")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, tokens, 32])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, tokens, 8])], inits, opset=17)


def depthwise_spread_cnn(seed: int = 0) -> onnx.ModelProto:
    """A float stem conv0 -> HardSwish -> Mul and Add by scalars (an affine block, as PP-LCNet writes after its HardSwish)
    -> depthwise dw -> Relu -> conv2 -> Relu -> conv3 on x [1, 3, 16, 16].

    Half of conv0's 16 channels are 200x smaller than the rest, as folded batch norms leave them, and dw's filters
    scale them back, so every channel counts alike downstream. No channel is an outlier (the largest is ~2x the
    median), yet per-tensor uint8 on dw's input rounds the small half away. Equalizing that tensor into dw's
    filters (exact in fp32: the affine block's constants become one per channel) gives each channel the same range.
    """
    rng = np.random.default_rng(seed)
    factor = np.where(np.arange(16) % 2 == 0, 1.0, 1 / 200)
    w0 = rng.normal(0, 0.3, (16, 3, 3, 3)) * factor[:, None, None, None]
    wd = rng.normal(0, 0.5, (16, 1, 3, 3)) / factor[:, None, None, None]
    inits = [_init("w0", w0), _init("b0", rng.normal(0, 0.1, 16) * factor), _init("gamma", np.array([0.7])),
             _init("beta", np.array([0.0004])), _init("wd", wd), _init("bd", rng.normal(0, 0.1, 16)),
             _init("w2", rng.normal(0, 0.2, (16, 16, 3, 3))), _init("b2", rng.normal(0, 0.1, 16)),
             _init("w3", rng.normal(0, 0.2, (8, 16, 1, 1))), _init("b3", rng.normal(0, 0.1, 8))]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1] * 4), helper.make_node("HardSwish", ["c0"], ["h0"], name="hswish0"),
        helper.make_node("Mul", ["gamma", "h0"], ["m0"], name="scale0"), helper.make_node("Add", ["m0", "beta"], ["a0"], name="shift0"),
        helper.make_node("Conv", ["a0", "wd", "bd"], ["d1"], name="dw", pads=[1] * 4, group=16), helper.make_node("Relu", ["d1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["out"], name="conv3"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, 8, 16, 16])], inits, opset=14)
