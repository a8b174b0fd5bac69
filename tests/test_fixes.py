"""The proposal's fixes as graph transforms, checked against numpy and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hybridq import bias_correction, equalize
from hybridq.calibration import session_for
from tests import models
from tests import proposal_models as pm
from tests.conftest import run


def _samples(shape: tuple[int, ...], n: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return m


def test_equalization_keeps_the_fp32_function_and_divides_the_channels():
    m = pm.informative_outlier_gemm()
    site = equalize.find_site(m, "r1")
    assert not isinstance(site, str)
    assert (site.producer, site.path, site.readers, site.channels) == ("fc1", ("relu1",), ("fc2",), 32)
    scales = np.linspace(0.5, 40.0, 32)
    eq = equalize.apply(m, site, scales)
    for feeds in _samples((16, 32), 3):
        before = run(_with_outputs(m, ["r1"]), feeds)
        after = run(_with_outputs(eq, ["r1"]), feeds)
        np.testing.assert_allclose(after[0], before[0], rtol=1e-4, atol=1e-4)  # the model's output is unchanged
        np.testing.assert_allclose(after[1], before[1] / scales[None, :].astype(np.float32), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("native", [True, False], ids=["LayerNormalization", "written-out"])
def test_equalization_through_a_layernorm_keeps_the_fp32_function(native):
    """SmoothQuant's site in a transformer: a LayerNorm's gamma and beta (native, or the Mul and Add ending a written-out
    one) divided per channel, the MatMuls reading it multiplied; ONNX Runtime computes the same outputs, and the
    LayerNorm's output channels divided by the scales."""
    m = pm.layernorm_outlier(native)
    site = equalize.find_site(m, "ln")
    assert not isinstance(site, str), site
    assert (site.producer, site.path, sorted(site.readers), site.channels) == (
        ("ln", (), ["k", "q"], 32) if native else ("ln_gamma", ("ln_beta",), ["k", "q"], 32))
    scales = np.linspace(0.5, 40.0, 32)
    eq = equalize.apply(m, site, scales)
    for feeds in _samples((16, 32), 3):
        before = run(_with_outputs(m, ["ln"]), feeds)
        after = run(_with_outputs(eq, ["ln"]), feeds)
        np.testing.assert_allclose(after[0], before[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(after[1], before[1] / scales[None, :].astype(np.float32), rtol=1e-5, atol=1e-5)

def test_equalization_through_an_affine_block_into_a_depthwise_conv_keeps_the_fp32_function():
    """PP-LCNet's site: HardSwish -> Mul and Add by scalars -> depthwise Conv. The scalars become one value per channel
    divided by the scales, filter c of the depthwise Conv is multiplied by scale c; ONNX Runtime computes the same
    outputs, and the tensor's channels divided by the scales."""
    m = pm.depthwise_spread_cnn()
    site = equalize.find_site(m, "a0")
    assert not isinstance(site, str), site
    assert (site.producer, site.path, site.readers, site.axis, site.channels, site.rank) == ("scale0", ("shift0",), ("dw",), 1, 16, 4)
    scales = np.linspace(0.005, 3.0, 16)
    eq = equalize.apply(m, site, scales)
    consts = {i.name: numpy_helper.to_array(i) for i in eq.graph.initializer}
    assert consts["gamma"].shape == consts["beta"].shape == (1, 16, 1, 1)
    for feeds in _samples((1, 3, 16, 16), 3):
        before = run(_with_outputs(m, ["a0"]), feeds)
        after = run(_with_outputs(eq, ["a0"]), feeds)
        np.testing.assert_allclose(after[0], before[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(after[1], before[1] / scales.reshape(1, -1, 1, 1).astype(np.float32), rtol=1e-4, atol=1e-6)


def test_equalization_scales_meet_the_weights_halfway():
    # SmoothQuant with alpha 0.5: an outlier activation channel 300x the median whose weights are 1/300 of the median gets s = 300.
    a = np.array([300.0, 1.0, 1.0, 1.0, 1.0])
    w = np.array([1 / 300, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(equalize.smooth_scales(a, w), [300.0, 1, 1, 1, 1])
    # an all-zero channel keeps scale 1
    assert equalize.smooth_scales(np.array([0.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]))[0] == 1.0


@pytest.mark.parametrize("tensor, reason", [
    ("out", "model output"),
    ("c1", "other readers"),
])
def test_equalization_refuses_sites_it_cannot_rescale(tensor, reason):
    m = pm.uninformative_outlier_cnn()
    site = equalize.find_site(m, tensor)
    assert isinstance(site, str)


def test_bias_correction_is_the_cumulative_numpy_shift(tmp_path: Path):
    """Each Gemm's shift in the model as it runs, earlier layers corrected: c_k = mean(h_k - h_k^q(c_1..c_k-1)), where
    h^q takes dq(q(.)) of its input with the built model's parameters; recomputed in numpy layer by layer."""
    from hybridq import api

    m = pm.informative_outlier_gemm()
    onnx.save(m, tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (16, 32)}, 8)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    temp, qdq = onnx.load(r.model, load_external_data=False), onnx.load(tmp_path / "q.onnx")
    onnx.load_external_data_for_model(temp, str(tmp_path / "ws"))
    samples = _samples((16, 32), 6)
    shifts = bias_correction.cumulative_shifts(temp, qdq, ["fc1", "fc2", "fc3"], samples, lambda mm: session_for(mm, basic=False))
    assert set(shifts) == {"fc1", "fc2", "fc3"}
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    fp = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in temp.graph.initializer}

    def fq(x, name):
        s, z = inits[f"{name}_scale"].astype(np.float64), inits[f"{name}_zero_point"]
        info = np.iinfo(z.dtype)
        return (np.clip(np.rint(x / s) + z.astype(np.float64), info.min, info.max) - z) * s

    layers = (("x", "w1", "b1"), ("r1", "w2", "b2"), ("r2", "w3", "b3"))

    def forward(x, c, quantized):
        outs = []
        for k, (inp, w, b) in enumerate(layers):
            if quantized:
                W = inits[f"{w}_quantized"].astype(np.float64) * inits[f"{w}_scale"].astype(np.float64)[:, None]
                h = fq(x, inp) @ W.T + inits[f"{b}_quantized"].astype(np.float64) * inits[f"{b}_scale"].astype(np.float64) + c[k]
            else:
                h = x @ fp[w].T + fp[b]
            outs.append(h)
            x = np.maximum(h, 0.0)
        return outs

    c = [np.zeros(32), np.zeros(32), np.zeros(8)]
    for k in range(3):
        diff = [f[k] - q[k] for f, q in ((forward(s["x"].astype(np.float64), c, False), forward(s["x"].astype(np.float64), c, True)) for s in samples)]
        c[k] = np.mean([d.mean(0) for d in diff], axis=0)
    assert np.abs(c[2]).max() > 1e-3  # the rounding moved the last layer's mean: the comparison says something
    # fc3 alone on fp32 inputs (the isolated shift) is a different figure: the test tells the two apart
    iso = np.mean([(forward(s["x"].astype(np.float64), c, False)[2] - fq(np.maximum(forward(s["x"].astype(np.float64), c, False)[1], 0), "r2")
                    @ (inits["w3_quantized"] * inits["w3_scale"][:, None]).astype(np.float64).T
                    - inits["b3_quantized"] * inits["b3_scale"].astype(np.float64)).mean(0) for s in samples], axis=0)
    assert np.abs(iso - c[2]).max() > 10 * (1e-4 + 1e-3 * np.abs(c[2]).max())
    for k, layer in enumerate(("fc1", "fc2", "fc3")):
        np.testing.assert_allclose(shifts[layer], c[k], rtol=1e-3, atol=1e-4)


def _residual_temp_and_qdq(tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """step1's temp model and step2's QDQ model of the residual CNN (no float stem), on 8 samples."""
    from hybridq import api

    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 8)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"float_stem": False})
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    return onnx.load(r.model), onnx.load(tmp_path / "q.onnx")


def test_bias_correction_run_in_segments_equals_whole_runs(tmp_path: Path, monkeypatch):
    """The shifts come from one segmented pass over the model (a segment ending at each layer, a residual tensor
    crossing segments); a whole run per layer, as before, gives the same figures bit for bit."""
    temp, qdq = _residual_temp_and_qdq(tmp_path)
    samples = _samples((1, 3, 16, 16), 5)
    opened: list[onnx.ModelProto] = []

    def session(m):
        opened.append(m)
        return session_for(m, basic=False)

    layers = ["conv1", "conv2", "conv3", "fc"]
    segmented = bias_correction.cumulative_shifts(temp, qdq, layers, samples, session)
    assert set(segmented) == set(layers) and len(opened) == 1 + len(layers), "the fp32 reference, then one segment per layer"
    # the fc segment reads the residual branch's tensor, written two segments before it
    assert "r1_quantized" in {i.name for i in opened[-1].graph.input} and "r1_quantized" in {o for n in opened[2].graph.node for o in n.output}
    monkeypatch.setattr(bias_correction, "split", lambda *a, **k: None)
    whole = bias_correction.cumulative_shifts(temp, qdq, layers, samples, session)
    assert len(opened) == 1 + len(layers) + 2, "the fp32 reference and the whole model"
    for k in layers:
        np.testing.assert_array_equal(segmented[k], whole[k])
    assert max(np.abs(v).max() for v in whole.values()) > 1e-4  # the rounding moved the means: the comparison says something


def test_bias_correction_memo_reuses_the_fp32_means_of_the_same_model_and_samples(tmp_path: Path):
    """With a memo, a second fit on the same fp32 model and samples (the proposal fits again per float candidate) opens
    no fp32 session and gives the shifts a fit without the memo gives; other samples, or another model, are measured."""
    temp, qdq = _residual_temp_and_qdq(tmp_path)
    samples, others = _samples((1, 3, 16, 16), 5), _samples((1, 3, 16, 16), 5)
    layers = ["conv1", "conv2", "conv3", "fc"]
    opened: list[onnx.ModelProto] = []

    def session(m):
        opened.append(m)
        return session_for(m, basic=False)

    def fp32_sessions() -> int:  # the reference: the fp32 model's graph, without the correction inputs
        return sum(not any(i.name.startswith("hybridq_bc/") for i in m.graph.input) and len(m.graph.node) == len(temp.graph.node)
                   for m in opened)

    plain = bias_correction.cumulative_shifts(temp, qdq, layers, samples, session)
    assert fp32_sessions() == 1
    memo: dict = {}
    for run in range(2):
        got = bias_correction.cumulative_shifts(temp, qdq, layers, samples, session, memo)
        assert fp32_sessions() == 2, f"run {run}: only the first fit with the memo measures fp32"
        for k in layers:
            np.testing.assert_array_equal(got[k], plain[k])
    fewer = bias_correction.cumulative_shifts(temp, qdq, layers[1:], samples, session, memo)
    assert fp32_sessions() == 2 and set(fewer) == set(layers[1:])
    bias_correction.cumulative_shifts(temp, qdq, layers, others, session, memo)
    assert fp32_sessions() == 3
    moved = onnx.ModelProto()
    moved.CopyFrom(temp)
    bias_correction.apply_in_place(moved, {"conv1": np.full(len(plain["conv1"]), 0.25)})
    bias_correction.cumulative_shifts(moved, qdq, layers, samples, session, memo)
    assert fp32_sessions() == 4


def test_bias_correction_memo_is_not_used_for_a_model_over_2_gb(tmp_path: Path, monkeypatch):
    """A model protobuf cannot serialize (over 2 GB) has no content key: each fit measures fp32 again, and works."""
    temp, qdq = _residual_temp_and_qdq(tmp_path)
    samples = _samples((1, 3, 16, 16), 3)
    monkeypatch.setattr(bias_correction, "serialized_within", lambda model, limit=None: None)
    opened: list[onnx.ModelProto] = []

    def session(m):
        opened.append(m)
        return session_for(m, basic=False)

    memo: dict = {}
    first = bias_correction.cumulative_shifts(temp, qdq, ["conv1", "fc"], samples, session, memo)
    count = len(opened)
    second = bias_correction.cumulative_shifts(temp, qdq, ["conv1", "fc"], samples, session, memo)
    assert memo == {} and len(opened) == 2 * count
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])


