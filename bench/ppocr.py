"""PP-OCR benchmark tasks: model fetching, data, preprocessing, metrics and ORT baselines.

Run as a script for the subprocess entry points used by `bench/run.py`:

    python bench/ppocr.py fetch
    python bench/ppocr.py ort-quantize MODEL DATASET_TXT OUT.onnx [--method MinMax] [--pre-process]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
WHEEL_SPEC = "rapidocr-onnxruntime==1.4.4"
WHEEL_MODEL_DIR = "rapidocr_onnxruntime/models/"
MODEL_FILES = {
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
DATA_HINT = (
    "PP-OCR benchmark data not found at {path}.\n"
    "Set HYBRIDQ_PPOCR_DATA to a directory holding rec/{{calib,eval}} and det/{{calib,eval}}\n"
    "(see ../shared/models/README.md in the project workspace for where it comes from)."
)

REC_SHAPE = (48, 480)
CLS_SHAPE = (48, 192)
DET_THRESH = 0.3
DET_BOX_THRESH = 0.5
DET_UNCLIP = 1.6
DET_IOU = 0.5


# --------------------------------------------------------------------------- models


def model_dir() -> Path:
    """Directory where the three PP-OCR ONNX files are cached."""
    return Path(os.environ.get("HYBRIDQ_PPOCR_MODELS", CACHE_DIR / "models"))


def fetch_models(dest: Path | None = None) -> dict[str, Path]:
    """Return {task: onnx path}, downloading the rapidocr wheel with pip if any file is missing."""
    dest = dest or model_dir()
    paths = {task: dest / name for task, name in MODEL_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    wheel = _download_wheel(CACHE_DIR / "wheels")
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for task, name in MODEL_FILES.items():
            paths[task].write_bytes(zf.read(WHEEL_MODEL_DIR + name))
    return paths


def _download_wheel(wheel_dir: Path) -> Path:
    """pip-download the rapidocr wheel (no deps) into wheel_dir and return its path."""
    found = sorted(wheel_dir.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel_dir), WHEEL_SPEC]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        found = sorted(wheel_dir.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {WHEEL_SPEC} produced no wheel in {wheel_dir}")
    return found[0]


# --------------------------------------------------------------------------- data


def data_dir() -> Path:
    """Root of the PP-OCR data (env HYBRIDQ_PPOCR_DATA, default ../shared/models/ppocr)."""
    default = REPO_ROOT.parent / "shared" / "models" / "ppocr"
    return Path(os.environ.get("HYBRIDQ_PPOCR_DATA", default))


def data_available() -> bool:
    """True when both rec and det splits are present."""
    root = data_dir()
    return all((root / t / s).is_dir() for t in ("rec", "det") for s in ("calib", "eval"))


def skip_message() -> str:
    """Explain where the data is expected and how to provide it."""
    return DATA_HINT.format(path=data_dir())


def read_lines(split: str) -> list[tuple[Path, str]]:
    """(image path, text) of the rec/cls text lines of a split, in file order."""
    folder = data_dir() / "rec" / split
    rows = []
    for line in (folder / "labels.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, _font, text = line.split("\t", 2)
            rows.append((folder / name, text))
    return rows


def read_pages(split: str) -> list[tuple[Path, np.ndarray]]:
    """(page path, gt boxes [n,4] as x0,y0,x1,y1) of the det pages of a split."""
    folder = data_dir() / "det" / split
    meta = json.loads((folder / "boxes.json").read_text(encoding="utf-8"))
    return [(folder / name, np.array(meta[name]["boxes"], dtype=np.float64).reshape(-1, 4)) for name in sorted(meta)]


# --------------------------------------------------------------------------- preprocessing


def normalise(pixels: np.ndarray) -> np.ndarray:
    """x = (pixel / 255 - 0.5) / 0.5 as float32."""
    return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)


def load_gray(path: Path) -> np.ndarray:
    """Grayscale uint8 [H,W] image."""
    return np.asarray(Image.open(path).convert("L"))


def rec_input(gray: np.ndarray) -> np.ndarray:
    """Gray line -> [1,3,48,480]: 3 channels at the left of a zero canvas (normalised space)."""
    h, w = REC_SHAPE
    line = normalise(gray[:h, :w])
    canvas = np.zeros((1, 3, h, w), dtype=np.float32)
    canvas[0, :, : line.shape[0], : line.shape[1]] = line
    return canvas


def cls_input(gray: np.ndarray) -> np.ndarray:
    """Gray line -> [1,3,48,192] as PaddleOCR's ClsPredictor: resize to h=48, w<=192, zero-pad right."""
    h, w = CLS_SHAPE
    ratio = gray.shape[1] / gray.shape[0]
    new_w = min(w, int(np.ceil(h * ratio)))
    resized = np.asarray(Image.fromarray(gray).resize((new_w, h), Image.BILINEAR))
    canvas = np.zeros((1, 3, h, w), dtype=np.float32)
    canvas[0, :, :, :new_w] = normalise(resized)
    return canvas


