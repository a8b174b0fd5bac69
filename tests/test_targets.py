"""`settings: target:` cpu | npu (SPEC 11): the npu's placement on the built graph, its integer numerics, float16 boundaries,
a target change step2 cannot honour, and cpu models byte-identical to the code before targets existed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import io
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import hybridq
from hybridq import patterns, targets
from hybridq._onnx import convert_opset
from hybridq.errors import ConfigError
from hybridq.plan import GraphView
from hybridq.settings import TARGET_NAMES, Settings
from tests import models, npu_models
from tests.conftest import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def npu_build(tmp_path_factory):
    """every_op through step1 --target npu and step2: (fp32 path, listing, step1 result, built model)."""
    tmp = tmp_path_factory.mktemp("npu")
    path = tmp / "every.onnx"
    onnx.save(npu_models.every_op(), path)
    listing = models.write_npy_dataset(tmp / "data", {"x": (1, 4, 8, 8)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp / "ws", settings={"target": "npu"})
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp / "q.onnx")
    return path, listing, r1, onnx.load(str(r2.output))


def _index(model: onnx.ModelProto):
    prod = {o: n for n in model.graph.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons


def _params(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, int]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[node.input[1]]), int(inits[node.input[2]])


def test_target_names_are_the_registry():
    # settings validates the name without importing targets (targets imports the plan): the two lists must agree
    assert TARGET_NAMES == tuple(targets.TARGETS)
    with pytest.raises(ConfigError, match="target 'gpu' is not valid.*cpu, npu"):
        targets.get("gpu")
    with pytest.raises(ConfigError, match="target 'nppu'.*Did you mean: 'npu'"):
        Settings(target="nppu").validate("settings")


def test_npu_every_operator_reads_and_writes_int8(npu_build):
    """Each listed op reads DequantizeLinear outputs and its outputs feed a QuantizeLinear, except a Relu fused into its Conv."""
    _, _, r1, q = npu_build
    temp = onnx.load(str(r1.model))
    prod, cons = _index(q)
    # inside a fused pattern (HardSwish = x * HardSigmoid(x), the Gelu chain) tensors stay float: one NPU layer each
    inner = patterns.inner_tensors(GraphView(temp))
    assert inner == {"_inlfunc_HardSwish_HS_X", "g_div", "g_erf", "g_add", "g_half"}
    seen = set()
    for node in q.graph.node:
        if node.op_type not in npu_models.NPU_OPS:
            continue
        seen.add(node.op_type)
        acts = [i for i in node.input if (i in prod or i == "x") and i not in inner]
        if node.name == "relu_fused":  # Conv + Relu is one NPU layer: the Conv's raw output carries no Q/DQ
            assert acts == ["c1"] and prod["c1"].op_type == "Conv"
        else:
            assert all(prod[i].op_type == "DequantizeLinear" for i in acts), node.name
            assert acts or set(node.input) & inner, node.name
        for o in node.output:
            if node.name != "conv1" and o not in inner:
                assert [c.op_type for c in cons[o]] == ["QuantizeLinear"], (node.name, o)
            if o in inner:
                assert "QuantizeLinear" not in [c.op_type for c in cons[o]], (node.name, o)
    # HardSwish is split into x * HardSigmoid(x) by the temp model's preparation; both halves are checked above
    expected = {op for n in temp.graph.node for op in [n.op_type] if op in npu_models.NPU_OPS}
    assert seen == expected and expected >= set(npu_models.NPU_OPS) - {"HardSwish"}
    # the graph input is quantized as the NPU's input layer is
    assert [c.op_type for c in cons["x"]] == ["QuantizeLinear"]


def test_npu_data_movement_and_concat_share_parameters(npu_build):
    """Reshape/Transpose/Flatten/Squeeze/Unsqueeze: the output's Q has the input's scale and zero point; Concat's inputs its output's."""
    _, _, _, q = npu_build
    prod, cons = _index(q)
    for node in q.graph.node:
        if node.op_type in npu_models.DATA_MOVEMENT:
            before = _params(q, prod[node.input[0]])
            after = _params(q, cons[node.output[0]][0])
            assert before == after, node.name
        if node.op_type == "Concat":
            out = _params(q, cons[node.output[0]][0])
            assert all(_params(q, prod[i]) == out for i in node.input), "Concat inputs take the output's parameters"
    # MaxPool and nearest Resize select input values: the same parameters, the integers moved as they are (numpy)
    x = np.random.default_rng(12).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    codes = {t: vals[next(c for c in cons[t] if c.op_type == "QuantizeLinear").output[0]] for t in ("cat", "mp", "ap", "rs")}
    for src, dst in (("cat", "mp"), ("ap", "rs")):
        assert _params(q, next(c for c in cons[src] if c.op_type == "QuantizeLinear")) == \
            _params(q, next(c for c in cons[dst] if c.op_type == "QuantizeLinear")), dst
    c = codes["cat"]
    assert np.array_equal(codes["mp"], c.reshape(1, c.shape[1], 4, 2, 4, 2).max(axis=(3, 5)))
    assert np.array_equal(codes["rs"], codes["ap"].repeat(2, axis=2).repeat(2, axis=3))


def _quantized_values(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the QDQ model by onnx.reference (QDQ semantics, independent of ONNX Runtime's fused kernels)."""
    ref = ReferenceEvaluator(convert_opset(model, 21))  # onnx.reference implements DequantizeLinear from opset 19
    names = [o for n in model.graph.node for o in n.output]
    return dict(zip(names, ref.run(names, {"x": x})))


