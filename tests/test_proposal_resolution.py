"""What the proposal can tell apart on its samples, and float candidates scored with a bias correction fitted to them.

Every figure is recomputed here from ONNX Runtime outputs with numpy: the leave-one-out cosines, their jackknife
error, and the mean output shift a re-fitted bias correction writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import hybridq
from hybridq.proposal import Target
from hybridq.proposal.evaluator import RESOLUTION_DB, Evaluator
from tests import models
from tests.conftest import run


def _perturbed(model: onnx.ModelProto, name: str, scale: float) -> onnx.ModelProto:
    """The model with noise added to one classifier initializer: a candidate with its own error (on the weights, an error
    that grows with the input; on the bias, one that does not)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            w = numpy_helper.to_array(init)
            w = w + np.random.default_rng(1).normal(0, scale, w.shape).astype(np.float32)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, name))
    return out


def test_resolution_is_twice_the_standard_error_of_the_paired_per_sample_differences():
    """A score carries each sample's own cosine; two candidates differ beyond what the samples resolve only by twice
    the standard error of their per-sample dB differences (at least RESOLUTION_DB). A loud sample counts as one of n."""
    fp32 = models.residual_cnn()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) * (6.0 if k == 3 else 1.0)} for k in range(8)]
    a_model, b_model = _perturbed(fp32, "fc_w", 0.02), _perturbed(fp32, "fc_b", 0.05)
    ev = Evaluator(fp32, samples, Target(cosine=0.999))
    a, b = ev.score(a_model), ev.score(b_model)

    ref = [run(fp32, s)[0].astype(np.float64) for s in samples]

    def per_sample(model: onnx.ModelProto) -> list[float]:
        out = [run(model, s)[0].astype(np.float64) for s in samples]
        return [float((r * o).sum() / math.sqrt((r * r).sum() * (o * o).sum())) for r, o in zip(ref, out)]

    ca, cb = per_sample(a_model), per_sample(b_model)
    assert np.allclose([c for c, _ in a.per_sample], ca, rtol=0, atol=1e-9) and np.allclose([c for c, _ in b.per_sample], cb, rtol=0, atol=1e-9)
    d = np.array([-10 * np.log10(1 - x) + 10 * np.log10(1 - y) for x, y in zip(ca, cb)])
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    assert 2 * se > RESOLUTION_DB  # the estimate, not the floor, decides
    assert math.isclose(ev.resolution(a, b), max(RESOLUTION_DB, 2 * se), rel_tol=1e-6)
    assert ev.as_good(b, a) == (d.mean() <= 2 * se) and ev.as_good(a, b) == (-d.mean() <= 2 * se)
    few = Evaluator(fp32, samples[:3], Target(cosine=0.999))  # too few samples to estimate: the floor
    assert few.score(a_model).per_sample == [] and few.resolution(few.score(a_model), few.score(b_model)) == RESOLUTION_DB


def test_a_gain_on_most_samples_is_resolved_though_one_sample_loses():
    """Candidate b is better than a by 3 dB on seven samples and worse by 4 dB on the eighth: paired, the gain is
    resolved; the pooled figures' leave-one-out error that the search used before let the one sample veto it."""
    from hybridq.proposal.evaluator import OutputScore, Score

    def score(errors: list[float]) -> Score:
        pooled = 1 - float(np.mean(errors))
        return Score({"y": OutputScore(pooled, 20.0, pooled, 20.0, None)}, per_sample=[(1 - e, 20.0) for e in errors])

    ev = Evaluator.__new__(Evaluator)
    ev.target = Target(cosine=0.999)
    a_err = [1e-2] * 8
    b_err = [1e-2 / 10 ** 0.3] * 7 + [1e-2 * 10 ** 0.4]
    a, b = score(a_err), score(b_err)
    d = np.array([10 * np.log10(x / y) for x, y in zip(a_err, b_err)])
    assert math.isclose(ev.resolution(b, a), 2 * d.std(ddof=1) / math.sqrt(8), rel_tol=1e-9)  # 1.75 dB
    assert d.mean() > ev.resolution(b, a) and not ev.as_good(a, b) and ev.as_good(b, a)  # 2.1 dB on average: resolved
    pooled = 10 * np.log10(np.mean(a_err) / np.mean(b_err))
    assert pooled < ev.resolution(b, a)  # pooled (1.2 dB), the eighth sample would have hidden it