def det_input(path: Path) -> np.ndarray:
    """Page -> [1,3,H,W] in BGR channel order, normalised."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    bgr = rgb[:, :, ::-1]
    return np.ascontiguousarray(normalise(bgr).transpose(2, 0, 1)[None])


# --------------------------------------------------------------------------- rec metric


def rec_charset(model_path: Path) -> list[str]:
    """CTC characters: 'blank' + the model's metadata `character` lines + ' '."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy(logits: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC decode of [T, C] scores: argmax, drop repeats and blank (index 0)."""
    ids = logits.argmax(axis=-1)
    keep = np.ones_like(ids, dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    keep &= ids != 0
    return "".join(charset[i] for i in ids[keep])


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(preds: list[str], gts: list[str], ignore_space: bool = False) -> float:
    """1 - total Levenshtein distance / total ground-truth characters (the README's metric).

    ``ignore_space`` drops every space from both first, as PaddleOCR's own RecMetric does by default
    (``ignore_space=True``): a diagnostic, since the model emits edge spaces that the README's metric counts."""
    if ignore_space:
        preds, gts = [p.replace(" ", "") for p in preds], [g.replace(" ", "") for g in gts]
    dist = sum(levenshtein(p, g) for p, g in zip(preds, gts))
    return 1.0 - dist / sum(len(g) for g in gts)


def rec_space_report(model: Path, runs: dict[str, RunFn], limit: int | None = None) -> dict[str, dict[str, float]]:
    """Per run: the README's char acc, the same with leading/trailing spaces stripped and with every space ignored,
    the eval lines decoded with a leading or trailing space (the ground truth has none); and against the first run's
    decodes (fp32's, by the caller's order): char acc, and the lines decoded otherwise. One decode per line."""
    charset, lines = rec_charset(model), read_lines("eval")[:limit]
    gts = [t for _, t in lines]
    out, first = {}, None
    for name, run in runs.items():
        preds = [ctc_greedy(run(rec_input(load_gray(p)))[0], charset) for p, _ in lines]
        first = preds if first is None else first
        out[name] = {"char acc": char_accuracy(preds, gts), "edge spaces stripped": char_accuracy([p.strip(" ") for p in preds], gts),
                     "spaces ignored": char_accuracy(preds, gts, ignore_space=True),
                     "edge-space lines": sum(p != p.strip(" ") for p in preds), "lines": len(preds),
                     "vs first": char_accuracy(preds, first), "lines unlike first": sum(p != f for p, f in zip(preds, first)),
                     "unlike by an edge space": sum(p != f and p.strip(" ") == f.strip(" ") for p, f in zip(preds, first))}
    return out


# --------------------------------------------------------------------------- det metric


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels: (row, start, end exclusive), row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    rows, starts = np.nonzero(diff == 1)
    _, ends = np.nonzero(diff == -1)
    return rows, starts, ends


def _find(parent: list[int], i: int) -> int:
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Component id per run, 8-connectivity, by union-find over runs of adjacent rows."""
    n = len(rows)
    parent = list(range(n))
    row_first = np.searchsorted(rows, np.arange(rows.max() + 2 if n else 1))
    for r in range(int(rows.max()) if n else 0):
        a0, a1, b1 = row_first[r], row_first[r + 1], row_first[r + 2]
        j = a1
        for i in range(a0, a1):
            while j < b1 and ends[j] < starts[i]:  # run j ends left of run i (8-conn: touch diagonally)
                j += 1
            k = j
            while k < b1 and starts[k] <= ends[i]:
                ri, rk = _find(parent, i), _find(parent, k)
                if ri != rk:
                    parent[max(ri, rk)] = min(ri, rk)
                k += 1
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def dilate_2x2(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 2x2 kernel, as cv2.dilate with the default anchor (grows right/down)."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= out[:, :-1].copy()
    return out


def det_boxes(prob: np.ndarray) -> np.ndarray:
    """Boxes [n,4] (x0,y0,x1,y1) from a [H,W] probability map, DB-style (threshold, CC, unclip).

    As PaddleOCR's DBPostProcess with use_dilation=True: the thresholded map is dilated by a
    2x2 kernel before labelling (the README omits this step; without it fp32 scores 0.980
    instead of the README's 0.917, with it fp32 0.917 and ORT default int8 0.954 as listed).
    """
    h, w = prob.shape
    rows, starts, ends = _row_runs(dilate_2x2(prob > DET_THRESH))
    if len(rows) == 0:
        return np.zeros((0, 4))
    labels = label_runs(rows, starts, ends)
    csum = np.zeros((h, w + 1))
    csum[:, 1:] = np.cumsum(prob, axis=1)
    run_sum = csum[rows, ends] - csum[rows, starts]
    boxes = []
    for lab in np.unique(labels):
        sel = labels == lab
        area = float((ends[sel] - starts[sel]).sum())
        if run_sum[sel].sum() / area < DET_BOX_THRESH:
            continue
        x0, x1 = float(starts[sel].min()), float(ends[sel].max())
        y0, y1 = float(rows[sel].min()), float(rows[sel].max() + 1)
        bw, bh = x1 - x0, y1 - y0
        d = bw * bh * DET_UNCLIP / (2 * (bw + bh))
        boxes.append([max(0.0, x0 - d), max(0.0, y0 - d), min(w, x1 + d), min(h, y1 + d)])
    return np.array(boxes).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [n,4] and b [m,4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_count(pred: np.ndarray, gt: np.ndarray) -> int:
    """One-to-one matches at IoU >= 0.5, greedily by decreasing IoU."""
    if len(pred) == 0 or len(gt) == 0:
        return 0
    iou = iou_matrix(pred, gt)
    used_p, used_g, hits = set(), set(), 0
    for flat in np.argsort(-iou, axis=None):
        p, g = divmod(int(flat), iou.shape[1])
        if iou[p, g] < DET_IOU:
            break
        if p not in used_p and g not in used_g:
            used_p.add(p)
            used_g.add(g)
            hits += 1
    return hits


def hmean(n_match: int, n_pred: int, n_gt: int) -> float:
    """F1 of precision n_match/n_pred and recall n_match/n_gt."""
    if n_match == 0:
        return 0.0
    p, r = n_match / n_pred, n_match / n_gt
    return 2 * p * r / (p + r)


def det_agreement(runs: dict[str, RunFn], limit: int | None = None) -> dict[str, dict[str, float]]:
    """Per run (the first is the reference, fp32): hmean against the ground truth; hmean against the reference's
    boxes (IoU >= 0.5) and the mean IoU of each reference box with its best-overlapping box of the run; and, for
    each ground-truth box, its best box's area over its own (median) and how many best IoUs lie within 0.05 of 0.5."""
    keys = ("match", "pred", "gt", "ref match", "ref", "iou sum", "near")
    out: dict[str, dict] = {k: dict.fromkeys(keys, 0) | {"areas": []} for k in runs}
    for path, gt in read_pages("eval")[:limit]:
        x, ref = det_input(path), None
        gt = np.asarray(gt, dtype=float).reshape(-1, 4)
        for name, run in runs.items():
            pred = det_boxes(run(x)[0, 0])
            ref = pred if ref is None else ref
            o = out[name]
            o["match"] += match_count(pred, gt)
            o["pred"], o["gt"], o["ref"] = o["pred"] + len(pred), o["gt"] + len(gt), o["ref"] + len(ref)
            o["ref match"] += match_count(pred, ref)
            if len(pred) and len(ref):
                o["iou sum"] += float(iou_matrix(ref, pred).max(axis=1).sum())
            if len(pred) and len(gt):
                m = iou_matrix(gt, pred)
                best = pred[m.argmax(axis=1)]
                o["near"] += int((np.abs(m.max(axis=1) - 0.5) < 0.05).sum())
                o["areas"] += list(((best[:, 2] - best[:, 0]) * (best[:, 3] - best[:, 1])) / ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])))
    return {k: {"hmean": hmean(o["match"], o["pred"], o["gt"]), "matched": o["match"], "gt": o["gt"],
                "hmean vs reference": hmean(o["ref match"], o["pred"], o["ref"]), "mean IoU with reference": o["iou sum"] / max(o["ref"], 1),
                "area vs gt": float(np.median(o["areas"])) if o["areas"] else float("nan"), "near threshold": o["near"]}
            for k, o in out.items()}