def test_npu_integer_simulation_matches_the_reference(npu_build):
    """ONNX Runtime (analysis' exact-int8 session) against onnx.reference, and hand-computed integer steps."""
    _, _, _, q = npu_build
    x = np.random.default_rng(11).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    prod, cons = _index(q)
    ort_out = run(q, {"x": x})
    for o, got in zip(q.graph.output, ort_out):
        want = vals[o.name]
        s, _ = _params(q, prod[prod[o.name].input[0]])  # the DequantizeLinear the final Neg reads
        # ORT's QLinear kernels round the float result of each op once: at most one step of the last Q's grid apart
        assert np.max(np.abs(got - want)) <= s * 1.001, o.name
        assert np.mean(got == want) >= 0.95, o.name

    def q_of(t: str) -> tuple[np.ndarray, float, int]:
        qnode = next(c for c in cons[t] if c.op_type == "QuantizeLinear")
        s, z = _params(q, qnode)
        return vals[qnode.output[0]].astype(np.int64), s, z

    # Add on two int8 inputs: requantize the real sum onto the output grid (numpy, round half to even as QuantizeLinear)
    (qa, sa, za), (qb, sb, zb), (qo, so, zo) = q_of("r1"), q_of("c2"), q_of("add")
    want = np.clip(np.rint(((qa - za) * sa + (qb - zb) * sb) / so) + zo, 0, 255)
    assert np.mean(want == qo) >= 0.99 and np.max(np.abs(want - qo)) <= 1  # float32 vs float64 ties only
    # data movement copies integers: no requantization
    qi, _, _ = q_of("sl")
    qr, _, _ = q_of("rsh")
    assert np.array_equal(qr, qi.reshape(1, 16, 64))
    qt, _, _ = q_of("tr")
    assert np.array_equal(qt, qr.transpose(0, 2, 1))
    # Concat of inputs already on its grid: the integers are concatenated as they are
    parts = [q_of(t)[0] for t in ("relu2", "sig", "hsig", "hswish", "tanh", "lrelu", "gelu")]
    assert np.array_equal(q_of("cat")[0], np.concatenate(parts, axis=1))


def test_step1_and_step2_count_npu_layers_alike(npu_build, tmp_path):
    """Elementwise and pooling layers quantized by default are counted as the cfg's dtype by both steps, never as `default`."""
    _, _, r1, _ = npu_build
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "again.onnx")
    assert "default" not in r2.layers and r2.layers == r1.layers and r2.layers.get("uint8", 0) > 10


def test_npu_float16_fallback_boundary(npu_build, tmp_path):
    """A float16 layer reads the int8 view through Cast(float16) and writes through Cast(float) into the next Q."""
    _, _, r1, _ = npu_build
    cfg = Path(r1.cfg)
    cfg.write_text(cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  sigmoid: float16"))
    r2 = hybridq.step2(r1.model, r1.data, cfg, tmp_path / "q16.onnx")
    q = onnx.load(str(r2.output))
    prod, cons = _index(q)
    sig = next(n for n in q.graph.node if n.name == "sigmoid")
    cast_in = prod[sig.input[0]]
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT16
    assert prod[cast_in.input[0]].op_type == "DequantizeLinear", "the fallback layer reads the int8 view"
    (cast_out,) = cons[sig.output[0]]
    assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == onnx.TensorProto.FLOAT
    assert [c.op_type for c in cons[cast_out.output[0]]] == ["QuantizeLinear"], "the next layer reads int8 again"
    x = np.random.default_rng(2).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    # sigmoid of the dequantized clip, by numpy, to float16's precision on (0, 1)
    clip_dq = vals[cast_in.input[0]]
    assert np.allclose(vals[cast_out.output[0]], 1 / (1 + np.exp(-clip_dq.astype(np.float64))), rtol=0, atol=2**-10)
    for got, want in zip(run(q, {"x": x}), (vals[o.name] for o in q.graph.output)):
        assert np.allclose(got, want, atol=0.05)


def test_step2_refuses_a_target_change_step1_did_not_calibrate(tmp_path, capsys):
    """cpu -> npu needs statistics step1 for cpu never took: ConfigError (exit 2) naming the cfg and what to run."""
    path = tmp_path / "every.onnx"
    onnx.save(npu_models.every_op(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 4)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws")
    cfg = Path(r1.cfg)
    assert "target: cpu" in cfg.read_text()  # the cfg says which target it was written for
    cfg.write_text(cfg.read_text().replace("target: cpu", "target: npu"))
    with pytest.raises(ConfigError, match=r"every\.quantization\.cfg: settings target is 'npu' but step1 calibrated this model for 'cpu'.*--target npu"):
        hybridq.step2(r1.model, r1.data, cfg, tmp_path / "q.onnx")
    from hybridq.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["step2", str(r1.model), str(r1.data), str(cfg), "-o", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "step1 calibrated this model for 'cpu'" in err and "Traceback" not in err


def test_npu_to_cpu_is_honoured(npu_build, tmp_path):
    """npu step1 observed every tensor cpu quantizes: step2 for cpu builds, as the cpu placement (Q/DQ around Conv only)."""
    _, _, r1, _ = npu_build
    text = Path(r1.cfg).read_text().replace("target: npu", "target: cpu")
    cfg = tmp_path / "every.quantization.cfg"
    cfg.write_text(text.replace("custom_quantize_layers:\n  sigmoid: float16", "custom_quantize_layers: {}"))
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, cfg, tmp_path / "q.onnx").output))
    prod, _ = _index(q)
    add = next(n for n in q.graph.node if n.name == "add")
    assert all(prod[i].op_type != "DequantizeLinear" for i in add.input), "cpu leaves Add in float"


