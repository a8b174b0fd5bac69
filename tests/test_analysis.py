"""analyze(): entire vs single error, identity through the QDQ map or the graph, snapshots.

Expected values come from numpy and ONNX's reference evaluator or a plain
ONNX Runtime session, never from hybridq itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import hybridq.analysis as an
from hybridq.analysis import QDQ_MAP_KEY, AnalysisOptions, analyze, plan_analysis
from hybridq._onnx import tensor_bytes
from hybridq.analysis import engine, running
from hybridq.api import analyze_samples
from hybridq.errors import ArtifactMismatchError, HybridqError, InputError, ModelError
from hybridq.kernels import SATURATION_NOTE
from hybridq.metrics import fused_kernel
from hybridq.report import render_csv, render_txt
from hybridq.snapshot import load_arrays, load_snapshot, safe_names
from tests.conftest import exact_options

C2 = "stage 1/c2:0"  # a tensor name that is not a safe file name
SHAPES = {"conv1": (4, 2), "conv2": (4, 4), "conv3": (3, 4)}  # (out, in) channels
OUTS = {"conv1": "c1", "conv2": C2, "conv3": "c3"}
INS = {"conv1": "x", "conv2": "c1", "conv3": C2}


def _weights() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        n: (
            (rng.normal(size=(co, ci, 3, 3)) * 0.4).astype(np.float32),
            (rng.normal(size=(co,)) * 0.1).astype(np.float32),
        )
        for n, (co, ci) in SHAPES.items()
    }


W = _weights()


def _model(nodes: list[onnx.NodeProto], inits: list[TP], opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 6, 6])],
        [h.make_tensor_value_info("c3", TP.FLOAT, [1, 3, 6, 6])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def float_model() -> onnx.ModelProto:
    nodes, inits = [], []
    for n in SHAPES:
        w, b = W[n]
        inits += [nh.from_array(w, f"{n}.w"), nh.from_array(b, f"{n}.b")]
        nodes.append(h.make_node("Conv", [INS[n], f"{n}.w", f"{n}.b"], [OUTS[n]], name=n, pads=[1, 1, 1, 1]))
    return _model(nodes, inits)


def samples(n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 2, 6, 6)).astype(np.float32)} for _ in range(n)]


def fp32_values(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ref = ReferenceEvaluator(float_model())
    return dict(zip(["c1", C2, "c3"], ref.run(["c1", C2, "c3"], feed)))


def act_scale(name: str) -> float:
    """Symmetric int8 scale from the fp32 range over the test samples."""
    return float(max(np.abs(fp32_values(s)[name]).max() for s in samples())) / 127


WEIGHT_SCALE = {n: float(np.abs(W[n][0]).max()) / 127 for n in SHAPES}
WEIGHT_SCALE["conv2"] = float(np.abs(W["conv2"][0]).max()) / 1.5  # terrible: weights become -1, 0, 1 steps
ACT_SCALE = {"c1": act_scale("c1"), C2: act_scale(C2)}


def fake_quant(x: np.ndarray, scale: float, lo: int = -128, hi: int = 127) -> np.ndarray:
    """numpy QuantizeLinear + DequantizeLinear, zero point 0 (round half to even, like ONNX)."""
    return (np.clip(np.round(x / np.float32(scale)), lo, hi) * np.float32(scale)).astype(np.float32)


def quant_model(with_map: bool) -> onnx.ModelProto:
    """step2's layout: weights int8 + DQ; c1 and c2 quantized Q -> DQ -> t_dq; c3 (output) float."""
    nodes, inits = [], []
    for n in SHAPES:
        w, b = W[n]
        s = WEIGHT_SCALE[n]
        wq = np.clip(np.round(w / np.float32(s)), -127, 127).astype(np.int8)
        inits += [
            nh.from_array(wq, f"{n}.w_quantized"),
            nh.from_array(np.array(s, np.float32), f"{n}.w_scale"),
            nh.from_array(np.array(0, np.int8), f"{n}.w_zero_point"),
            nh.from_array(b, f"{n}.b"),
        ]
        nodes.append(
            h.make_node(
                "DequantizeLinear",
                [f"{n}.w_quantized", f"{n}.w_scale", f"{n}.w_zero_point"],
                [f"{n}.w_dq"],
                name=f"{n}.w_DequantizeLinear",
            )
        )
        src = INS[n] if n == "conv1" else f"{INS[n]}_dq"
        nodes.append(h.make_node("Conv", [src, f"{n}.w_dq", f"{n}.b"], [OUTS[n]], name=n, pads=[1, 1, 1, 1]))
        t = OUTS[n]
        if t in ACT_SCALE:
            inits += [
                nh.from_array(np.array(ACT_SCALE[t], np.float32), f"{t}_scale"),
                nh.from_array(np.array(0, np.int8), f"{t}_zero_point"),
            ]
            nodes += [
                h.make_node("QuantizeLinear", [t, f"{t}_scale", f"{t}_zero_point"], [f"{t}_q"], name=f"{t}_Q"),
                h.make_node("DequantizeLinear", [f"{t}_q", f"{t}_scale", f"{t}_zero_point"], [f"{t}_dq"], name=f"{t}_DQ"),
            ]
    m = _model(nodes, inits, opset=19)  # the reference evaluator runs DequantizeLinear from opset 19
    if with_map:
        qmap = {
            "tensors": {"c1": "c1_dq", C2: f"{C2}_dq", "c3": "c3"},
            "layers": {n: {"op": "Conv", "precision": "int8"} for n in SHAPES},
        }
        onnx.helper.set_model_props(m, {QDQ_MAP_KEY: json.dumps(qmap)})
    return m


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def expected_conv2_single(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """conv2 alone: fp32 c1 -> int8 fake quant -> conv with the dequantized bad weights -> fake quant."""
    fp = fp32_values(feed)
    s = WEIGHT_SCALE["conv2"]
    w, b = W["conv2"]
    wdq = (np.clip(np.round(w / np.float32(s)), -127, 127) * np.float32(s)).astype(np.float32)
    conv = ReferenceEvaluator(
        h.make_model(
            h.make_graph(
                [h.make_node("Conv", ["i", "w", "b"], ["o"], pads=[1, 1, 1, 1])],
                "one",
                [h.make_tensor_value_info("i", TP.FLOAT, None)],
                [h.make_tensor_value_info("o", TP.FLOAT, None)],
                [nh.from_array(wdq, "w"), nh.from_array(b, "b")],
            ),
            opset_imports=[h.make_opsetid("", 17)],
        )
    )
    (out,) = conv.run(None, {"i": fake_quant(fp["c1"], ACT_SCALE["c1"])})
    return fp[C2], fake_quant(out, ACT_SCALE[C2])


@pytest.mark.parametrize("with_map", [True, False], ids=["qdq_map", "structural"])
def test_single_flags_the_lossy_layer_and_entire_propagates(with_map: bool) -> None:
    data = samples()
    result = analyze(float_model(), quant_model(with_map), data)
    by = {layer.tensor: layer for layer in result.layers}
    assert list(by) == ["c1", C2, "c3"]  # graph order
    assert [by[t].layer for t in by] == ["conv1", "conv2", "conv3"]
    assert by[C2].quant_tensor == f"{C2}_dq"
    assert all(layer.single is not None for layer in result.layers)
    single = {t: layer.single.cosine for t, layer in by.items() if layer.single}
    entire = {t: layer.entire.cosine for t, layer in by.items()}
    # the layer with the terrible weight scale is the only one that adds error ...
    assert single[C2] < 0.95
    assert single["c1"] > 0.999 and single["c3"] > 0.999
    assert result.worst(1)[0].tensor == C2
    # ... and its error reaches everything downstream
    assert entire["c1"] > 0.999
    assert entire[C2] < 0.95 and entire["c3"] < 0.95
    assert entire["c3"] < single["c3"] - 0.05

    # single of conv2 against an independent numpy / reference-evaluator computation
    want = np.mean([np_cos(*expected_conv2_single(s)) for s in data])
    assert single[C2] == pytest.approx(want, abs=1e-4)
    # entire against the reference evaluator on the quantized model
    qref = ReferenceEvaluator(quant_model(with_map))
    for t, view in (("c1", "c1_dq"), (C2, f"{C2}_dq"), ("c3", "c3")):
        want = np.mean([np_cos(fp32_values(s)[t], qref.run([view], s)[0]) for s in data])
        assert entire[t] == pytest.approx(want, abs=1e-4), t
    assert by["c1"].precision == ("int8" if with_map else None)


def test_samples_measured_side_by_side_keep_their_order() -> None:
    """Two samples in flight (worker processes on Linux) give each sample's own numbers, in sample order."""
    rng = np.random.default_rng(5)
    # samples scaled far apart: each has its own entire error, so a swap would show
    data = [{"x": (rng.normal(size=(1, 2, 6, 6)) * k).astype(np.float32)} for k in (0.05, 3.0, 0.3, 1.0, 8.0)]
    side = analyze(float_model(), quant_model(True), iter(data), options=AnalysisOptions(workers=2))
    alone = analyze(float_model(), quant_model(True), iter(data), options=AnalysisOptions(workers=1))
    for a, b in zip(side.layers, alone.layers):
        assert a.entire.per_sample == b.entire.per_sample and a.single.per_sample == b.single.per_sample, a.tensor
    # the output's per-sample cosines, independently: plain ONNX Runtime sessions, metrics in float64 numpy
    fs = ort.InferenceSession(float_model().SerializeToString())
    qs = ort.InferenceSession(quant_model(True).SerializeToString(), exact_options())
    want = [np_cos(fs.run(None, s)[0], qs.run(None, s)[0]) for s in data]
    (out,) = side.output_layers()
    assert out.entire.per_sample["cosine"] == pytest.approx(want, abs=1e-6)
    assert len(set(np.round(want, 4))) == len(data)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_graph_onnx_runtime_cannot_load_is_a_model_error(workers: int) -> None:
    """Also when the sessions are made in worker processes: the error reaches the caller, not a traceback."""
    fm, qm = float_model(), quant_model(True)
    for m in (fm, qm):
        m.graph.node.append(h.make_node("Weird", ["c3"], ["w"], domain="foo.bar"))
        m.opset_import.append(h.make_opsetid("foo.bar", 1))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load.*foo.bar:Weird"):
        analyze(fm, qm, samples(3), options=AnalysisOptions(workers=workers, fork_min_samples=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes are forked on Linux only")
def test_few_samples_run_on_threads_and_many_or_uncounted_in_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few samples run on threads; more on a thread and forked worker processes; the figures are the same either way."""
    used = []
    real = running.executor

    @contextlib.contextmanager
    def spy(work, workers, count=None):
        with real(work, workers, count) as (pool, w, run):
            used.append(type(pool).__name__)
            yield pool, w, run

    monkeypatch.setattr(engine, "executor", spy)
    fused_kernel()  # every run below then sums by the same kernel (numba loaded), whichever tests ran before this one
    data = samples(4)
    few = analyze(float_model(), quant_model(True), data, options=AnalysisOptions(workers=2, fork_min_samples=5))
    many = analyze(float_model(), quant_model(True), data, options=AnalysisOptions(workers=2, fork_min_samples=4))
    uncounted = analyze(float_model(), quant_model(True), iter(data), options=AnalysisOptions(workers=2))
    large = analyze(float_model(), quant_model(True), data, options=AnalysisOptions(workers=2, fork_limit=1))  # a graph "too large" to fork
    assert used == ["ThreadPoolExecutor", "MixedPool", "MixedPool", "ThreadPoolExecutor"]
    for a, b, c, d in zip(few.layers, many.layers, uncounted.layers, large.layers):
        assert a.entire.per_sample == b.entire.per_sample == c.entire.per_sample == d.entire.per_sample, a.tensor


def test_tensor_bytes_counts_initializers_constants_and_subgraphs() -> None:
    """The fork limit's measure: every tensor's serialized size, wherever it sits, which is nearly the model's own size."""
    w, c, inner = (np.arange(n, dtype=np.float32) for n in (1000, 300, 200))
    then = h.make_graph([h.make_node("Constant", [], ["t"], value=nh.from_array(inner, "inner"))], "then", [],
                        [h.make_tensor_value_info("t", TP.FLOAT, [200])])
    nodes = [h.make_node("Constant", [], ["c"], value=nh.from_array(c, "c")),
             h.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("cond", TP.BOOL, [])], [h.make_tensor_value_info("y", TP.FLOAT, [200])],
                     initializer=[nh.from_array(w, "w")])
    m = h.make_model(g)
    expected = sum(nh.from_array(a, n).ByteSize() for a, n in ((w, "w"), (c, "c"), (inner, "inner"), (inner, "inner")))
    assert tensor_bytes(m) == expected
    assert 0.95 * m.ByteSize() <= tensor_bytes(m) <= m.ByteSize()


def test_sessions_opened_side_by_side_give_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment sessions opened on one thread per core measure what sessions opened one by one measure."""
    data = samples(3)
    opts = AnalysisOptions(workers=1, segment_bytes=1.0)  # a segment per compared tensor: many sessions
    opened: list[int] = []
    real = running._open_all

    def spy(segments, what, host_int8, threads=0):  # type: ignore[no-untyped-def]
        opened.append(len(segments))
        return real(segments, what, host_int8, threads)

    monkeypatch.setattr(running, "_open_all", spy)
    monkeypatch.setattr(running._runtime, "cores", lambda: 1)
    alone = analyze(float_model(), quant_model(True), data, options=opts)
    monkeypatch.setattr(running._runtime, "cores", lambda: 4)
    side = analyze(float_model(), quant_model(True), data, options=opts)
    assert opened[0] == opened[1] > 2
    assert [(a.tensor, a.shape, a.entire, a.single) for a in alone.layers] == [(b.tensor, b.shape, b.entire, b.single) for b in side.layers]


def test_analyze_pauses_the_cyclic_gc_and_restores_it() -> None:
    import gc

    seen: list[bool] = []
    analyze(float_model(), quant_model(True), samples(2), on_sample=lambda: seen.append(gc.isenabled()))
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        analyze(float_model(), quant_model(True), samples(1))
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def _die(sample: dict[str, np.ndarray], n: int) -> None:
    os._exit(3)  # a worker killed mid-sample (the OOM killer, say)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes are forked on Linux only")
def test_a_worker_process_that_dies_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running, "_child_sample", _die)
    with pytest.raises(HybridqError, match="worker process of the analysis ended abruptly.*taskset"):
        analyze(float_model(), quant_model(True), samples(4), options=AnalysisOptions(workers=2, fork_min_samples=0))


class RecordingSink:
    """A SampleSink that records what the engine hands it, in order."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    def start(self, tensors: list[str]) -> None:
        self.log.append(("start", list(tensors)))

    def add_sample(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.log.append(("sample", {t: (a.copy(), b.copy()) for t, (a, b) in arrays.items()}))

    def finish(self, result: object) -> None:
        self.log.append(("finish", result))

    def abort(self) -> None:
        self.log.append(("abort",))


def test_the_engine_writes_no_file_and_streams_each_sample_to_its_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = samples(4)
    log: list[tuple] = []

    def pulled() -> Iterator[dict[str, np.ndarray]]:
        for i, s in enumerate(data):
            log.append(("pulled", i))
            yield s

    result = analyze(float_model(), quant_model(True), pulled(), sink=RecordingSink(log))
    assert list(tmp_path.iterdir()) == []  # the engine writes nothing; api.analyze_samples writes the snapshot
    kinds = [e[0] for e in log if e[0] != "pulled"]
    assert kinds == ["start", "sample", "sample", "sample", "sample", "finish"]
    assert log[[e[0] for e in log].index("start")][1] == [layer.tensor for layer in result.layers]
    # streamed: the first sample reaches the sink before the last one is read from the dataset
    assert log.index(next(e for e in log if e[0] == "sample")) < log.index(("pulled", 3))
    # the arrays handed over are the fp32 tensor and its quant view of that sample
    first = next(e[1] for e in log if e[0] == "sample")
    np.testing.assert_allclose(first["c1"][0], fp32_values(data[0])["c1"], rtol=1e-5, atol=1e-6)


def test_a_failed_analysis_aborts_its_sink() -> None:
    log: list[tuple] = []
    bad = [*samples(2), {"x": np.zeros((1, 2, 6, 6), np.float64)}]
    with pytest.raises(InputError, match="sample 2"):
        analyze(float_model(), quant_model(True), bad, sink=RecordingSink(log))
    assert [e[0] for e in log] == ["start", "sample", "sample", "abort"]


def test_models_given_as_protos_are_not_modified() -> None:
    fm, qm = float_model(), quant_model(True)
    before = (fm.SerializeToString(), qm.SerializeToString())
    analyze(fm, qm, samples(1))
    assert (fm.SerializeToString(), qm.SerializeToString()) == before


def test_float16_layer_is_recognised_structurally() -> None:
    # conv2 kept in float16: Cast(to fp16) on its input, fp16 weights, Cast(to float) writes the original name
    qm = quant_model(False)
    g = qm.graph
    keep = [n for n in g.node if not n.name.startswith(("conv2", C2))]
    w, b = W["conv2"]
    g.initializer.extend([nh.from_array(w.astype(np.float16), "conv2.w_fp16"), nh.from_array(b.astype(np.float16), "conv2.b_fp16")])
    fp16 = [
        h.make_node("Cast", ["c1_dq"], ["c1_fp16"], name="conv2_in_cast", to=TP.FLOAT16),
        h.make_node("Conv", ["c1_fp16", "conv2.w_fp16", "conv2.b_fp16"], ["c2_fp16"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Cast", ["c2_fp16"], [C2], name="conv2_out_cast", to=TP.FLOAT),
    ]
    conv3 = next(n for n in keep if n.name == "conv3")
    conv3.input[0] = C2
    del g.node[:]
    g.node.extend([n for n in keep if n.name != "conv3"] + fp16 + [conv3])
    onnx.checker.check_model(qm)
    result = analyze(float_model(), qm, samples(2))
    by = {layer.tensor: layer for layer in result.layers}
    assert by[C2].quant_tensor == C2
    assert by[C2].single is not None
    # fp16 of an int8-quantized input: close to fp32 but not exact
    assert 0.999 < by[C2].single.cosine < 1.0
    assert by[C2].entire.cosine > 0.999


def _ort_model() -> onnx.ModelProto:
    """A conv -> relu -> conv -> relu -> conv model, for onnxruntime's quantize_static."""
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    chans = [(3, 6), (6, 6), (6, 4)]
    src = "x"
    for i, (ci, co) in enumerate(chans, 1):
        inits += [
            nh.from_array((rng.normal(size=(co, ci, 3, 3)) * 0.3).astype(np.float32), f"w{i}"),
            nh.from_array((rng.normal(size=(co,)) * 0.1).astype(np.float32), f"b{i}"),
        ]
        nodes.append(h.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"conv{i}_out"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        src = f"conv{i}_out"
        if i < 3:
            nodes.append(h.make_node("Relu", [src], [f"relu{i}_out"], name=f"relu{i}"))
            src = f"relu{i}_out"
    g = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
        [h.make_tensor_value_info(src, TP.FLOAT, [1, 4, 8, 8])], inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def ort_quantized(tmp_path: Path, seed: int) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """:func:`_ort_model` and ONNX Runtime's quantize_static QDQ model of it on disk, with 3 fresh samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    fpath, qpath = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_ort_model(), fpath)
    rng = np.random.default_rng(seed)
    calib = iter([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(calib, None)

    quantize_static(str(fpath), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return fpath, qpath, [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]


def test_foreign_qdq_model_from_onnxruntime(tmp_path: Path) -> None:
    fpath, qpath, data = ort_quantized(tmp_path, 1)
    result = analyze_samples(fpath, qpath, data, dump=tmp_path / "snap")

    fs, qs = ort.InferenceSession(str(fpath)), ort.InferenceSession(str(qpath), exact_options())
    f_out = [fs.run(None, s)[0] for s in data]
    q_out = [qs.run(None, s)[0] for s in data]
    out = result.output_layers()
    assert [o.tensor for o in out] == ["conv3_out"]
    want = np.mean([np_cos(a, b) for a, b in zip(f_out, q_out)])
    assert out[0].entire.cosine == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the quantized outputs used are exactly those of a plain session (QDQ groups fused as deployed)
    dumped = np.load(tmp_path / "snap" / out[0].quant_file)
    np.testing.assert_array_equal(dumped, np.stack(q_out))
    # identity recovered from the graph: ORT renames the producer of a graph output
    assert [layer.tensor for layer in result.layers] == ["relu1_out", "relu2_out", "conv3_out"]
    assert all(layer.single is not None for layer in result.layers)
    assert all(0.99 < layer.single.cosine <= 1.0 for layer in result.layers if layer.single)
    assert [n for n in result.notes if n != SATURATION_NOTE] == []  # that one only on x86 without VNNI


def test_snapshot_round_trip_and_numpy_recomputation(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    result = analyze_samples(float_model(), quant_model(True), samples(3), dump=snap)
    assert sorted(p.name for p in snap.iterdir()) == [
        "error_analysis.csv", "error_analysis.png", "error_analysis.txt", "fp32", "manifest.json", "quant", "report.html",
    ]
    assert not [p for p in snap.rglob(".*")]  # no temporary file left behind
    manifest = json.loads((snap / "manifest.json").read_text())
    entry = manifest["tensors"][C2]
    assert entry["fp32"] == f"fp32/{safe_names([C2])[C2]}.npy" == "fp32/stage_1_c2_0.npy"
    assert set(entry["entire"]) >= {"cosine", "euclid", "snr_db", "max_abs"}

    back = load_snapshot(snap)
    assert back.to_dict() == result.to_dict()
    # `analyze --from DIR` renders the same table (and, told the snapshot's path, the same verdict) without a model
    assert render_txt(back, v=an.judge(back, snapshot=str(snap))) == (snap / "error_analysis.txt").read_text()
    assert render_csv(back) == (snap / "error_analysis.csv").read_text()

    for layer in back.layers:
        a, b = load_arrays(snap, layer.tensor)
        assert a.shape == (3, *layer.shape) and b.shape == a.shape
        want = np.mean([np_cos(a[i], b[i]) for i in range(3)])
        assert layer.entire.cosine == pytest.approx(want, rel=1e-12)
        d = a.astype(np.float64) - b.astype(np.float64)
        assert layer.entire.max_abs == pytest.approx(np.mean([np.abs(d[i]).max() for i in range(3)]), rel=1e-12)
        if layer.tensor not in back.outputs:
            assert layer.slices is None  # only model outputs get the per-slice measure
            continue
        # per-slice measure of the output, recomputed in numpy from the dumped arrays (samples pooled)
        sl = layer.slices
        assert sl is not None and sl.axis == 1 and len(sl.cosine) == layer.shape[1]
        x = np.moveaxis(a.astype(np.float64), 2, 0).reshape(layer.shape[1], -1)
        y = np.moveaxis(b.astype(np.float64), 2, 0).reshape(layer.shape[1], -1)
        cos = (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))
        snr = 10 * np.log10((x * x).sum(1) / ((x - y) ** 2).sum(1))
        assert sl.cosine == pytest.approx(cos.tolist(), rel=1e-12)
        assert sl.snr_db == pytest.approx(snr.tolist(), rel=1e-9)
        assert sl.worst == int(np.argmin(snr))
        # the whole output with the samples pooled (the proposal's figure), and the verdict judges by it
        pooled_cos = float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
        pooled_snr = float(10 * np.log10((x * x).sum() / ((x - y) ** 2).sum()))
        assert layer.pooled == pytest.approx((pooled_cos, pooled_snr), rel=1e-9)
        entry = next(o for o in an.judge(back).outputs if o["tensor"] == layer.tensor)
        assert (entry["cosine"], entry["snr_db"], entry["pooled"]) == (layer.pooled[0], layer.pooled[1], True)
        mean_snr = layer.entire.snr_db
        if abs(mean_snr - pooled_snr) > 1e-6:  # a threshold between the two: the verdict follows the pooled figure
            between = (mean_snr + pooled_snr) / 2
            v = an.judge(back, cos_threshold=-1.0, snr_threshold=min(between, sl.snr_db[sl.worst]))
            assert v.ok or pooled_snr < between


def test_max_bytes_caps_the_dump_but_not_the_metrics(tmp_path: Path) -> None:
    one = 2 * 4 * 36 * 4  # fp32 + quant arrays of c1 for one sample: 2 x (1*4*6*6) float32
    snap = tmp_path / "snap"
    result = analyze_samples(float_model(), quant_model(True), samples(3), dump=snap, max_bytes=one + 10)
    assert result.dumped_samples == 1
    assert result.dump_message is not None and "1 of 3 tensors and 1 of 3 samples" in result.dump_message
    by = {layer.tensor: layer for layer in result.layers}
    assert by["c1"].fp32_file and by[C2].fp32_file is None and by["c3"].quant_file is None
    assert np.load(snap / by["c1"].fp32_file).shape == (1, 1, 4, 6, 6)
    assert all(layer.entire.n_samples == 3 for layer in result.layers)
    assert result.dump_message in (snap / "error_analysis.txt").read_text()
    assert load_snapshot(snap).dump_message == result.dump_message
    assert not [p for p in snap.rglob(".*")]


def test_a_dump_into_an_older_snapshot_replaces_its_arrays_and_keeps_other_files(tmp_path: Path) -> None:
    """Dumping again into a snapshot folder: the older run's arrays that the new one does not write are removed (a
    script reading fp32/*.npy took them for the new run's), files the snapshot did not write stay."""
    snap = tmp_path / "snap"
    analyze_samples(float_model(), quant_model(True), samples(3), dump=snap)
    (snap / "fp32" / "my_notes.txt").write_text("mine")
    (snap / "quant" / "kept.npy").write_bytes(b"not the snapshot's")
    one = 2 * 4 * 36 * 4
    result = analyze_samples(float_model(), quant_model(True), samples(3), dump=snap, max_bytes=one + 10)
    listed = {f for layer in result.layers for f in (layer.fp32_file, layer.quant_file) if f}
    assert listed == {"fp32/c1.npy", "quant/c1.npy"}
    assert {str(p.relative_to(snap)) for p in snap.rglob("*.npy")} == listed | {"quant/kept.npy"}
    assert (snap / "fp32" / "my_notes.txt").read_text() == "mine"

def test_a_dump_without_max_bytes_stops_before_the_disk_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk reports room for one sample's arrays beyond the reserve: the dump stops there, says why, and the metrics
    still cover every sample."""
    from collections import namedtuple

    from hybridq import snapshot

    one = 2 * 4 * 36 * 4 * 3  # fp32 + quant arrays of the three tensors of one sample
    reserve = snapshot.DISK_RESERVE  # a disk of 20 reserves: 5 % of it is the reserve itself
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(snapshot.shutil, "disk_usage", lambda p: usage(20 * reserve, 0, reserve + one + 10))
    result = analyze_samples(float_model(), quant_model(True), samples(3), dump=tmp_path / "snap")
    assert result.dumped_samples == 1 and all(layer.entire.n_samples == 3 for layer in result.layers)
    assert "stopped to keep free space on the disk" in result.dump_message and "--max-bytes" in result.dump_message
    unlimited = analyze_samples(float_model(), quant_model(True), samples(3), dump=tmp_path / "snap2", max_bytes=10 ** 9)
    assert unlimited.dumped_samples == 3 and unlimited.dump_message is None  # --max-bytes chosen: the user's cap rules


def test_plan_is_data_and_deterministic() -> None:
    p1 = plan_analysis(float_model(), quant_model(False))
    p2 = plan_analysis(float_model(), quant_model(False))
    assert p1 == p2
    assert [(t.tensor, t.view, t.source) for t in p1.tensors] == [
        ("c1", "c1_dq", "c1"), (C2, f"{C2}_dq", C2), ("c3", "c3", "c3"),
    ]


def test_safe_names_are_deterministic_and_unique() -> None:
    names = safe_names(["a/b", "a:b", "A_b", "..", "", "x" * 300])
    assert names["a/b"] == "a_b"
    assert len({v.lower() for v in names.values()}) == 6
    assert all(not v.startswith(".") and v for v in names.values())
    assert len(names["x" * 300]) < 140
    assert safe_names(["a/b", "a:b", "A_b", "..", "", "x" * 300]) == names


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no value for model input 'x'"):
        analyze(float_model(), quant_model(True), [{"y": np.zeros((1, 2, 6, 6), np.float32)}])
    with pytest.raises(InputError, match="no samples"):
        analyze(float_model(), quant_model(True), [])
    with pytest.raises(ModelError, match="does not exist"):
        analyze(tmp_path / "missing.onnx", quant_model(True), samples(1))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        analyze(tmp_path / "bad.onnx", quant_model(True), samples(1))
    with pytest.raises(InputError, match="sample 0"):
        analyze(float_model(), quant_model(True), [{"x": np.zeros((1, 2, 6, 6), np.float64)}])
    with pytest.raises(InputError, match="not a snapshot"):
        load_snapshot(tmp_path)


def test_segments_give_the_same_metrics_as_a_plain_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer per segment vs one segment: same numbers, and entire = plain ORT quant session vs fp32, in numpy."""
    from hybridq.metrics import sample_metrics

    fpath, qpath, data = ort_quantized(tmp_path, 2)
    sessions: list[int] = []
    real_runner = running.Runner

    def counting_runner(*args: object) -> object:
        r = real_runner(*args)  # type: ignore[arg-type]
        sessions.append(len(r.sessions))
        return r

    monkeypatch.setattr(running, "Runner", counting_runner)
    # workers=1: sessions made in this process, where they are counted
    split = analyze(fpath, qpath, data, options=AnalysisOptions(workers=1, segment_bytes=0))
    whole = analyze(fpath, qpath, data, options=AnalysisOptions(workers=1, segment_bytes=math.inf))
    assert sessions[0] == len(split.layers) and sessions[1] == 1
    for a, b in zip(split.layers, whole.layers):
        assert a.tensor == b.tensor
        assert a.entire.to_dict(False) == pytest.approx(b.entire.to_dict(False), rel=1e-6, abs=1e-6)
        assert a.single is not None and b.single is not None
        assert a.single.to_dict(False) == pytest.approx(b.single.to_dict(False), rel=1e-6, abs=1e-6)

    # entire, independently: each model with the layer's tensor as an extra output, metrics in float64 numpy
    def session(path: Path, names: list[str]) -> ort.InferenceSession:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(h.make_empty_tensor_value_info(n) for n in names if n not in have)
        return ort.InferenceSession(m.SerializeToString(), exact_options())

    fs = session(fpath, [layer.tensor for layer in split.layers])
    qs = session(qpath, [layer.quant_tensor for layer in split.layers])
    for layer in split.layers:
        want = np.mean([sample_metrics(fs.run([layer.tensor], s)[0], qs.run([layer.quant_tensor], s)[0]) for s in data], axis=0)
        got = [getattr(layer.entire, k) for k in ("cosine", "euclid", "snr_db", "max_abs")]
        assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6), layer.tensor


def test_float_layers_reading_dequantized_tensors_get_no_single_error(tmp_path: Path) -> None:
    """With step2's map, only quantized layers are isolated: the float residual Add adds no error of its own."""
    import hybridq
    from tests import models

    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 6)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws")
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    quant = onnx.load(str(r2.output))
    data = [{"x": np.random.default_rng(i).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for i in range(3)]
    by = {layer.layer: layer for layer in analyze(onnx.load(str(path)), quant, data).layers}
    assert by["add"].single is None and by["add"].entire.cosine < 1.0
    assert by["conv3"].single is not None and by["fc"].single is not None
    # conv2's output is the fp32 model's bn2 tensor (BatchNormalization folded into conv2): still isolated,
    # and the row is named by the node the cfg names (conv2), the folded node kept beside it
    assert "bn2" not in by
    conv2 = by["conv2"]
    assert conv2.precision == "uint8" and conv2.single is not None and conv2.op_type == "Conv"
    assert conv2.folded == "BatchNormalization bn2" and conv2.label == f"conv2 [{conv2.tensor}] uint8"
    assert "# output of conv2" in Path(r1.cfg).read_text()  # the name the cfg uses for that tensor's layer
    # the Q after relu2 (absorbed into conv2's integer kernel) is measured at relu2: a float op whose output
    # is quantized, labelled so
    assert by["relu2"].single is not None and by["relu2"].single.cosine < 1.0
    assert by["relu2"].precision == "float32->uint8"
    # a float op that only reads dequantized tensors runs in float32
    assert by["add"].precision == "float32"
    # without the map (a foreign QDQ model), reading a dequantized tensor counts as quantized
    del quant.metadata_props[:]
    assert {layer.layer: layer for layer in analyze(onnx.load(str(path)), quant, data).layers}["add"].single is not None


def test_a_small_analysis_uses_the_numpy_blocks_and_never_loads_numba(tmp_path, monkeypatch):
    """Below COMPILE_MIN_PAIRS pairs to compare, loading numba (0.1-0.4 s) costs more than its kernel saves: a fresh
    process analysing a small CNN never imports it, and its figures equal those of the compiled kernel."""
    import glob
    import subprocess

    import hybridq
    from hybridq.metrics import COMPILE_MIN_PAIRS, fused_kernel, worth_compiling
    from tests import models

    monkeypatch.delitem(sys.modules, "numba", raising=False)
    assert not worth_compiling(COMPILE_MIN_PAIRS / 10) and worth_compiling(COMPILE_MIN_PAIRS) and worth_compiling(None)
    monkeypatch.undo()
    listing = models.residual_cnn_step1(tmp_path)
    ws = tmp_path / "ws"
    hybridq.step2(ws / "cnn.model", ws / "cnn.data", ws / "cnn.quantization.cfg", tmp_path / "q.onnx")
    script = (
        "import json, sys, numpy as np\n"
        "from hybridq.analysis import analyze\n"
        f"samples = [{{'x': np.load(p)}} for p in sorted(__import__('glob').glob({str(tmp_path / 'data' / 'x_*.npy')!r}))]\n"
        f"res = analyze({str(tmp_path / 'cnn.onnx')!r}, {str(tmp_path / 'q.onnx')!r}, samples)\n"
        "print(json.dumps({'numba': 'numba' in sys.modules, 'rows': [[l.tensor, l.entire.cosine, l.entire.snr_db] for l in res.layers]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["numba"] is False
    assert fused_kernel() is not None  # numba loaded here: this process compares with the compiled kernel
    samples = [{"x": np.load(p)} for p in sorted(glob.glob(str(tmp_path / "data" / "x_*.npy")))]
    here = analyze(tmp_path / "cnn.onnx", tmp_path / "q.onnx", samples)
    assert [r[0] for r in fresh["rows"]] == [l.tensor for l in here.layers] and listing.is_file()
    for (_, cos, snr), l in zip(fresh["rows"], here.layers):
        assert cos == pytest.approx(l.entire.cosine, rel=1e-6, abs=1e-7) and snr == pytest.approx(l.entire.snr_db, rel=1e-5)


def _hard_swish_models(quantize_inside: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32: x -> Conv -> c -> HardSwish as exporters write it (Add 3 from a Constant node, Clip 0..6, Div 6, Mul by c)
    -> y. The quantized model: x through Q/DQ and, with `quantize_inside`, the Add's output too."""
    w = np.random.default_rng(3).normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32)

    def model(head: list[onnx.NodeProto], conv_in: str, mid: list[onnx.NodeProto], clip_in: str) -> onnx.ModelProto:
        nodes = head + [
            h.make_node("Conv", [conv_in, "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            h.make_node("Constant", [], ["three"], value=nh.from_array(np.array(3.0, np.float32))),
            h.make_node("Add", ["c", "three"], ["hs_add"], name="hs_add"),
        ] + mid + [
            h.make_node("Clip", [clip_in, "zero", "six"], ["hs_clip"], name="hs_clip"),
            h.make_node("Div", ["hs_clip", "six"], ["hs_div"], name="hs_div"),
            h.make_node("Mul", ["c", "hs_div"], ["y"], name="hs_mul"),
        ]
        inits = [nh.from_array(w, "w"), nh.from_array(np.array(0.0, np.float32), "zero"), nh.from_array(np.array(6.0, np.float32), "six"),
                 nh.from_array(np.array(0.02, np.float32), "s"), nh.from_array(np.array(0.05, np.float32), "s2"),
                 nh.from_array(np.array(0, np.int8), "z")]
        g = h.make_graph(nodes, "hs", [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 6, 6])], [h.make_tensor_value_info("y", TP.FLOAT, None)],
                         initializer=inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])

    fm = model([], "x", [], "hs_add")
    head = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    inside = [h.make_node("QuantizeLinear", ["hs_add", "s2", "z"], ["aq"]), h.make_node("DequantizeLinear", ["aq", "s2", "z"], ["a_dq"])]
    qm = model(head, "xd", inside, "a_dq") if quantize_inside else model(head, "xd", [], "hs_add")
    return fm, qm


@pytest.mark.parametrize("quantize_inside", [False, True])
def test_an_activation_written_out_is_one_row_unless_quantized_inside(quantize_inside: bool) -> None:
    """A HardSwish exported as Add/Clip/Div/Mul is one row, at its output, naming the nodes inside (RKNN-Toolkit2's one
    HardSwish row), when the quantized model computes it in float; a QuantizeLinear inside lists every tensor. The
    rows' figures are the cosines of ONNX Runtime's outputs either way."""
    fm, qm = _hard_swish_models(quantize_inside)
    data = samples(3)
    res = analyze(fm, qm, data)
    rows = {layer.tensor: layer for layer in res.layers}
    if quantize_inside:
        assert list(rows) == ["c", "hs_add", "hs_clip", "hs_div", "y"] and rows["y"].folded is None
    else:
        assert list(rows) == ["c", "y"]
        assert (rows["y"].op_type, rows["y"].layer, rows["y"].folded) == ("HardSwish", "hs_mul", "Add hs_add, Clip hs_clip, Div hs_div")
        assert any("1 activation(s) written as chains" in n and "HardSwish" in n for n in res.notes)
    views = {t: rows[t].quant_tensor for t in rows}  # a quantized tensor is compared after its Q/DQ
    ref = ort.InferenceSession(_with_outputs(fm, list(views)).SerializeToString(), exact_options())
    got = ort.InferenceSession(_with_outputs(qm, list(views.values())).SerializeToString(), exact_options())
    for t, v in views.items():
        want = np.mean([np_cos(ref.run([t], d)[0], got.run([v], d)[0]) for d in data])
        assert rows[t].entire.cosine == pytest.approx(want, rel=1e-6), t


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(h.make_tensor_value_info(n, TP.FLOAT, None) for n in names)
    return m


def test_a_model_output_also_read_by_a_quantized_layer_is_compared_as_returned(tmp_path: Path) -> None:
    """An output that the next quantized layer also reads (through its Q/DQ) is compared as the quantized model returns
    it, the raw tensor, not the reader's dequantized copy: its row is ONNX Runtime's cosine of the two models' outputs."""
    import hybridq
    from tests import models

    rng = np.random.default_rng(1)
    nodes, inits, cur = [], [], "x"
    for i in range(4):
        nodes += [h.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        bias = np.array([40.0, 0, 0, 0], np.float32) if i == 2 else rng.normal(0, 0.1, 4).astype(np.float32)  # r2: one wide channel
        inits += [nh.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"), nh.from_array(bias, f"b{i}")]
        cur = f"r{i}"
    outs = [h.make_tensor_value_info(n, TP.FLOAT, [1, 4, 8, 8]) for n in ("r2", "r3")]
    fm = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 4, 8, 8])], outs, inits),
                      opset_imports=[h.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(fm, src)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 4, 8, 8)}, 6)
    r1 = hybridq.step1(src, listing, out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False})
    qm = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "r2" for n in qm.graph.node)
    data = [{"x": np.load(listing.parent / f"x_{k}.npy")} for k in range(6)]
    row = {layer.tensor: layer for layer in analyze(fm, qm, data).layers}["r2"]
    fs, qs = ort.InferenceSession(fm.SerializeToString()), ort.InferenceSession(qm.SerializeToString(), exact_options())
    want = np.mean([np_cos(fs.run(["r2"], d)[0], qs.run(["r2"], d)[0]) for d in data])
    assert row.quant_tensor == "r2" and row.entire.cosine == pytest.approx(want, rel=1e-6)


def test_rows_name_the_precision_the_model_quantizes_to(tmp_path: Path) -> None:
    """An int8 (sym) model: the rows of float ops whose output is quantized say 'float32->int8', the type of the
    model's own QuantizeLinear zero points, though on x86 the analysis runs those pairs as uint8 (as ORT does)."""
    import hybridq
    from tests import models

    rng = np.random.default_rng(3)
    nodes, inits, cur = [], [], "x"
    for i in range(3):
        nodes += [h.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += [nh.from_array(rng.normal(0, 0.3, (8, 8 if i else 3, 3, 3)).astype(np.float32), f"w{i}"),
                  nh.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"b{i}")]
        cur = f"r{i}"
    nodes.append(h.make_node("Conv", [cur, "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]))
    inits.append(nh.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w3"))
    fm = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                                   [h.make_tensor_value_info("y", TP.FLOAT, [1, 8, 8, 8])], inits), opset_imports=[h.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(fm, src)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    r1 = hybridq.step1(src, listing, out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False, "dtype": "int8", "qtype": "sym"})
    qm = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    zp = {i.name: i.data_type for i in qm.graph.initializer}
    written = {TP.DataType.Name(zp[n.input[2]]).lower() for n in qm.graph.node if n.op_type == "QuantizeLinear"}
    assert written == {"int8"}
    res = analyze(fm, qm, [{"x": np.load(listing.parent / f"x_{k}.npy")} for k in range(2)])
    labels = {layer.precision for layer in res.layers if layer.op_type == "Relu"}
    assert labels == {"float32->int8"}



def _qdq(src: str, dst: str) -> list[onnx.NodeProto]:
    """QuantizeLinear + DequantizeLinear of ``src`` into ``dst`` (int8, scale ``s``, zero point ``z``)."""
    q = h.make_node("QuantizeLinear", [src, "s", "z"], [f"{dst}_q"])
    return [q, h.make_node("DequantizeLinear", [f"{dst}_q", "s", "z"], [dst])]


def _kept_scores_models(first: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32: x [1, 50] -> Sigmoid -> p; the scores above 0.5 (Greater, NonZero, GatherND) -> kept, of a data-dependent
    length. The quantized model reads x through Q/DQ (scale 0.1) and keeps p's first `first` columns (50: all)."""

    def model(head: list[onnx.NodeProto], src: str, inits: list[TP]) -> onnx.ModelProto:
        nodes = head + [
            h.make_node("Sigmoid", [src], ["p"], name="sigmoid"),
            h.make_node("Greater", ["p", "half"], ["above"], name="greater"),
            h.make_node("NonZero", ["above"], ["nz"], name="nonzero"),
            h.make_node("Transpose", ["nz"], ["idx"], name="transpose", perm=[1, 0]),
            h.make_node("GatherND", ["p", "idx"], ["kept"], name="gather_kept"),
        ]
        inits = [nh.from_array(np.array(0.5, np.float32), "half"), *inits]
        g = h.make_graph(nodes, "kept", [h.make_tensor_value_info("x", TP.FLOAT, [1, 50])],
                         [h.make_tensor_value_info("kept", TP.FLOAT, ["n"])], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

    qdq = [nh.from_array(np.array(0.1, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z")]
    if first < 50:
        cut = [nh.from_array(np.array([0, 0], np.int64), "starts"), nh.from_array(np.array([1, first], np.int64), "ends")]
        qm = model(_qdq("x", "x_dq") + [h.make_node("Slice", ["x_dq", "starts", "ends"], ["x_cut"])], "x_cut", qdq + cut)
    else:
        qm = model(_qdq("x", "x_dq"), "x_dq", qdq)
    return model([], "x", []), qm


def test_a_data_dependent_length_is_left_out_where_it_differs_and_a_static_one_is_an_error() -> None:
    """NonZero keeps fewer scores once x is quantized: that sample is left out with a note, not the whole analysis."""
    fm, qm = _kept_scores_models(50)
    rng = np.random.default_rng(4)
    near = rng.normal(size=(1, 50)).astype(np.float32)
    near[0, :3] = [0.01, 0.02, 0.04]  # quantized to 0: sigmoid 0.5, not above
    far = (np.sign(near) * (0.1 + np.abs(near))).astype(np.float32)  # every |x| >= 0.1: the same scores kept
    data = [{"x": near}, {"x": far}, {"x": near[:, ::-1].copy()}]
    fs, qs = (ort.InferenceSession(_with_outputs(m, ["kept", "p"]).SerializeToString(), exact_options()) for m in (fm, qm))
    f_out, q_out = [fs.run(None, d) for d in data], [qs.run(None, d) for d in data]
    assert [a[0].shape != b[0].shape for a, b in zip(f_out, q_out)] == [True, False, True]
    res = analyze(fm, qm, data)
    rows = {layer.tensor: layer for layer in res.layers}
    assert rows["kept"].entire.cosine == pytest.approx(np_cos(f_out[1][0], q_out[1][0]), rel=1e-6)
    assert rows["kept"].entire.n_samples == 1 and rows["p"].entire.n_samples == 3
    want = np.mean([np_cos(a[1], b[1]) for a, b in zip(f_out, q_out)])
    assert rows["p"].entire.cosine == pytest.approx(want, rel=1e-6)
    told = [n for n in res.notes if "depends on the data" in n]
    assert len(told) == 1 and f"'kept': fp32 {f_out[0][0].shape} vs quantized {q_out[0][0].shape} on sample 0" in told[0]
    assert "not compared on 2 of 3 sample(s)" in told[0]
    with pytest.raises(ArtifactMismatchError, match="not built from this float model"):
        analyze(fm, _kept_scores_models(40)[1], data)  # p: 50 columns against 40, both static


def test_the_worst_sample_of_an_output_left_out_on_some_samples_is_named_by_its_place_in_the_run() -> None:
    """'kept' is left out on sample 0 (NonZero keeps fewer scores once x is quantized) and compared on 1 and 2: the verdict
    names the worse of those two by its index in the run, checked against ONNX Runtime's outputs."""
    from hybridq.analysis.verdict import judge

    fm, qm = _kept_scores_models(50)
    rng = np.random.default_rng(4)
    near = rng.normal(size=(1, 50)).astype(np.float32)
    near[0, :3] = [0.01, 0.02, 0.04]
    far = [(np.sign(v) * (0.1 + np.abs(v))).astype(np.float32) for v in (near, rng.normal(size=(1, 50)) * 3)]
    data = [{"x": near}, {"x": far[0]}, {"x": far[1]}]
    fs, qs = (ort.InferenceSession(_with_outputs(m, ["kept"]).SerializeToString(), exact_options()) for m in (fm, qm))
    f_out, q_out = [fs.run(None, d)[0] for d in data], [qs.run(None, d)[0] for d in data]
    assert [a.shape != b.shape for a, b in zip(f_out, q_out)] == [True, False, False]
    cos = {i: np_cos(f_out[i], q_out[i]) for i in (1, 2)}
    assert abs(cos[1] - cos[2]) > 1e-6  # the two compared samples differ, so the worst is one of them
    res = analyze(fm, qm, data)
    (kept,) = [o for o in judge(res).outputs if o["tensor"] == "kept"]
    worst = min(cos, key=cos.get)
    assert kept["worst_sample"]["index"] == worst
    assert kept["worst_sample"]["cosine"] == pytest.approx(cos[worst], rel=1e-6)


def _reshaped_conv_models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """fp32: x [1, 2, H, W] -> Conv (6 channels) -> Reshape -> y [1, 6, H * W]; quantized: int8 weights, Q/DQ on x, c."""
    w = np.random.default_rng(5).normal(0, 0.5, (6, 2, 3, 3)).astype(np.float32)
    wq = np.clip(np.round(w / 0.01), -127, 127).astype(np.int8)

    def model(nodes: list[onnx.NodeProto], inits: list[TP]) -> onnx.ModelProto:
        nodes = nodes + [h.make_node("Reshape", [nodes[-1].output[0], "shape"], ["y"], name="reshape")]
        inits = [nh.from_array(np.array([0, 6, -1], np.int64), "shape"), *inits]
        g = h.make_graph(nodes, "r", [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, "H", "W"])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [1, 6, None])], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

    fm = model([h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])], [nh.from_array(w, "w")])
    weights = [h.make_node("DequantizeLinear", ["wq", "ws", "z"], ["w_dq"])]
    conv = [h.make_node("Conv", ["x_dq", "w_dq"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    scales = [nh.from_array(np.array(v, np.float32), n) for n, v in (("ws", 0.01), ("s", 0.05))]
    inits = [nh.from_array(wq, "wq"), nh.from_array(np.array(0, np.int8), "z"), *scales]
    return fm, model(_qdq("x", "x_dq") + weights + conv + _qdq("c", "c_dq"), inits)


@pytest.mark.parametrize("sizes, axis", [([(8, 8), (4, 4)], 1), ([(2, 3), (8, 8)], None), ([(8, 8), (1, 1)], None)])
def test_an_output_whose_slice_axis_moves_between_samples_gets_no_per_slice_measure(
    sizes: list[tuple[int, int]], axis: int | None
) -> None:
    """Samples slicing an output along other axes ([1, 6, 6]: 2, [1, 6, 64]: 1) or none ([1, 6, 1]) get no slices."""
    fm, qm = _reshaped_conv_models()
    rng = np.random.default_rng(6)
    data = [{"x": rng.normal(size=(1, 2, *hw)).astype(np.float32)} for hw in sizes]
    res = analyze(fm, qm, data)
    y = {layer.tensor: layer for layer in res.layers}["y"]
    fs, qs = (ort.InferenceSession(m.SerializeToString(), exact_options()) for m in (fm, qm))
    pairs = [(fs.run(None, d)[0].astype(np.float64), qs.run(None, d)[0].astype(np.float64)) for d in data]
    assert y.entire.cosine == pytest.approx(np.mean([np_cos(a, b) for a, b in pairs]), rel=1e-6)
    if axis is None:
        assert y.slices is None
        return
    x = np.concatenate([a[0] for a, _ in pairs], axis=1)  # one axis: each channel pooled over the samples, as numpy sums
    q = np.concatenate([b[0] for _, b in pairs], axis=1)
    assert y.slices is not None and y.slices.axis == axis
    cos = (x * q).sum(1) / np.sqrt((x * x).sum(1) * (q * q).sum(1))
    assert y.slices.cosine == pytest.approx(cos.tolist(), rel=1e-6)
    assert y.slices.snr_db == pytest.approx((10 * np.log10((x * x).sum(1) / ((x - q) ** 2).sum(1))).tolist(), rel=1e-6)


def test_unnamed_float_nodes_are_rows_under_step1_names_not_folds(tmp_path: Path) -> None:
    """A float model whose nodes have no names: step1 names them (Conv_0 ...) and the rows carry those names, as the cfg
    does, without calling the node folded into itself; a BatchNormalization folded into a Conv is still a fold."""
    import hybridq
    from tests import models

    rng = np.random.default_rng(2)
    nodes = [h.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c0", "s", "b", "m", "v"], ["bn"]),
             h.make_node("Relu", ["bn"], ["r0"]), h.make_node("Conv", ["r0", "w1"], ["y"], pads=[1, 1, 1, 1])]
    inits = [nh.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w0"),
             nh.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w1")]
    inits += [nh.from_array(v.astype(np.float32), n) for n, v in
              (("s", rng.uniform(0.5, 1.5, 4)), ("b", rng.normal(0, 0.1, 4)), ("m", rng.normal(0, 0.1, 4)), ("v", rng.uniform(0.5, 1.5, 4)))]
    fm = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                                   [h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])], inits), opset_imports=[h.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(fm, src)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 8, 8)}, 4)
    r1 = hybridq.step1(src, listing, out=tmp_path / "ws", settings={"speed_check": False, "float_stem": False})
    qm = onnx.load(str(hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx").output))
    producer = {n.output[0]: n for n in qm.graph.node}
    rows = {layer.tensor: layer for layer in analyze(fm, qm, [{"x": np.load(listing.parent / f"x_{k}.npy")} for k in range(2)]).layers}
    assert (rows["y"].layer, rows["y"].folded) == (producer["y"].name, None) and rows["y"].layer != "y"
    assert rows["bn"].folded is not None and rows["bn"].op_type == "Conv"


def test_a_snapshot_leaves_out_tensors_whose_shape_changes_between_samples(tmp_path: Path) -> None:
    """Samples of two sizes through a model with dynamic height and width: the feature maps change shape, so their arrays
    are not written (one .npy per tensor holds one shape) and the manifest says so; the pooled output keeps one shape
    and is written, every sample of it, as ONNX Runtime computes it in each model."""
    rng = np.random.default_rng(6)
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("GlobalAveragePool", ["r"], ["y"], name="pool")]
    fm = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, "H", "W"])],
                                   [h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 1, 1])],
                                   [nh.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]),
                      opset_imports=[h.make_opsetid("", 17)])
    qm = onnx.ModelProto()
    qm.CopyFrom(fm)  # the same graph: the snapshot's layout is the point here, not the error
    data = [{"x": rng.normal(0, 1, (1, 3, s, s)).astype(np.float32)} for s in (8, 12, 8)]
    res = analyze_samples(fm, qm, data, dump=tmp_path / "snap")
    assert res.dump_message is not None and "'c'" in res.dump_message and "shape changing" in res.dump_message
    back = load_snapshot(tmp_path / "snap")
    assert {layer.tensor for layer in back.layers if layer.fp32_file} == {"y"}
    got, _ = load_arrays(tmp_path / "snap", "y")
    want = [ort.InferenceSession(fm.SerializeToString()).run(["y"], d)[0] for d in data]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-6, atol=1e-7)
