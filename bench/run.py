"""hybridq benchmark on the PP-OCR models, side by side with ONNX Runtime's quantizer.

    python bench/run.py [--models rec,cls,det] [--quick] [--out bench/RESULTS.md]

For every model: task metric, latency (ORT CPU, 1 and 2 threads), file size and the
build cost (wall, peak RSS) of fp32, ORT default int8, ORT after quant_pre_process,
hybridq default int8 and hybridq --proposal; then the calibration cost of each
algorithm at N and 10N samples. Writes RESULTS.md, RESULTS.json and a chart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppocr  # noqa: E402
import results_md  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hybridq.kernels import u8s8_saturates  # noqa: E402  (results_md.cpu needs hybridq on the path too)

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = ppocr.CACHE_DIR / "work"
PPOCR_PY = BENCH_DIR / "ppocr.py"
STEP_TIMEOUT_S = 1800
MEMORY_ERRORS = ("MemoryError", "bad_alloc", "Failed to allocate", "Cannot allocate memory")


@dataclass
class Profile:
    """How much work one run does (full run vs --quick smoke test)."""

    calib_limit: int | None = None
    eval_limit: int | None = None
    rounds: int = 5
    runs: dict[str, int] = field(default_factory=lambda: {"rec": 10, "cls": 50, "det": 5})
    cost_n: dict[str, int] = field(default_factory=lambda: {"rec": 10, "cls": 10, "det": 2})
    cost_methods: tuple[str, ...] = ("MinMax", "Percentile", "Entropy")
    threads: tuple[int, ...] = (1, 2)
    cost: bool = True


QUICK = Profile(calib_limit=10, eval_limit=20, rounds=2, runs={"cls": 20}, cost=False)


@dataclass
class Proc:
    """Outcome of one measured subprocess."""

    ok: bool
    wall_s: float
    peak_rss_mb: float
    error: str = ""
    proposal: dict = field(default_factory=dict)  # hybridq --proposal: what it chose (proposal_summary)


@dataclass
class Variant:
    """One model variant's results."""

    name: str
    path: str | None = None
    build: Proc | None = None
    metric: float | None = None
    metric_exact: float | None = None  # with exact int8 products, where this CPU's default kernels saturate
    exact_error: str = ""  # why metric_exact is missing
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    size_mb: float | None = None
    error: str = ""


# --------------------------------------------------------------------------- subprocesses


def memory_cap_bytes() -> int:
    """Address-space cap for child processes: env HYBRIDQ_BENCH_MEM_GB, default 2/3 of physical RAM."""
    if "HYBRIDQ_BENCH_MEM_GB" in os.environ:
        return int(float(os.environ["HYBRIDQ_BENCH_MEM_GB"]) * 2**30)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 2 / 3)


