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
from tests.conftest import cosine, run, run_cli


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
    # both weights the equalization rescales (fc1's divided, fc2's multiplied) are listed with the scales the model uses
    model_inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(q).graph.initializer}
    for w in ("w1", "w2"):
        np.testing.assert_allclose(load_cfg(res.cfg).entries[w].values["scale"], model_inits[f"{w}_scale"], rtol=1e-6)
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



def test_small_channels_a_depthwise_conv_reads_are_equalized_with_no_float_layer(tmp_path):
    """Half the channels of a depthwise Conv's input are 200x smaller (no outlier: the largest is ~2x the median), so
    per-tensor uint8 rounds them away; the proposal equalizes the tensor into the depthwise filters: no float layer."""
    path, res, q = _step1(tmp_path, pm.depthwise_spread_cnn(), (1, 3, 16, 16))
    p = res.proposal
    assert p.met and p.layers == {} and p.float_fraction == 0.0
    scales = np.array(load_cfg(res.cfg).entries["a0"].values["equalize"])
    assert scales.size == 16 and scales[0::2].min() > 100 * scales[1::2].max()  # the small channels widened to the typical range
    assert any(r.fix.startswith("equalize 1 tensor(s) into the depthwise Convs") and r.outcome == "kept" for r in p.table)
    fresh = _fresh((1, 3, 16, 16))
    assert min(cosine(run(path, f)[0], run(q, f)[0]) for f in fresh) >= 0.99
    base = tmp_path / "base"
    r = api.step1(path, tmp_path / "data" / "dataset.txt", out=base)
    api.step2(r.model, r.data, r.cfg, base / "q.onnx")
    assert np.mean([cosine(run(path, f)[0], run(base / "q.onnx", f)[0]) for f in fresh]) < 0.9  # the default int8 is far off


@pytest.mark.parametrize("native", [True, False], ids=["LayerNormalization", "written-out"])
def test_a_layernorm_outlier_channel_is_equalized_into_the_matmuls_with_no_float_layer(tmp_path, native):
    """A transformer's LayerNorm with one channel 40x the rest feeding q and k: the proposal moves the channel's scale
    into their weights (it could only rescale Conv/Gemm/MatMul producers before, and reached cos 0.95 at best)."""
    path, res, q = _step1(tmp_path, pm.layernorm_outlier(native), (16, 32))
    p = res.proposal
    assert p.met and p.layers == {}, p.table
    assert len(load_cfg(res.cfg).entries["ln"].values["equalize"]) == 32
    cos = [cosine(run(path, f)[0], run(q, f)[0]) for f in _fresh((16, 32))]
    assert min(cos) >= 0.99
    onnx.save(pm.layernorm_outlier(native), tmp_path / "b.onnx")
    r = api.step1(tmp_path / "b.onnx", tmp_path / "data" / "dataset.txt", out=tmp_path / "base")
    api.step2(r.model, r.data, r.cfg, tmp_path / "base" / "q.onnx")
    assert np.mean([cosine(run(path, f)[0], run(tmp_path / "base" / "q.onnx", f)[0]) for f in _fresh((16, 32))]) < 0.99

def test_analyze_measures_an_equalized_model_against_fp32_s_own_channels(tmp_path):
    """After an equalization the quantized model's LayerNorm output is fp32's divided by the scales and q's weights are
    multiplied by them: analyze must undo that before comparing (it reported the LayerNorm at cos 0.33 and q alone at
    0.90, false alarms that would float q). Every figure is recomputed in numpy from the cfg's parameters."""
    from hybridq.analysis import analyze

    path, res, q = _step1(tmp_path, pm.layernorm_outlier(True), (16, 32))
    cfg = load_cfg(res.cfg)
    e, w = cfg.entries["ln"].values, cfg.entries["wq"].values
    s = np.asarray(e["equalize"])
    model = onnx.load(path)
    init = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w_eq = init["wq"] * s[:, None]  # the weights step2 quantizes: input channel c times s[c]
    w_scale = np.abs(w_eq).max(axis=0) / 127  # per output channel, symmetric int8
    np.testing.assert_allclose(w["scale"], w_scale, rtol=1e-6)  # the cfg lists the equalized weights' scales, as step2 uses
    wq = np.clip(np.round(w_eq / w_scale), -127, 127) * w_scale
    fresh = _fresh((16, 32), 6)
    ln_cos, q_cos = [], []
    for f in fresh:
        x = f["x"].astype(np.float64)
        ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * init["gamma"] + init["beta"]
        code = np.clip(np.round(ln / s / e["scale"][0]) + e["zero_point"][0], 0, 255)
        deq = (code - e["zero_point"][0]) * e["scale"][0]
        ln_cos.append(cosine(ln, deq * s))
        q_cos.append(cosine(ln @ init["wq"], deq @ wq))
    rows = {r.tensor: r for r in analyze(path, q, fresh).layers}
    assert rows["ln"].entire.cosine == pytest.approx(np.mean(ln_cos), abs=1e-4) and np.mean(ln_cos) > 0.999
    assert rows["ln"].single.cosine == pytest.approx(np.mean(ln_cos), abs=1e-4)
    assert rows["q"].single.cosine == pytest.approx(np.mean(q_cos), abs=1e-4) and np.mean(q_cos) > 0.999