def test_the_bias_correction_setting_writes_step1_s_own_shifts_and_cancels_the_last_layer_s_mean_error(tmp_path: Path):
    """`bias_correction: true`: step1 writes each layer's cumulative shift, measured on the default int8 model (as
    cumulative_shifts gives it on a step1 + step2 without the setting), as its own entries (propose sees no user
    edit); in ONNX Runtime the corrected model's last layer has no mean error left on the samples it was fitted on."""
    from hybridq import api
    from hybridq.artifacts import read_step1
    from hybridq.config import load_cfg

    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 10)
    plain = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "plain", settings={"float_stem": False})
    api.step2(plain.model, plain.data, plain.cfg, tmp_path / "plain.onnx")
    fit = [{"x": np.load(tmp_path / "data" / f"x_{i}.npy")} for i in range(8)]  # the first 8 calibration samples
    temp = onnx.load(plain.model)
    layers = ["conv1", "conv2", "conv3", "fc"]
    want = bias_correction.cumulative_shifts(temp, onnx.load(tmp_path / "plain.onnx"), layers, fit, lambda m: session_for(m, basic=False))
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"float_stem": False, "bias_correction": True})
    cfg = load_cfg(r.cfg)
    weight = {n.name: n.input[1] for n in temp.graph.node if n.name in layers}
    for layer in layers:
        np.testing.assert_allclose(cfg.entries[weight[layer]].values["bias_correction"], want[layer], rtol=1e-5, atol=1e-7)
    assert "bias of fc shifted by its mean output error" in r.cfg.read_text()
    bundle = read_step1(r.model, r.data, cfg.header.get("model_sha256"), r.cfg)
    assert api.user_edits(cfg, bundle.meta, {})[0] == set(), "step1's own entries, not the user's"
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    err = {k: np.mean([run(tmp_path / "m.onnx", s)[0] - run(tmp_path / k, s)[0] for s in fit], axis=0) for k in ("plain.onnx", "q.onnx")}
    assert np.abs(err["plain.onnx"]).max() > 1e-3, "the rounding moved the logits' mean: the check says something"
    assert np.abs(err["q.onnx"]).max() < 0.05 * np.abs(err["plain.onnx"]).max(), err


