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