def test_a_layernorm_read_through_onnx_runtime_s_gemm_reshapes_is_equalized_once_for_all_its_views(tmp_path, capsys):
    """A static-shape transformer: ONNX Runtime rewrites MatMul + Add on 3-D input as Reshape -> Gemm -> Reshape, so the
    LayerNorm's output is quantized as one 2-D view per Gemm. Equalization reaches the LayerNorm through the views: each
    view's entry carries the same scales and the same range, and step2 rescales gamma, beta and the weights once."""
    path, res, q = _step1(tmp_path, pm.layernorm_outlier_3d(), (1, 16, 32))
    p = res.proposal
    assert p.met and p.layers == {}, p.table
    cfg = load_cfg(res.cfg)
    views = [t for t, e in cfg.entries.items() if "equalize" in e.values]
    assert len(views) == 2 and "ln" not in cfg.entries, views
    a, b = (cfg.entries[v].values for v in views)
    assert a["equalize"] == b["equalize"] and (a["min"], a["max"]) == (b["min"], b["max"]) and len(a["equalize"]) == 32
    fresh = _fresh((1, 16, 32))
    assert min(cosine(run(path, f)[0], run(q, f)[0]) for f in fresh) >= 0.99
    # applied once: gamma divided by the scales (numpy), the fp32 function unchanged with the weights multiplied
    from hybridq.build import apply_fixes, edits_from
    temp = onnx.load(res.model)
    fixed = apply_fixes(temp, edits_from({}, cfg.entries, temp, "cfg"))
    gamma = {i.name: onnx.numpy_helper.to_array(i) for i in fixed.graph.initializer}["gamma"]
    orig = {i.name: onnx.numpy_helper.to_array(i) for i in temp.graph.initializer}["gamma"]
    np.testing.assert_allclose(gamma, orig / np.asarray(a["equalize"]), rtol=1e-6)
    np.testing.assert_allclose(run(fixed, fresh[0])[0], run(temp, fresh[0])[0], rtol=1e-4, atol=1e-4)
    base = tmp_path / "base"
    onnx.save(pm.layernorm_outlier_3d(), tmp_path / "b.onnx")
    r = api.step1(tmp_path / "b.onnx", tmp_path / "data" / "dataset.txt", out=base)
    api.step2(r.model, r.data, r.cfg, base / "q.onnx")
    assert np.mean([cosine(run(path, f)[0], run(base / "q.onnx", f)[0]) for f in fresh]) < 0.99
    # views edited to different scales would rescale the LayerNorm twice: refused, naming both
    text = res.cfg.read_text()
    first = text.index("equalize:", text.index(f"  {views[1]}:"))
    res.cfg.write_text(text[:first] + text[first:].replace("equalize: [", "equalize: [2.0, ", 1).replace(f"{a['equalize'][-1]}]", "]", 1))
    code, out, err = run_cli(capsys, "step2", res.model, res.data, res.cfg, "-o", tmp_path / "q2.onnx")
    assert code == 2 and "differ" in err and views[0] in err and views[1] in err and "Traceback" not in err, err


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


