"""The `target: cpu` cost model and step1's fixed costs (SPEC 9 and 11, issue 19), beside ONNX Runtime's quantizer.

    python bench/cost.py                      # rec, det, cls, ResNet-18 shape; ~10 min on 2 cores
    python bench/cost.py --models cls --no-write

In one run: (1) latency at 1 and 2 threads of fp32, ORT quantize_static (QDQ, per-channel, MinMax),
hybridq --measure (measured cost model, then step1's speed check), the table's own placement (speed check off) and
hybridq's default int8 (MAC placement, --no-measure), with the cost model's predicted latency (step1's note, 1 thread)
against the measured one of the table's placement; (2) step1 wall time (whole process) against quantize_static MinMax at 10 and 100 samples on cls
and rec and at 24 samples on a small detector-shaped model, with a cold cost cache (first run in a
workspace) and a warm one. Writes the section between `<!-- cost:begin -->` and `<!-- cost:end -->`
of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import plain_cnn  # noqa: E402
import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

BEGIN, END = results_md.markers("cost")
RESULTS = HERE / "RESULTS.md"
WORK = ppocr.CACHE_DIR / "cost"
MEASURED = "hybridq --measure (measured cost model)"
TABLE = "hybridq --measure, speed_check: false (the table's placement)"
PREDICTED = re.compile(r"predicted ([\d.]+) ms against ([\d.]+) ms")


def small_detector(seed: int = 0, size: int = 320) -> onnx.ModelProto:
    """A small detector shape: strided Conv+BN+Relu backbone (/32), an upsampling neck with Concat, two 1x1 heads."""
    b = plain_cnn._Builder(seed)
    x, c = "input", 3
    feats = []
    for cout in (16, 32, 64, 128, 256):
        x = b.conv_bn(b.conv_bn(x, c, cout, 3, 2, True), cout, cout, 3, 1, True)
        c = cout
        feats.append((x, c))
    (p4, c4), (p5, c5) = feats[-2], feats[-1]
    lat = b.conv_bn(p5, c5, 128, 1, 1, True)
    b.nodes.append(helper.make_node("Resize", [lat, "", "up_scales"], ["up"], name="up", mode="nearest"))
    b.nodes.append(helper.make_node("Concat", ["up", p4], ["cat"], name="cat", axis=1))
    n4 = b.conv_bn(b.conv_bn("cat", 128 + c4, 128, 1, 1, True), 128, 128, 3, 1, True)
    outs = []
    for name, t, stride in (("head16", n4, 16), ("head32", lat, 32)):
        w = b._init(f"{name}.w", b.rng.normal(0, np.sqrt(1.0 / 128), (85 * 3, 128, 1, 1)))
        b.nodes.append(helper.make_node("Conv", [t, w], [name], name=name))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 85 * 3, size // stride, size // stride]))
    b._init("up_scales", np.array([1, 1, 2, 2], np.float32))
    graph = helper.make_graph(b.nodes, "small_detector", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              outs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def hybridq_build(model: Path, dataset: Path, work: Path, name: str, extra: list[str]) -> tuple[Path, bench_run.Proc, str]:
    """step1 (+ extra flags) then step2 as CLI subprocesses; the step1 log text for the cost model's note."""
    wd = work / name
    shutil.rmtree(wd, ignore_errors=True)
    cmd1 = bench_run.hybridq_cmd() + ["step1", str(model), "--dataset", str(dataset), "--out", str(wd), *extra]
    p1 = bench_run.run_measured(cmd1, work / f"{name}.step1.log")
    s, out = wd / model.stem, wd / f"{model.stem}.q.onnx"
    cmd2 = bench_run.hybridq_cmd() + ["step2", f"{s}.model", f"{s}.data", f"{s}.quantization.cfg", "-o", str(out)]
    p2 = bench_run.run_measured(cmd2, work / f"{name}.step2.log") if p1.ok else p1
    return out, bench_run.Proc(p1.ok and p2.ok, p1.wall_s + p2.wall_s, max(p1.peak_rss_mb, p2.peak_rss_mb), p2.error), (
        (work / f"{name}.step1.log").read_text(errors="replace"))


