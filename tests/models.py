"""Small real ONNX models built with onnx.helper, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 13) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "test", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


def residual_cnn(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """Conv stem -> Conv+BN+Relu -> 1x1 Conv -> residual Add -> GAP -> Gemm; input x [1,3,16,16]."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, c)),
        _init("w2", rng.normal(0, 0.15, (c, c, 3, 3))), _init("b2", rng.normal(0, 0.1, c)),
        _init("bn_s", rng.uniform(0.5, 1.5, c)), _init("bn_b", rng.normal(0, 0.1, c)),
        _init("bn_m", rng.normal(0, 0.1, c)), _init("bn_v", rng.uniform(0.5, 1.5, c)),
        _init("w3", rng.normal(0, 0.2, (c, c, 1, 1))), _init("b3", rng.normal(0, 0.1, c)),
        _init("fc_w", rng.normal(0, 0.3, (10, c))), _init("fc_b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn2"], name="bn2"),
        helper.make_node("Relu", ["bn2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c3", "r1"], ["res"], name="add"),
        helper.make_node("Relu", ["res"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", T.FLOAT, [1, 10])], inits)


def conv_relu(channels: int = 8, size: int = 16, seed: int = 11) -> onnx.ModelProto:
    """x [1, 3, size, size] -> Conv 3x3 (pads 1, `channels` outputs) 'c' -> Relu 'y': the least a calibration observes."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, size, size])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, channels, size, size])],
                  [_init("w", rng.normal(0, 0.5, (channels, 3, 3, 3)))], opset=17)


def matmul_mlp(seed: int = 1) -> onnx.ModelProto:
    """MatMul + Add -> Relu -> MatMul -> Softmax, with a dynamic batch dim; input x [N, 32]."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.2, (32, 64))), _init("b1", rng.normal(0, 0.1, 64)),
             _init("w2", rng.normal(0, 0.2, (64, 8)))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Softmax", ["m2"], ["prob"], name="softmax", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["N", 32])],
                  [helper.make_tensor_value_info("prob", T.FLOAT, ["N", 8])], inits)


def linear_3d(seed: int = 4) -> onnx.ModelProto:
    """Two Linears on a sequence of any length, as transformer exporters write them: x [1,S,32] -> MatMul + Add(b1) ->
    Relu -> MatMul (no bias) -> y [1,S,16]. A dynamic 3-D input, so ONNX Runtime does not fuse MatMul + Add into a Gemm."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(0, 0.2, (32, 64))), _init("b1", rng.normal(0, 0.1, 64)),
             _init("w2", rng.normal(0, 0.2, (64, 16)))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, "S", 32])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, "S", 16])], inits)


def two_input(seed: int = 2) -> onnx.ModelProto:
    """Two image inputs a [1,3,8,8] and b [1,3,8,8]: conv each, concat, conv; two outputs."""
    rng = np.random.default_rng(seed)
    inits = [_init("wa", rng.normal(0, 0.3, (8, 3, 3, 3))), _init("wb", rng.normal(0, 0.3, (8, 3, 3, 3))),
             _init("wc", rng.normal(0, 0.2, (4, 16, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["a", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "wb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ca", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["out"], name="conv_c"),
        helper.make_node("ReduceMax", ["cat"], ["peak"], name="peak", keepdims=0),
    ]
    ins = [helper.make_tensor_value_info(n, T.FLOAT, [1, 3, 8, 8]) for n in ("a", "b")]
    outs = [helper.make_tensor_value_info("out", T.FLOAT, [1, 4, 8, 8]), helper.make_tensor_value_info("peak", T.FLOAT, [])]
    return _model(nodes, ins, outs, inits)


def opset11_constant_weights(seed: int = 3) -> onnx.ModelProto:
    """Paddle2ONNX style: opset 11, weights in Constant nodes, Conv + Relu + Conv + Gemm; input x [1,3,8,8]."""
    rng = np.random.default_rng(seed)
    consts = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)), "fc_w": rng.normal(0, 0.3, (8, 5)),
    }
    nodes = [helper.make_node("Constant", [], [k], name=f"const_{k}", value=_init(k, v)) for k, v in consts.items()]
    nodes += [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", T.FLOAT, [1, 5])], [], opset=11)


def write_npy_dataset(directory: Path, shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0, scale: float = 1.0) -> Path:
    """n samples of Gaussian data as .npy files and a dataset.txt (one path per input per line)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        paths = []
        for name, shape in shapes.items():
            p = directory / f"{name}_{i}.npy"
            np.save(p, (rng.normal(0, 1, shape) * scale).astype(np.float32))
            paths.append(p.name)
        lines.append(" ".join(paths))
    listing = directory / "dataset.txt"
    listing.write_text("# test samples\n" + "\n".join(lines) + "\n")
    return listing


def residual_cnn_step1(root: Path, seed: int = 0) -> Path:
    """The residual CNN saved as root/cnn.onnx, 4 samples in root/data, step1 into root/ws; returns the dataset listing."""
    import hybridq

    root.mkdir(parents=True, exist_ok=True)
    onnx.save(residual_cnn(seed=seed), root / "cnn.onnx")
    listing = write_npy_dataset(root / "data", {"x": (1, 3, 16, 16)}, 4)
    hybridq.step1(root / "cnn.onnx", listing, out=root / "ws")
    return listing


def outlier_channel_cnn(seed: int = 0) -> onnx.ModelProto:
    """Four convs; conv1 writes one channel ~300x larger than the others (input x [1,8,16,16]).

    Per-tensor uint8 on conv1's output wipes the 15 small channels that conv2 reads.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 8, 3, 3))
    w1[0] *= 300
    w2 = rng.normal(0, 0.2, (16, 16, 3, 3))
    w2[:, 0] /= 300
    inits = [_init("w1", w1), _init("w2", w2), _init("w3", rng.normal(0, 0.2, (16, 16, 1, 1))), _init("w4", rng.normal(0, 0.2, (8, 16, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"), helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4"], ["out"], name="conv4"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, 8, 16, 16])], inits)


def concat_ranges_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two branches with ranges 1000x apart concatenated, then a 1x1 conv that needs both (input x [1,8,12,12])."""
    rng = np.random.default_rng(seed)
    inits = [_init("wa", rng.normal(0, 0.3, (8, 8, 3, 3)) * 500), _init("wb", rng.normal(0, 0.3, (8, 8, 3, 3)) * 0.5),
             _init("wc", np.concatenate([rng.normal(0, 0.2, (8, 8, 1, 1)) / 1000, rng.normal(0, 0.2, (8, 8, 1, 1))], axis=1)),
             _init("wd", rng.normal(0, 0.3, (4, 8, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1] * 4),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["c"], name="conv_c"),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
        helper.make_node("Conv", ["rc", "wd"], ["out"], name="conv_d"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 12, 12])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, 4, 12, 12])], inits)


