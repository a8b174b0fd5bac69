"""The float step ranks layers by the damage each does at the outputs quantized alone (every other layer float32)."""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from hybridq import api
from hybridq.config import load_cfg
from tests import models
from tests import proposal_models as pm
from tests.conftest import cosine, run


def _fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 asymmetric quantize-dequantize by the textbook formula (range widened to hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale


def _int8_rows(w: np.ndarray) -> np.ndarray:
    """Per-row (output channel) symmetric int8 quantize-dequantize."""
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _forward(model: onnx.ModelProto, x: np.ndarray, quantize: str | None, ranges: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """The fixture's graph in float64 numpy, with one Gemm (`quantize`) fed its input and weights quantized."""
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    env = {"x": x.astype(np.float64)}
    for n in model.graph.node:
        a = [env[i] if i in env else w[i] for i in n.input]
        if n.op_type == "Gemm":
            inp, weight = a[0], a[1]
            if n.name == quantize:
                inp, weight = _fake_quant(inp, *ranges[n.input[0]]), _int8_rows(weight)
            env[n.output[0]] = inp @ weight.T + a[2]
        elif n.op_type == "Mul":
            env[n.output[0]] = a[0] * a[1]
        elif n.op_type == "Add":
            env[n.output[0]] = a[0] + a[1]
        elif n.op_type == "Concat":
            env[n.output[0]] = np.concatenate(a, axis=1)
    return env


def _snr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / ((ref - test) ** 2).sum()))


def test_the_float_step_finds_the_layer_whose_damage_shows_only_at_the_outputs(tmp_path):
    """fc_a's own output is nearly exact (local cosine > 0.9999) but, alone in int8, costs the outputs 20 dB; eight side
    Gemms have larger local errors and cost nothing. The search before (the 8 locally worst layers, each set float in
    the int8 model) kept fc_amp alone and missed the target; ranked by damage alone, fc_a and fc_amp meet it."""
    model = pm.masked_culprit_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (16, 32)}, 32)
    res = api.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False},
                    proposal=api.ProposalOptions(max_float_layers=2, max_float_fraction=1.0))
    p = res.proposal

    # the fixture's premise, computed independently in numpy with the cfg's step1 ranges
    entries = load_cfg(res.cfg).entries
    ranges = {t: (e.values["min"][0], e.values["max"][0]) for t, e in entries.items() if "min" in e.values}
    xs = [np.load(tmp_path / "data" / f"x_{i}.npy") for i in range(4)]
    ref = [_forward(model, x, None, ranges) for x in xs]
    alone = {n: [_forward(model, x, n, ranges) for x in xs] for n in ("fc_a", "fc_amp", "fc_side0")}
    local = {n: cosine(np.concatenate([r[o] for r in ref]), np.concatenate([a[o] for a in alone[n]]))
             for n, o in (("fc_a", "h"), ("fc_side0", "s0"))}
    damage = {n: _snr(np.concatenate([r["out"] for r in ref]), np.concatenate([a["out"] for a in v])) for n, v in alone.items()}
    assert local["fc_a"] > 0.9999 > local["fc_side0"]  # locally, each side Gemm looks worse than fc_a
    assert damage["fc_a"] < 25.0 and damage["fc_amp"] < 10.0 and damage["fc_side0"] > 60.0

    rows = [r for r in p.table if r.step == "sensitivity"]
    assert [r.fix.split()[0] for r in rows[:2]] == ["fc_amp", "fc_a"]
    assert all("quantized alone, the rest float32" in r.fix for r in rows) and rows[-1].fix.startswith("fc_side")
    assert p.met and p.layers == {"fc_amp": "float32", "fc_a": "float32"}
    assert re.search(r"fc_a: float32 *# proposal: 2 of 10 by damage at the outputs \(output cosine quantized alone: 0\.99", res.cfg.read_text())
    out = tmp_path / "q.onnx"
    api.step2(res.model, res.data, res.cfg, out)
    fresh = np.random.default_rng(5).normal(0, 1, (8, 16, 32)).astype(np.float32)
    assert min(cosine(run(path, {"x": f})[0], run(out, {"x": f})[0]) for f in fresh) >= 0.99


def test_float_sets_grow_worst_first_by_doubling_then_bisect_to_the_fewest_that_meet():
    """Float layers interact (PP-OCR det: its worst layer set float alone measured 1.3 dB worse; with the next three,
    3.4 dB better): sets of 1, 2, 4, ... of the worst layers are scored until one meets, then bisection finds
    the fewest. Below the target, the cheapest set within the resolution of the best is kept."""
    from types import SimpleNamespace

    from hybridq.build import Edits
    from hybridq.proposal.evaluator import Evaluator, OutputScore, Score, Target
    from hybridq.proposal.climb import Climb
    from hybridq.proposal.search import _float_step, _sizes

    assert _sizes(1) == [1] and _sizes(5) == [1, 2, 4, 5] and _sizes(8) == [1, 2, 4, 8]

    def score(err: float) -> Score:
        return Score({"y": OutputScore(1 - err, 20.0, 1 - err, 20.0, None)}, task=None, flips=0, decisions=0)

    def climb_over(errors: dict[str, float]) -> tuple[Climb, list[str]]:
        ev = Evaluator.__new__(Evaluator)
        ev.target, ev._eval = Target(cosine=0.999), None
        tried: list[str] = []

        def scored(model: str, limit=None) -> Score:
            tried.append(model)
            return score(errors[model])

        ev.score = scored
        build = lambda edits: SimpleNamespace(model="".join(sorted(edits.layers)))
        return Climb(SimpleNamespace(temp=onnx.ModelProto()), ev, build, Edits(), build(Edits()), "the default quantization"), tried

    ranked = [(n, 0.9) for n in "abcde"]
    macs = {n: 1.0 for n in "abcde"}
    # 'a' alone is worse than none; 'abcd' meets; 'abc' meets too: bisection between 2 and 4 finds 3
    climb, tried = climb_over({"": 2e-3, "a": 3e-3, "ab": 1.5e-3, "abcd": 5e-4, "abc": 8e-4})
    choice = _float_step(climb, ranked, list("abcde"), 0, "float32", macs, 5.0)
    assert tried == ["", "a", "ab", "abcd", "abc"] and climb.met and choice == "3 layer(s) in float32"
    assert [r.outcome for r in climb.table if r.step == "float"] == ["no gain", "improves", "meets", "kept: fewest float layers that meet the target"]
    assert climb.kept[-1].layers == dict.fromkeys("abc", "float32")
    # never met: every size up to the whole budget; 'ab' is as good as 'abcde' (0.4 dB) and cheaper
    climb, tried = climb_over({"": 2e-3, "a": 3e-3, "ab": 1.5e-3, "abcd": 1.45e-3, "abcde": 1.4e-3})
    choice = _float_step(climb, ranked, list("abcde"), 0, "float32", macs, 5.0)
    assert tried == ["", "a", "ab", "abcd", "abcde"] and "target NOT met" in choice
    assert climb.kept[-1].layers == dict.fromkeys("ab", "float32")
    assert [r.outcome for r in climb.table if r.step == "float"] == [
        "no gain", "kept: best within the budget (cheapest of the alike)", "no better than a cheaper one", "no better than a cheaper one"]