def _limit_memory() -> None:
    """preexec_fn: cap the child's address space so a runaway calibrator fails instead of OOM-killing."""
    cap = memory_cap_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_measured(cmd: list[str], log: Path, timeout_s: float = STEP_TIMEOUT_S) -> Proc:
    """Run cmd in a fresh process; return wall time, peak RSS (incl. waited-for children), error tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(filter(None, [str(ppocr.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, COLUMNS="200")
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ppocr.REPO_ROOT, preexec_fn=_limit_memory
            )
        except OSError as exc:
            return Proc(False, 0.0, 0.0, f"{type(exc).__name__}: {exc}")
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    ok = proc.returncode == 0
    error = "" if ok else last_line(log, proc.returncode)
    if wall >= timeout_s:
        error = f"timed out after {timeout_s:.0f} s"
    return Proc(ok, wall, usage.ru_maxrss / 1024.0, error)


def last_line(log: Path, code: int) -> str:
    """Last non-empty line of a log (or the killing signal), for an n/a cell."""
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    tail = lines[-1] if len(lines) > 1 else "(no output)"
    if any(m in text for m in MEMORY_ERRORS):
        tail = f"out of memory (cap {memory_cap_bytes() / 2**30:.0f} GB): {tail}"
    return f"exit {code}: {tail}"[:200]


def hybridq_cmd() -> list[str]:
    """How to invoke hybridq (env HYBRIDQ_BENCH_CMD overrides `python -m hybridq`)."""
    custom = os.environ.get("HYBRIDQ_BENCH_CMD")
    return shlex.split(custom) if custom else [sys.executable, "-m", "hybridq"]


# --------------------------------------------------------------------------- builders

Builder = Callable[[Path, Path, Path], tuple[Path, Proc]]


def build_fp32(model: Path, dataset: Path, work: Path) -> tuple[Path, Proc]:
    """The original model, no build."""
    return model, Proc(True, 0.0, 0.0)


def build_ort(pre_process: bool) -> Builder:
    """ORT quantize_static (QDQ, per-channel, MinMax), optionally after opset 13 + quant_pre_process."""

    def build(model: Path, dataset: Path, work: Path) -> tuple[Path, Proc]:
        name = "ort_pre" if pre_process else "ort_default"
        out = work / name / f"{model.stem}.int8.onnx"
        cmd = [sys.executable, str(PPOCR_PY), "ort-quantize", str(model), str(dataset), str(out)]
        return out, run_measured(cmd + (["--pre-process"] if pre_process else []), work / f"{name}.log")

    return build


def build_hybridq(proposal: bool, name: str | None = None, workspace_yaml: str | None = None) -> Builder:
    """hybridq step1 (optionally --proposal; with `workspace_yaml` as the hybridq.yaml of its --out directory) then
    step2, as CLI subprocesses."""

    def build(model: Path, dataset: Path, work: Path) -> tuple[Path, Proc]:
        label = name or ("hybridq_proposal" if proposal else "hybridq")
        wd = work / label
        if workspace_yaml is not None:
            wd.mkdir(parents=True, exist_ok=True)
            (wd / "hybridq.yaml").write_text(workspace_yaml)
        out = wd / f"{model.stem}.q.onnx"
        out.unlink(missing_ok=True)
        cmd1 = hybridq_cmd() + ["step1", str(model), "--dataset", str(dataset), "--out", str(wd)]
        # Plain --proposal, as a new user runs it (default target and float budget); --json for its figures.
        cmd1 += (["--proposal", "--json"] if proposal else []) + shlex.split(os.environ.get("HYBRIDQ_STEP1_ARGS", ""))
        p1 = run_measured(cmd1, work / f"{label}.step1.log")
        if not p1.ok:
            return out, p1
        if proposal:
            p1.proposal = proposal_summary(work / f"{label}.step1.log")
        s = wd / model.stem
        cmd2 = hybridq_cmd() + ["step2", f"{s}.model", f"{s}.data", f"{s}.quantization.cfg", "-o", str(out)]
        p2 = run_measured(cmd2, work / f"{label}.step2.log")
        return out, Proc(p2.ok, p1.wall_s + p2.wall_s, max(p1.peak_rss_mb, p2.peak_rss_mb), p2.error, p1.proposal)

    return build


def proposal_summary(log: Path) -> dict:
    """What the proposal chose, from step1's --json output in its log: fixes, float layers, float compute, seconds."""
    text = log.read_text(encoding="utf-8", errors="replace")
    start = next((m.start() for m in re.finditer(r"^\{", text, re.M)), None)
    if start is None:
        return {}
    try:
        doc, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return {}
    p = doc.get("proposal") or {}
    if not p:  # step1's speed check kept the model float: no proposal ran
        return {"skipped": next((n for n in doc.get("notes", []) if "slower than fp32" in n or "not faster than fp32" in n), "no proposal in step1's output")}
    fc = p.get("float_compute") or {}
    return {"choice": p.get("choice"), "met": p.get("met"), "fixes": p.get("fixes", []), "float_layers": len(p.get("layers", {})),
            "float_proposed": fc.get("proposed"), "float_total": fc.get("total"), "evaluations": p.get("evaluations"),
            "seconds": p.get("seconds")}


ALGORITHMS = ("minmax", "percentile", "mse", "kl")
"""Range algorithms benched: step2 only, from the `hybridq` variant's step1, on its int8 placement (minmax is
`hybridq` itself unless step1's speed check kept that model float)."""
SPEED_CHECK_FLOAT = re.compile(r"^  \S+: float32\s*# speed check: .*\n", re.M)