def _wrapped_softmax_model() -> onnx.ModelProto:
    """x [2,3,8] -> MatMul -> Flatten -> Softmax -> Reshape back (as exporters write an N-d Softmax), and the same
    probabilities reshaped to [2,8,3] (the normalised axis is no longer the last)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).normal(0, 1, (8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Flatten", ["logits"], ["flat"], axis=2),
        helper.make_node("Softmax", ["flat"], ["p2d"], axis=1),
        helper.make_node("Reshape", ["p2d", "shape"], ["prob"]),
        helper.make_node("Reshape", ["p2d", "moved"], ["scrambled"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2, 3, 8], np.int64), "shape"),
             numpy_helper.from_array(np.array([2, 8, 3], np.int64), "moved")]
    graph = helper.make_graph(nodes, "wrapped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [2, 3, 8]),
                               helper.make_tensor_value_info("scrambled", TensorProto.FLOAT, [2, 8, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_decisions_are_counted_through_the_reshapes_around_an_exported_softmax():
    """Flatten -> Softmax -> Reshape is still a decision output (argmax on the last axis); a reshape that moves the
    normalised axis is not (its last axis does not sum to one)."""
    from hybridq.proposal import Evaluator, Target

    model = _wrapped_softmax_model()
    samples = [{"x": x["x"].reshape(2, 3, 8)} for x in _fresh((6, 8), 4)]
    ev = Evaluator(model, samples, Target())
    assert ev.class_axis == {"prob": -1}
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = onnx.numpy_helper.to_array(other.graph.initializer[0])
    other.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w + np.float32(0.7) * np.sign(w[::-1]), "w"))
    flips = sum(int((run(model, f)[0].argmax(-1) != run(other, f)[0].argmax(-1)).sum()) for f in samples)
    assert flips > 0  # the candidate changes decisions, and the evaluator counts exactly those
    s = ev.score(other)
    assert (s.flips, s.decisions) == (flips, 4 * 2 * 3)


def _npu_patterns(tmp_path: Path):
    """exported_patterns through step1 --target npu: (step1 result, parsed cfg, step1 bundle, the fix Context)."""
    from hybridq.artifacts import read_step1
    from hybridq.build import Edits, build
    from hybridq.proposal.fixes import Context
    from tests import npu_models

    path = tmp_path / "patterns.onnx"
    onnx.save(npu_models.exported_patterns(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16)}, 8, scale=3.0)
    r1 = api.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    parsed = load_cfg(r1.cfg)
    bundle = read_step1(r1.model, r1.data, None, r1.cfg)
    plan = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).plan
    return r1, parsed, bundle, Context(bundle.model, bundle.observers, parsed.settings, plan, bundle.meta["written_entries"], set())


def test_range_candidates_on_an_npu_keep_the_hard_swish_floor(tmp_path):
    """A HardSwish input's range starts at -3 (the reader ignores what is below): a proposed range does too, as step2's
    own algorithms compute it from the floored statistics; the raw histogram's percentile reaches far below."""
    from hybridq.build import Edits
    from hybridq.observers import compute_range
    from hybridq.proposal.fixes import range_fix

    r1, parsed, bundle, ctx = _npu_patterns(tmp_path)
    assert ctx.plan.floors == {"ln": (-3.0, float("inf"))}
    raw_lo, _ = compute_range(bundle.observers["ln"], "percentile", 256, parsed.settings.percentile)
    assert raw_lo < -3.0  # without the floor the candidate would widen the range below what HardSwish reads
    lo, hi = compute_range(ctx.observers["ln"], "percentile", 256, parsed.settings.percentile)
    assert lo == pytest.approx(-3.0, abs=ctx.observers["ln"].width) and bundle.observers["ln"].min < -3.0  # the fixes' statistics are floored, step1's untouched
    for cand in range_fix(ctx, Edits(), "percentile"):
        assert cand.entries.get("ln", {"min": [-3.0]})["min"][0] >= -3.0
    edited = parsed.path.read_text().replace("  algorithm: minmax\n", "  algorithm: percentile\n", 1)
    (tmp_path / "p.cfg").write_text(edited)
    q = onnx.load(str(api.step2(r1.model, r1.data, tmp_path / "p.cfg", tmp_path / "p.onnx").output))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    qn = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "ln")
    # the range the fixes compute is the one step2's own percentile setting builds
    assert float(inits[qn.input[1]]) == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-4)


def test_an_npu_float_candidate_takes_its_readers_so_the_tensor_it_writes_stays_float(tmp_path):
    """On an NPU a float16 layer's readers requantize what it writes: floating the LayerNorm layer alone leaves
    'ln' quantized; its unit (the HardSwish reading 'ln', whole) leaves 'ln' float."""
    from hybridq.build import Edits, build
    from hybridq.proposal.search import _float_units

    _, parsed, bundle, ctx = _npu_patterns(tmp_path)
    ranked = [(n, 0.9) for n in ctx.plan.layers]
    norm = ctx.graph.producer_node("ln").name  # the LayerNormalization the temp model fused the chain into
    unit = _float_units(ctx, ranked)[norm]
    assert unit[0] == norm and {"hs_add", "hs_clip", "hs_mul", "hs_div"} <= set(unit)

    def quantized(layers: list[str]) -> set[str]:
        built = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits({n: "float16" for n in layers}))
        return {n.input[0] for n in built.model.graph.node if n.op_type == "QuantizeLinear"}

    assert "ln" in quantized([]) and "ln" in quantized([norm]) and "ln" not in quantized(unit)


