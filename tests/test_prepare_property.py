"""step1's graph preparation (graph.prepare: ONNX Runtime's basic optimizer, untie_weights, fold_conv_affine) keeps
what the fp32 model computes: random small Conv chains with Mul/Add/Relu/BatchNormalization tails, constants of every
broadcast shape, shared weights, a Conv output read twice or also a graph output, and initializers that are also graph
inputs (keep_initializers_as_inputs: constants of the prepared model, which no longer lists them as inputs). Each prepared
model is run against the original in ONNX Runtime, graph optimizations off, with the initializers' stored values."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from hybridq.graph import prepare

KINDS = ("scalar", "one", "ones", "c", "nc", "vec", "width", "over", "c_over")
"""Shapes of a tail constant, for a Conv output of rank r with C channels and width W: [], [1], [1]*r, [C,1..], [1,C,1..],
[W] (rank 1: along the width, not the channels), [1..,W], [1]*(r+1) and [1,1,C,1..] (both raise the rank)."""


@dataclass(frozen=True)
class Step:
    """One node after the Conv: its op, its constant's shape kind, and whether the constant is its first input."""

    op: str
    kind: str = ""
    first: bool = False


@dataclass(frozen=True)
class Case:
    """One random model: a Conv, a tail of Steps, and what else reads or feeds its tensors."""

    dims: int
    batch: int
    cin: int
    cout: int
    group: int
    kernel: int
    stride: int
    pads: tuple[int, int]
    width: int
    bias: bool
    tail: tuple[Step, ...]
    conv_is_output: bool
    second_reader: bool
    shared_weight: bool
    bias_read: bool
    fed: str
    opset: int
    seed: int


def _shape(kind: str, rank: int, c: int, w: int) -> list[int]:
    """The dims of a constant of this kind for a Conv output of `rank` dims, `c` channels and width `w`."""
    return {"scalar": [], "one": [1], "ones": [1] * rank, "nc": [1, c] + [1] * (rank - 2), "c": [c] + [1] * (rank - 2),
            "vec": [w], "width": [1] * (rank - 1) + [w], "over": [1] * (rank + 1), "c_over": [1, 1, c] + [1] * (rank - 2)}[kind]


def random_case(rng: np.random.Generator) -> Case:
    """A random Case whose model is valid ONNX (shapes agree); each feature that stops a fold is drawn rarely."""
    layout = rng.choice(["plain", "depthwise", "grouped"])
    if layout == "plain":
        group, cin, cout = 1, int(rng.integers(1, 5)), int(rng.integers(1, 6))
    elif layout == "depthwise":
        cin = group = int(rng.integers(1, 5))
        cout = cin * int(rng.integers(1, 3))
    else:
        group = 2
        cin, cout = 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 4))
    kernel = int(rng.integers(1, 4))
    begin = int(rng.integers(0, kernel))
    pads = (begin, int(rng.integers(0, kernel - begin)))  # at most kernel - 1 in all: the input keeps >= 1 element
    # W == C half the time: a rank-1 [C] or a [1,..,1,W] constant then has C values, yet runs along the width
    width = cout if rng.random() < 0.5 else int(rng.integers(1, 6))
    tail: list[Step] = []
    raised = False  # a constant of rank r+1 raised the rank: a BatchNormalization would then normalize the wrong axis
    for _ in range(int(rng.choice(4, p=[0.1, 0.35, 0.3, 0.25]))):
        op = str(rng.choice(["Mul", "Add", "Relu", "BatchNormalization"], p=[0.35, 0.35, 0.15, 0.15]))
        if op == "BatchNormalization" and raised:
            op = "Relu"
        if op in ("Mul", "Add"):
            kind = str(rng.choice(KINDS))
            raised = raised or kind in ("over", "c_over")
            tail.append(Step(op, kind, bool(rng.random() < 0.5)))
        else:
            tail.append(Step(op))
    bias = bool(rng.random() < 0.5)
    fed = str(rng.choice(["", "tail", "weight", "bias"], p=[0.55, 0.15, 0.15, 0.15]))
    if (fed == "tail" and not any(s.kind for s in tail)) or (fed == "bias" and not bias):
        fed = ""

    def sometimes() -> bool:
        return bool(rng.random() < 0.2)

    return Case(dims=int(rng.integers(1, 3)), batch=int(rng.integers(1, 3)), cin=cin, cout=cout, group=group, kernel=kernel,
                stride=int(rng.integers(1, 3)), pads=pads, width=width, bias=bias, tail=tuple(tail), conv_is_output=sometimes(),
                second_reader=sometimes(), shared_weight=sometimes(), bias_read=bias and sometimes(), fed=fed,
                opset=int(rng.choice([11, 13, 17])), seed=int(rng.integers(2**16)))


