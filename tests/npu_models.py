"""Fixture models for `target: npu`: every operator an integer-only accelerator runs, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

NPU_OPS = (
    "Conv", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Erf",
    "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Resize", "Concat", "Split", "Slice", "Softmax",
    "LayerNormalization", "MatMul", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
)
"""The op types of `every_op`, each with at least one node."""

DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _f(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _i(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.int64), name)


def _model(name: str, nodes: list, outputs: dict[str, list[int]], inits: list, x_shape: list[int]) -> onnx.ModelProto:
    """A checked opset-17 model of `nodes` reading one float input x."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", T.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, T.FLOAT, shape) for o, shape in outputs.items()], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def every_op(seed: int = 0) -> onnx.ModelProto:
    """x [1,4,8,8] through every op of NPU_OPS (opset 17); each branch ends in a Neg (float on every target), so no listed op writes a graph output."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    inits = [
        _f("w1", rng.normal(0, 0.3, (8, 4, 3, 3))), _f("b1", rng.normal(0, 0.1, 8)),
        _f("w2", rng.normal(0, 0.4, (8, 4, 1, 1))), _f("b2", rng.normal(0, 0.1, 8)),
        _f("two", 2.0), _f("lo", -1.0), _f("hi", 1.0), _f("sqrt2", np.sqrt(2.0)), _f("half", 0.5), _f("one", 1.0),
        _f("scales", [1.0, 1.0, 2.0, 2.0]), _i("split", [28, 28]), _i("s0", [0]), _i("s1", [16]), _i("ax1", [1]),
        _i("ax23", [2, 3]), _i("ax2", [2]), _i("shape", [1, 16, 64]),
        _f("gamma", rng.uniform(0.5, 1.5, 16)), _f("beta", rng.normal(0, 0.1, 16)),
    ]
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        n("Relu", ["c1"], ["r1"], name="relu_fused"),
        n("Conv", ["x", "w2", "b2"], ["c2"], name="conv2"),
        n("Add", ["r1", "c2"], ["add"], name="add"),
        n("Sub", ["add", "c2"], ["sub"], name="sub"),
        n("Mul", ["sub", "c2"], ["mul"], name="mul"),
        n("Div", ["mul", "two"], ["div"], name="div"),
        n("Relu", ["div"], ["relu2"], name="relu"),
        n("Clip", ["sub", "lo", "hi"], ["clip"], name="clip"),
        n("Sigmoid", ["clip"], ["sig"], name="sigmoid"),
        n("HardSigmoid", ["mul"], ["hsig"], name="hardsigmoid"),
        n("HardSwish", ["add"], ["hswish"], name="hardswish"),
        n("Tanh", ["c2"], ["tanh"], name="tanh"),
        n("LeakyRelu", ["add"], ["lrelu"], name="leakyrelu", alpha=0.1),
        # Gelu as exported by PyTorch: x * 0.5 * (1 + erf(x / sqrt 2))
        n("Div", ["c2", "sqrt2"], ["g_div"], name="gelu_div"),
        n("Erf", ["g_div"], ["g_erf"], name="gelu_erf"),
        n("Add", ["g_erf", "one"], ["g_add"], name="gelu_add"),
        n("Mul", ["c2", "half"], ["g_half"], name="gelu_half"),
        n("Mul", ["g_half", "g_add"], ["gelu"], name="gelu_mul"),
        n("Concat", ["relu2", "sig", "hsig", "hswish", "tanh", "lrelu", "gelu"], ["cat"], name="concat", axis=1),
        n("MaxPool", ["cat"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        n("AveragePool", ["mp"], ["ap"], name="avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        n("Resize", ["ap", "", "scales"], ["rs"], name="resize", mode="nearest"),
        n("Split", ["rs", "split"], ["sp1", "sp2"], name="split", axis=1),
        n("Slice", ["sp1", "s0", "s1", "ax1"], ["sl"], name="slice"),
        n("GlobalAveragePool", ["sp2"], ["gap"], name="gap"),
        n("Squeeze", ["gap", "ax23"], ["sq"], name="squeeze"),
        n("Unsqueeze", ["sq", "ax2"], ["uq"], name="unsqueeze"),
        n("ReduceMean", ["sl"], ["rm"], name="reducemean", axes=[1], keepdims=1),
        n("Reshape", ["sl", "shape"], ["rsh"], name="reshape"),
        n("Transpose", ["rsh"], ["tr"], name="transpose", perm=[0, 2, 1]),
        n("LayerNormalization", ["tr", "gamma", "beta"], ["ln"], name="layernorm", axis=-1),
        n("MatMul", ["ln", "rsh"], ["mm"], name="matmul"),
        n("Softmax", ["mm"], ["sm"], name="softmax", axis=-1),
        n("Flatten", ["sm"], ["fl"], name="flatten", axis=1),
        n("Neg", ["fl"], ["y_attn"], name="out_attn"),
        n("Neg", ["uq"], ["y_pool"], name="out_pool"),
        n("Neg", ["rm"], ["y_mean"], name="out_mean"),
    ]
    return _model("every_op", nodes, {"y_attn": [1, 4096], "y_pool": [1, 28, 1], "y_mean": [1, 1, 8, 8]}, inits, [1, 4, 8, 8])


def exported_patterns(seed: int = 0) -> onnx.ModelProto:
    """x [1,8,16]: LayerNorm, HardSwish (clip form), Swish and Gelu ((x * (1 + erf)) * 0.5) as exporters write them, in a chain."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    inits = [
        _f("two", 2.0), _f("eps", 1e-5), _f("gamma", rng.uniform(0.5, 1.5, 16)), _f("beta", rng.normal(0, 0.1, 16)),
        _f("three", 3.0), _f("zero", 0.0), _f("six", 6.0), _f("sqrt2", np.sqrt(2.0)), _f("one", 1.0), _f("half", 0.5),
    ]
    nodes = [
        n("ReduceMean", ["x"], ["mean"], name="ln_mean", axes=[-1]),
        n("Sub", ["x", "mean"], ["d"], name="ln_sub"),
        n("Pow", ["d", "two"], ["d2"], name="ln_pow"),
        n("ReduceMean", ["d2"], ["var"], name="ln_var", axes=[-1]),
        n("Add", ["var", "eps"], ["var_eps"], name="ln_eps"),
        n("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        n("Div", ["d", "std"], ["norm"], name="ln_div"),
        n("Mul", ["norm", "gamma"], ["scaled"], name="ln_gamma"),
        n("Add", ["scaled", "beta"], ["ln"], name="ln_beta"),
        n("Add", ["ln", "three"], ["hs_add"], name="hs_add"),
        n("Clip", ["hs_add", "zero", "six"], ["hs_clip"], name="hs_clip"),
        n("Mul", ["ln", "hs_clip"], ["hs_mul"], name="hs_mul"),
        n("Div", ["hs_mul", "six"], ["hs"], name="hs_div"),
        n("Sigmoid", ["hs"], ["sw_sig"], name="sw_sig"),
        n("Mul", ["hs", "sw_sig"], ["sw"], name="sw_mul"),
        n("Div", ["sw", "sqrt2"], ["ge_div"], name="ge_div"),
        n("Erf", ["ge_div"], ["ge_erf"], name="ge_erf"),
        n("Add", ["ge_erf", "one"], ["ge_add"], name="ge_add"),
        n("Mul", ["sw", "ge_add"], ["ge_mul"], name="ge_mul"),
        n("Mul", ["ge_mul", "half"], ["ge"], name="ge_half"),
        n("Neg", ["ge"], ["y"], name="out"),
    ]
    return _model("patterns", nodes, {"y": [1, 8, 16]}, inits, [1, 8, 16])


def saturating_readers(seed: int = 0) -> onnx.ModelProto:
    """x [1,4,8,8]: five Convs whose outputs only a saturating op reads (HardSigmoid, Sigmoid, Clip; an Add read only
    by Relu), the ranges an NPU clamps to the reader's saturation interval; one Conv output also read by a Neg (not clamped)."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    inits = [_f(f"w{k}", rng.normal(0, 1.5, (4, 4, 3, 3))) for k in "abcde"] + [_f("lo", -1.0), _f("hi", 1.0)]
    nodes = [n("Conv", ["x", f"w{k}"], [f"c{k}"], name=f"conv_{k}", pads=[1, 1, 1, 1]) for k in "abcde"] + [
        n("HardSigmoid", ["ca"], ["hsig"], name="hardsigmoid", alpha=0.2, beta=0.5),
        n("Sigmoid", ["cb"], ["sig"], name="sigmoid"),
        n("Add", ["cc", "cd"], ["s"], name="add"),
        n("Relu", ["s"], ["r"], name="relu"),
        n("Clip", ["ce", "lo", "hi"], ["cl"], name="clip"),
        n("Neg", ["cd"], ["y_d"], name="out_d"),
    ] + [n("Neg", [t], [f"y_{t}"], name=f"out_{t}") for t in ("hsig", "sig", "r", "cl")]
    outs = {o: [1, 4, 8, 8] for o in ("y_hsig", "y_sig", "y_r", "y_cl", "y_d")}
    return _model("saturating", nodes, outs, inits, [1, 4, 8, 8])


def concat_with_shared_input(seed: int = 0) -> onnx.ModelProto:
    """x [1,4,8,8]: Concat(ca, cb) where ca (range ~4x narrower) is also read by a Neg, cb only by the Concat."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    inits = [_f("wa", rng.normal(0, 0.25, (4, 4, 3, 3))), _f("wb", rng.normal(0, 1.0, (4, 4, 3, 3)))]
    nodes = [
        n("Conv", ["x", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        n("Conv", ["x", "wb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        n("Concat", ["ca", "cb"], ["cat"], name="concat", axis=1),
        n("Neg", ["cat"], ["y_cat"], name="out_cat"),
        n("Neg", ["ca"], ["y_a"], name="out_a"),
    ]
    return _model("concat_shared", nodes, {"y_cat": [1, 8, 8, 8], "y_a": [1, 4, 8, 8]}, inits, [1, 4, 8, 8])


def conv_affine_chain(seed: int = 0) -> onnx.ModelProto:
    """x [1,4,8,8]: 1x1 Conv -> Mul (const first) -> Add by [1]-shaped constants, as Paddle exports a learnable affine
    (ONNX Runtime's Conv fusions, in hybridq's preparation, leave it); and a 1x1 Conv -> Mul by a per-column
    [1,1,1,8] constant, which no compiler can fold."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    inits = [
        _f("w1", rng.normal(0, 0.5, (6, 4, 1, 1))), _f("b1", rng.normal(0, 0.2, 6)),
        _f("a", [-1.7]), _f("c", [0.4]),
        _f("w2", rng.normal(0, 0.5, (6, 4, 1, 1))), _f("m", rng.uniform(0.5, 2.0, (1, 1, 1, 8))),
    ]
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        n("Mul", ["a", "c1"], ["m1"], name="scale"),
        n("Add", ["m1", "c"], ["a1"], name="shift"),
        n("Neg", ["a1"], ["y1"], name="out1"),
        n("Conv", ["x", "w2"], ["c2"], name="conv2"),
        n("Mul", ["c2", "m"], ["m2"], name="columns"),
        n("Neg", ["m2"], ["y2"], name="out2"),
    ]
    return _model("conv_affine", nodes, {"y1": [1, 6, 8, 8], "y2": [1, 6, 8, 8]}, inits, [1, 4, 8, 8])