# --------------------------------------------------------------------------- tasks

RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Task:
    """One PP-OCR model with its calibration inputs and evaluation."""

    name: str
    model: Path
    metric_name: str
    calib_inputs: Callable[[], Iterator[np.ndarray]]
    evaluate: Callable[[RunFn, int | None], float]
    eval_input: Callable[[], np.ndarray]


def _lines_for_cls(split: str) -> Iterator[tuple[np.ndarray, int]]:
    """cls samples: every other line (odd index) rotated 180 degrees, label 1."""
    for i, (path, _text) in enumerate(read_lines(split)):
        gray = load_gray(path)
        label = i % 2
        yield (np.ascontiguousarray(gray[::-1, ::-1]) if label else gray), label


def _eval_rec(model: Path) -> Callable[[RunFn, int | None], float]:
    """Character accuracy evaluator for the recognizer."""
    charset = rec_charset(model)

    def evaluate(run: RunFn, limit: int | None = None) -> float:
        preds, gts = [], []
        for path, text in read_lines("eval")[:limit]:
            preds.append(ctc_greedy(run(rec_input(load_gray(path)))[0], charset))
            gts.append(text)
        return char_accuracy(preds, gts)

    return evaluate


def _eval_cls(run: RunFn, limit: int | None = None) -> float:
    """Orientation accuracy of the classifier."""
    hits = total = 0
    for gray, label in list(_lines_for_cls("eval"))[:limit]:
        hits += int(run(cls_input(gray))[0].argmax() == label)
        total += 1
    return hits / total