BASE = Case(dims=2, batch=1, cin=1, cout=2, group=1, kernel=1, stride=1, pads=(0, 0), width=2, bias=False, tail=(),
            conv_is_output=False, second_reader=False, shared_weight=False, bias_read=False, fed="", opset=13, seed=0)
"""A 1x1 Conv from 1 to 2 channels over a 3x2 image: W == C, so [C] and [1,1,1,W] constants have C values."""

CORNERS = (
    replace(BASE, tail=(Step("Mul", "vec"),)),  # rank-1 [C]: runs along the width, not a per-channel scale
    replace(BASE, tail=(Step("Add", "width", first=True),)),  # [1,1,1,W]: per width
    replace(BASE, tail=(Step("Mul", "over"),)),  # one value, yet of rank 5: the output's rank grows
    replace(BASE, dims=1, kernel=3, pads=(1, 1), bias=True, tail=(Step("Mul", "one"), Step("Add", "scalar"))),
    replace(BASE, cin=2, group=2, bias=True, stride=2, tail=(Step("Add", "one"), Step("Mul", "ones"), Step("Relu"))),
    replace(BASE, tail=(Step("BatchNormalization"), Step("Mul", "one"))),
    replace(BASE, tail=(Step("Mul", "one"),), conv_is_output=True),  # the Conv output is also a graph output
    replace(BASE, tail=(Step("Mul", "one"),), second_reader=True),  # the Conv output has two readers
    replace(BASE, tail=(Step("Mul", "one"),), shared_weight=True),  # two Convs share W
    replace(BASE, bias=True, tail=(Step("Add", "one"),), bias_read=True),  # the bias has another reader
    replace(BASE, tail=(Step("Mul", "one"),), fed="tail"),  # the Mul's constant is also a graph input
    replace(BASE, tail=(Step("Mul", "one"),), fed="weight"),  # the Conv's weight is also a graph input
    replace(BASE, bias=True, tail=(Step("Add", "one"),), fed="bias"),  # the Conv's bias is also a graph input
    replace(BASE, shared_weight=True, fed="weight"),  # two Convs share W, a graph input
)
"""One model for each corner the random cases may miss, run first."""


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """The model of `case`, a random value for its input x, and the initializers it also lists as graph inputs."""
    rng = np.random.default_rng(case.seed)
    rank, c, w = case.dims + 2, case.cout, case.width
    out_spatial = [3] * (case.dims - 1) + [w]
    in_spatial = [(o - 1) * case.stride + case.kernel - sum(case.pads) for o in out_spatial]
    inits: list[onnx.TensorProto] = []

    def const(name: str, dims: list[int], *, positive: bool = False) -> str:
        v = rng.uniform(0.5, 1.5, dims) if positive else rng.normal(0, 1, dims)
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    const("W", [c, case.cin // case.group] + [case.kernel] * case.dims)
    conv_in = ["x", "W"] + ([const("B", [c])] if case.bias else [])
    attrs = dict(kernel_shape=[case.kernel] * case.dims, strides=[case.stride] * case.dims,
                 pads=[case.pads[0]] * case.dims + [case.pads[1]] * case.dims, group=case.group)
    nodes = [helper.make_node("Conv", conv_in, ["conv_out"], name="conv", **attrs)]
    outputs, fed_names, out = [], [], "conv_out"
    shapes = {"conv_out": (case.batch, c, *out_spatial)}
    for k, step in enumerate(case.tail):
        name = f"t{k}"
        if step.op == "Relu":
            nodes.append(helper.make_node("Relu", [out], [name], name=name))
        elif step.op == "BatchNormalization":
            params = [const(f"{name}.{p}", [c], positive=p == "var") for p in ("scale", "shift", "mean", "var")]
            nodes.append(helper.make_node("BatchNormalization", [out, *params], [name], name=name))
        else:
            operand = const(f"{name}.k", _shape(step.kind, rank, c, w))
            fed_names += [operand] if case.fed == "tail" and not fed_names else []
            nodes.append(helper.make_node(step.op, [operand, out] if step.first else [out, operand], [name], name=name))
        shapes[name] = np.broadcast_shapes(shapes[out], tuple(_shape(step.kind, rank, c, w)) if step.kind else ())
        out = name
    outputs.append("y" if case.tail else "conv_out")
    if case.tail:
        nodes[-1].output[0], shapes["y"] = "y", shapes[out]
        if case.conv_is_output:
            outputs.append("conv_out")
    if case.second_reader:
        nodes.append(helper.make_node("Mul", ["conv_out", const("side.k", [c] + [1] * (rank - 2))], ["side"], name="side"))
        outputs.append("side")
        shapes["side"] = shapes["conv_out"]
    if case.shared_weight:
        nodes.append(helper.make_node("Conv", conv_in, ["conv2_out"], name="conv2", **attrs))
        nodes.append(helper.make_node("Mul", ["conv2_out", const("y2.k", [1, c] + [1] * (rank - 2))], ["y2"], name="y2"))
        outputs.append("y2")
        shapes["y2"] = shapes["conv_out"]
    if case.bias_read:  # the bias also read by a node that runs (its input is x): it must keep its value
        nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["pooled"], name="pool"))
        nodes.append(helper.make_node("Add", ["pooled", "B"], ["b_read"], name="b_read"))
        outputs.append("b_read")
        shapes["b_read"] = (case.batch, case.cin) + (1,) * (case.dims - 1) + (c,)
    fed_names += {"weight": ["W"], "bias": ["B"]}.get(case.fed, [])
    by_name = {i.name: i for i in inits}
    x_shape = [case.batch, case.cin, *in_spatial]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, x_shape)]
    inputs += [helper.make_tensor_value_info(n, T.FLOAT, list(by_name[n].dims)) for n in fed_names]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, T.FLOAT, list(shapes[o])) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    x = {"x": rng.normal(0, 1, x_shape).astype(np.float32)}
    return model, x, fed_names


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in ONNX Runtime's CPU provider with graph optimizations off (it runs the graph as written)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # no warning for each initializer that is also a graph input
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def check(case: Case) -> None:
    """Assert the prepared model of `case` keeps the output names, the input names but the initializers', and computes
    the original's outputs."""
    model, x, initializer_inputs = build(case)
    prepared, report = prepare(model)
    assert report.initializer_inputs == initializer_inputs
    for kind, dropped in (("input", set(initializer_inputs)), ("output", set())):
        names, kept = [v.name for v in getattr(model.graph, kind) if v.name not in dropped], [v.name for v in getattr(prepared.graph, kind)]
        assert kept == names, f"graph {kind}s {names} became {kept}"
    for name, want, got in zip([o.name for o in model.graph.output], _run(model, x), _run(prepared, x)):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        diff = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
        scale = float(np.abs(want).max(initial=0.0))
        assert diff <= 1e-4 * scale + 1e-6, f"{name}: max abs diff {diff:.3g} (output scale {scale:.3g})"


def _size(case: Case) -> tuple[int, ...]:
    """How big a case is, to report the smallest failing ones first."""
    flags = case.conv_is_output + case.second_reader + case.shared_weight + case.bias_read + bool(case.fed) + case.bias
    return len(case.tail), flags, case.dims, case.cin * case.cout, case.kernel, case.batch


CASES, SEED = 800, 20240613


def test_prepare_keeps_what_random_conv_chains_compute() -> None:
    """Random Conv chains compute the same outputs, under the same input and output names, before and after prepare."""
    failures: list[tuple[tuple[int, ...], Case, str]] = []
    for case in CORNERS + tuple(random_case(np.random.default_rng([SEED, i])) for i in range(CASES)):
        try:
            check(case)
        except Exception as exc:  # an assertion, or prepare or ONNX Runtime failing on the prepared model
            failures.append((_size(case), case, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
    failures.sort(key=lambda f: f[0])
    report = "\n".join(f"{case}\n    -> {why}" for _, case, why in failures[:6])
    assert len(failures) == 0, f"{len(failures)} of {len(CORNERS) + CASES} models changed in preparation; the smallest:\n{report}"
