"""Deployed int8 speed on a plain CNN (SPEC 9, issue 6: ">= 2x faster than fp32 on plain CNNs").

    python bench/plain_cnn.py            # ResNet-18 shape, 224x224, 16 calibration samples

Builds a ResNet-18-shaped model with onnx.helper (He-initialised random weights,
Conv + BatchNormalization + Relu, residual Adds, GAP, Gemm), random calibration
and evaluation inputs, then in one run: hybridq step1 + step2 (CLI), ONNX
Runtime's quantize_static default (QDQ, per-channel, MinMax, S8S8), and
interleaved latency at 1 and 2 threads (bench/run.py's measure_latency).
Fidelity is the output cosine against fp32 on held-out random inputs (random
weights have no task metric). The section between `<!-- plain:begin -->` and
`<!-- plain:end -->` in bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

BEGIN, END = results_md.markers("plain")
RESULTS = HERE / "RESULTS.md"
WORK = ppocr.CACHE_DIR / "plain"


class _Builder:
    """Accumulates nodes and He-initialised weights of a ResNet-style graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.n = 0

    def _init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        self.n += 1
        p = f"l{self.n}"
        w = self._init(f"{p}.w", self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)))
        bn = [self._init(f"{p}.bn_{s}", v) for s, v in (
            ("scale", self.rng.uniform(0.5, 1.0, cout)), ("bias", self.rng.normal(0, 0.1, cout)),
            ("mean", self.rng.normal(0, 0.1, cout)), ("var", self.rng.uniform(0.5, 1.5, cout)))]
        self.nodes.append(helper.make_node("Conv", [x, w], [f"{p}.c"], name=f"{p}.conv", kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        self.nodes.append(helper.make_node("BatchNormalization", [f"{p}.c", *bn], [f"{p}.bn"], name=f"{p}.bn"))
        if not relu:
            return f"{p}.bn"
        self.nodes.append(helper.make_node("Relu", [f"{p}.bn"], [f"{p}.r"], name=f"{p}.relu"))
        return f"{p}.r"

    def basic_block(self, x: str, cin: int, cout: int, stride: int) -> str:
        y = self.conv_bn(self.conv_bn(x, cin, cout, 3, stride, True), cout, cout, 3, 1, False)
        skip = self.conv_bn(x, cin, cout, 1, stride, False) if stride != 1 or cin != cout else x
        self.n += 1
        self.nodes.append(helper.make_node("Add", [y, skip], [f"add{self.n}"], name=f"add{self.n}"))
        self.nodes.append(helper.make_node("Relu", [f"add{self.n}"], [f"res{self.n}"], name=f"res{self.n}"))
        return f"res{self.n}"


def resnet18(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """ResNet-18 layer shapes (11.7 M parameters, 1.8 GMAC at 224x224) with random weights."""
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2, True)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = b.basic_block(x, cin, cout, stride)
        x = b.basic_block(x, cout, cout, 1)
        cin = cout
    b.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", b._init("fc.w", b.rng.normal(0, np.sqrt(1.0 / 512), (1000, 512))),
                                  b._init("fc.b", np.zeros(1000))], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(b.nodes, "resnet18", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_inputs(directory: Path, n: int, size: int, seed: int) -> Path:
    """n random normal images as .npy plus an RKNN-style dataset.txt listing them."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        np.save(directory / f"{i:03d}.npy", rng.normal(0, 1, (1, 3, size, size)).astype(np.float32))
        names.append(f"{i:03d}.npy")
    (directory / "dataset.txt").write_text("\n".join(names) + "\n")
    return directory / "dataset.txt"


def output_cosine(model: Path, reference: Path, inputs: list[np.ndarray]) -> float:
    """Mean cosine of the model's output against the reference model's, per input."""
    a, b = ppocr.session_runner(model), ppocr.session_runner(reference)
    cos = []
    for x in inputs:
        u, v = a(x).ravel().astype(np.float64), b(x).ravel().astype(np.float64)
        cos.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
    return float(np.mean(cos))


def build(work: Path, calib_n: int, size: int) -> dict[str, Path]:
    """fp32, ORT default int8 and hybridq int8 models; returns their paths."""
    fp32 = work / "resnet18.onnx"
    onnx.save(resnet18(size=size), fp32)
    dataset = write_inputs(work / "calib", calib_n, size, seed=1)
    ws = work / "ws"
    py = [sys.executable, "-m", "hybridq"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    for cmd in (
        py + ["step1", str(fp32), "--dataset", str(dataset), "--out", str(ws), "--quiet"],
        py + ["step2", str(ws / "resnet18.model"), str(ws / "resnet18.data"), str(ws / "resnet18.quantization.cfg"),
              "-o", str(work / "hybridq.onnx"), "--quiet"],
    ):
        subprocess.run(cmd, check=True, env=env)
    ppocr.ort_quantize(fp32, dataset, work / "ort_default.onnx")
    ppocr.ort_quantize(fp32, dataset, work / "ort_pre.onnx", pre_process=True)
    return {"fp32": fp32, "ort_default": work / "ort_default.onnx", "ort_pre": work / "ort_pre.onnx", "hybridq": work / "hybridq.onnx"}


def runs_or_error(path: Path, x: np.ndarray) -> str | None:
    """None when ORT runs the model on x, else the first line of its error."""
    try:
        ppocr.session_runner(path)(x)
        return None
    except Exception as exc:  # noqa: BLE001 - any ORT failure is reported in the table
        return str(exc).splitlines()[0][:160]


def render(rows: list[dict], failed: dict[str, str], args: argparse.Namespace, load: tuple[float, float]) -> str:
    """The RESULTS.md section."""
    fp = {t: min(rows[0][t]) for t in ("1t", "2t")}
    out = [
        BEGIN,
        "## plain CNN (ResNet-18 shape, random weights)",
        "",
        f"Command: `python bench/plain_cnn.py --size {args.size} --calib {args.calib}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {results_md.cpu()}, "
        f"{os.cpu_count()} cores, onnxruntime {__import__('onnxruntime').__version__}; "
        f"1-min load average before the rounds: 1t {load[0]:.2f}, 2t {load[1]:.2f}  ",
        f"Input 1x3x{args.size}x{args.size}; {args.rounds} interleaved rounds; best round median in ms; "
        "fidelity = mean output cosine vs fp32 on 8 held-out random inputs.",
        "",
        "| variant | output cos vs fp32 | latency 1t ms | speed-up 1t | latency 2t ms | speed-up 2t |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['cos']:.4f} | {min(r['1t']):.2f} | {fp['1t'] / min(r['1t']):.2f}x | "
            f"{min(r['2t']):.2f} | {fp['2t'] / min(r['2t']):.2f}x |"
        )
    for name, err in failed.items():
        out.append(f"| {name} | does not run in ORT: {err} | | | | |")
    out += ["", "`ort_default` = quantize_static on the model as exported; `ort_pre` = after quant_pre_process "
            "(BatchNormalization folded).", "", END]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="runs per round")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = build(WORK, args.calib, args.size)
    rng = np.random.default_rng(7)
    held_out = [rng.normal(0, 1, (1, 3, args.size, args.size)).astype(np.float32) for _ in range(8)]
    x = held_out[0]
    failed = {n: err for n, p in paths.items() if (err := runs_or_error(p, x))}
    ok = {n: p for n, p in paths.items() if n not in failed}
    load = []
    lat = {}
    for threads in (1, 2):
        load.append(os.getloadavg()[0])
        lat[f"{threads}t"] = bench_run.measure_latency(ok, x, threads, args.rounds, args.runs)
    rows = [{"name": n, "cos": output_cosine(p, paths["fp32"], held_out), "1t": lat["1t"][n], "2t": lat["2t"][n]} for n, p in ok.items()]
    text = render(rows, failed, args, (load[0], load[1]))
    print(text)
    if not args.no_write:
        results_md.write_section(RESULTS, "plain", text)
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