def test_matmul_bias_correction_is_the_numpy_shift_and_moves_the_add_bias(tmp_path: Path):
    """A MatMul followed by its bias Add (a Linear), the first layer: the shift is mean(x W - dq(q(x)) dq(q(W))) over the rows,
    it lands in the Add's bias; a MatMul without a bias Add is not correctable."""
    from hybridq import api

    m = models.linear_3d()
    onnx.save(m, tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 32)}, 8)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    temp, qdq = onnx.load(r.model, load_external_data=False), onnx.load(tmp_path / "q.onnx")
    onnx.load_external_data_for_model(temp, str(tmp_path / "ws"))
    samples = _samples((1, 8, 32), 5)
    shifts = bias_correction.cumulative_shifts(temp, qdq, ["mm1", "mm2"], samples, lambda mm: session_for(mm, basic=False))
    assert set(shifts) == {"mm1"}  # mm2 has no bias Add to move
    shift = shifts["mm1"]
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    s, z = inits["x_scale"].astype(np.float64), inits["x_zero_point"]
    info = np.iinfo(z.dtype)
    W = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w1")).astype(np.float64)
    Wq = inits["w1_quantized"].astype(np.float64) * inits["w1_scale"].astype(np.float64)[None, :]
    total = 0.0
    for feeds in samples:
        x = feeds["x"].astype(np.float64)
        xq = (np.clip(np.rint(x / s) + z.astype(np.float64), info.min, info.max) - z) * s
        total = total + (x @ W - xq @ Wq).mean((0, 1))
    assert np.abs(total).max() > 1e-4  # the rounding moved the mean: the comparison below says something
    np.testing.assert_allclose(shift, total / len(samples), rtol=1e-3, atol=1e-5)
    moved = {i.name: numpy_helper.to_array(i) for i in bias_correction.apply(m, {"mm1": shift}).graph.initializer}
    b1 = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}["b1"]
    np.testing.assert_allclose(moved["b1"], b1 + shift.astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="without a bias Add"):
        bias_correction.apply(m, {"mm2": np.zeros(16)})