def build_hybridq_algorithm(algorithm: str) -> Builder:
    """step2 from the `hybridq` variant's artifacts with the cfg's `settings: algorithm:` edited (no re-calibration)."""

    def build(model: Path, dataset: Path, work: Path) -> tuple[Path, Proc]:
        name = f"hybridq_{algorithm}"
        src, wd = work / "hybridq" / model.stem, work / name
        wd.mkdir(parents=True, exist_ok=True)
        out = wd / f"{model.stem}.q.onnx"
        out.unlink(missing_ok=True)
        cfg_in = Path(f"{src}.quantization.cfg")
        if not cfg_in.is_file():
            return out, Proc(False, 0.0, 0.0, "needs the hybridq variant (its step1 artifacts) first")
        text = cfg_in.read_text()
        edited = re.sub(r"^(  algorithm:) \w+", rf"\1 {algorithm}", text, count=1, flags=re.M)
        if edited == text and algorithm != "minmax":
            return out, Proc(False, 0.0, 0.0, "the hybridq cfg has no `settings: algorithm:` line")
        # the layers step1's speed check kept float go back to int8: these rows are about the ranges
        edited = re.sub(r"^custom_quantize_layers:\n(?! )", "custom_quantize_layers: {}\n", SPEED_CHECK_FLOAT.sub("", edited), flags=re.M)
        cfg = wd / cfg_in.name
        cfg.write_text(edited)
        cmd = hybridq_cmd() + ["step2", f"{src}.model", f"{src}.data", str(cfg), "-o", str(out)]
        return out, run_measured(cmd, work / f"{name}.step2.log")

    return build


BUILDERS: dict[str, Builder] = {
    "fp32": build_fp32,
    "ort_default": build_ort(pre_process=False),
    "ort_pre": build_ort(pre_process=True),
    "hybridq": build_hybridq(proposal=False),
    "hybridq_proposal": build_hybridq(proposal=True),
    "hybridq_bias": build_hybridq(proposal=False, name="hybridq_bias", workspace_yaml="bias_correction: true\n"),
    **{f"hybridq_{a}": build_hybridq_algorithm(a) for a in ALGORITHMS},
}
SAME_GRAPH = {f"hybridq_{a}" for a in ALGORITHMS} | {"hybridq_bias"}
"""Variants whose graph is hybridq's with other scales: latency is not measured again."""


# --------------------------------------------------------------------------- measurements