class _ScoreTable:
    """A stand-in for the search state: each float set's score comes from a table, higher is better, and scores
    within 0.005 of each other are alike."""

    def __init__(self, scores: dict[frozenset, float], target: float, start: float) -> None:
        from types import SimpleNamespace

        self.scores, self.table, self.score = scores, [], start
        self.evaluator = SimpleNamespace(met=lambda s: s >= target, as_good=lambda a, b: a >= b - 0.005)
        self.tried: list[frozenset] = []

    def better(self, a: float, b: float) -> bool:
        return a > b

    def _row(self, step, fix, s, cost, outcome):
        from hybridq.proposal.climb import Row

        self.table.append(Row(step, fix, s, s, 0.0, 0.0, cost, outcome))

    def candidate(self, names: list[str]):
        from types import SimpleNamespace

        key = frozenset(names)
        self.tried.append(key)
        return self.scores[key], SimpleNamespace(label=f"{len(names)} layer(s) in float16", cost=len(names) / 100), None, None


def test_below_the_target_the_cheapest_of_the_alike_candidates_is_kept():
    from hybridq.proposal.search import _cheapest_alike

    s = {frozenset("a"): 0.91, frozenset("ab"): 0.970, frozenset("abc"): 0.973}
    climb = _ScoreTable(s, target=0.99, start=0.90)
    found = []
    for names in (["a"], ["a", "b"], ["a", "b", "c"]):
        state = climb.candidate(names)
        climb._row("float", state[1].label, state[0], state[1].cost, "improves")
        found.append((state, climb.table[-1]))
    # 0.970 is within the resolution of the best (0.973) and one layer cheaper; 0.91 is not alike
    state, row = _cheapest_alike(climb, found)
    assert state[0] == 0.970 and row is climb.table[1]


def test_alike_scores_are_those_within_half_a_decibel_of_output_error():
    """1 - cosine read as a noise-to-signal ratio: 0.0100 vs 0.0110 is 0.41 dB apart (alike), vs 0.0115 0.61 dB (not);
    an SNR target compares dB directly; a task score and clearly more flipped decisions are never excused."""
    from hybridq.proposal.evaluator import Evaluator, OutputScore, Score, Target

    def score(cos: float, snr: float = 20.0, task: float | None = None, flips: int = 0) -> Score:
        return Score({"y": OutputScore(cos, snr, cos, snr, None)}, task=task, flips=flips, decisions=100 if flips else 0)

    ev = Evaluator.__new__(Evaluator)
    ev.target = Target(cosine=0.999)
    assert ev.as_good(score(0.9890), score(0.9900)) and not ev.as_good(score(0.9885), score(0.9900))
    assert 10 * np.log10(0.0110 / 0.0100) < 0.5 < 10 * np.log10(0.0115 / 0.0100)
    assert not ev.as_good(score(0.9899, flips=30), score(0.9900, flips=5))
    assert ev.as_good(score(0.5, task=0.91), score(0.99, task=0.91)) and not ev.as_good(score(0.99, task=0.90), score(0.5, task=0.91))
    ev.target = Target(cosine=None, snr_db=30.0)
    assert ev.as_good(score(0.9, snr=29.6), score(0.9, snr=30.0)) and not ev.as_good(score(0.9, snr=29.4), score(0.9, snr=30.0))


def test_an_eval_function_returning_nan_is_an_input_error() -> None:
    """A NaN score compared with `<` is never below the target: it once counted as meeting it."""
    from hybridq.errors import InputError
    from hybridq.proposal.evaluator import task_score

    model = models.residual_cnn()
    assert task_score(lambda path: 0.75, "task.py:ok", model) == 0.75
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match=r"--eval function 'task.py:score' returned (nan|inf) for a model"):
            task_score(lambda path, bad=bad: bad, "task.py:score", model)