def _deep_cnn() -> onnx.ModelProto:
    """x -> conv_a -> relu -> conv_b -> relu -> conv_c -> relu -> conv_d; 3x3 convs, 8 channels, input [1, 3, 12, 12]."""
    rng = np.random.default_rng(5)
    inits, nodes, prev, cin = [], [], "x", 3
    for k, name in enumerate(("conv_a", "conv_b", "conv_c", "conv_d")):
        inits += [numpy_helper.from_array(rng.normal(0, 0.4, (8, cin, 3, 3)).astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(rng.normal(0.2, 0.1, 8).astype(np.float32), f"{name}_b")]
        nodes.append(helper.make_node("Conv", [prev, f"{name}_w", f"{name}_b"], [f"{name}_out"], name=name, pads=[1, 1, 1, 1]))
        prev, cin = f"{name}_out", 8
        if k < 3:
            nodes.append(helper.make_node("Relu", [prev], [f"relu_{k}"], name=f"relu_{k}"))
            prev = f"relu_{k}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_a_float_candidate_carries_a_bias_correction_fitted_to_its_placement(tmp_path):
    """With a bias correction kept, a float candidate replaces it with one fitted on the model where that layer is float:
    conv_c's correction is then its own mean output error there (numpy, from ORT runs of that model), not the one it had
    when conv_b was int8; keeping the candidate drops the stale correction."""
    from hybridq.artifacts import read_step1
    from hybridq.build import build
    from hybridq.calibration import session_for
    from hybridq.config import load_cfg
    from hybridq.proposal.fixes import Context, bias_fix, float_fix
    from hybridq.proposal.climb import Climb
    from hybridq.proposal.search import _fit_with_floats, _keep_float

    fp32 = _deep_cnn()
    onnx.save(fp32, tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 12, 12)}, 8)
    res = hybridq.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"float_stem": False})
    art = read_step1(res.model, res.data, None, res.cfg)
    settings = load_cfg(res.cfg).with_recorded(art.meta.get("written_settings", {})).settings
    samples = [{"x": np.load(tmp_path / "data" / f"x_{k}.npy")} for k in range(8)]
    make = lambda edits: build(art.model, art.observers, art.meta, settings, edits)
    from hybridq.build import Edits

    first = make(Edits())
    ctx = Context(art.model, art.observers, settings, first.plan, art.meta["written_entries"], set())
    session = lambda m: session_for(m, basic=False)
    stale = bias_fix(ctx, Edits(), first.fixed, first.model, samples, session)[0]
    ev = Evaluator(art.model, samples, Target(cosine=0.99999))
    climb = Climb(ctx, ev, make, Edits(), first, "the default quantization")
    climb.kept, climb.edits = [stale], stale.onto(Edits(), art.model)
    climb.built = make(climb.edits)
    climb.score = ev.score(climb.built.model)

    _fit_with_floats(climb, samples, session)
    cand, edits = climb.float_edits(float_fix(ctx, ["conv_b"], "float32", 0.25, {}))
    assert cand.layers == {"conv_b": "float32"} and "fitted again" in cand.label
    weight_of = {n.name: n.input[1] for n in art.model.graph.node if n.op_type == "Conv"}
    fitted = cand.entries[weight_of["conv_c"]]["bias_correction"]

    # conv_c's own mean output error (fp32 - quantized, per channel) in the model with conv_b float and conv_a corrected
    # as the candidate corrects it (conv_a is upstream of conv_b: its correction is the stale one, unchanged)
    assert np.allclose(cand.entries[weight_of["conv_a"]]["bias_correction"], stale.entries[weight_of["conv_a"]]["bias_correction"])
    partial = Edits().with_entries({weight_of["conv_a"]: cand.entries[weight_of["conv_a"]]}, art.model)
    partial.layers.update(cand.layers)
    quant = make(partial).model

    def with_output(m: onnx.ModelProto, name: str) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        return out

    f_out = [run(with_output(art.model, "conv_c_out"), s)[-1] for s in samples]
    q_out = [run(with_output(quant, "conv_c_out"), s)[-1] for s in samples]
    shift = np.mean([(f - q).astype(np.float64).mean(axis=(0, 2, 3)) for f, q in zip(f_out, q_out)], axis=0)
    # (step2 writes conv_a's correction into its int32 bias; the fit fed it in float: 1 % of the largest shift apart)
    tol = 0.01 * float(np.abs(shift).max())
    assert np.abs(np.asarray(fitted) - shift).max() <= tol
    assert np.abs(np.asarray(stale.entries[weight_of["conv_c"]]["bias_correction"]) - shift).max() > 5 * tol

    _keep_float(climb, (ev.score(make(edits).model), cand, edits, make(edits)), climb.table[-1], "kept")
    assert climb.kept == [cand]  # the stale correction is gone; the candidate carries the fitted one