def model_size_mb(path: Path) -> float:
    """Size of an ONNX file plus any external data files it references."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    total += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return total / 1e6


def measure_latency(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """Per-round median latency (ms) of each model, rounds interleaved A,B,C,A,B,C..."""
    sessions = {}
    for name, path in paths.items():
        sess = ppocr.ort_session(path, threads)
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(3):
            sess.run(None, feed)
        sessions[name] = (sess, feed)
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (sess, feed) in sessions.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t0) * 1e3)
            medians[name].append(statistics.median(times))
    return medians


def calibration_cost(task: ppocr.Task, dataset: Path, work: Path, prof: Profile) -> list[dict]:
    """Wall time and peak RSS of each calibration at N and 10N samples, each in a fresh process."""
    n = prof.cost_n[task.name]
    rows = []
    for count in (n, 10 * n):
        ds = ppocr.repeat_dataset(dataset, count, dataset.parent / f"dataset_{count}.txt")
        for method in prof.cost_methods:
            out = work / "cost" / f"ort_{method}_{count}.onnx"
            cmd = [sys.executable, str(PPOCR_PY), "ort-quantize", str(task.model), str(ds), str(out), "--method", method]
            rows.append({"tool": f"ORT {method}", "n": count, **asdict(run_measured(cmd, work / "cost" / f"ort_{method}_{count}.log"))})
            out.unlink(missing_ok=True)
        wd = work / "cost" / f"hybridq_{count}"
        cmd = hybridq_cmd() + ["step1", str(task.model), "--dataset", str(ds), "--out", str(wd)]
        cmd += shlex.split(os.environ.get("HYBRIDQ_STEP1_ARGS", ""))
        rows.append({"tool": "hybridq step1", "n": count, **asdict(run_measured(cmd, work / "cost" / f"hybridq_{count}.log"))})
    return rows


def bench_model(task: ppocr.Task, variants: list[str], prof: Profile) -> dict:
    """All measurements for one model."""
    work = WORK_DIR / task.name
    dataset = ppocr.write_calib_dataset(task, work / "calib", prof.calib_limit)
    n_calib = len(ppocr.read_dataset(dataset))
    results: dict[str, Variant] = {}
    for name in variants:
        log(f"[{task.name}] build {name}")
        path, proc = BUILDERS[name](task.model, dataset, work)
        v = Variant(name, str(path), proc)
        if not proc.ok or not path.is_file():
            v.error = proc.error or f"no output file {path}"
        else:
            v.size_mb = model_size_mb(path)
            log(f"[{task.name}] evaluate {name}")
            try:
                v.metric = task.evaluate(ppocr.session_runner(path, max(prof.threads)), prof.eval_limit)
            except Exception as exc:  # a broken model is a result, not a crash
                v.error = f"evaluate: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            if not v.error and u8s8_saturates() and name != "fp32":
                try:
                    v.metric_exact = task.evaluate(ppocr.session_runner(path, max(prof.threads), exact_int8=True), prof.eval_limit)
                except Exception as exc:  # ORT's x64quantprecision rewrite fails on some models
                    v.exact_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        results[name] = v
    ok = {n: Path(v.path) for n, v in results.items() if not v.error and n not in SAME_GRAPH}
    x = task.eval_input()
    load = {}
    for threads in prof.threads:
        load[f"{threads}t"] = os.getloadavg()[0]
        log(f"[{task.name}] latency {threads}t (load avg {load[f'{threads}t']:.2f}): {', '.join(ok)}")
        for name, meds in measure_latency(ok, x, threads, prof.rounds, prof.runs[task.name]).items():
            results[name].latency_ms[f"{threads}t"] = meds
    cost = []
    if prof.cost:
        log(f"[{task.name}] calibration cost")
        cost = calibration_cost(task, dataset, work, prof)
    return {
        "model": task.name,
        "file": task.model.name,
        "metric_name": task.metric_name,
        "n_calib": n_calib,
        "load_avg_before_latency": load,
        "variants": [asdict(v) for v in results.values()],
        "calibration_cost": cost,
    }


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
    """CPU model, core count and library versions."""
    import onnx
    import onnxruntime

    return {
        "cpu": results_md.cpu(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def fmt_latency(meds: list[float] | None) -> str:
    """Best per-round median and the range of round medians."""
    if not meds:
        return "n/a"
    return f"{min(meds):.2f} ({min(meds):.2f}–{max(meds):.2f})"


def render_markdown(report: dict) -> str:
    """RESULTS.md text."""
    m = report["machine"]
    out = [
        "# hybridq benchmark results (PP-OCR)",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores",
        f"- versions: python {m['python']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}",
        f"- command: `{report['command']}`",
        f"- total wall time: {report['wall_s']:.0f} s",
        "",
        "Latency: ORT CPU EP, ORT_ENABLE_ALL, one fixed eval input; best per-round median in ms",
        f"(range of round medians), {report['profile']['rounds']} interleaved rounds. Build = wall time / peak RSS",
        "of the quantizer process(es) on the whole calib split. `ort_default`: quantize_static QDQ,",
        "per_channel, MinMax, default options (S8S8); `ort_pre`: same after opset 13 + quant_pre_process.",
        "`hybridq_minmax/_percentile/_mse/_kl`: step2 only, from the `hybridq` step1 with `settings: algorithm:` edited",
        "in the cfg, and any layers its speed check kept float back in int8 (no re-calibration; latency not measured:",
        "the graph is `hybridq`'s, or the int8 one bench/cost.py times as `speed_check: false`). `hybridq_bias`: step1 with",
        "`bias_correction: true` (the shifts measured on 8 calibration samples), then step2; where the speed check keeps the",
        "model float there is nothing to correct.",
        "",
    ]
    if any(v.get("metric_exact") is not None for r in report["models"] for v in r["variants"]):
        out += [
            "This CPU has no VNNI: ONNX Runtime's default U8S8 kernels add pairs of int8 products in a saturating",
            "int16. The metric column is what a default session gives here; `exact int8` is the same model with",
            "`session.x64quantprecision=1` (exact U8U8 kernels, as VNNI and ARM CPUs and NPUs compute).",
            "",
        ]
    for r in report["models"]:
        exact = any(v.get("metric_exact") is not None for v in r["variants"])
        out += [f"## {r['model']} ({r['file']}, {r['metric_name']}, calib samples: {r['n_calib']})", ""]
        out += ["| variant | " + r["metric_name"] + (" | exact int8" if exact else "")
                + " | latency 1t ms | latency 2t ms | size MB | build s | build RSS MB |"]
        out += ["|---|---|---|---|---|---|---|" + ("---|" if exact else "")]
        for v in r["variants"]:
            if v["error"]:
                out.append(f"| {v['name']} | n/a: {v['error'].replace('|', '/')} | | | | | |" + (" |" if exact else ""))
                continue
            b = v["build"]
            ex = "" if not exact else (f" {v['metric_exact']:.3f} |" if v.get("metric_exact") is not None
                                       else " n/a: ORT cannot load it so |" if v.get("exact_error") else " |")
            out.append(
                f"| {v['name']} | {v['metric']:.3f} |{ex} {fmt_latency(v['latency_ms'].get('1t'))} | "
                f"{fmt_latency(v['latency_ms'].get('2t'))} | {v['size_mb']:.2f} | {b['wall_s']:.1f} | {b['peak_rss_mb']:.0f} |"
            )
        for v in r["variants"]:
            pr = (v.get("build") or {}).get("proposal") or {}
            if pr.get("skipped"):
                out += ["", f"`{v['name']}` (plain `--proposal`): not run. step1: {pr['skipped']}"]
            elif pr:
                fixes = "; ".join(pr.get("fixes") or []) or "none"
                out += ["", f"`{v['name']}` (plain `--proposal`): {pr.get('choice')}. Target met: {pr.get('met')}; "
                        f"fixes kept: {fixes}; float layers added: {pr.get('float_layers')} "
                        f"({100 * (pr.get('float_proposed') or 0):.1f} % of the Conv/Gemm/MatMul compute; float in all, "
                        f"policy floats included: {100 * (pr.get('float_total') or 0):.1f} %); {pr.get('evaluations')} evaluations, "
                        f"proposal {pr.get('seconds') or 0:.1f} s of the build time."]
        load = ", ".join(f"{k} {v:.2f}" for k, v in r["load_avg_before_latency"].items())
        out += ["", f"1-min load average before the latency rounds: {load} ({report['machine']['cores']} cores;"]
        out += ["above ~0.5 other work was running and latencies are inflated)."]
        if not r["calibration_cost"]:
            continue
        out += ["", "Calibration cost (fresh process each; ORT = full quantize_static, hybridq = step1):", ""]
        out += ["| tool | samples | wall s | peak RSS MB |", "|---|---|---|---|"]
        for c in r["calibration_cost"]:
            if c["ok"]:
                out.append(f"| {c['tool']} | {c['n']} | {c['wall_s']:.1f} | {c['peak_rss_mb']:.0f} |")
            else:
                out.append(f"| {c['tool']} | {c['n']} | n/a: {c['error'].replace('|', '/')} | |")
        out.append("")
    out += ["![accuracy vs latency](accuracy_vs_latency.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """Metric vs 1-thread latency, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, r in zip(axes[0], models):
        for v in r["variants"]:
            meds = v["latency_ms"].get("1t")
            if v["metric"] is None or not meds:
                continue
            ax.scatter(min(meds), v["metric"])
            ax.annotate(v["name"], (min(meds), v["metric"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{r['model']}")
        ax.set_xlabel("latency, 1 thread (ms)")
        ax.set_ylabel(r["metric_name"])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="rec,cls,det", help="comma list of rec,cls,det")
    p.add_argument("--variants", default=",".join(BUILDERS), help="comma list of " + ",".join(BUILDERS))
    p.add_argument("--quick", action="store_true", help="CI smoke test: cls only, few samples (< 60 s)")
    p.add_argument("--out", type=Path, help="RESULTS.md path (default bench/RESULTS.md; --quick: bench/.cache/quick/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report."""
    args = parse_args(argv)
    if not ppocr.data_available():
        print(ppocr.skip_message())
        print("skipped")
        return 0
    prof = QUICK if args.quick else Profile()
    names = ["cls"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in ppocr.MODEL_FILES] + [v for v in variants if v not in BUILDERS]
    if unknown:
        print(f"unknown model/variant {unknown}; models: {list(ppocr.MODEL_FILES)}, variants: {list(BUILDERS)}")
        return 2
    out = args.out or (ppocr.CACHE_DIR / "quick" / "RESULTS.md" if args.quick else BENCH_DIR / "RESULTS.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = ppocr.make_tasks(ppocr.fetch_models())
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "profile": asdict(prof),
        "models": [bench_model(tasks[n], variants, prof) for n in names],
    }
    report["wall_s"] = time.perf_counter() - start
    out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot(report, out.parent / "accuracy_vs_latency.png")
    results_md.write_main(out, render_markdown(report))
    log(f"wrote {out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