def _eval_det(run: RunFn, limit: int | None = None) -> float:
    """Box F1 (hmean) of the detector over the eval pages."""
    n_match = n_pred = n_gt = 0
    for path, gt in read_pages("eval")[:limit]:
        pred = det_boxes(run(det_input(path))[0, 0])
        n_match += match_count(pred, gt)
        n_pred += len(pred)
        n_gt += len(gt)
    return hmean(n_match, n_pred, n_gt)


def make_tasks(models: dict[str, Path]) -> dict[str, Task]:
    """The three tasks, keyed rec/cls/det."""
    return {
        "rec": Task(
            "rec",
            models["rec"],
            "char acc",
            lambda: (rec_input(load_gray(p)) for p, _ in read_lines("calib")),
            _eval_rec(models["rec"]),
            lambda: rec_input(load_gray(read_lines("eval")[0][0])),
        ),
        "cls": Task(
            "cls",
            models["cls"],
            "accuracy",
            lambda: (cls_input(g) for g, _ in _lines_for_cls("calib")),
            _eval_cls,
            lambda: cls_input(next(_lines_for_cls("eval"))[0]),
        ),
        "det": Task(
            "det",
            models["det"],
            "hmean",
            lambda: (det_input(p) for p, _ in read_pages("calib")),
            _eval_det,
            lambda: det_input(read_pages("eval")[0][0]),
        ),
    }


