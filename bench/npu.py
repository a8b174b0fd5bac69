"""`target: npu` on PP-OCR beside RKNN-Toolkit2 2.5's simulator (SPEC 11, issue 17).

    python bench/npu.py [--models rec,det,cls] [--variants int8,proposal] [--eval-limit N] [--no-fidelity]

For each model: hybridq step1 --target npu (+ --proposal, whose fallback on npu is float16) and step2,
as CLI subprocesses (bench/run.py's `build_hybridq`), then the task metric (bench/run.py's
tasks and data) in the exact-int8 simulation. RKNN's figures are copied from
../shared/rknn/README.md (its x86 simulator on the same models and data). Fidelity (default
on): the fp32 metric of each model, and det again with RKNN's input normalisation (ImageNet
mean/std, from ../shared/rknn/det.step1_files.txt; bench/ppocr.py feeds det (p/255-0.5)/0.5),
fp32 and npu int8. Writes the section between `<!-- npu:begin -->` and `<!-- npu:end -->`
of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ppocr  # noqa: E402
import results_md  # noqa: E402
import run as bench_run  # noqa: E402

RESULTS = HERE / "RESULTS.md"
WORK = ppocr.CACHE_DIR / "npu"

RKNN = {  # RKNN-Toolkit2 2.5.0 x86 simulator, ../shared/rknn/README.md: (int8, proposal, proposal float16 layers)
    "rec": (0.929, 0.974, 29),
    "det": (0.928, 0.913, 75),
    "cls": (0.993, 0.993, 0),
}
GOAL = {"rec": 0.974, "det": 0.917, "cls": 0.990}
"""The issue's bar for the npu proposal (RKNN's, det a little above it)."""
RKNN_CFGS = {"det": HERE.parent.parent / "shared" / "rknn" / "det.noproposal.quantization.cfg",
             "cls": HERE.parent.parent / "shared" / "rknn" / "cls.noproposal.quantization.cfg"}
"""RKNN's own int8 ranges (its step1 cfg, no proposal); none was recorded for rec."""
RKNN_DET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
RKNN_DET_STD = np.array([58.395, 57.12, 57.375], np.float32)
"""RKNN's det config(mean_values, std_values), ../shared/rknn/det.step1_files.txt (RGB order: quant_img_RGB2BGR=False)."""


def det_input_imagenet(path: Path) -> np.ndarray:
    """Page -> [1,3,H,W], RGB, normalised as RKNN's det run was (ImageNet mean/std in pixel units)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
    return np.ascontiguousarray(((rgb - RKNN_DET_MEAN) / RKNN_DET_STD).transpose(2, 0, 1)[None]).astype(np.float32)


@contextmanager
def det_normalisation(fn):
    """bench/ppocr.py's det tasks (calibration and evaluation) read pages through `fn` meanwhile."""
    old, ppocr.det_input = ppocr.det_input, fn
    try:
        yield
    finally:
        ppocr.det_input = old


