"""The proposal's outlier clip: the max it writes and the channels it names, checked against per-channel maxima that
ONNX Runtime computes on the fp32 model, on a Gemm model whose hidden features hold ignored and used outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from hybridq import api
from hybridq.artifacts import read_step1
from hybridq.build import Edits, build
from hybridq.config import load_cfg
from hybridq.proposal.fixes import Context, clip_fix
from hybridq.proposal.ranker import channel_stats
from tests import models
from tests.conftest import run

IGNORED = (1, 2, 3)
"""Hidden features fc2 gives a zero weight: the only ones a clip may saturate."""


def ignored_and_used_outliers(gains: dict[int, float], seed: int = 0) -> onnx.ModelProto:
    """x [16, 8] -> fc1 -> Relu -> h [16, 16] -> fc2 -> out [16, 4]; fc1's feature c is gains[c] times larger, and fc2
    reads features 1-3 with weight zero (feature 0 with its ordinary weights), like a Flatten feeding a classifier."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 8))
    for c, gain in gains.items():
        w1[c] *= gain
    w2 = rng.normal(0, 0.3, (4, 16))
    w2[:, list(IGNORED)] = 0.0
    inits = [models._init("w1", w1), models._init("b1", rng.normal(0.1, 0.05, 16)), models._init("w2", w2),
             models._init("b2", rng.normal(0, 0.1, 4))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="fc1", transB=1), helper.make_node("Relu", ["g1"], ["h"], name="relu1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["out"], name="fc2", transB=1)]
    return models._model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [16, 8])], [helper.make_tensor_value_info("out", T.FLOAT, [16, 4])], inits)


def _peaks(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Per-feature max of `h` over the samples, by ONNX Runtime on the fp32 model with `h` made an output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("h", T.FLOAT, None))
    return np.max([run(probe, s)[1].max(axis=0) for s in samples], axis=0)


def _clip(tmp_path: Path, model: onnx.ModelProto, fresh: bool):
    """(the clip candidates for `h`, step1's range of `h`, the samples they were fitted on): on step1's calibration
    samples or on fresh ones (`propose -d` with another dataset)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (16, 8)}, 16)
    r1 = api.step1(path, listing, out=tmp_path / "ws", settings={"float_stem": False, "speed_check": False})
    parsed, bundle = load_cfg(r1.cfg), read_step1(r1.model, r1.data, None, r1.cfg)
    plan = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).plan
    ctx = Context(bundle.model, bundle.observers, parsed.settings, plan, bundle.meta["written_entries"], set())
    assert "h" in plan.tensors
    rng = np.random.default_rng(11)
    samples = [{"x": rng.normal(0, 1, (16, 8)).astype(np.float32) if fresh else np.load(tmp_path / "data" / f"x_{i}.npy")} for i in range(16)]
    old = parsed.entries["h"].values
    return clip_fix(ctx, Edits(), channel_stats(bundle.model, samples, ["h"])["h"]), (old["min"][0], old["max"][0]), samples


@pytest.mark.parametrize("fresh", [False, True], ids=["calibration samples", "other samples"])
def test_no_clip_when_the_ignored_outliers_stay_below_a_used_one(tmp_path, fresh):
    """Feature 0, read by fc2, peaks above the ignored outliers 1-3: keeping it keeps them all, so no clip is offered
    (it was: max set to feature 0's peak, step1's own max on the calibration samples, naming 1-3 as saturating)."""
    model = ignored_and_used_outliers({0: 300.0, 1: 60.0, 2: 80.0, 3: 40.0})
    cands, (old_lo, old_hi), samples = _clip(tmp_path, model, fresh)
    peaks = _peaks(model, samples)
    assert peaks[list(IGNORED)].max() < peaks[0] and peaks[0] > 8 * np.median(peaks)  # the setting, by ONNX Runtime
    if not fresh:
        assert old_hi == pytest.approx(peaks[0], rel=1e-5)  # step1 calibrated on these very samples
    assert cands == []


@pytest.mark.parametrize("fresh", [False, True], ids=["calibration samples", "other samples"])
def test_clip_writes_the_used_channels_max_and_names_exactly_those_above_it(tmp_path, fresh):
    """Features 1 and 2 (ignored) peak above feature 0 (used, itself an outlier), feature 3 (ignored) below it: the clip
    writes the largest peak of the features it keeps, and names 1 and 2, never 3, which does not saturate."""
    model = ignored_and_used_outliers({0: 60.0, 1: 300.0, 2: 250.0, 3: 20.0})
    (cand,), (old_lo, old_hi), samples = _clip(tmp_path, model, fresh)
    peaks = _peaks(model, samples)
    kept = [c for c in range(16) if c not in IGNORED]
    want = min(float(peaks[kept].max()), old_hi)  # a clip never widens step1's range
    saturate = [c for c in IGNORED if peaks[c] > want]
    assert saturate == [1, 2] and peaks[3] > 8 * np.median(peaks)  # 3 is an outlier the clip may saturate, yet it does not
    entry = cand.entries["h"]
    assert entry["min"] == [0.0] and entry["max"][0] == pytest.approx(want, rel=1e-5) and want < 0.5 * old_hi
    assert cand.label == "clip 'h' (outlier channel(s) 1, 2)"
    comment = cand.comments["h"]
    assert "channel(s) 1, 2, which its readers weigh (nearly) zero," in comment
    assert f"reach {peaks[saturate].max():.4g} there and saturate" in comment and "over 16 proposal sample(s)" in comment
    assert f"(was [{old_lo:.4g}, {old_hi:.4g}])" in comment