def write_calib_dataset(task: Task, out_dir: Path, limit: int | None = None) -> Path:
    """Write calib samples as .npy [1,3,H,W] float32 plus dataset.txt (relative paths); return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, x in enumerate(task.calib_inputs()):
        if limit is not None and i >= limit:
            break
        name = f"{i:04d}.npy"
        np.save(out_dir / name, x.astype(np.float32))
        names.append(name)
    dataset = out_dir / "dataset.txt"
    dataset.write_text("\n".join(names) + "\n", encoding="utf-8")
    return dataset


def repeat_dataset(dataset: Path, n: int, out: Path) -> Path:
    """Write a dataset list of n entries, cycling through dataset's samples (paths kept relative)."""
    entries = read_dataset(dataset)
    rel = [os.path.relpath(p, out.parent) for p in entries]
    out.write_text("\n".join(rel[i % len(rel)] for i in range(n)) + "\n", encoding="utf-8")
    return out


def read_dataset(dataset: Path) -> list[Path]:
    """Absolute .npy paths listed in a dataset.txt (one input per line)."""
    lines = [ln.split("#", 1)[0].strip() for ln in dataset.read_text(encoding="utf-8").splitlines()]
    return [(dataset.parent / ln).resolve() for ln in lines if ln]


# --------------------------------------------------------------------------- onnxruntime


def ort_session(model: Path, threads: int = 2, exact_int8: bool = False):
    """CPU session at ORT_ENABLE_ALL with the given intra-op thread count.

    ``exact_int8``: ``session.x64quantprecision=1``, exact int8 products on x86 CPUs without VNNI
    (see hybridq/kernels.py); otherwise the CPU's default kernels, as a deployment runs them.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if exact_int8:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def session_runner(model: Path, threads: int = 2, exact_int8: bool = False) -> RunFn:
    """A function x -> first output of the model."""
    sess = ort_session(model, threads, exact_int8)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


class NpyReader:
    """ORT CalibrationDataReader over a list of .npy files, loaded lazily."""

    def __init__(self, input_name: str, paths: list[Path]):
        self.input_name = input_name
        self.paths = iter(paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next sample as {input: array}, or None at the end."""
        path = next(self.paths, None)
        return None if path is None else {self.input_name: np.load(path)}


def upgrade_and_preprocess(model: Path, out: Path) -> Path:
    """Opset >= 13 (version_converter) then ORT's quant_pre_process; return out."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    m = onnx.load(str(model))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    upgraded = out.with_suffix(".opset13.onnx")
    if opset < 13:
        m = version_converter.convert_version(m, 13)
    onnx.save(m, str(upgraded))
    try:
        quant_pre_process(str(upgraded), str(out))
    except Exception as exc:  # symbolic shape inference rejects some graphs (cls: Concat axis != 0)
        print(f"quant_pre_process failed ({type(exc).__name__}: {exc}); retrying with skip_symbolic_shape=True")
        quant_pre_process(str(upgraded), str(out), skip_symbolic_shape=True)
    return out


def ort_quantize(model: Path, dataset: Path, out: Path, method: str = "MinMax", pre_process: bool = False) -> Path:
    """quantize_static, QDQ, per_channel=True, default types/options; optionally after pre-processing."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    out.parent.mkdir(parents=True, exist_ok=True)
    src = upgrade_and_preprocess(model, out.with_suffix(".pre.onnx")) if pre_process else model
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    reader = NpyReader(input_name, read_dataset(dataset))
    quantize_static(
        str(src),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry points: fetch | ort-quantize."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download/cache the three PP-OCR models")
    q = sub.add_parser("ort-quantize", help="ORT quantize_static (QDQ, per-channel)")
    q.add_argument("model", type=Path)
    q.add_argument("dataset", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--method", default="MinMax", choices=["MinMax", "Percentile", "Entropy", "Distribution"])
    q.add_argument("--pre-process", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        for task, path in fetch_models().items():
            print(task, path)
    else:
        ort_quantize(args.model, args.dataset, args.out, args.method, args.pre_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
