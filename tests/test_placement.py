"""Speed-aware placement: `float_depthwise: auto` keeps depthwise Convs float only where they dominate the compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import hybridq
from hybridq.errors import ConfigError
from hybridq.graph import prepare
from hybridq.plan import DEPTHWISE_SHARE, depthwise_share, make_plan
from hybridq.settings import Settings
from tests import models
from tests.conftest import cosine, run


def _numpy_share(c: int, hw: int = 16) -> float:
    """Depthwise MACs / all Conv MACs of models.mobile_block, counted by hand (stride 1, same padding)."""
    e = 4 * c
    stem, expand, dw, project = 3 * 9 * c, c * e, e * 9, e * c
    return dw / (stem + expand + dw + project)


@pytest.mark.parametrize("c", [2, 4, 16, 64])
def test_depthwise_share_matches_a_hand_count(c):
    temp, _ = prepare(models.mobile_block(c))
    assert depthwise_share(temp) == pytest.approx(_numpy_share(c), rel=1e-9)


@pytest.mark.parametrize(("c", "expected"), [(8, "float32"), (64, "default")])
def test_auto_keeps_depthwise_float_only_when_it_dominates(c, expected):
    assert (_numpy_share(c) >= DEPTHWISE_SHARE) == (expected == "float32")
    temp, _ = prepare(models.mobile_block(c))
    plan = make_plan(temp, Settings())
    assert plan.layers["dw"].precision == expected
    if expected == "float32":
        assert "float_depthwise: auto" in plan.layers["dw"].reason
        assert "wd" not in plan.weights
    assert plan.layers["expand"].precision == plan.layers["project"].precision == "default"


@pytest.mark.parametrize(("setting", "expected"), [(True, "float32"), (False, "default")])
def test_explicit_setting_overrides_auto(setting, expected):
    temp, _ = prepare(models.mobile_block(8))
    assert make_plan(temp, Settings(float_depthwise=setting)).layers["dw"].precision == expected


def test_auto_depthwise_float_end_to_end(tmp_path):
    """step1 + step2 on a depthwise-heavy block: the depthwise weight stays float, the rest runs int8, outputs follow fp32."""
    path = tmp_path / "mobile.onnx"
    onnx.save(models.mobile_block(8), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws")
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    q = onnx.load(str(r2.output))
    dw = next(n for n in q.graph.node if n.op_type == "Conv" and n.name == "dw")
    assert dw.input[1] == "wd", "the depthwise weight is read directly as float"
    assert {"expand", "project"} <= {n.name for n in q.graph.node if any(i.endswith("_dequantized") for i in n.input[1:2])}
    rng = np.random.default_rng(5)
    for _ in range(4):
        feeds = {"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.99


def test_float_depthwise_rejects_other_values():
    with pytest.raises(ConfigError, match="float_depthwise must be true, false or auto"):
        Settings.from_dict({"float_depthwise": "sometimes"}, "hybridq.yaml")