PRE_TARGETS_SCRIPT = """
import sys, onnx
sys.path.insert(0, sys.argv[1])
import hybridq
from tests import models, npu_models
from pathlib import Path
out = Path(sys.argv[2])
for name, model, settings in [
    ("residual", models.residual_cnn(), None),
    ("mobile", models.mobile_block(8), None),
    ("every", npu_models.every_op(), {"quantize_ops": ["Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "Sigmoid", "Relu", "Softmax"]}),
]:
    d = out / name
    d.mkdir(parents=True)
    onnx.save(model, d / "m.onnx")
    shape = {i.name: tuple(x.dim_value for x in i.type.tensor_type.shape.dim) for i in model.graph.input}
    listing = models.write_npy_dataset(d / "data", shape, 4)
    r1 = hybridq.step1(d / "m.onnx", listing, out=d / "ws", settings=settings)
    hybridq.step2(r1.model, r1.data, r1.cfg, d / "q.onnx")
"""


def _pre_targets_tree(dest: Path) -> str:
    """The package as it was before targets.py existed (the parent of the commit that added it), unpacked in `dest`."""
    log = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--", "hybridq/targets.py"],
                         capture_output=True, text=True, check=True).stdout.split()
    commit = f"{log[-1]}^" if log else "HEAD"  # uncommitted targets.py: HEAD is still the code before it
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "hybridq"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    # calibration later moved to ONNX Runtime's full optimization level (faster; activations differ by float rounding):
    # the old tree calibrates as today's does, so the comparison is of what targets changed
    calib = dest / "hybridq" / "calibration.py"
    text = calib.read_text()
    assert text.count("lean=True, threads=threads)") == 2, "the pre-targets calibration changed: update this patch"
    calib.write_text(text.replace("lean=True, threads=threads)", "basic=False, lean=True, threads=threads)"))
    return commit


