"""LSTM layers through hybridq (issue 21): size, output cosine and latency of DynamicQuantizeLSTM against fp32.

    python bench/recurrent.py            # three LSTM shapes, 8 calibration samples each

Each model is x -> MatMul -> LSTM -> output, with random weights (std 0.1) and random normal inputs;
hybridq step1 + step2 (Python API, default settings: the LSTM runs as com.microsoft
DynamicQuantizeLSTM with int8 weights per gate row, the MatMul as uint8 QDQ) and the same model
with the MatMul quantized but the LSTM kept float32 (cfg edit), to isolate the LSTM's effect.
Fidelity is the mean output cosine against fp32 on 8 held-out inputs; latency is interleaved
(bench/run.py's measure_latency) at 1 thread. The section between `<!-- recurrent:begin -->` and
`<!-- recurrent:end -->` in bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

RESULTS = HERE / "RESULTS.md"
WORK = ppocr.CACHE_DIR / "recurrent"
SHAPES = ((100, 64, 128, "forward"), (100, 256, 256, "bidirectional"), (40, 512, 512, "forward"))


def lstm_model(steps: int, features: int, hidden: int, direction: str, seed: int = 0) -> onnx.ModelProto:
    """x [steps, 1, features] -> MatMul -> LSTM -> y (its Y output)."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    arrays = {"w_in": (features, features), "W": (d, 4 * hidden, features), "R": (d, 4 * hidden, hidden), "B": (d, 8 * hidden)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, s).astype(np.float32), n) for n, s in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["feat"], name="proj"),
             helper.make_node("LSTM", ["feat", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden, direction=direction)]
    g = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, features])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, d, 1, hidden])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_shape(steps: int, features: int, hidden: int, direction: str, rounds: int, runs: int) -> dict:
    """step1 + step2 with the LSTM int8 and with it float32; sizes, cosines and 1-thread latencies."""
    import hybridq

    work = WORK / f"{steps}x{features}x{hidden}{direction[0]}"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "lstm.onnx"
    onnx.save(lstm_model(steps, features, hidden, direction), fp32)
    rng = np.random.default_rng(1)
    names = []
    for i in range(8):
        np.save(work / f"{i}.npy", rng.normal(0, 1, (steps, 1, features)).astype(np.float32))
        names.append(f"{i}.npy")
    (work / "dataset.txt").write_text("\n".join(names) + "\n")
    r1 = hybridq.step1(fp32, work / "dataset.txt", out=work / "ws")
    int8 = hybridq.step2(r1.model, r1.data, r1.cfg, work / "lstm_int8.onnx").output
    r1.cfg.write_text(r1.cfg.read_text().replace("  lstm: int8", "  lstm: float32"))
    lstm_float = hybridq.step2(r1.model, r1.data, r1.cfg, work / "lstm_float.onnx").output
    paths = {"fp32": fp32, "lstm float32": lstm_float, "lstm int8": int8}
    held = [np.random.default_rng(100 + k).normal(0, 1, (steps, 1, features)).astype(np.float32) for k in range(8)]
    refs = [ppocr.session_runner(fp32)(x) for x in held]
    row = {"shape": f"{steps} steps, {features} in, {hidden} hidden, {direction}", "variants": {}}
    lat = bench_run.measure_latency(paths, held[0], 1, rounds, runs)
    for name, path in paths.items():
        runner = ppocr.session_runner(path)
        cos = statistics.mean(_cosine(runner(x), r) for x, r in zip(held, refs))
        row["variants"][name] = {"mb": path.stat().st_size / 1e6, "cos": cos, "ms": statistics.median(lat[name])}
    return row


def render(rows: list[dict], when: str) -> str:
    """The marked RESULTS.md section."""
    begin, end = results_md.markers("recurrent")
    import onnxruntime

    lines = [begin, "## LSTM layers (bench/recurrent.py)", "",
             f"{results_md.cpu()}, 1 thread, ONNX Runtime {onnxruntime.__version__}, {when}. Random weights and inputs: output cosine "
             "against fp32 (mean of 8 held-out inputs). `lstm int8` is hybridq's default (DynamicQuantizeLSTM, int8 weights per "
             "gate row); `lstm float32` sets the LSTM to float32 in the cfg (the MatMul before it is uint8 in both).", "",
             "| LSTM | variant | size MB | output cosine | latency ms | vs fp32 |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        base = row["variants"]["fp32"]["ms"]
        for name, v in row["variants"].items():
            lines.append(f"| {row['shape']} | {name} | {v['mb']:.2f} | {v['cos']:.5f} | {v['ms']:.2f} | {base / v['ms']:.2f}x |")
    return "\n".join(lines + ["", end]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    rows = [one_shape(*shape, args.rounds, args.runs) for shape in SHAPES]
    text = render(rows, dt.date.today().isoformat())
    results_md.write_section(RESULTS, "recurrent", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
