"""The proposal finds the cheapest fix: models built in fixtures, each with a known problem, checked in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hybridq import api
from hybridq.config import load_cfg
from tests import models
from tests import proposal_models as pm
from tests.conftest import cosine, run


def _step1(tmp_path: Path, model: onnx.ModelProto, shape: tuple[int, ...], n: int = 32):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": shape}, n)
    res = api.step1(path, listing, out=tmp_path / "ws", proposal=api.ProposalOptions())
    out = tmp_path / "q.onnx"
    api.step2(res.model, res.data, res.cfg, out)
    return path, res, out


def _fresh(shape: tuple[int, ...], n: int = 8, seed: int = 11) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _slice_snr(ref: list[np.ndarray], test: list[np.ndarray]) -> np.ndarray:
    """SNR in dB of every slice along axis 1, pooled over samples, by the textbook formula."""
    r = np.concatenate([np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in ref], axis=1).astype(np.float64)
    q = np.concatenate([np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in test], axis=1).astype(np.float64)
    return 10 * np.log10((r**2).sum(1) / ((r - q) ** 2).sum(1))


def test_uninformative_outlier_channel_is_clipped_with_no_float_layer(tmp_path):
    path, res, q = _step1(tmp_path, pm.uninformative_outlier_cnn(), (1, 8, 16, 16))
    p = res.proposal
    assert p.met and p.layers == {} and p.float_fraction == 0.0
    cfg = load_cfg(res.cfg)
    assert cfg.custom == {}
    r1 = cfg.entries["r1"].values
    assert r1["max"][0] < 0.2 * r1["ori_max"][0]  # clipped far below the outlier channel's range
    text = res.cfg.read_text()
    assert "proposal: clipped to" in text
    cos = [cosine(run(path, f)[0], run(q, f)[0]) for f in _fresh((1, 8, 16, 16))]
    assert min(cos) >= 0.99


def test_informative_outlier_channel_feeding_a_gemm_is_equalized_with_no_float_layer(tmp_path):
    path, res, q = _step1(tmp_path, pm.informative_outlier_gemm(), (16, 32))
    p = res.proposal
    assert p.met and p.layers == {}
    entry = load_cfg(res.cfg).entries["r1"].values
    assert len(entry["equalize"]) == 32 and max(entry["equalize"]) > 50  # channel 0's scale moved into fc2
    assert not any(r.fix.startswith("clip 'r1'") for r in p.table)  # fc2 reads channel 0: a clip is not even tried
    cos = [cosine(run(path, f)[0], run(q, f)[0]) for f in _fresh((16, 32))]
    assert min(cos) >= 0.99
    # the default int8 model is far off: the fix, not the model, makes the difference
    base = tmp_path / "base"
    onnx.save(pm.informative_outlier_gemm(), tmp_path / "b.onnx")
    r = api.step1(tmp_path / "b.onnx", tmp_path / "data" / "dataset.txt", out=base)
    api.step2(r.model, r.data, r.cfg, base / "q.onnx")
    assert np.mean([cosine(run(path, f)[0], run(base / "q.onnx", f)[0]) for f in _fresh((16, 32))]) < 0.9


def _detections(out: np.ndarray, threshold: float = 0.5) -> list[tuple[int, np.ndarray]]:
    """(class, box x0 y0 x1 y1) of every anchor whose best score passes the threshold; out is [1, 4 + C, A] with cx, cy, w, h."""
    boxes, scores = out[0, :4].T, out[0, 4:].T
    found = []
    for b, s in zip(boxes, scores):
        if s.max() >= threshold:
            cx, cy, w, h = b
            found.append((int(s.argmax()), np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])))
    return found


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _f1(pred: list, gt: list) -> float:
    """Greedy one-to-one matching at IoU >= 0.5 and the same class."""
    used, hits = set(), 0
    for c, b in pred:
        for j, (gc, gb) in enumerate(gt):
            if j not in used and gc == c and _iou(b, gb) >= 0.5:
                used.add(j)
                hits += 1
                break
    return 1.0 if not pred and not gt else 2 * hits / (len(pred) + len(gt))


def test_yolo_style_concat_output_scores_are_flagged_and_fixed(tmp_path):
    shape = (1, 8, 16, 16)
    path, res, q = _step1(tmp_path, pm.yolo_concat(), shape)
    fresh = _fresh(shape, 16)
    ref = [run(path, f)[0] for f in fresh]
    # the default int8 model: the whole output looks perfect, the score slices do not
    base_dir = tmp_path / "base"
    r = api.step1(path, tmp_path / "data" / "dataset.txt", out=base_dir)
    api.step2(r.model, r.data, r.cfg, base_dir / "q.onnx")
    base = [run(base_dir / "q.onnx", f)[0] for f in fresh]
    assert np.mean([cosine(a, b) for a, b in zip(ref, base)]) > 0.999
    assert _slice_snr(ref, base)[4:].min() < 15
    # the proposal's model: every slice >= 20 dB, detections as fp32's
    p = res.proposal
    assert p.met and p.baseline.worst_slice_snr < 15
    fixed = [run(q, f)[0] for f in fresh]
    assert _slice_snr(ref, fixed).min() >= 20
    gt = [d for a in ref for d in _detections(a)]
    assert len(gt) >= 20  # the fixture does detect things
    f1 = np.mean([_f1(_detections(b), _detections(a)) for a, b in zip(ref, fixed)])
    assert f1 >= 0.98


def test_the_candidate_table_is_part_of_the_result(tmp_path):
    _, res, _ = _step1(tmp_path, pm.uninformative_outlier_cnn(), (1, 8, 16, 16))
    rows = res.proposal.table
    assert rows[0].step == "start" and rows[0].outcome == "below target"
    assert any(r.outcome == "kept" and r.fix.startswith("clip 'r1'") for r in rows)
    assert all(np.isfinite(r.cosine) for r in rows)


@pytest.mark.parametrize("edit", ["algorithm: percentile"])
def test_a_tensor_the_user_edited_is_not_changed_by_the_proposal(tmp_path, edit):
    path = tmp_path / "m.onnx"
    onnx.save(pm.uninformative_outlier_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16, 16)}, 32)
    r = api.step1(path, listing, out=tmp_path / "ws")
    text = r.cfg.read_text()
    start = text.index("\n  r1:")
    text = text[:start] + text[start:].replace("algorithm: minmax", edit, 1)
    r.cfg.write_text(text)
    result, _ = api.propose_cfg(r.cfg, listing)
    values = load_cfg(r.cfg).entries["r1"].values
    assert values["algorithm"] == "percentile" and "equalize" not in values
    assert result.baseline_label == "your cfg as edited"


def test_decisions_flipped_on_a_softmax_output_rank_before_cosine(tmp_path):
    """Flips are counted as numpy's argmax says; a candidate that flips clearly more decisions is vetoed."""
    from hybridq.proposal import Evaluator, Score, Target

    path = tmp_path / "mlp.onnx"
    onnx.save(models.matmul_mlp(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (4, 32)}, 8)
    r = api.step1(path, listing, out=tmp_path / "ws")
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    samples = _fresh((4, 32), 8)
    ev = Evaluator(onnx.load(path), samples, Target())
    assert ev.class_axis == {"prob": -1}
    s = ev.score(onnx.load(tmp_path / "q.onnx"))
    flips = sum(int((run(path, f)[0].argmax(-1) != run(tmp_path / "q.onnx", f)[0].argmax(-1)).sum()) for f in samples)
    assert (s.flips, s.decisions) == (flips, 8 * 4)
    # clearly more flips (beyond the counting noise, sqrt of both counts) veto a candidate; one more does not
    assert ev.flips_more(Score(s.outputs, None, 9, 32), Score(s.outputs, None, 1, 32))
    assert not ev.flips_more(Score(s.outputs, None, 2, 32), Score(s.outputs, None, 1, 32))