def test_cpu_models_are_byte_identical_to_the_code_before_targets(tmp_path):
    """The same step1 artifacts and cfg, built by the pre-targets package and by this one: the same bytes (cpu is today's)."""
    old = tmp_path / "old"
    _pre_targets_tree(old)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(ROOT)])}
    subprocess.run([sys.executable, "-c", PRE_TARGETS_SCRIPT, str(old), str(tmp_path / "runs")], env=env, check=True, cwd=ROOT)
    for name in ("residual", "mobile", "every"):
        d = tmp_path / "runs" / name
        stem = "m"
        new = hybridq.step2(d / "ws" / f"{stem}.model", d / "ws" / f"{stem}.data", d / "ws" / f"{stem}.quantization.cfg", d / "new.onnx")
        assert (d / "q.onnx").read_bytes() == Path(new.output).read_bytes(), name
    # and a fresh step1 with target cpu (its cfg has `target: cpu`) builds the same model again
    d = tmp_path / "runs" / "every"
    r1 = hybridq.step1(d / "m.onnx", d / "data" / "dataset.txt", out=tmp_path / "fresh",
                       settings={"quantize_ops": ["Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "Sigmoid", "Relu", "Softmax"], "target": "cpu"})
    again = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "fresh.onnx")
    a, b = onnx.load(str(d / "q.onnx")), onnx.load(str(again.output))
    for init in [*a.graph.initializer, *b.graph.initializer]:  # a tensor read back from external data says DEFAULT
        if init.data_location == onnx.TensorProto.DEFAULT:  # aloud; the temp model keeps small ones inline since
            init.ClearField("data_location")
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    # the step1 run's hash covers its settings, which now name the target; the source model's sha256 is recorded
    # since (the old step1 did not); every other record is the same
    later = {"hybridq.step1_run", "hybridq.source_sha256"}
    assert {p.key: p.value for p in a.metadata_props if p.key not in later} == \
        {p.key: p.value for p in b.metadata_props if p.key not in later}


def test_analyze_and_proposal_on_an_npu_model(npu_build, tmp_path):
    """analyze measures every npu tensor; the proposal's float16 layers are built through Casts and meet its target."""
    from hybridq.api import ProposalOptions
    from hybridq.proposal import Target

    path, listing, r1, q = npu_build
    qpath = tmp_path / "q.onnx"
    onnx.save(q, qpath)
    result = hybridq.analyze(path, qpath, listing, samples=2)
    measured = {layer.tensor for layer in result.layers}
    assert {"add", "sub", "cat", "sm", "ln", "rm"} <= measured  # elementwise, concat, softmax, norm, reduce: int8 on npu
    # each row names the precision the layer runs in; a Relu fused into its Conv, or a GELU whose input is the
    # pattern's own, runs in its output's dtype (it read "default" before)
    precision = {layer.tensor: layer.precision for layer in result.layers if layer.op_type != "Neg"}
    assert set(precision.values()) == {"uint8"}, {t: p for t, p in precision.items() if p != "uint8"}
    # a cosine int8 cannot reach: with --fallback float16 the proposal must move layers to float16 and verify it
    r = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"},
                      proposal=ProposalOptions(Target(cosine=0.9999), max_float_fraction=1.0, samples=4, fallback="float16"))
    p = r.proposal
    assert p.layers and set(p.layers.values()) == {"float16"}
    text = Path(r.cfg).read_text()
    assert "target: npu" in text and all(f"{n}: float16" in text for n in p.layers)
    built = onnx.load(str(hybridq.step2(r.model, r.data, r.cfg, tmp_path / "qp.onnx").output))
    casts = {n.name for n in built.graph.node if n.op_type == "Cast"}
    assert all(f"{n}_Cast_input0" in casts for n in p.layers)


def test_npu_runs_exported_patterns_as_one_layer_each(tmp_path):
    """LayerNorm, HardSwish, Swish and Gelu chains: Q/DQ on their inputs and results only, numerics as onnx.reference computes them."""
    path = tmp_path / "patterns.onnx"
    onnx.save(npu_models.exported_patterns(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16)}, 8, scale=3.0)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "ln", "hs", "sw", "ge"}
    x = np.random.default_rng(4).normal(0, 3, (1, 8, 16)).astype(np.float32)
    vals = _quantized_values(q, x)
    # the LayerNorm layer: numpy's layer norm of the dequantized input, then one requantization
    prod, cons = _index(q)
    xd = vals[next(c for c in cons[cons["x"][0].output[0]] if c.op_type == "DequantizeLinear").output[0]]
    m = xd.mean(-1, keepdims=True)
    gamma = onnx.numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == "gamma"))
    beta = onnx.numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == "beta"))
    ln = (xd - m) / np.sqrt(((xd - m) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    s, z = _params(q, cons["ln"][0])
    want = np.clip(np.rint(ln / s) + z, 0, 255)
    got = vals[cons["ln"][0].output[0]].astype(np.int64)
    assert np.max(np.abs(want - got)) <= 1 and np.mean(want == got) >= 0.98  # float32 vs float64 only at rounding ties
    np.testing.assert_allclose(run(q, {"x": x})[0], vals["y"], atol=_params(q, cons["ge"][0])[0] * 1.001)


PATTERN_INNER = {"d": ("LayerNorm", {"mean", "d", "d2", "var", "var_eps", "std", "norm", "scaled"}),
                 "hs_add": ("HardSwish", {"hs_add", "hs_clip", "hs_mul"}),
                 "sw_sig": ("Swish", {"sw_sig"}),
                 "ge_div": ("GELU", {"ge_div", "ge_erf", "ge_add", "ge_mul"})}


@pytest.mark.parametrize("read", list(PATTERN_INNER))
def test_a_pattern_whose_inner_tensor_is_read_outside_is_not_one_layer(tmp_path, read):
    """An activation chain is one layer only when its inner tensors are read inside it: one also read by another node
    (and a graph output) leaves that chain as separate operators, analysed row by row and, on an NPU, quantized between
    them; the other chains stay one layer each."""
    from hybridq.analysis.matching import plan_analysis

    m = npu_models.exported_patterns()
    m.graph.node.append(helper.make_node("Neg", [read], ["outside"], name="outside"))
    m.graph.output.append(helper.make_tensor_value_info("outside", TensorProto.FLOAT, [1, 8, 16]))
    label, inner = PATTERN_INNER[read]
    others = set().union(*(t for r, (_, t) in PATTERN_INNER.items() if r != read))
    found = patterns.inner_tensors(GraphView(m))
    assert not (found & inner) and others <= found
    rows = {t.tensor: t for t in plan_analysis(m, m).tensors}
    assert read in rows and rows["outside"].op_type == "Neg" and label not in {t.op_type for t in rows.values()}
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16)}, 4, scale=3.0)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    assert read in {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


def test_hard_swish_input_range_is_floored_at_minus_three():
    """HardSwish maps every x < -3 to 0: its input's range starts at -3 (RKNN's cfg does the same), all algorithms agree."""
    from hybridq.graph import prepare
    from hybridq.observers import HistogramObserver
    from hybridq.resolve import compute_range

    temp, _ = prepare(npu_models.exported_patterns())
    assert patterns.hard_swish_floors(GraphView(temp)) == {"ln": -3.0}  # ln is read only by the clip-form HardSwish
    data = np.random.default_rng(0).normal(1.0, 4.0, 100_000).astype(np.float32)
    obs = HistogramObserver()
    obs.update(data)
    (fl,) = targets.floored({"t": obs}, {"t": (-3.0, float("inf"))}).values()
    ref = HistogramObserver()
    ref.update(np.maximum(data, -3.0))
    assert (fl.min, fl.max, fl.count) == (-3.0, float(data.max()), data.size) and obs.min < -3.0  # the original is untouched
    assert fl.counts.sum() == obs.counts.sum()
    for algo in ("minmax", "percentile"):
        lo, hi = compute_range(fl, algo, 256, 99.9)
        lo_ref, hi_ref = compute_range(ref, algo, 256, 99.9)
        assert lo == pytest.approx(lo_ref, abs=fl.width) and hi == pytest.approx(hi_ref, abs=fl.width)


def test_saturating_readers_clamp_their_input_range(tmp_path):
    """A tensor only saturating ops read is calibrated to their saturation interval (RKNN's cfgs: HardSigmoid inputs
    [-2.5, 2.5], Relu inputs [0, max], the Sigmoid's input [-7, 7]); the readers' outputs do not change (numpy reference)."""
    from hybridq.graph import prepare

    model = npu_models.saturating_readers()
    temp, _ = prepare(model)
    inf = float("inf")
    dtypes = {t: "uint8" for t in ("ca", "cb", "cc", "cd", "ce", "s")}
    want = {"ca": (-2.5, 2.5), "cb": (-7.0, 7.0), "ce": (-1.0, 1.0), "s": (0.0, inf)}
    got = patterns.saturation_ranges(GraphView(temp), dtypes)
    assert set(got) == set(want) and all(got[t] == pytest.approx(want[t]) for t in want)  # cc, cd feed an Add: kept
    assert "cb" not in patterns.saturation_ranges(GraphView(temp), {**dtypes, "cb": "int16"})  # int16 sees sigmoid's tail

    path = tmp_path / "sat.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    entries = __import__("yaml").safe_load(Path(r1.cfg).read_text())["quantize_parameters"]
    ref = ReferenceEvaluator(model)
    names = ["ca", "cb", "ce", "s", "cd"]
    seen = [ref.run(names, {"x": np.load(p)}) for p in sorted((tmp_path / "data").glob("x_*.npy"))]
    observed = {t: (min(float(v[i].min()) for v in seen), max(float(v[i].max()) for v in seen)) for i, t in enumerate(names)}
    _, cons = _index(q)
    for t, (lo, hi) in want.items():
        assert observed[t][0] < lo or observed[t][1] > hi, f"{t}: calibration data must reach past the interval"
        clamped = (max(lo, observed[t][0]), min(hi, observed[t][1]))
        assert (entries[t]["min"][0], entries[t]["max"][0]) == pytest.approx(clamped, rel=1e-5), t
        assert (entries[t]["ori_min"][0], entries[t]["ori_max"][0]) == pytest.approx(observed[t], rel=1e-5), t  # raw, as seen
        lo_0, hi_0 = min(clamped[0], 0.0), max(clamped[1], 0.0)  # uint8 asymmetric over the clamped range, 0 included
        scale = (hi_0 - lo_0) / 255
        qnode = next(c for c in cons[t] if c.op_type == "QuantizeLinear")
        got_scale, got_zp = _params(q, qnode)
        assert got_scale == pytest.approx(scale, rel=1e-5) and abs(got_zp - (-lo_0 / scale)) <= 0.5 + 1e-3, t  # ties either way
    assert (entries["cd"]["min"][0], entries["cd"]["max"][0]) == pytest.approx(observed["cd"], rel=1e-5)  # not clamped

    # each reader's int8 output against numpy applied to its input before the clamping Q (onnx.reference's values
    # of the QDQ graph): clamping changes no output beyond the input's and the output's rounding
    x = np.random.default_rng(5).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    numpy_out = {"hsig": lambda v: np.clip(0.2 * v + 0.5, 0, 1), "sig": lambda v: 1 / (1 + np.exp(-v.astype(np.float64))),
                 "r": lambda v: np.maximum(v, 0), "cl": lambda v: np.clip(v, -1, 1)}
    for t, clamped in {"hsig": "ca", "sig": "cb", "r": "s", "cl": "ce"}.items():
        s, z = _params(q, next(c for c in cons[t] if c.op_type == "QuantizeLinear"))
        qin = next(c for c in cons[clamped] if c.op_type == "QuantizeLinear")
        s_in = _params(q, qin)[0]
        assert np.max(np.abs(vals[clamped])) > max(abs(v) for v in want[clamped] if np.isfinite(v)), t  # the clamp bites
        got = (vals[next(c for c in cons[t] if c.op_type == "QuantizeLinear").output[0]].astype(np.int64) - z) * s
        assert np.max(np.abs(got - numpy_out[t](vals[clamped]))) <= 1.01 * (s / 2 + s_in / 2), t  # slopes <= 1


def test_a_tensor_compared_within_its_readers_range_says_so_in_the_snapshot(tmp_path):
    """analyze compares `s` (read only by a Relu) clipped to [0, inf); the manifest records it, and the figure is the
    cosine of the dumped arrays clipped so (numpy), not of the raw ones."""
    model = npu_models.saturating_readers()
    path = tmp_path / "sat.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 4)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output
    res = hybridq.analyze(path, q, listing, dump=tmp_path / "snap")
    doc = json.loads((tmp_path / "snap" / "manifest.json").read_text())["tensors"]
    assert doc["s"]["compared_within"] == [0.0, None] and doc["cd"]["compared_within"] is None
    assert any("compared_within" in n and "s to [0, inf]" in n for n in res.notes), res.notes
    f, qv = np.load(tmp_path / "snap" / "fp32" / "s.npy"), np.load(tmp_path / "snap" / "quant" / "s.npy")
    assert (f < 0).any()

    def cos(a, b):
        a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    clipped = np.mean([cos(np.maximum(f[i], 0), np.maximum(qv[i], 0)) for i in range(len(f))])
    raw = np.mean([cos(f[i], qv[i]) for i in range(len(f))])
    assert doc["s"]["entire"]["cosine"] == pytest.approx(clipped, abs=1e-6) and abs(clipped - raw) > 1e-3


def test_concat_input_read_elsewhere_keeps_its_own_parameters(tmp_path):
    """RKNN's det cfg: a Concat's inputs keep their scales, requantized into the output's. hybridq shares only the
    inputs the Concat alone reads (the same integers); an input other ops read keeps its finer grid (numpy requantization)."""
    path = tmp_path / "cat.onnx"
    onnx.save(npu_models.concat_with_shared_input(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    _, cons = _index(q)
    qnode = {t: next(c for c in cons[t] if c.op_type == "QuantizeLinear") for t in ("ca", "cb", "cat")}
    (sa, za), (sb, zb), (so, zo) = (_params(q, qnode[t]) for t in ("ca", "cb", "cat"))
    assert (sb, zb) == (so, zo) and sa < so / 2  # cb shares the Concat's grid; ca, read by a Neg too, keeps its own
    x = np.random.default_rng(6).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    qa, qb, qo = (vals[qnode[t].output[0]].astype(np.int64) for t in ("ca", "cb", "cat"))
    want = np.concatenate([np.clip(np.rint((qa - za) * sa / so) + zo, 0, 255), qb], axis=1)
    assert np.max(np.abs(want - qo)) <= 1 and np.mean(want == qo) >= 0.99  # float32 ties only
    np.testing.assert_allclose(run(q, {"x": x})[1], -(qa - za) * sa, atol=1e-6)  # ca's other reader sees its own grid


def test_conv_affine_folds_into_the_conv(tmp_path):
    """Conv -> Mul/Add by per-channel constants is one NPU layer (RKNN's det cfg quantizes only the Add's output):
    no Q/DQ in between; the int8 output is numpy's folded Conv (int8 weights per channel, int32 bias), rounded once."""
    model = npu_models.conv_affine_chain()
    path = tmp_path / "aff.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    quantized = {nd.input[0] for nd in q.graph.node if nd.op_type == "QuantizeLinear"}
    assert {"a1", "c2", "m2"} <= quantized and not {"c1", "m1"} & quantized

    x = np.random.default_rng(7).normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    vals = _quantized_values(q, x)
    _, cons = _index(q)
    qx = next(c for c in cons["x"] if c.op_type == "QuantizeLinear")
    sx, zx = _params(q, qx)
    xd = (vals[qx.output[0]].astype(np.int64) - zx) * sx
    inits = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w = inits["w1"][:, :, 0, 0]
    sw = np.abs(w).max(axis=1) / 127  # int8 symmetric per output channel
    bias = np.rint(inits["b1"] / (sx * sw)) * sx * sw  # int32 bias on the accumulator's grid
    conv = np.einsum("oc,nchw->nohw", np.rint(w / sw[:, None]) * sw[:, None], xd) + bias[None, :, None, None]
    folded = conv * inits["a"][None] + inits["c"]
    qo = next(c for c in cons["a1"] if c.op_type == "QuantizeLinear")
    so, zo = _params(q, qo)
    want = np.clip(np.rint(folded / so) + zo, 0, 255)
    got = vals[qo.output[0]].astype(np.int64)
    assert np.max(np.abs(want - got)) <= 1 and np.mean(want == got) >= 0.99  # float32 vs float64 at ties only


def test_a_concat_kept_float16_shares_no_grid_with_its_inputs(tmp_path):
    """The sweep's YOLO-style head: the int8 Concat of boxes (hundreds) and sigmoid scores (0-1) puts the scores on the
    boxes' grid. Keeping the Concat float16 must give the scores their own grid again (it was still shared), so the
    float16 fix a user or the proposal picks reaches the output: scores' scale from their calibrated range (numpy)."""
    path = tmp_path / "head.onnx"
    onnx.save(models.detector_head(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16, 16)}, 8)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    xs = [np.load(tmp_path / "data" / ln) for ln in listing.read_text().split() if ln.endswith(".npy")]
    probe = models.detector_head()
    probe.graph.output.append(onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, None))
    fp32 = [run(probe, {"x": x})[1] for x in xs]
    lo, hi = min(0.0, min(float(s.min()) for s in fp32)), max(0.0, max(float(s.max()) for s in fp32))

    def scores_scale(cfg_text: str, name: str) -> float:
        r1.cfg.write_text(cfg_text)
        q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / name).output))
        return _params(q, next(c for c in _index(q)[1]["scores"] if c.op_type == "QuantizeLinear"))[0]

    text = r1.cfg.read_text()
    assert scores_scale(text, "int8.onnx") > 100 * (hi - lo) / 255  # the Concat's grid, boxes and all
    fixed = text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  concat: float16")
    assert scores_scale(fixed, "f16.onnx") == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_cpu_to_npu_is_refused_when_a_tensor_was_observed_on_the_first_batches_only(tmp_path):
    """step1 for cpu observes the tensors no layer quantizes for min/max on the first 8 samples only: an npu build from
    them clipped the residual Add's range to those samples (the sweep's case), so the change is refused."""
    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 12)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False})
    cfg = Path(r1.cfg)
    cfg.write_text(cfg.read_text().replace("target: cpu", "target: npu"))
    with pytest.raises(ConfigError, match=r"step1 calibrated this model for 'cpu': \d+ tensor\(s\) the npu target quantizes have no usable"):
        hybridq.step2(r1.model, r1.data, cfg, tmp_path / "q.onnx")