def attention_block(seed: int = 0, seq: int = 16, dim: int = 32) -> onnx.ModelProto:
    """A transformer encoder layer: LayerNorm, QKV MatMuls, scaled QK^T with an additive mask of -1e9, Softmax,
    attention MatMul, output projection, residual, GELU (Erf) MLP. Inputs x [1,seq,dim] and mask [1,1,seq] (0 or 1)."""
    rng = np.random.default_rng(seed)
    inits = [_init(n, rng.normal(0, 0.2, (dim, dim))) for n in ("wq", "wk", "wv", "wo")]
    inits += [_init("w1", rng.normal(0, 0.2, (dim, 2 * dim))), _init("w2", rng.normal(0, 0.2, (2 * dim, dim))),
              _init("ln_g", np.ones(dim)), _init("ln_b", np.zeros(dim)), _init("scale", np.array(1 / np.sqrt(dim))),
              _init("neg", np.array(-1e9)), _init("one", np.array(1.0)), _init("half", np.array(0.5)), _init("sqrt2", np.array(np.sqrt(2.0)))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        helper.make_node("Mul", ["qk", "scale"], ["qk_s"], name="qk_scale"),
        helper.make_node("Sub", ["one", "mask"], ["inv_mask"], name="inv_mask"),
        helper.make_node("Mul", ["inv_mask", "neg"], ["bias"], name="mask_bias"),
        helper.make_node("Add", ["qk_s", "bias"], ["logits"], name="masked"),
        helper.make_node("Softmax", ["logits"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"], name="attn_v"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["h"], name="residual"),
        helper.make_node("MatMul", ["h", "w1"], ["f1"], name="fc1"),
        helper.make_node("Div", ["f1", "sqrt2"], ["f1s"], name="gelu_div"),
        helper.make_node("Erf", ["f1s"], ["erf"], name="gelu_erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="gelu_add"),
        helper.make_node("Mul", ["f1", "erf1"], ["g0"], name="gelu_mul"),
        helper.make_node("Mul", ["g0", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "w2"], ["f2"], name="fc2"),
        helper.make_node("Add", ["f2", "h"], ["y"], name="residual2"),
    ]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, [1, seq, dim]), helper.make_tensor_value_info("mask", T.FLOAT, [1, 1, seq])]
    return _model(nodes, ins, [helper.make_tensor_value_info("y", T.FLOAT, [1, seq, dim])], inits, opset=17)


def detector_head(seed: int = 0) -> onnx.ModelProto:
    """Backbone convs, then one head Conv whose 6 channels are split into 4 box offsets (pixels, large) and 2 score
    logits; boxes are decoded (x stride + grid) and concatenated with sigmoid scores: out [1,6,8,8]. Input x [1,8,16,16]."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8)), 0).astype(np.float32) * 8
    wh = rng.normal(0, 0.3, (6, 16, 1, 1))
    wh[:4] *= 200  # raw box regressions span hundreds, score logits a few units
    inits = [_init("w1", rng.normal(0, 0.3, (16, 8, 3, 3))), _init("w2", rng.normal(0, 0.2, (16, 16, 3, 3))),
             _init("wh", wh), _init("stride", np.array(0.2)),
             _init("grid", np.concatenate([grid, grid])[None]), _init("split", np.array([4, 2]).astype(np.int64))]
    inits[-1] = numpy_helper.from_array(np.array([4, 2], dtype=np.int64), "split")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4, strides=[2, 2]), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "wh"], ["head"], name="head"),
        helper.make_node("Split", ["head", "split"], ["box_raw", "score_logit"], name="split", axis=1),
        helper.make_node("Mul", ["box_raw", "stride"], ["box_px"], name="box_scale"),
        helper.make_node("Add", ["box_px", "grid"], ["boxes"], name="box_decode"),
        helper.make_node("Sigmoid", ["score_logit"], ["scores"], name="score"),
        helper.make_node("Concat", ["boxes", "scores"], ["out"], name="concat", axis=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, 6, 8, 8])], inits)


def reshaped_head(seed: int = 7, transpose: bool = False) -> onnx.ModelProto:
    """Backbone convs, then a 1x1 head Conv whose channels 0-3 are 100x the other 8 (boxes beside scores), exported as
    Conv -> Reshape [1,3,4,64] (-> Transpose [1,3,64,4] with `transpose`) -> graph output. Input x [1,8,16,16]."""
    rng = np.random.default_rng(seed)
    w3, b3 = rng.normal(0, 0.2, (12, 16, 1, 1)), rng.normal(0, 0.1, 12)
    w3[:4] *= 100
    b3[:4] *= 100
    inits = [_init("w1", rng.normal(0, 0.2, (16, 8, 3, 3))), _init("w2", rng.normal(0, 0.1, (16, 16, 3, 3))), _init("w3", w3), _init("b3", b3),
             numpy_helper.from_array(np.array([1, 3, 4, 64], np.int64), "shape")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4, strides=[2, 2]), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="head"),
        helper.make_node("Reshape", ["c3", "shape"], ["reshaped" if transpose else "y"], name="reshape_out"),
    ] + ([helper.make_node("Transpose", ["reshaped"], ["y"], name="transpose_out", perm=[0, 1, 3, 2])] if transpose else [])
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 3, 64, 4] if transpose else [1, 3, 4, 64])], inits)


def mobile_block(c: int, seed: int = 0, hw: int = 16) -> onnx.ModelProto:
    """Cin=3 stem -> 1x1 expand (c -> 4c) -> Relu -> 3x3 depthwise -> Relu -> 1x1 project (4c -> c); input x [1,3,hw,hw].

    Depthwise share of the MACs is 36 / (63 + 8c): about 0.28 at c=8 and 0.06 at c=64.
    """
    rng = np.random.default_rng(seed)
    e = 4 * c
    inits = [
        _init("w0", rng.normal(0, 0.3, (c, 3, 3, 3))), _init("b0", rng.normal(0, 0.1, c)),
        _init("w1", rng.normal(0, 0.3, (e, c, 1, 1))), _init("b1", rng.normal(0, 0.1, e)),
        _init("wd", rng.normal(0, 0.3, (e, 1, 3, 3))), _init("bd", rng.normal(0, 0.1, e)),
        _init("w2", rng.normal(0, 0.3, (c, e, 1, 1))), _init("b2", rng.normal(0, 0.1, c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
        helper.make_node("Conv", ["s_r", "w1", "b1"], ["e"], name="expand"),
        helper.make_node("Relu", ["e"], ["e_r"], name="expand_relu"),
        helper.make_node("Conv", ["e_r", "wd", "bd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=e),
        helper.make_node("Relu", ["d"], ["d_r"], name="dw_relu"),
        helper.make_node("Conv", ["d_r", "w2", "b2"], ["y"], name="project"),
        helper.make_node("Relu", ["y"], ["out"], name="project_relu"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, hw, hw])],
                  [helper.make_tensor_value_info("out", T.FLOAT, [1, c, hw, hw])], inits)