def latency_rows(name: str, model: Path, dataset: Path, x: np.ndarray, args: argparse.Namespace) -> dict:
    """fp32, ORT default, hybridq --measure and the default (--no-measure): latency at 1 and 2 threads, and the predicted latency."""
    work = WORK / name
    paths: dict[str, Path] = {"fp32": model}
    out, proc = bench_run.build_ort(False)(model, dataset, work)
    if proc.ok:
        paths["ORT quantize_static"] = out
    predicted = None
    unchecked = work / "speed_check_off.yaml"
    unchecked.parent.mkdir(parents=True, exist_ok=True)
    unchecked.write_text("speed_check: false\n")
    variants = ((MEASURED, "measure", ["--measure"]), (TABLE, "table", ["--measure", "--config", str(unchecked)]),
                ("hybridq default (MAC placement)", "nomeasure", ["--no-measure"]))
    for label, tag, extra in variants:
        out, proc, log = hybridq_build(model, dataset, work, "hq_" + tag, extra)
        if proc.ok:
            paths[label] = out
        m = PREDICTED.search(log)
        if m and label == TABLE:
            predicted = (float(m.group(1)), float(m.group(2)))
    failed = [k for k, p in paths.items() if plain_cnn.runs_or_error(p, x)]
    for k in failed:  # e.g. ORT's own model of an un-preprocessed BatchNormalization graph
        bench_run.log(f"[{name}] {k} does not run in ONNX Runtime: left out")
        del paths[k]
    lat = {}
    for threads in (1, 2):
        bench_run.log(f"[{name}] latency {threads}t (load {os.getloadavg()[0]:.2f})")
        lat[f"{threads}t"] = {k: min(v) for k, v in bench_run.measure_latency(paths, x, threads, args.rounds, args.runs[name]).items()}
    lat["cpu"] = cpu_ms(paths, x, args.rounds, args.runs[name])
    return {"model": name, "latency": lat, "predicted": predicted}