def test_a_float32_layer_of_an_npu_model_stays_float_in_the_simulation(tmp_path):
    """ONNX Runtime's WeightBiasQuantization would quantize a float32 layer that reads a DequantizeLinear and feeds a
    QuantizeLinear (an npu float32 fallback); the exact sessions hybridq measures with leave it float, as onnx.reference does."""
    from hybridq import _runtime

    rng = np.random.default_rng(4)
    w1, w2 = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h0"], name="conv0"), helper.make_node("Conv", ["h0", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "three_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32), "w0"), numpy_helper.from_array(w1, "w1"),
                               numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
                               numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 4)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"})
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv1: float32"))
    q = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    assert any(n.op_type == "Conv" and n.name == "conv1" and n.input[1] == "w1" for n in q.graph.node), "conv1 keeps its float weight"
    x = np.load(listing.parent / "x_0.npy")
    want = ReferenceEvaluator(convert_opset(q, 21)).run(None, {"x": x})[0]
    got = _runtime.session(q, exact_int8=True).run(None, {"x": x})[0]
    plain = _runtime.session(q).run(None, {"x": x})[0]  # ORT's default: conv1's weights quantized by WeightBiasQuantization
    assert np.abs(got - want).max() < 0.2 * np.abs(plain - want).max()
    assert np.mean(np.isclose(got, want, atol=1e-5)) > 0.95  # the rest: int8 kernels against float Q/DQ, a rounding apart