def test_bias_correction_adds_the_shift_to_the_bias_or_creates_one():
    m = pm.uninformative_outlier_cnn()
    shift = np.arange(8, dtype=np.float64)
    out = bias_correction.apply(m, {"conv4": shift, "conv1": np.ones(16)})
    g = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    conv4 = next(n for n in out.graph.node if n.name == "conv4")
    np.testing.assert_array_equal(g[conv4.input[2]], shift.astype(np.float32))  # conv4 had no bias
    b1 = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}["b1"]
    np.testing.assert_allclose(g["b1"], b1 + 1.0)


def _edit_entry(text: str, tensor: str, key: str, value: str) -> str:
    """Add `key: value` to the quantize_parameters entry of `tensor` (after its zero_point line)."""
    start = text.index(f"\n  {tensor}:\n")
    zp = text.index("\n    zero_point:", start)
    end = text.index("\n", zp + 1)
    return text[:end] + f"\n    {key}: {value}" + text[end:]


def test_step2_applies_a_bias_correction_written_in_the_cfg(tmp_path: Path):
    from hybridq import api

    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 8)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    shift = np.linspace(-0.5, 0.5, 16)
    r.cfg.write_text(_edit_entry(r.cfg.read_text(), "w3", "bias_correction", "[" + ", ".join(f"{v:.6g}" for v in shift) + "]"))
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    b3 = numpy_helper.to_array(next(i for i in models.residual_cnn().graph.initializer if i.name == "b3")).astype(np.float64)
    deq = inits["b3_quantized"].astype(np.float64) * inits["b3_scale"].astype(np.float64)
    np.testing.assert_allclose(deq, b3 + shift, atol=inits["b3_scale"].max())  # int32 bias: within one step


