"""Integer outputs in the proposal: an ArgMax's label map is judged on the float tensor it decides from, other integer
outputs value for value; never a cosine of class indices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hybridq import api
from hybridq.errors import InputError
from hybridq.proposal.evaluator import Evaluator, Target
from tests import models
from tests.conftest import cosine, run, run_cli


def _segmenter(seed: int = 0, softmax: bool = False) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-Conv to 5 class logits (`softmax`: then their Softmax), then ArgMax over the classes, cast to
    int32: a label map output."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (16, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (5, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["logits" if not softmax else "z"], name="conv3"),
        *([helper.make_node("Softmax", ["z"], ["logits"], axis=1, name="softmax")] if softmax else []),
        helper.make_node("ArgMax", ["logits"], ["idx"], axis=1, keepdims=0, name="argmax"),
        helper.make_node("Cast", ["idx"], ["label"], to=TensorProto.INT32, name="cast"),
    ]
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("label", TensorProto.INT32, [1, 16, 16])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _masked_mlp(with_float_output: bool) -> onnx.ModelProto:
    """Gemm-Relu-Gemm to `y` (and `z`); `mask` = Cast(z > 0) to int64, a threshold decided on `z`; `coords` = Cast(y)
    to int64, an integer output no deciding op writes."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(0, 0.3, (32, 16)).astype(np.float32), rng.normal(0, 0.3, (8, 32)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (8, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2"], ["y"], transB=1, name="fc2"),
        helper.make_node("Gemm", ["hr", "w3"], ["z"], transB=1, name="fc3"),
        helper.make_node("Greater", ["z", "zero"], ["pos"], name="greater"),
        helper.make_node("Cast", ["pos"], ["mask"], to=TensorProto.INT64, name="cast"),
        helper.make_node("Mul", ["y", "ten"], ["y10"], name="scale"),
        helper.make_node("Cast", ["y10"], ["coords"], to=TensorProto.INT64, name="cast_y"),
    ]
    outputs = [helper.make_tensor_value_info("coords", TensorProto.INT64, [4, 8])]
    if with_float_output:
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("mask", TensorProto.INT64, [4, 8])] + outputs
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])], outputs,
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3"),
                               numpy_helper.from_array(np.zeros(1, np.float32), "zero"), numpy_helper.from_array(np.full(1, 10, np.float32), "ten")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of `model` that also outputs tensor `name` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


@pytest.mark.parametrize("softmax", [False, True])
def test_an_argmax_output_is_judged_on_the_logits_it_decides_from(tmp_path, softmax):
    """The proposal's figures for 'label' are the logits' cosine and the label map's differing pixels, both recomputed
    here with ONNX Runtime from the fp32 model and the model step2 builds from the written cfg. Over a Softmax the
    probabilities are also compared on their log-probabilities, and each pixel's decision is counted once."""
    path = tmp_path / "seg.onnx"
    onnx.save(_segmenter(softmax=softmax), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 16)
    res = api.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False}, proposal=api.ProposalOptions())
    p = res.proposal
    assert p.measured is not None
    assert any("'label'" in n and "ArgMax of 'logits'" in n for n in p.notes), p.notes

    quant = onnx.load(str(api.step2(res.model, res.data, res.cfg, tmp_path / "q.onnx").output))
    (argmax,) = [n for n in quant.graph.node if n.op_type == "ArgMax"]
    xs = [{"x": np.load(tmp_path / "data" / f"x_{i}.npy")} for i in range(16)]
    ref = [run(_with_output(_segmenter(softmax=softmax), "logits"), x) for x in xs]  # [label, logits]
    got = [run(_with_output(quant, argmax.input[0]), x) for x in xs]
    logits_cos = cosine(np.concatenate([r[1] for r in ref]), np.concatenate([g[1] for g in got]))
    differing = sum(int(np.count_nonzero(r[0] != g[0])) for r, g in zip(ref, got))
    label_cos = cosine(np.concatenate([r[0] for r in ref]), np.concatenate([g[0] for g in got]))

    score = p.measured
    assert score.outputs["label"].cosine == pytest.approx(logits_cos, abs=1e-6)
    assert abs(label_cos - logits_cos) > 1e-4  # the figure is not the cosine of class indices
    assert (score.flips, score.decisions) == (differing, 16 * 16 * 16)
    assert ("label" in score.logp) == softmax


def test_a_threshold_output_is_judged_on_its_input_and_other_integer_outputs_value_for_value(tmp_path):
    """'mask' (z > 0) is judged on z; 'coords' (int of 10 y) only counts its values; every integer value that differs
    from fp32's is a flipped decision. Recomputed here with ONNX Runtime."""
    fp32 = _masked_mlp(with_float_output=True)
    path = tmp_path / "m.onnx"
    onnx.save(fp32, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (4, 16)}, 16)
    res = api.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False})
    quant = onnx.load(str(api.step2(res.model, res.data, res.cfg, tmp_path / "q.onnx").output))
    samples = [{"x": np.load(tmp_path / "data" / f"x_{i}.npy")} for i in range(16)]

    ev = Evaluator(fp32, samples, Target())
    score = ev.score(quant)
    (greater,) = [n for n in quant.graph.node if n.op_type == "Greater"]  # what it decides on there: z after its Q/DQ
    ref, got = [run(_with_output(fp32, "z"), s) for s in samples], [run(_with_output(quant, greater.input[0]), s) for s in samples]
    assert list(score.outputs) == ["y", "mask"]
    for k, name in ((0, "y"), (3, "mask")):  # run's outputs: y, mask, coords, z
        want = cosine(np.concatenate([r[k] for r in ref]), np.concatenate([g[k] for g in got]))
        assert score.outputs[name].cosine == pytest.approx(want, abs=1e-6)
    differing = sum(int(np.count_nonzero(r[k] != g[k])) for r, g in zip(ref, got) for k in (1, 2))
    assert differing > 0
    assert (score.flips, score.decisions) == (differing, 16 * 2 * 4 * 8)
    assert any("'mask'" in n and "Greater of 'z'" in n for n in ev.notes) and any("'coords'" in n for n in ev.notes)


def test_a_model_with_no_float_output_to_judge_is_refused_by_name(tmp_path, capsys):
    fp32 = _masked_mlp(with_float_output=False)
    with pytest.raises(InputError, match="coords"):
        Evaluator(fp32, [{"x": np.zeros((4, 16), np.float32)}], Target())
    path = tmp_path / "m.onnx"
    onnx.save(fp32, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (4, 16)}, 8)
    (tmp_path / "hybridq.yaml").write_text("speed_check: false\n")
    code, out, err = run_cli(capsys, "step1", path, "--dataset", listing, "--out", tmp_path / "ws", "--proposal")
    assert code == 2, (out, err)
    assert "coords" in err and "Traceback" not in err
