"""Build the bundled demo: a small residual CNN classifier (ONNX) and 24 synthetic RGB images with a dataset.txt.

Deterministic and offline: `python examples/build_demo.py examples/demo`. With `--outlier`, the 1x1 `expand`
conv writes one channel ~300x larger than the others that the classifier never reads: the README's
walk-through of a failing layer and its fix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from PIL import Image, ImageDraw


def _conv(rng, name, cin, cout, k):
    std = np.sqrt(2.0 / (cin * k * k))
    return [numpy_helper.from_array(rng.normal(0, std, (cout, cin, k, k)).astype(np.float32), f"{name}.weight"),
            numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"{name}.bias")]


def build_model(seed: int = 7, outlier: bool = False) -> onnx.ModelProto:
    """stem 3->16 (stride 2) -> 2 residual blocks with BN -> 1x1 expand -> GAP -> Gemm(10); input [1,3,64,64].

    `outlier`: expand's channel 0 is scaled 300x (with a positive bias, so Relu keeps it) and fc ignores it.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    inits += _conv(rng, "stem", 3, 16, 3)
    nodes.append(helper.make_node("Conv", ["input", "stem.weight", "stem.bias"], ["stem_out"], name="stem", pads=[1] * 4, strides=[2, 2]))
    nodes.append(helper.make_node("Relu", ["stem_out"], ["stem_relu"], name="stem_relu"))
    x = "stem_relu"
    for b in range(2):
        p = f"block{b}"
        inits += _conv(rng, f"{p}.conv1", 16, 16, 3) + _conv(rng, f"{p}.conv2", 16, 16, 3)
        for t, v in (("scale", rng.uniform(0.8, 1.2, 16)), ("b", rng.normal(0, 0.05, 16)), ("mean", rng.normal(0, 0.05, 16)), ("var", rng.uniform(0.8, 1.2, 16))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}.bn.{t}"))
        nodes += [
            helper.make_node("Conv", [x, f"{p}.conv1.weight", f"{p}.conv1.bias"], [f"{p}.c1"], name=f"{p}.conv1", pads=[1] * 4),
            helper.make_node("BatchNormalization", [f"{p}.c1"] + [f"{p}.bn.{t}" for t in ("scale", "b", "mean", "var")], [f"{p}.bn1"], name=f"{p}.bn1"),
            helper.make_node("Relu", [f"{p}.bn1"], [f"{p}.r1"], name=f"{p}.relu1"),
            helper.make_node("Conv", [f"{p}.r1", f"{p}.conv2.weight", f"{p}.conv2.bias"], [f"{p}.c2"], name=f"{p}.conv2", pads=[1] * 4),
            helper.make_node("Add", [f"{p}.c2", x], [f"{p}.sum"], name=f"{p}.add"),
            helper.make_node("Relu", [f"{p}.sum"], [f"{p}.out"], name=f"{p}.relu2"),
        ]
        x = f"{p}.out"
    expand = _conv(rng, "expand", 16, 64, 1)
    fc_w = rng.normal(0, 0.2, (10, 64)).astype(np.float32)
    if outlier:
        w, b = (numpy_helper.to_array(t).copy() for t in expand)
        w[0] = np.abs(w[0]) * 300
        b[0] = 1.0
        expand = [numpy_helper.from_array(w, "expand.weight"), numpy_helper.from_array(b, "expand.bias")]
        fc_w[:, 0] = 0.0
    inits += expand
    inits += [numpy_helper.from_array(fc_w, "fc.weight"),
              numpy_helper.from_array(rng.normal(0, 0.05, 10).astype(np.float32), "fc.bias")]
    nodes += [
        helper.make_node("Conv", [x, "expand.weight", "expand.bias"], ["expand_out"], name="expand"),
        helper.make_node("Relu", ["expand_out"], ["expand_relu"], name="expand_relu"),
        helper.make_node("GlobalAveragePool", ["expand_relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "demo_cnn", [helper.make_tensor_value_info("input", T.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("prob", T.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hybridq-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def draw_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A random scene: a colour gradient background with a few filled shapes."""
    base = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, 3) + np.linspace(0, 1, size)[:, None, None] * rng.uniform(0, 255, 3)
    img = Image.fromarray(np.clip(base / 2, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(6, 32), y0 + rng.integers(6, 32)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=colour)
    return img


def main(out: str, outlier: bool = False) -> None:
    """Write model, images and dataset lists into `out`."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(outlier=outlier), root / "demo_cnn.onnx")
    rng = np.random.default_rng(0)
    names = []
    for i in range(24):
        name = f"images/{i:03d}.png"
        draw_image(rng).save(root / name)
        names.append(name)
    (root / "dataset.txt").write_text("# calibration images (RKNN dataset.txt: one sample per line)\n" + "\n".join(names[:16]) + "\n")
    (root / "eval.txt").write_text("# held-out images for analyze\n" + "\n".join(names[16:]) + "\n")
    # step1 reads a hybridq.yaml beside the model: the demo is about accuracy, and a 64x64 CNN this small runs as
    # fast in fp32 as in int8 on a CPU, so step1's speed check would keep it float
    (root / "hybridq.yaml").write_text(
        "# the demo shows what quantization does to accuracy; on a model this small int8 is not faster than fp32 on a\n"
        "# CPU, and step1's speed check would keep every layer float: quantize anyway\n"
        "speed_check: false\n")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--outlier"]
    main(args[0] if args else "examples/demo", outlier="--outlier" in sys.argv[1:])