def with_rknn_ranges(task: ppocr.Task, eval_limit: int | None) -> float | None:
    """The npu int8 workspace with every range of RKNN's own cfg imported (`hybridq rknn-cfg import --all-ranges`),
    step2, evaluated: the simulation given RKNN's parameters instead of hybridq's. None without RKNN's cfg."""
    rknn_cfg = RKNN_CFGS.get(task.name.split("-")[0])
    src = WORK / task.name / "int8" / "hybridq"
    if rknn_cfg is None or not rknn_cfg.is_file() or not src.is_dir():
        return None
    wd = WORK / task.name / "rknn-ranges"
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(src, wd)
    s, out = wd / task.model.stem, wd / "rknn-ranges.q.onnx"
    cmds = [["rknn-cfg", "import", str(rknn_cfg), "--cfg", f"{s}.quantization.cfg", "--all-ranges", "-q"],
            ["step2", f"{s}.model", f"{s}.data", f"{s}.quantization.cfg", "-o", str(out), "-q"]]
    for cmd in cmds:
        proc = subprocess.run(bench_run.hybridq_cmd() + cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[{task.name}] rknn ranges: {' '.join(cmd[:2])} failed: {proc.stderr[-400:]}", file=sys.stderr)
            return None
    return task.evaluate(ppocr.session_runner(out, 2, exact_int8=True), eval_limit)


def fidelity(tasks: dict, rows: list[dict], calib_limit: int | None, eval_limit: int | None) -> list[dict]:
    """fp32 beside each row's npu int8 (and int8 with RKNN's ranges where its cfg exists); det again with RKNN's
    normalisation, its own work dir."""
    out = []
    for r in rows:
        task = tasks[r["model"]]
        out.append({"model": r["model"], "input": "bench/ppocr.py", "int8": r.get("int8"),
                    "fp32": task.evaluate(ppocr.session_runner(task.model, 2), eval_limit),
                    "rknn_ranges": with_rknn_ranges(task, eval_limit) if r["model"] == "cls" else None})
    if "det" in tasks and any(r["model"] == "det" for r in rows):
        with det_normalisation(det_input_imagenet):
            task = replace(tasks["det"], name="det-imagenet")
            row = bench(task, ["int8"], calib_limit, eval_limit)
            out.append({"model": "det", "input": "RKNN's (ImageNet mean/std, RGB)", "int8": row.get("int8"),
                        "fp32": task.evaluate(ppocr.session_runner(task.model, 2), eval_limit),
                        "rknn_ranges": with_rknn_ranges(task, eval_limit)})
    print(f"fidelity: {out}", file=sys.stderr, flush=True)
    return out


def render_fidelity(rows: list[dict]) -> list[str]:
    """The fidelity table: fp32 and npu int8 on one input, beside RKNN's int8."""
    lines = [
        "",
        "Fidelity (`target: npu` int8 beside RKNN's simulator): the same task metric in fp32 and npu int8 on one input "
        "normalisation. RKNN normalised det with ImageNet's mean/std (`../shared/rknn/det.step1_files.txt`); bench/ppocr.py "
        "feeds det `(p/255 - 0.5)/0.5`, on which fp32 itself scores lower, so det is shown on both. RKNN's fp32 on its "
        "inputs was not recorded. `with RKNN's ranges`: the same npu int8 workspace with every range of RKNN's own cfg "
        "imported (`hybridq rknn-cfg import --all-ranges`, `../shared/rknn/*.noproposal.quantization.cfg`), so the "
        "simulation, not the calibration, is compared; RKNN wrote no cfg for rec, and its det cfg was calibrated on "
        "ImageNet-normalised inputs, so det is shown there only.",
        "",
        "| model | input normalisation | fp32 | hybridq npu int8 | hybridq npu int8 with RKNN's ranges | RKNN int8 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in rows:
        i8 = f"{f['int8']:.3f}" if f.get("int8") is not None else "not run"
        rr = (f"{f['rknn_ranges']:.3f}" if f.get("rknn_ranges") is not None
              else "no RKNN cfg" if f["model"] not in RKNN_CFGS else "its ranges fit the other input")
        lines.append(f"| {f['model']} | {f['input']} | {f['fp32']:.3f} | {i8} | {rr} | {RKNN[f['model']][0]:.3f} |")
    return lines


def build(task: ppocr.Task, variant: str, calib_limit: int | None) -> tuple[Path, bench_run.Proc]:
    """step1 --target npu (with --proposal for `proposal`: float16 fallback, npu's default) and step2, through bench/run.py's builder."""
    work = WORK / task.name
    dataset = ppocr.write_calib_dataset(task, work / "calib", calib_limit)
    extra = "--target npu"
    os.environ["HYBRIDQ_STEP1_ARGS"] = extra
    try:
        return bench_run.build_hybridq(variant == "proposal")(task.model, dataset, work / variant)
    finally:
        os.environ.pop("HYBRIDQ_STEP1_ARGS", None)


def render(rows: list[dict], eval_limit: int | None, fidelity_rows: list[dict] | None = None) -> str:
    """The marked section: a table per model and variant beside RKNN's anchors."""
    begin, end = results_md.markers("npu")
    lines = [
        begin,
        "## target: npu on PP-OCR, beside RKNN-Toolkit2 2.5's simulator",
        "",
        f"Measured {dt.date.today().isoformat()} on {results_md.cpu()} (`python bench/npu.py`; build times include the "
        "machine's other load, if any). Task metric in hybridq's exact-int8 simulation of the QDQ model "
        f"({'first ' + str(eval_limit) + ' eval samples' if eval_limit else 'full eval split'}). RKNN figures: its x86 "
        "simulator on the same models and data, copied from `../shared/rknn/README.md` (SPEC 11).",
        "",
        "| model | metric | hybridq npu int8 | RKNN int8 | hybridq npu --proposal (float16 layers) | RKNN proposal (float16 layers) | goal | build s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rk = RKNN[r["model"]]
        prop = f"{r['proposal']:.3f} ({r['float_layers']})" if r.get("proposal") is not None else r.get("proposal_error", "not run")
        i8 = f"{r['int8']:.3f}" if r.get("int8") is not None else r.get("int8_error", "not run")
        lines.append(f"| {r['model']} | {r['metric']} | {i8} | {rk[0]:.3f} | {prop} | {rk[1]:.3f} ({rk[2]}) | "
                     f">= {GOAL[r['model']]:.3f}, fewer float16 layers | {r.get('seconds', '')} |")
    lines += [
        "",
        "hybridq's proposal here is the plain CLI one (`--target npu --proposal`, int16 then float16 layers by default on npu: output cosine target 0.99, float "
        "budget 5 % of the quantized layers), not a task-metric search; RKNN's used its cosine threshold 0.98. "
        "A proposal row with `(0)` met its target (or stopped) with range, clip and bias fixes only: no layer taken out of int8.",
        *(render_fidelity(fidelity_rows) if fidelity_rows else []),
        "",
        end,
    ]
    return "\n".join(lines) + "\n"


def bench(task: ppocr.Task, variants: list[str], calib_limit: int | None, eval_limit: int | None) -> dict:
    """One model: each variant built and evaluated."""
    row: dict = {"model": task.name, "metric": task.metric_name}
    secs = []
    for variant in variants:
        t0 = time.time()
        path, proc = build(task, variant, calib_limit)
        if not proc.ok or not path.is_file():
            row[f"{variant}_error"] = f"build failed: {proc.error}"[:80]
            continue
        row["int8" if variant == "int8" else "proposal"] = task.evaluate(ppocr.session_runner(path, 2, exact_int8=True), eval_limit)
        if variant == "proposal":
            row["float_layers"] = (proc.proposal or {}).get("float_layers")
        secs.append(f"{variant} {time.time() - t0:.0f}")
        print(f"[{task.name}] {variant}: {row}", file=sys.stderr, flush=True)
    row["seconds"] = ", ".join(secs)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="rec,det,cls")
    ap.add_argument("--variants", default="int8,proposal")
    ap.add_argument("--calib-limit", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the fp32 and RKNN-normalisation det rows")
    args = ap.parse_args(argv)
    if not ppocr.data_available():
        print(ppocr.skip_message(), file=sys.stderr)
        return 0
    tasks = ppocr.make_tasks(ppocr.fetch_models())
    rows = [bench(tasks[m], args.variants.split(","), args.calib_limit, args.eval_limit) for m in args.models.split(",")]
    fid = None if args.no_fidelity else fidelity(tasks, rows, args.calib_limit, args.eval_limit)
    (WORK / "rows.json").write_text(json.dumps({"rows": rows, "fidelity": fid}, indent=1), encoding="utf-8")
    text = render(rows, args.eval_limit, fid)
    if args.no_write:
        print(text)
    else:
        results_md.write_section(RESULTS, "npu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