@pytest.mark.parametrize("attrs, floor", [({"alpha": 1 / 6, "beta": 0.5}, -3.0), ({}, -2.5), ({"alpha": 0.1, "beta": 0.5}, -5.0),
                                          ({"alpha": -0.2, "beta": 0.5}, None)])
def test_a_hard_sigmoid_gate_floors_its_input_where_it_reaches_zero(attrs, floor):
    """x * HardSigmoid(x) is 0 below -beta/alpha (ONNX's defaults 0.2 and 0.5): the range floor of x, measured on the
    op itself with numpy; a negative alpha has no such point and no floor."""
    n = helper.make_node
    nodes = [n("HardSigmoid", ["x"], ["g"], name="gate", **attrs), n("Mul", ["x", "g"], ["y"], name="mul")]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])]),
                          opset_imports=[helper.make_opsetid("", 13)])
    got = patterns.hard_swish_floors(GraphView(m)).get("x")
    if floor is None:
        assert got is None
        return
    assert got == pytest.approx(floor)
    x = np.concatenate([np.linspace(got - 3, got, 301), [got + 0.01]])
    hs = x * np.clip(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1)
    assert np.all(np.abs(hs[:-1]) <= 1e-6) and abs(hs[-1]) > 1e-4  # zero up to the floor, not just above it