@pytest.mark.parametrize("tensor, key, value, message", [
    ("r1", "bias_correction", "[0.1]", "not a layer's weight"),
    ("r1", "equalize", "[2.0]", "cannot be applied"),  # r1 is also read by the residual Add: no layer takes the scale
])
def test_a_misplaced_fix_in_the_cfg_is_a_clear_error(tmp_path: Path, capsys, tensor, key, value, message):
    from hybridq import api
    from hybridq.cli import main

    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    text = r.cfg.read_text()
    assert f"\n  {tensor}:\n" in text, f"{tensor} has no entry"
    r.cfg.write_text(_edit_entry(text, tensor, key, value))
    with pytest.raises(SystemExit) as exc:
        main(["step2", str(r.model), str(r.data), str(r.cfg), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


def test_step2_moves_a_linear_bias_and_refuses_a_matmul_without_one(tmp_path: Path, capsys):
    """bias_correction on a MatMul's weight entry lands in the Add after it (checked on the built model, with ONNX
    Runtime: the output moves by the shift); on a MatMul with no bias Add it is a clear error naming the layer."""
    from hybridq import api
    from hybridq.cli import main

    onnx.save(models.linear_3d(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 32)}, 4)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    text = r.cfg.read_text()
    shift = np.linspace(-0.3, 0.3, 64)
    api.step2(r.model, r.data, r.cfg, tmp_path / "plain.onnx")
    r.cfg.write_text(_edit_entry(text, "w1", "bias_correction", "[" + ", ".join(f"{v:.6g}" for v in shift) + "]"))
    api.step2(r.model, r.data, r.cfg, tmp_path / "moved.onnx")
    a1 = lambda path: run(_with_outputs(onnx.load(path), ["a1"]), _samples((1, 8, 32), 1)[0])[1]  # noqa: E731
    np.testing.assert_allclose(a1(tmp_path / "moved.onnx") - a1(tmp_path / "plain.onnx"), np.broadcast_to(shift, (1, 8, 64)), atol=1e-5)
    r.cfg.write_text(_edit_entry(text, "w2", "bias_correction", "[" + ", ".join(["0.1"] * 16) + "]"))
    with pytest.raises(SystemExit) as exc:
        main(["step2", str(r.model), str(r.data), str(r.cfg), "-o", str(tmp_path / "bad.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "mm2" in err and "without a bias Add" in err and "Traceback" not in err
    assert not (tmp_path / "bad.onnx").exists()


def test_equalization_refuses_a_view_read_along_another_axis_and_a_bias_whose_input_is_a_model_output():
    """Two sites that would change the fp32 function: a Conv1d reading a [1, 8, 8] view of a Gemm's [8, 8] output takes
    the Gemm's rows as channels (the view keeps only the last axis in place); a MatMul whose output, before its bias Add,
    is also a model output would change that output."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from hybridq import equalize

    r = np.random.default_rng(0)
    f = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    inits = [f("W", r.normal(size=(8, 8))), numpy_helper.from_array(np.array([1, 8, 8], np.int64), "shape"), f("Wc", r.normal(size=(4, 8, 1)))]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="gemm"), helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["v"], name="view"), helper.make_node("Conv", ["v", "Wc"], ["y"], name="conv")]
    m = onnx.shape_inference.infer_shapes(helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [8, 8])], [helper.make_tensor_value_info("y", T.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)]))
    assert "along another axis" in equalize.find_site(m, "r")
    inits = [f("W1", r.normal(size=(8, 8))), f("b1", r.normal(size=8)), f("W2", r.normal(size=(8, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["q0"], name="q"), helper.make_node("Add", ["q0", "b1"], ["q1"], name="bias"),
             helper.make_node("Relu", ["q1"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "W2"], ["y"], name="o")]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                                            [helper.make_tensor_value_info("y", T.FLOAT, [2, 4]), helper.make_tensor_value_info("q0", T.FLOAT, [2, 8])],
                                            inits), opset_imports=[helper.make_opsetid("", 17)])
    assert isinstance(equalize.find_site(m, "r"), str)
