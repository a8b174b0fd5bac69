"""4-bit MatMul/Gemm weights (issue 21): size, accuracy and latency of int8 / int4-plain / int4-gptq / proposal.

    python bench/int4.py                 # PP-OCR rec (its 9 MatMul layers) and a transformer-block fixture
    python bench/int4.py --no-write      # print the section only

For each model, in one run: fp32; hybridq int8 (the default step2); the same with
every MatMul/Gemm that can be int4 set to `int4` (round-to-nearest, then GPTQ on
the X^T X step1 recorded); and `--proposal --max-size-mb` with a budget halfway
between the int8 and the all-int4 sizes. Accuracy: rec char accuracy on the eval
lines (bench/run.py / ppocr.py helpers); for the fixture (random weights, no task)
the output cosine and SNR against fp32 on held-out inputs. Latency: interleaved
rounds at 1 thread, best round median. The section between `<!-- int4:begin -->`
and `<!-- int4:end -->` of bench/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

import hybridq  # noqa: E402
from hybridq.api import ProposalOptions  # noqa: E402
from hybridq.graph import prepare  # noqa: E402
from hybridq.int4 import int4_candidates  # noqa: E402
from tests.models import attention_block  # noqa: E402

WORK = ppocr.CACHE_DIR / "int4"


def _with_layers(cfg: Path, layers: list[str], rounding: str, out: Path, rest_float: bool = False) -> Path:
    """A copy of a step1 cfg with `layers` set to int4 and int4_rounding set (`rest_float`: nothing else quantized)."""
    text = cfg.read_text()
    if rest_float:
        text = re.sub(r"quantize_ops: \[[^\]]*\]", "quantize_ops: []", text)
    text = text.replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n" + "".join(f"  {n}: int4\n" for n in layers))
    for r in ("rtn", "gptq"):
        text = text.replace(f"int4_rounding: {r}", f"int4_rounding: {rounding}")
    out.write_text(text)
    return out


def build_variants(model: Path, dataset: Path, work: Path, samples: int) -> tuple[dict[str, Path], dict]:
    """The variants' model paths, and what the proposal chose."""
    ws = work / "ws"
    r1 = hybridq.step1(model, dataset, out=ws, settings={"int4_rounding": "gptq"})
    layers = int4_candidates(prepare(onnx.load(str(model)))[0])
    paths = {"fp32": model, "int8": hybridq.step2(r1.model, r1.data, r1.cfg, work / "int8.onnx").output}
    for name, rounding, rest in (("int4-plain", "rtn", False), ("int4-gptq", "gptq", False),
                                 ("w4 only, plain", "rtn", True), ("w4 only, gptq", "gptq", True)):
        cfg = _with_layers(r1.cfg, layers, rounding, ws / f"{name}.cfg".replace(" ", "").replace(",", "_"), rest)
        paths[name] = hybridq.step2(r1.model, r1.data, cfg, cfg.with_suffix(".onnx")).output
    int8_mb, int4_mb = (os.path.getsize(paths[k]) / 1e6 for k in ("int8", "int4-gptq"))
    budget = round((int8_mb + int4_mb) / 2, 3)
    t0 = time.perf_counter()
    rp = hybridq.step1(model, dataset, out=work / "prop", settings={"int4_rounding": "gptq"},
                       proposal=ProposalOptions(max_size_mb=budget, samples=samples))
    chosen = sorted(n for n, p in rp.proposal.layers.items() if p == "int4")
    paths["proposal"] = hybridq.step2(rp.model, rp.data, rp.cfg, work / "proposal.onnx").output
    info = {"budget": budget, "int4": chosen, "float": sorted(n for n, p in rp.proposal.layers.items() if p in ("float16", "float32")),
            "candidates": len(layers), "seconds": time.perf_counter() - t0}
    return paths, info