def test_a_float_layer_between_qdq_of_a_cpu_model_is_simulated_as_onnx_runtime_runs_it(tmp_path):
    """On cpu, ONNX Runtime quantizes a float layer that reads a DequantizeLinear and feeds a QuantizeLinear when it
    loads the model (WeightBiasQuantization): step2 says so, and the exact sessions analyze and the benches measure with
    compute what a plain ONNX Runtime session computes (only an npu model's float layers stay float there)."""
    from hybridq import _runtime

    rng = np.random.default_rng(1)
    nodes, inits, cur = [], [], "x"
    for i in range(3):  # conv a1's output is also a graph output: step2 leaves that layer float between Q/DQ
        nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"a{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), f"b{i}")]
        cur = f"r{i}"
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("r2", "a1")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])], outs, inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 4)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False})
    res = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    q = onnx.load(str(res.output))
    between = _runtime.float_layers_between_qdq(q)
    assert between and all(any(f"layer '{n}' is float between" in note for note in res.notes) for n in between)
    x = np.load(listing.parent / "x_0.npy")
    plain = _runtime.session(q).run(None, {"x": x})
    exact = _runtime.session(q, exact_int8=True).run(None, {"x": x})
    for p, e in zip(plain, exact):
        np.testing.assert_array_equal(e, p)