def cpu_ms(paths: dict[str, Path], x: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Least CPU time (ms) of a 1-thread run of each model, in interleaved rounds of `runs` back-to-back runs (warm caches,
    as measure_latency): ORT computes in the calling thread, so other work on a shared machine inflates this far less than wall time."""
    sessions = {k: ppocr.ort_session(p, 1) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feeds[k])
            for _ in range(runs):
                t0 = time.thread_time()
                s.run(None, feeds[k])
                best[k] = min(best[k], (time.thread_time() - t0) * 1e3)
    return best


def step1_wall(name: str, model: Path, dataset: Path, n: int, rounds: int) -> dict:
    """Whole-process wall time of ORT quantize_static MinMax and of hybridq step1 at n samples: one cold step1 (measures
    the cost model), then `rounds` interleaved rounds of ORT and a warm step1 (cost table reused); medians and ranges."""
    work = WORK / name / f"wall_{n}"
    ds = ppocr.repeat_dataset(dataset, n, dataset.parent / f"dataset_{n}.txt")
    ort_out = work / "ort.onnx"
    cmd = [sys.executable, str(bench_run.PPOCR_PY), "ort-quantize", str(model), str(ds), str(ort_out)]
    wd = work / "hq"
    shutil.rmtree(wd, ignore_errors=True)
    step1 = bench_run.hybridq_cmd() + ["step1", str(model), "--dataset", str(ds), "--out", str(wd)]
    cold = bench_run.run_measured(step1, work / "hq_cold.log")
    ort, warm = [], []
    for _ in range(rounds):
        ort.append(bench_run.run_measured(cmd, work / "ort.log"))
        warm.append(bench_run.run_measured(step1, work / "hq_warm.log"))
    return {"model": name, "n": n, "rounds": rounds, "cold": cold.wall_s,
            "ort": statistics.median(r.wall_s for r in ort), "ort_range": (min(r.wall_s for r in ort), max(r.wall_s for r in ort)),
            "warm": statistics.median(r.wall_s for r in warm), "warm_range": (min(r.wall_s for r in warm), max(r.wall_s for r in warm)),
            "ok": cold.ok and all(r.ok for r in ort + warm)}


def render(lat_rows: list[dict], wall_rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """The RESULTS.md section."""
    out = [
        BEGIN, "## target cpu: measured cost model, and step1's fixed costs (issue 19)", "",
        f"Command: `python bench/cost.py --models {args.models}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {results_md.cpu()}, {os.cpu_count()} cores, "
        f"onnxruntime {__import__('onnxruntime').__version__}; {seconds:.0f} s. Latency: best of {args.rounds} interleaved round "
        "medians, ms; calibration on the models' 10 calib samples.", "",
        "| model | variant | 1 thread ms | 2 threads ms | vs fp32 (1t) | 1 thread CPU ms | vs fp32 (CPU) |", "|---|---|---|---|---|---|---|",
    ]
    for r in lat_rows:
        fp, cpu = r["latency"]["1t"]["fp32"], r["latency"]["cpu"]
        for v in r["latency"]["1t"]:
            out.append(f"| {r['model']} | {v} | {r['latency']['1t'][v]:.3f} | {r['latency']['2t'][v]:.3f} | {r['latency']['1t'][v] / fp:.2f}x "
                       f"| {cpu[v]:.3f} | {cpu[v] / cpu['fp32']:.2f}x |")
    out += ["", "Cost model: predicted latency (step1's note, 1 thread) against the measured one (wall; CPU time), on the placement the "
            "table chose (`speed_check: false`: the speed check may keep that placement float, as the --measure row shows).", "",
            "| model | predicted int8 ms | measured int8 ms | error | predicted fp32 ms | measured fp32 ms | error of int8/fp32 "
            "| measured int8 CPU ms | error (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lat_rows:
        if r["predicted"]:
            label = TABLE
            meas, cpu = r["latency"]["1t"].get(label, float("nan")), r["latency"]["cpu"].get(label, float("nan"))
            p, f = r["predicted"]
            fm = r["latency"]["1t"]["fp32"]
            ratio = 100 * ((p / f) / (meas / fm) - 1)
            out.append(f"| {r['model']} | {p:.3f} | {meas:.3f} | {100 * (p - meas) / meas:+.1f} % | {f:.3f} | {fm:.3f} | {ratio:+.1f} % "
                       f"| {cpu:.3f} | {100 * (p - cpu) / cpu:+.1f} % |")
    out += ["", "The last column compares the predicted int8/fp32 ratio with the measured one: on a loaded machine step1's "
            "timings and the latency rounds see different loads, and the ratio cancels the difference."]
    rounds = wall_rows[0]["rounds"] if wall_rows else args.wall_rounds
    out += ["", "step1 wall time (whole process, s) against ORT quantize_static MinMax; cold = first step1 in a workspace "
            f"(measures the cost model), one run; ORT and warm (the cost table reused from the workspace cache): median "
            f"(range) of {rounds} interleaved rounds.", "",
            "| model | samples | ORT quantize_static | hybridq step1 cold | hybridq step1 warm | warm / ORT |", "|---|---|---|---|---|---|"]
    for w in wall_rows:
        (olo, ohi), (wlo, whi) = w["ort_range"], w["warm_range"]
        out.append(f"| {w['model']} | {w['n']} | {w['ort']:.2f} ({olo:.2f}-{ohi:.2f}) | {w['cold']:.2f} | {w['warm']:.2f} ({wlo:.2f}-{whi:.2f}) "
                   f"| {w['warm'] / w['ort']:.2f}x |" + ("" if w["ok"] else " (a run failed: see bench/.cache/cost logs)"))
    out += ["", f"1-min load average at the end: {os.getloadavg()[0]:.2f} (2 cores; above ~0.5 other work was running).", END]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="rec,det,cls,resnet18")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-wall", action="store_true", help="skip the step1 wall-time table")
    ap.add_argument("--wall-rounds", type=int, default=5, help="interleaved ORT / warm step1 rounds per wall-time row (median kept)")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    args = ap.parse_args(argv)
    args.runs = {"rec": 10, "cls": 200, "det": 5, "resnet18": 10}  # cls: 0.8 ms a run, 2-thread medians need more
    t0 = time.time()
    names = args.models.split(",")
    tasks = ppocr.make_tasks(ppocr.fetch_models()) if ppocr.data_available() else {}
    lat_rows, wall_rows, data = [], [], {}
    for name in names:
        if name == "resnet18":
            model = WORK / "resnet18" / "resnet18.onnx"
            model.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(plain_cnn.resnet18(), model)
            data[name] = (model, plain_cnn.write_inputs(WORK / "resnet18" / "calib", 10, 224, 0))
            x = np.load(data[name][1].parent / "000.npy")
        elif name in tasks:
            data[name] = (tasks[name].model, ppocr.write_calib_dataset(tasks[name], WORK / name / "calib", 10))
            x = tasks[name].eval_input()
        else:
            print(f"{name}: {ppocr.skip_message()}", file=sys.stderr)
            continue
        bench_run.log(f"[{name}] build and latency")
        lat_rows.append(latency_rows(name, *data[name], x, args))
    if not args.no_wall:
        # hybridq's bytecode, as an installed wheel has it (ORT's quantizer has its own): with PYTHONDONTWRITEBYTECODE
        # an editable checkout would compile its sources in every timed step1
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "hybridq")], check=False)
        det = WORK / "small_detector" / "small_detector.onnx"
        det.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(small_detector(), det)
        data["small detector"] = (det, plain_cnn.write_inputs(WORK / "small_detector" / "calib", 24, 320, 1))
        for name, n in (("cls", 10), ("cls", 100), ("rec", 10), ("rec", 100), ("small detector", 24)):
            if name in data:
                bench_run.log(f"[{name}] step1 wall at {n} samples")
                wall_rows.append(step1_wall(name.replace(" ", "_"), *data[name], n, args.wall_rounds) | {"model": name})
    text = render(lat_rows, wall_rows, args, time.time() - t0)
    print(text)
    if not args.no_write:
        results_md.write_section(RESULTS, "cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
