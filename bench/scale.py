"""Scaling out: step1, analyze and the proposal on PP-OCR rec in this process, on 1 and 2 local workers, and on Ray local with 2 workers.

    python bench/scale.py [--no-write] [--only step1,analyze,proposal]

step1 at 100 samples (the calib split) and at 400 (the split listed four
times), analyze on 40 samples; each run in a fresh process, measuring wall time
and the peak RSS of the whole process tree (the CLI, its workers, and for Ray
the raylet, GCS and actors: psutil samples every process below the CLI's).
analyze compares the per-layer figures of `--json`. Ray's per-sample overhead is the slope of its step1 wall time over the 300
extra samples, minus the slope on 2 local workers. `step1 --proposal` at 100
samples (16 scored; the proposal's own seconds from `--json` beside the wall)
runs its analyses and scores a step's candidates side by side on the workers.
Every back end must write the same cfg and .data bytes, the same analyze
figures and the same candidate table; the table says so.
Writes the section `scale` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

RESULTS = HERE / "RESULTS.md"
WORK = ppocr.CACHE_DIR / "scale"
BACKENDS = {
    "default": [],  # step1: in this process (ORT and the binning side by side); analyze: its two forked workers
    "1 worker": ["--workers", "1"],
    "2 workers": ["--workers", "2"],
    "Ray local, 2 workers": ["--ray", "local", "--workers", "2"],
}


def run_tree(cmd: list[str], log: Path, stdout: Path | None = None) -> dict:
    """Run cmd (its stdout to `stdout` when given, else to the log); wall time, and the peak summed RSS of it and all
    its descendants (sampled every 50 ms)."""
    env = dict(os.environ, PYTHONPATH=str(ppocr.REPO_ROOT), COLUMNS="200", RAY_DISABLE_USAGE_STATS="1")
    peak = [0]
    with open(log, "w", encoding="utf-8") as out, open(stdout or os.devnull, "w", encoding="utf-8") as json_out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=json_out if stdout else out, stderr=out, env=env, cwd=ppocr.REPO_ROOT)
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    total = 0
                    for p in tree:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak[0] = max(peak[0], total)
                except psutil.Error:
                    pass
                done.wait(0.05)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        code = proc.wait()
        done.set()
        watcher.join()
        wall = time.perf_counter() - start
    return {"ok": code == 0, "wall": wall, "rss_mb": peak[0] / 2**20, "error": "" if code == 0 else bench_run.last_line(log, code)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def step1_rows(model: Path, datasets: dict[int, Path]) -> list[dict]:
    """step1 at each sample count on every back end; the digests of the cfg and .data each wrote."""
    rows = []
    for n, ds in datasets.items():
        for name, flags in BACKENDS.items():
            out = WORK / f"step1_{n}_{name.replace(' ', '_').replace(',', '')}"
            cmd = bench_run.hybridq_cmd() + ["step1", str(model), "--dataset", str(ds), "--out", str(out), "--quiet", *flags]
            r = run_tree(cmd, WORK / f"{out.name}.log")
            stem = model.stem
            r["digest"] = (sha(out / f"{stem}.quantization.cfg"), sha(out / f"{stem}.data")) if r["ok"] else None
            rows.append({"job": f"step1, {n} samples", "n": n, "backend": name, **r})
            bench_run.log(f"step1 {n} {name}: {r['wall']:.1f} s, {r['rss_mb']:.0f} MB {r['error']}")
    return rows


def analyze_rows(model: Path, cfg: Path, ds: Path, n: int) -> list[dict]:
    """analyze on `n` samples on every back end; the digest of the per-layer figures each printed (--json)."""
    rows = []
    for name, flags in BACKENDS.items():
        stem = WORK / f"analyze_{name.replace(' ', '_').replace(',', '')}"
        cmd = bench_run.hybridq_cmd() + ["analyze", str(model), str(cfg), "--dataset", str(ds), "--samples", str(n), "--json", *flags]
        r = run_tree(cmd, stem.with_suffix(".log"), stem.with_suffix(".json"))
        r["digest"] = (hashlib.sha256(json.dumps(json.loads(stem.with_suffix(".json").read_text())["tensors"]).encode()).hexdigest()[:12],
                       ) if r["ok"] else None
        rows.append({"job": f"analyze, {n} samples", "n": n, "backend": name, **r})
        bench_run.log(f"analyze {name}: {r['wall']:.1f} s, {r['rss_mb']:.0f} MB {r['error']}")
    return rows


def proposal_rows(model: Path, ds: Path) -> list[dict]:
    """step1 --proposal on the default, 2 local workers and Ray; the digests of its cfg, .data and candidate table (--json)."""
    rows = []
    for name in ("default", "2 workers", "Ray local, 2 workers"):
        out = WORK / f"proposal_{name.replace(' ', '_').replace(',', '')}"
        cmd = bench_run.hybridq_cmd() + ["step1", str(model), "--dataset", str(ds), "--out", str(out), "--proposal", "--json", *BACKENDS[name]]
        r = run_tree(cmd, out.with_suffix(".log"), out.with_suffix(".json"))
        if r["ok"]:
            prop = json.loads(out.with_suffix(".json").read_text())["proposal"]
            table = hashlib.sha256(json.dumps(prop["candidates"]).encode()).hexdigest()[:12]
            r["digest"] = (sha(out / f"{model.stem}.quantization.cfg"), sha(out / f"{model.stem}.data"), table)
            r["note"] = f"proposal {prop['seconds']:.1f} s, {prop['evaluations']} evaluations"
        rows.append({"job": "step1 --proposal, 100 samples", "n": 0, "backend": name, **r})
        bench_run.log(f"proposal {name}: {r['wall']:.1f} s, {r['rss_mb']:.0f} MB {r.get('note', '')} {r['error']}")
    return rows


def render(rows: list[dict], load: tuple[float, float]) -> str:
    """The marked section: one row per job and back end, the identity check, and Ray's per-sample overhead."""
    begin, end = results_md.markers("scale")
    lines = [begin, "## Scaling out: local workers and Ray (`bench/scale.py`)", "",
             f"PP-OCRv4 rec, {dt.date.today().isoformat()}, CPU: {results_md.cpu()}, {os.cpu_count()} cores; "
             f"load average {load[0]:.1f} before, {load[1]:.1f} after (a shared machine: the walls are indicative). "
             "Default: step1 in this process (ONNX Runtime and the binning already run side by side on two cores), "
             "analyze on its two forked workers; `--workers N` local processes; Ray local started by the run. "
             "analyze compares the per-layer figures of `--json`; the proposal its cfg, .data and candidate table.", "",
             "| job | back end | wall (s) | peak RSS of the process tree (MB) | same bytes as the default |",
             "| --- | --- | ---: | ---: | --- |"]
    base = {r["job"]: r["digest"] for r in rows if r["backend"] == "default"}
    for r in rows:
        same = "n/a" if not r["ok"] else ("yes" if r["digest"] == base.get(r["job"]) else "**no**")
        wall = (f"{r['wall']:.1f}" + (f" ({r['note']})" if r.get("note") else "")) if r["ok"] else f"failed: {r['error']}"
        lines.append(f"| {r['job']} | {r['backend']} | {wall} | {r['rss_mb']:.0f} | {same} |")
    walls = {(r["n"], r["backend"]): r["wall"] for r in rows if r["ok"] and r["job"].startswith("step1,")}
    ns = sorted({n for n, _ in walls})
    if len(ns) == 2 and all((n, b) in walls for n in ns for b in ("2 workers", "Ray local, 2 workers")):
        lo, hi = ns

        def slope(b: str) -> float:
            return (walls[(hi, b)] - walls[(lo, b)]) / (hi - lo) * 1000

        fixed = walls[(lo, "Ray local, 2 workers")] - walls[(lo, "2 workers")] - slope("Ray local, 2 workers") * lo / 1000 + slope("2 workers") * lo / 1000
        lines += ["", f"Ray's overhead on step1: {slope('Ray local, 2 workers') - slope('2 workers'):+.1f} ms per sample "
                      f"(slope of the wall time from {lo} to {hi} samples, Ray minus 2 local workers: "
                      f"{slope('Ray local, 2 workers'):.1f} vs {slope('2 workers'):.1f} ms/sample), "
                      f"plus about {fixed:.1f} s once per run (starting Ray and its actors)."]
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    ap.add_argument("--only", default="step1,analyze,proposal", help="comma-separated jobs to run (a partial run implies --no-write)")
    args = ap.parse_args(argv)
    jobs = set(args.only.split(","))
    if not ppocr.data_available():
        print(ppocr.skip_message(), file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    task = ppocr.make_tasks(ppocr.fetch_models())["rec"]
    calib = ppocr.write_calib_dataset(task, WORK / "calib")
    n = len(ppocr.read_dataset(calib))
    datasets = {n: calib, 4 * n: ppocr.repeat_dataset(calib, 4 * n, calib.parent / f"dataset_{4 * n}.txt")}
    load0 = os.getloadavg()[0]
    rows = step1_rows(task.model, datasets) if "step1" in jobs else []
    if "analyze" in jobs:
        cfg = WORK / f"step1_{n}_default" / f"{task.model.stem}.quantization.cfg"
        rows += analyze_rows(task.model, cfg, calib, 40)
    if "proposal" in jobs:
        rows += proposal_rows(task.model, calib)
    text = render(rows, (load0, os.getloadavg()[0]))
    print(text)
    if not args.no_write and jobs >= {"step1", "analyze", "proposal"}:
        results_md.write_section(RESULTS, "scale", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