def _hard_swish_after_conv() -> onnx.ModelProto:
    """x [1, 4, 12, 12] -> Conv (8 channels, biases down to -40: a long negative tail) -> HardSwish exported as
    x * Clip(x + 3, 0, 6) / 6 -> 1x1 Conv -> y. Everything below -3 reads as 0 to the HardSwish."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.4, (8, 4, 3, 3)).astype(np.float32)
    b1 = np.array([-40, -25, -10, -4, -2, 0, 1, 2], np.float32)
    w2 = rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32)
    consts = {"w1": w1, "b1": b1, "w2": w2, "three": np.array(3, np.float32), "zero": np.array(0, np.float32),
              "six": np.array(6, np.float32)}
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c", "three"], ["c3"], name="hs_add"),
        h.make_node("Clip", ["c3", "zero", "six"], ["gate"], name="hs_clip"),
        h.make_node("Mul", ["c", "gate"], ["cg"], name="hs_mul"),
        h.make_node("Div", ["cg", "six"], ["hs"], name="hs_div"),
        h.make_node("Conv", ["hs", "w2"], ["y"], name="conv2"),
    ]
    g = h.make_graph(nodes, "hs", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 12, 12])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 12, 12])], [nh.from_array(v, k) for k, v in consts.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_ranges_clamped_where_a_hard_swish_saturates_are_a_verified_cpu_candidate(tmp_path):
    """cpu: the Conv output a float HardSwish reads spans [-40+, ...]; the clamp candidate narrows it to [-3, max] (what the
    reader tells apart), and the model step2 builds with it is closer to fp32 in ONNX Runtime; the proposal keeps it."""
    from hybridq.artifacts import read_step1
    from hybridq.build import Edits, build
    from hybridq.proposal.fixes import Context, clamp_fix

    path = tmp_path / "hs.onnx"
    onnx.save(_hard_swish_after_conv(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 12, 12)}, 16)
    settings = {"float_stem": False, "speed_check": False}
    r1 = api.step1(path, listing, out=tmp_path / "ws", settings=settings)
    parsed = load_cfg(r1.cfg)
    bundle = read_step1(r1.model, r1.data, None, r1.cfg)
    plan = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).plan
    ctx = Context(bundle.model, bundle.observers, parsed.settings, plan, bundle.meta["written_entries"], set())
    assert not plan.floors  # cpu: the plain ranges by default
    (cand,) = clamp_fix(ctx, Edits())
    entry = cand.entries["c"]
    assert bundle.observers["c"].min < -30 and entry["min"][0] == pytest.approx(-3.0, abs=bundle.observers["c"].width)
    assert entry["max"][0] == pytest.approx(bundle.meta["written_entries"]["c"]["max"][0])
    assert "its readers (HardSwish) give one output outside [-3, inf]" in cand.comments["c"]
    default = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).model
    clamped = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, cand.onto(Edits(), bundle.model)).model
    fresh = _fresh((1, 4, 12, 12))
    ref = [run(path, s)[0] for s in fresh]
    snr = {k: float(_slice_snr(ref, [run(m, s)[0] for s in fresh]).min()) for k, m in (("default", default), ("clamped", clamped))}
    assert snr["clamped"] > snr["default"] + 3.0, snr
    r2 = api.step1(path, listing, out=tmp_path / "ws2", settings=settings, proposal=api.ProposalOptions())
    p = r2.proposal
    assert [r.outcome for r in p.table if r.fix.startswith("ranges clamped at saturating readers")][:1] == ["kept"], p.table
    assert p.entries["c"]["min"][0] == pytest.approx(entry["min"][0]) and not p.layers  # in the cfg, with no float layer
    assert "its readers" in Path(r2.cfg).read_text()
    # the cfg agrees with itself: the scale/zero_point written beside the new range are what step2 uses, with no warning
    from onnx import numpy_helper

    built = api.step2(r2.model, r2.data, r2.cfg, tmp_path / "q.onnx")
    assert not [w for w in built.warnings if "no effect" in w or "contradicts" in w], built.warnings
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(built.output)).graph.initializer}
    written = load_cfg(r2.cfg).entries["c"].values
    assert float(inits["c_scale"]) == pytest.approx(written["scale"][0], rel=1e-6) and int(inits["c_zero_point"]) == written["zero_point"][0]


@pytest.mark.parametrize("model, shape", [(pm.uninformative_outlier_cnn, (1, 8, 16, 16)), (pm.informative_outlier_gemm, (16, 32))])
def test_proposing_again_on_the_result_changes_nothing(tmp_path, model, shape):
    """README: met part way up the ladder (an outlier fix), the free fixes are still tried, so a second propose on
    the written cfg finds nothing left (it added an mse range and bias corrections: 42.3 -> 47.4 dB)."""
    _, res, _ = _step1(tmp_path, model(), shape)
    first = {t: e.values for t, e in load_cfg(res.cfg).entries.items()}
    again, _ = api.propose(res.cfg, tmp_path / "data" / "dataset.txt")
    assert again.met, again.choice
    assert {t: e.values for t, e in load_cfg(res.cfg).entries.items()} == first
