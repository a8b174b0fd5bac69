"""What the PP-OCR task metrics see: agreement with fp32 beside the score against the ground truth.

    python bench/task_metric.py            # after bench/run.py and bench/npu.py built their models

The goals of the proposal (issues 16, 17) are task figures, and on PP-OCR rec and det those move
with things the quantization error barely touches: rec's char acc counts a space the model
decodes before or after a line (the ground truth has none), and det's hmean counts boxes whose
IoU with the ground truth sits near 0.5, where fp32's own boxes already lie. This script scores
the models bench/run.py (cpu) and bench/npu.py (npu) built, read from their work directories,
on the full eval split:

* rec: the README's char acc, the same decodes with edge spaces stripped (interior spaces still
  count) and with every space ignored (PaddleOCR's RecMetric default), and how many lines decode
  with an edge space;
* det: hmean against the ground truth, hmean against fp32's boxes (IoU >= 0.5), and the mean IoU
  of each fp32 box with the model's best-overlapping box: how faithfully the boxes are reproduced.

Writes the `<!-- task_metric:begin/end -->` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ppocr  # noqa: E402
import results_md  # noqa: E402

RESULTS = HERE / "RESULTS.md"
VARIANTS = {  # label -> (work directory under bench/.cache, sub-path of the built model's folder)
    "cpu int8 (default)": ("work", "hybridq"),
    "cpu algorithm: percentile": ("work", "hybridq_percentile"),
    "cpu algorithm: mse": ("work", "hybridq_mse"),
    "cpu --proposal": ("work", "hybridq_proposal"),
    "cpu bias_correction: true": ("work", "hybridq_bias"),
    "ORT quantize_static": ("work", "ort_default"),
    "npu int8": ("npu", "int8/hybridq"),
    "npu --proposal --fallback float16": ("npu", "proposal/hybridq_proposal"),
}


def built_models(task: ppocr.Task) -> dict[str, Path]:
    """The variants whose model exists (bench/run.py and bench/npu.py write them)."""
    out = {}
    for label, (work, sub) in VARIANTS.items():
        found = sorted((ppocr.CACHE_DIR / work / task.name / sub).glob("*.onnx"))
        if found:
            out[label] = found[0]
    return out


def runs(task: ppocr.Task) -> dict[str, ppocr.RunFn]:
    """fp32 first (the reference), then each built variant in exact int8."""
    out = {"fp32": ppocr.session_runner(task.model, 2)}
    out.update({label: ppocr.session_runner(p, 2, exact_int8=True) for label, p in built_models(task).items()})
    return out


def render(rec: dict[str, dict] | None, det: dict[str, dict] | None, eval_limit: int | None) -> str:
    """The RESULTS.md section."""
    begin, end = results_md.markers("task_metric")
    split = f"first {eval_limit} eval samples" if eval_limit else "full eval split"
    out = [begin, "## What the PP-OCR task metrics see (`python bench/task_metric.py`)", "",
           f"Measured {dt.date.today().isoformat()} on {results_md.cpu()}, {split}, on the models bench/run.py (cpu) and "
           "bench/npu.py (npu) built. A quantized model can score above fp32 by drifting in a direction the metric "
           "happens to reward; these columns show, beside each task figure, how closely the model reproduces fp32."]
    if rec:
        out += ["", "rec: the README's char acc counts spaces, and the model decodes a space before or after many lines "
                "(the ground truth has none). The same decodes with edge spaces stripped (interior spaces still count), "
                "and with every space ignored as PaddleOCR's own RecMetric does by default (`ignore_space=True`); then "
                "against fp32's own decodes (how closely the model reproduces fp32): char acc, and the lines decoded "
                "otherwise, of which those that differ only by an edge space:", "",
                "| rec model | char acc (README) | edge spaces stripped | spaces ignored (PaddleOCR) | lines with an edge space "
                "| char acc vs fp32's decodes | lines unlike fp32's |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {k} | {r['char acc']:.4f} | {r['edge spaces stripped']:.4f} | {r['spaces ignored']:.4f} | "
                f"{r['edge-space lines']} of {r['lines']} | {r['vs first']:.4f} | {r['lines unlike first']} "
                f"({r['unlike by an edge space']} by an edge space only) |" for k, r in rec.items()]
    if det:
        out += ["", "det: hmean against the ground truth (IoU >= 0.5), against fp32's own boxes, and the mean IoU of each "
                "fp32 box with the model's best-overlapping box (1.0 = fp32's boxes exactly); then, per ground-truth box, "
                "the median area of its best box over its own, and how many best IoUs lie within 0.05 of the 0.5 "
                "threshold (boxes a small change of extent moves across it):", "",
                "| det model | hmean (README) | boxes matched | hmean vs fp32's boxes | mean IoU with fp32's boxes "
                "| box area / ground truth | IoU within 0.05 of 0.5 |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {k} | {r['hmean']:.4f} | {r['matched']} of {r['gt']} | {r['hmean vs reference']:.4f} | "
                f"{r['mean IoU with reference']:.4f} | {r['area vs gt']:.3f} | {r['near threshold']} |" for k, r in det.items()]
        out += ["", det_ranking(det)]
    out += ["", end]
    return "\n".join(out) + "\n"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (average ranks for ties)."""
    def ranks(x: list[float]) -> np.ndarray:
        v = np.asarray(x, np.float64)
        return np.array([np.mean(np.flatnonzero(np.sort(v) == e)) for e in v])
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def det_ranking(det: dict[str, dict]) -> str:
    """Do hmean and fidelity to fp32 rank the quantized det models alike? (Spearman over the models other than fp32.)"""
    rows = {k: r for k, r in det.items() if k != "fp32"}
    if len(rows) < 3:
        return ""
    hm = [r["hmean"] for r in rows.values()]
    fid = [r["mean IoU with reference"] for r in rows.values()]
    area = [r["area vs gt"] for r in rows.values()]
    return (f"Across the {len(rows)} quantized det models, Spearman's rank correlation of hmean with the mean IoU with "
            f"fp32's boxes is {spearman(hm, fid):+.2f}, and with the box area over the ground truth's {spearman(hm, area):+.2f} "
            f"(fp32's own best box is {det['fp32']['area vs gt']:.2f}x its ground-truth box's area, median): a model "
            "scores higher hmean here by drawing smaller boxes than fp32, not by reproducing fp32 better.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args(argv)
    if not ppocr.data_available():
        print(ppocr.skip_message(), file=sys.stderr)
        return 0
    tasks = ppocr.make_tasks(ppocr.fetch_models())
    rec = ppocr.rec_space_report(tasks["rec"].model, runs(tasks["rec"]), args.eval_limit)
    det = ppocr.det_agreement(runs(tasks["det"]), args.eval_limit)
    text = render(rec, det, args.eval_limit)
    print(text)
    if not args.no_write:
        results_md.write_section(RESULTS, "task_metric", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