def test_an_edited_range_on_npu_is_what_its_shared_group_takes(tmp_path):
    """On npu a Concat's output and inputs (and reshapes) share one scale; a min/max edited in the cfg on one of them is
    what the whole group gets (it was replaced by the group's widest statistics, silently): scale and zero point as
    numpy computes them for the edited range, and step2 says which tensors follow the edit."""
    from ruamel.yaml import YAML

    rng = np.random.default_rng(15)
    c = 8
    w = lambda n, *s: numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Reshape", ["c1", "shp"], ["r"], name="reshape"),
             helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3", pads=[1] * 4),
             helper.make_node("Concat", ["r", "c3"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv2", pads=[1] * 4)]
    inits = [w("w1", c, c, 3, 3), w("w3", c, c, 3, 3), w("w2", c, 2 * c, 3, 3), numpy_helper.from_array(np.array([1, c, 6, 6], np.int64), "shp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r1 = hybridq.step1(path, models.write_npy_dataset(tmp_path / "data", {"x": (1, c, 6, 6)}, 4), out=tmp_path / "ws",
                       settings={"target": "npu"})
    yaml = YAML()
    doc = yaml.load(r1.cfg.read_text())

    def built(edits: dict[str, tuple[float, float]], name: str):
        """step2 on the cfg with these ranges edited: its result, and (scale, zero point) of each quantized tensor."""
        for t, (lo, hi) in edits.items():
            doc["quantize_parameters"][t]["min"], doc["quantize_parameters"][t]["max"] = [lo], [hi]
        with r1.cfg.open("w") as f:
            yaml.dump(doc, f)
        res = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / name)
        q = onnx.load(str(res.output))
        inits_q = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        return res, {n.input[0]: (float(inits_q[n.input[1]]), int(inits_q[n.input[2]])) for n in q.graph.node
                     if n.op_type == "QuantizeLinear" and n.input[0] in ("r", "c1", "c3", "cat")}

    res, group = built({"cat": (-1.0, 2.0)}, "q.onnx")
    scale = 3.0 / 255
    assert group["cat"] == pytest.approx((scale, round(1.0 / scale)), rel=1e-6)
    shared = [t for t in group if group[t] == group["cat"]]
    assert len(shared) >= 2 and any("'cat' edited" in n and "take the edited range [-1, 2]" in n for n in res.notes)
    # two members of one group (a Reshape's input and output) edited to different ranges: one scale covers both, and
    # step2 warns (it said nothing, and its note listed no tensor)
    res, group = built({"c1": (-0.5, 1.0), "r": (-1.0, 2.0)}, "q2.onnx")
    assert group["c1"][0] == pytest.approx(scale, rel=1e-6) and group["r"] == group["c1"], group
    assert any("'c1' [-0.5, 1], 'r' [-1, 2] are edited to different ranges" in w and "use [-1, 2]" in w for w in res.warnings), res.warnings
    assert not any("share its parameters on this target (one scale through data movement and Concat: )" in n for n in res.notes)


def _additive_mask_attention() -> onnx.ModelProto:
    """scores = x Wq; Softmax(scores + (1 - m) * -10000) Wv, m a 0/1 key mask: on npu the masked sum's int8 grid (a
    step of ~40) wipes out the scores, an int16 one (~0.15) keeps them."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n) for n, s in (("wq", (8, 16)), ("wv", (16, 8)))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("one", 1.0), ("neg", -10000.0))]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["scores"], name="q"), helper.make_node("Sub", ["one", "m"], ["inv"], name="inv"),
             helper.make_node("Mul", ["inv", "neg"], ["ext"], name="ext"), helper.make_node("Add", ["scores", "ext"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1), helper.make_node("MatMul", ["p", "wv"], ["y"], name="v")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8]),
                                       helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_npu_proposal_tries_int16_first_and_fixes_an_additive_mask_with_fewer_layers(tmp_path):
    """npu's ladder (SPEC 6): int16 layers before float16 ones. The masked sum's own output goes int16, which a float16
    layer alone cannot give (its output is requantized to int8 for the Softmax): the float16 fix needs more layers.
    Output cosine checked in ONNX Runtime.
    `--fallback int16` on cpu is refused: no int16 kernels."""
    from hybridq.api import ProposalOptions
    from hybridq.proposal import Target
    from tests.conftest import cosine

    path, rng, lines = tmp_path / "mask.onnx", np.random.default_rng(0), []
    onnx.save(_additive_mask_attention(), path)
    for i in range(12):
        np.save(tmp_path / f"x{i}.npy", rng.normal(0, 1, (1, 4, 8)).astype(np.float32))
        np.save(tmp_path / f"m{i}.npy", (rng.random((1, 1, 16)) > 0.25).astype(np.float32))
        lines.append(f"{tmp_path / f'x{i}.npy'} {tmp_path / f'm{i}.npy'}")
    listing = tmp_path / "dataset.txt"
    listing.write_text("\n".join(lines) + "\n")
    opts = ProposalOptions(Target(cosine=0.99), max_float_fraction=0.5, samples=8)  # 1 of 6 layers: 17 %; npu tries int16 first
    r = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"target": "npu"}, proposal=opts)
    assert r.proposal.layers and set(r.proposal.layers.values()) == {"int16"}, r.proposal.layers
    built = hybridq.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx").output
    plain = hybridq.step1(path, listing, out=tmp_path / "plain", settings={"target": "npu"})
    default = hybridq.step2(plain.model, plain.data, plain.cfg, tmp_path / "d.onnx").output
    feeds = [{"x": rng.normal(0, 1, (1, 4, 8)).astype(np.float32), "m": (rng.random((1, 1, 16)) > 0.25).astype(np.float32)} for _ in range(4)]
    cos = lambda m: min(float(cosine(run(m, f)[0], run(path, f)[0])) for f in feeds)  # noqa: E731
    assert cos(built) > 0.99 > cos(default)
    only16 = hybridq.step1(path, listing, out=tmp_path / "f16", settings={"target": "npu"},
                           proposal=ProposalOptions(Target(cosine=0.99), max_float_fraction=0.5, samples=8, fallback="float16"))
    assert set(only16.proposal.layers.values()) == {"float16"} and len(only16.proposal.layers) > len(r.proposal.layers)
    with pytest.raises(hybridq.errors.InputError, match="int16 is for target npu"):
        hybridq.step1(path, listing, out=tmp_path / "cpu", proposal=ProposalOptions(Target(cosine=0.99), fallback="int16"))


def test_calibration_of_a_model_whose_map_keeps_a_layer_float_between_qdq_runs_that_layer_float():
    """An npu model's float layer between Q/DQ (step2's map: float_between_qdq) stays float in ONNX Runtime only when the
    session sees the map; calibration hands it the model, not bare bytes, so the statistics are those of the float
    Conv: the fold of each batch's values computed here (numpy Q/DQ around a plain ORT Conv)."""
    from hybridq._onnx import QDQ_MAP_KEY
    from hybridq.calibration import calibrate
    from hybridq.observers import HistogramObserver
    from tests.conftest import run

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(8, 4, 3, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.float32(0.02), "s"),
             numpy_helper.from_array(np.uint8(128), "z"), numpy_helper.from_array(np.float32(0.05), "s2"),
             numpy_helper.from_array(np.uint8(128), "z2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q0"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq0"),
             helper.make_node("Conv", ["xd", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s2", "z2"], ["yq"], name="q1"),
             helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["out"], name="dq1"),
             helper.make_node("Relu", ["out"], ["r"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    m.metadata_props.add(key=QDQ_MAP_KEY, value=json.dumps({"float_between_qdq": True}))
    conv = helper.make_model(helper.make_graph([nodes[2]], "c", [helper.make_tensor_value_info("xd", TensorProto.FLOAT, [1, 4, 8, 8])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits[:2]),
                             opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32) * 2} for _ in range(4)]
    expected = HistogramObserver()
    for batch in batches:
        xd = ((np.clip(np.rint(batch["x"] / np.float32(0.02)) + 128, 0, 255) - 128) * np.float32(0.02)).astype(np.float32)
        y = run(conv, {"xd": xd})[0]
        expected.update(((np.clip(np.rint(y / np.float32(0.05)) + 128, 0, 255) - 128) * np.float32(0.05)).astype(np.float32))
    got = calibrate(m, iter(batches), tensors=["out"], histograms={"out"}, threads=1)["out"]
    assert (got.min, got.max, got.count) == (expected.min, expected.max, expected.count)
    assert np.abs(got.counts - expected.counts).sum() <= 2 * expected.counts.sum() // 1000, "float Conv's values, up to rounding ties"
