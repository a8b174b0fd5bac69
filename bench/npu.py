"""`target: npu` on PP-OCR beside RKNN-Toolkit2 2.5's simulator (SPEC 11, issue 17).

    python bench/npu.py [--models rec,det,cls] [--variants int8,proposal] [--eval-limit N]

For each model: hybridq step1 --target npu (+ --proposal --fallback float16) and step2,
as CLI subprocesses (bench/run.py's `build_hybridq`), then the task metric (bench/run.py's
tasks and data) in the exact-int8 simulation. RKNN's figures are copied from
../shared/rknn/README.md (its x86 simulator on the same models and data). Writes the
section between `<!-- npu:begin -->` and `<!-- npu:end -->` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

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


def build(task: ppocr.Task, variant: str, calib_limit: int | None) -> tuple[Path, bench_run.Proc]:
    """step1 --target npu (with --proposal --fallback float16 for `proposal`) and step2, through bench/run.py's builder."""
    work = WORK / task.name
    dataset = ppocr.write_calib_dataset(task, work / "calib", calib_limit)
    extra = "--target npu" + (" --fallback float16" if variant == "proposal" else "")
    os.environ["HYBRIDQ_STEP1_ARGS"] = extra
    try:
        return bench_run.build_hybridq(variant == "proposal")(task.model, dataset, work / variant)
    finally:
        os.environ.pop("HYBRIDQ_STEP1_ARGS", None)


def render(rows: list[dict], eval_limit: int | None) -> str:
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
        "hybridq's proposal here is the plain CLI one (`--proposal --fallback float16`: output cosine target 0.99, float "
        "budget 5 % of the quantized layers), not a task-metric search; RKNN's used its cosine threshold 0.98. "
        "A proposal row with `(0)` met its target (or stopped) with range, clip and bias fixes only: no float16 layer.",
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
    args = ap.parse_args(argv)
    if not ppocr.data_available():
        print(ppocr.skip_message(), file=sys.stderr)
        return 0
    tasks = ppocr.make_tasks(ppocr.fetch_models())
    rows = [bench(tasks[m], args.variants.split(","), args.calib_limit, args.eval_limit) for m in args.models.split(",")]
    (WORK / "rows.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    text = render(rows, args.eval_limit)
    if args.no_write:
        print(text)
    else:
        results_md.write_section(RESULTS, "npu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