def rec_rows(args: argparse.Namespace) -> tuple[list[dict], dict, str]:
    """PP-OCR rec: the variants' size, char accuracy and latency."""
    task = ppocr.make_tasks(ppocr.fetch_models())["rec"]
    work = WORK / "rec"
    dataset = ppocr.write_calib_dataset(task, work / "calib", limit=args.calib)
    paths, info = build_variants(task.model, dataset, work, args.samples)
    x = task.eval_input()
    lat = bench_run.measure_latency(paths, x, 1, args.rounds, args.runs)
    inputs = [ppocr.rec_input(ppocr.load_gray(p)) for p, _ in ppocr.read_lines("eval")[:32]]
    ref = [ppocr.session_runner(task.model)(v).astype(np.float64) for v in inputs]
    rows = []
    for n, p in paths.items():
        run = ppocr.session_runner(p)
        cos = np.mean([_cos(run(v).astype(np.float64), r) for v, r in zip(inputs, ref)])
        rows.append({"name": n, "mb": os.path.getsize(p) / 1e6, "acc": task.evaluate(run, args.eval), "cos": cos, "ms": min(lat[n])})
    return rows, info, f"char acc ({args.eval or 'all'} eval lines) (logits cos vs fp32, 32 lines)"


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def block_rows(args: argparse.Namespace) -> tuple[list[dict], dict, str]:
    """The transformer-block fixture (tests/models.attention_block, dim 256, seq 64) on anisotropic inputs."""
    work = WORK / "block"
    (work / "calib").mkdir(parents=True, exist_ok=True)
    dim, seq = 256, 64
    model = work / "block.onnx"
    onnx.save(attention_block(seq=seq, dim=dim), model)
    rng = np.random.default_rng(0)
    mix = rng.normal(0, 1, (dim, dim)) * (0.9 ** np.arange(dim))[:, None]

    def sample(r: np.random.Generator) -> dict[str, np.ndarray]:
        return {"x": (r.normal(0, 1, (1, seq, dim)) @ mix).astype(np.float32), "mask": np.ones((1, 1, seq), np.float32)}

    names = []
    for i in range(args.calib):
        np.savez(work / "calib" / f"{i:03d}.npz", **sample(rng))
        names.append(f"{i:03d}.npz")
    (work / "calib" / "dataset.txt").write_text("\n".join(names) + "\n")
    paths, info = build_variants(model, work / "calib" / "dataset.txt", work, args.samples)
    held = [sample(np.random.default_rng(1000 + i)) for i in range(16)]
    ref = [ppocr.ort_session(model, 1).run(None, h)[0] for h in held]
    rows = []
    for n, p in paths.items():
        sess = ppocr.ort_session(p, 1)
        out = [sess.run(None, h)[0].astype(np.float64) for h in held]
        cos = np.mean([_cos(o, r) for o, r in zip(out, ref)])
        snr = np.mean([10 * np.log10(np.sum(r.astype(np.float64) ** 2) / max(np.sum((o - r) ** 2), 1e-30)) for o, r in zip(out, ref)])
        rows.append({"name": n, "mb": os.path.getsize(p) / 1e6, "acc": cos, "snr": snr, "p": p})
    lat = _block_latency({r["name"]: r["p"] for r in rows}, held[0], args)
    for r in rows:
        r["ms"] = min(lat[r["name"]])
    return rows, info, "output cos vs fp32 (SNR dB), 16 held-out inputs"


def _block_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, list[float]]:
    """bench/run.py's measure_latency takes one input; the block has two (x, mask), so interleave here the same way."""
    import statistics

    sessions = {n: ppocr.ort_session(p, 1) for n, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    med: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(args.rounds):
        for n, s in sessions.items():
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                s.run(None, feed)
                times.append((time.perf_counter() - t0) * 1e3)
            med[n].append(statistics.median(times))
    return med


def render(results: dict[str, tuple[list[dict], dict, str]], args: argparse.Namespace, load: float) -> str:
    """The RESULTS.md section."""
    begin, end = results_md.markers("int4")
    out = [
        begin, "## int4 weights (MatMul/Gemm, MatMulNBits)", "",
        f"Command: `python bench/int4.py --calib {args.calib} --eval {args.eval or 0}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {results_md.cpu()}, {os.cpu_count()} cores, "
        f"onnxruntime {__import__('onnxruntime').__version__}; 1-min load average before the rounds {load:.2f} "
        "(above ~0.5 other work was running: latencies are then indicative)  ",
        "int4: block 32, symmetric, activations float; int8: hybridq's default step2; int4-*: int8 with every MatMul/Gemm "
        "that can be int4 in int4; w4 only: those int4 and nothing else quantized (the int4 error alone); latency: 1 thread, "
        f"{args.rounds} interleaved rounds of {args.runs} runs, best round median.", "",
    ]
    for title, (rows, info, metric) in results.items():
        fp = next(r for r in rows if r["name"] == "fp32")
        out += [f"### {title}", "", f"| variant | size MB | x smaller than fp32 | {metric} | latency ms | vs fp32 |", "|---|---|---|---|---|---|"]
        for r in rows:
            acc = f"{r['acc']:.4f}" + (f" ({r['snr']:.1f})" if "snr" in r else f" ({r['cos']:.4f})")
            out.append(f"| {r['name']} | {r['mb']:.3f} | {fp['mb'] / r['mb']:.2f}x | {acc} | {r['ms']:.2f} | {fp['ms'] / r['ms']:.2f}x |")
        out += ["", f"proposal: `--max-size-mb {info['budget']}` (halfway between int8 and all-int4); it chose int4 for "
                f"{len(info['int4'])} of {info['candidates']} MatMul/Gemm layers"
                + (f" and float for {len(info['float'])}" if info["float"] else "") + f", in {info['seconds']:.0f} s "
                "(step1 + proposal).", ""]
    out.append(end)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32, help="calibration samples")
    ap.add_argument("--eval", type=int, default=0, help="rec eval lines (0: all)")
    ap.add_argument("--samples", type=int, default=8, help="samples the proposal scores candidates on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20, help="runs per round")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    args = ap.parse_args(argv)
    args.eval = args.eval or None
    t0 = time.time()
    load = os.getloadavg()[0]
    results = {"transformer block (dim 256, seq 64, random weights)": block_rows(args)}
    if ppocr.data_available():
        results["PP-OCR rec (PP-OCRv4, 9 MatMul layers)"] = rec_rows(args)
    else:
        print(ppocr.skip_message(), file=sys.stderr)
    text = render(results, args, load)
    print(text)
    if not args.no_write:
        results_md.write_section(HERE / "RESULTS.md", "int4", text)
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