def _softmax_head(directory) -> tuple[Path, Path]:
    """conv1 -> HardSwish -> conv2 (+ residual) -> Mul -> MaxPool -> Resize -> Concat -> Softmax over 16 channels, with
    8 Gaussian samples: the exploratory tester's m1 model, whose bias correction moves the log-probabilities by 0.01 dB."""
    rng = np.random.default_rng(0)
    f = lambda n, a: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    rng.normal(0, 0.5, (4, 8, 3, 3)), rng.normal(0, 0.1, 8)  # the draws the original script made and dropped
    inits = [f("w1", rng.normal(0, 0.5, (8, 4, 3, 3))), f("b1", rng.normal(0, 0.1, 8)), f("w2", rng.normal(0, 0.5, (8, 8, 1, 1))),
             f("b2", rng.normal(0, 0.1, 8)), f("scales", [1, 1, 2, 2])]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), n("HardSwish", ["c1"], ["hs"], name="hswish"),
             n("Conv", ["hs", "w2", "b2"], ["c2"], name="conv2"), n("Add", ["c2", "hs"], ["add"], name="add"),
             n("Mul", ["add", "c1"], ["mul"], name="mul"), n("MaxPool", ["mul"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
             n("Resize", ["mp", "", "scales"], ["rs"], name="resize", mode="nearest"),
             n("Concat", ["rs", "add"], ["cat"], name="concat", axis=1), n("Softmax", ["cat"], ["y"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "m1", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, data = Path(directory) / "m1.onnx", Path(directory) / "d"
    onnx.save(model, path)
    data.mkdir()
    for k in range(8):
        np.save(data / f"s{k}.npy", rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32))
    (data / "dataset.txt").write_text("".join(f"s{k}.npy\n" for k in range(8)))
    return path, data / "dataset.txt"


def test_below_the_target_a_gain_within_the_resolution_is_said_to_be_so(tmp_path):
    """Bias correction on the m1 model moves the pooled log-probability SNR by hundredths of a dB (numpy on ORT outputs
    of the models step2 builds with and without `bias_correction: true`), far below RESOLUTION_DB. Below the target the
    proposal keeps a free fix's gain, but its row says the gain is within what the samples resolve (it said "kept")."""
    from hybridq.api import ProposalOptions

    path, listing = _softmax_head(tmp_path)
    xs = [np.load(listing.parent / f"s{k}.npy") for k in range(8)]

    def logp_snr(model) -> float:
        """Pooled SNR of the log-probabilities (floored at 1e-4, centred over the classes) against fp32's."""
        def logp(p):
            lp = np.log(np.maximum(p.astype(np.float64), 1e-4))
            return lp - lp.mean(axis=1, keepdims=True)
        ref = np.stack([logp(run(path, {"x": x})[0]) for x in xs])
        out = np.stack([logp(run(model, {"x": x})[0]) for x in xs])
        return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))

    figures = {}
    for bias in (False, True):
        ws = tmp_path / f"ws_{bias}"
        r = hybridq.step1(path, listing, out=ws, settings={"target": "npu", "bias_correction": bias})
        hybridq.step2(r.model, r.data, r.cfg, ws / "q.onnx")
        figures[bias] = logp_snr(ws / "q.onnx")
    assert 0 < abs(figures[True] - figures[False]) < 0.1 < RESOLUTION_DB  # far within what any 8 samples resolve

    res = hybridq.step1(path, listing, out=tmp_path / "wsp", settings={"target": "npu"}, proposal=ProposalOptions()).proposal
    start, = [r for r in res.table if r.step == "start"]
    bias_row, = [r for r in res.table if r.step == "bias"]
    assert start.outcome == "below target" and math.isclose(start.logp_snr_db, figures[False], abs_tol=1e-3)
    assert math.isclose(bias_row.logp_snr_db, figures[True], abs_tol=1e-3)  # the candidate is the model measured above
    gained = figures[True] > figures[False]
    assert bias_row.outcome == ("kept (a gain within what the samples resolve)" if gained else "no gain"), bias_row.outcome
