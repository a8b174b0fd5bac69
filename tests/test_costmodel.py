"""The `target: cpu` cost model: measured per-layer costs, their cache, and placement by predicted latency."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import hybridq
from hybridq import costmodel, placement
from hybridq._runtime import session
from hybridq.graph import prepare, tensor_shapes
from hybridq.cost import concrete_shapes
from hybridq.placement import CostTable, Layer, choose_int8, predicted_ms
from hybridq.plan import make_plan
from hybridq.settings import Settings
from hybridq.errors import ConfigError
from tests import models
from tests.conftest import cosine, run

SAMPLE = {"x": np.zeros((1, 3, 16, 16), np.float32)}


def _stub(fast_dw: bool = False) -> CostTable:
    """Costs of models.mobile_block: expand and project 3x faster in int8; dw slower unless `fast_dw`."""
    return CostTable(
        fp32={"stem": 0.2, "expand": 1.0, "dw": 0.5, "project": 1.0},
        int8={"stem": 0.4, "expand": 0.3, "dw": 0.4 if fast_dw else 0.9, "project": 0.3},
        quantize={"s_r": 0.05, "e_r": 0.1, "d_r": 0.1}, dequantize={"e_r": 0.1, "d_r": 0.1},
        model_fp32=3.0, source="stub",
    )


def test_placement_keeps_the_layer_where_int8_is_slower_float():
    temp, _ = prepare(models.mobile_block(64))
    plan = make_plan(temp, Settings(), costs=_stub())
    assert plan.layers["dw"].precision == "float32" and "not faster" in plan.layers["dw"].reason
    assert "wd" not in plan.weights
    assert plan.layers["expand"].precision == plan.layers["project"].precision == "default"
    # kernels only (BOUNDARY_WEIGHT 0): 3.0 + (0.3 - 1.0) + (0.3 - 1.0) = 1.6 ms
    assert any("predicted 1.60 ms against 3.00 ms" in n for n in plan.notes)
    assert make_plan(temp, Settings(), costs=_stub(fast_dw=True)).layers["dw"].precision == "default"


def test_float_depthwise_false_overrides_the_cost_model():
    temp, _ = prepare(models.mobile_block(64))
    assert make_plan(temp, Settings(float_depthwise=False), costs=_stub()).layers["dw"].precision == "default"
    assert "depthwise" in make_plan(temp, Settings(float_depthwise=True), costs=_stub(fast_dw=True)).layers["dw"].reason


def test_a_model_where_int8_does_not_pay_stays_float_and_says_so():
    temp, _ = prepare(models.mobile_block(64))
    slow = _stub()
    slow.int8 = {k: v * 2 + 1 for k, v in slow.fp32.items()}
    plan = make_plan(temp, Settings(), costs=slow)
    assert {n: lp.precision for n, lp in plan.layers.items() if n != "stem"} == dict.fromkeys(("expand", "dw", "project"), "float32")
    assert not plan.tensors and not plan.weights
    assert "int8 is not faster than fp32 for this model on this CPU: kept 3 layers float." in plan.notes


def _brute_force(layers, readers, table, weight):
    """min over every subset of the latency formula in placement's docstring, written out independently."""
    producer = {lay.output: n for n, lay in layers.items() if lay.output}
    best = None
    for k in range(len(layers) + 1):
        for s in map(set, itertools.combinations(sorted(layers), k)):
            t = table.model_fp32 + sum(table.int8[n] - table.fp32[n] for n in s)
            tensors = {x for n in s for x in (*layers[n].inputs, layers[n].output) if x}
            for x in tensors:
                if producer.get(x) not in s and any(x in layers[n].inputs for n in s):
                    t += weight * table.quantize.get(x, 0.0)
                if producer.get(x) in s and any(r not in s for r in readers.get(x, [])):
                    t += weight * table.dequantize.get(x, 0.0)
            best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_a_run_of_layers_moves_to_float_together(monkeypatch, weight):
    """a -> b -> c where each int8 kernel saves a little but the run's Q and DQ cost more: with boundaries
    charged, only moving the whole run to float finds the optimum (single flips each add a boundary)."""
    monkeypatch.setattr(placement, "BOUNDARY_WEIGHT", weight)
    layers = {"a": Layer(("x",), "ta"), "b": Layer(("ta",), "tb"), "c": Layer(("tb",), "tc")}
    readers = {"x": ["a"], "ta": ["b"], "tb": ["c"], "tc": ["sink"]}
    table = CostTable(fp32=dict.fromkeys("abc", 1.0), int8=dict.fromkeys("abc", 0.9),
                      quantize={"x": 0.25, "ta": 0.25, "tb": 0.25}, dequantize={"ta": 0.25, "tb": 0.25, "tc": 0.25}, model_fp32=5.0)
    chosen = choose_int8(layers, readers, table)
    assert chosen.predicted_ms == pytest.approx(_brute_force(layers, readers, table, weight))
    assert chosen.int8 == (set() if weight else {"a", "b", "c"})
    assert predicted_ms(layers, readers, table, chosen.int8) == pytest.approx(chosen.predicted_ms)


@pytest.mark.measured
def test_measured_int8_layers_run_as_integer_kernels(tmp_path):
    """The timed int8 graph is what ORT fuses after calibration: one QLinearConv per layer, no float Conv left."""
    temp, _ = prepare(models.mobile_block(16))
    shapes = tensor_shapes(concrete_shapes(temp, SAMPLE))
    bench = costmodel._bench_model(temp, costmodel.candidates(temp, Settings()), shapes)
    assert sorted(bench.layers.values()) == ["dw", "expand", "project", "stem"]
    optimized = tmp_path / "opt.onnx"
    session(costmodel._int8_model(bench.model, Settings()), threads=1, optimization="all", optimized_model=str(optimized))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 4 and "Conv" not in ops and "FusedConv" not in ops
    table = costmodel.measure(temp, SAMPLE, Settings())
    assert set(table.fp32) == set(table.int8) == set(bench.layers.values())
    assert all(v > 0 for v in [*table.fp32.values(), *table.int8.values(), table.model_fp32])
    assert set(table.quantize) == {"x", "s_r", "e_r", "d_r"}


def _counting(monkeypatch):
    calls = []

    def fake(model, sample, settings):
        calls.append(sample["x"].shape)
        return CostTable(fp32={"dw": 1.0}, int8={"dw": 2.0}, model_fp32=float(len(calls)), source="stub")

    monkeypatch.setattr(costmodel, "measure", fake)
    return calls


def test_cost_cache_is_reused_and_invalidated_on_shape_cpu_and_ort_change(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    temp, _ = prepare(models.mobile_block(16))
    cache = tmp_path / ".hybridq" / "m.cost.json"
    t1, reused = costmodel.load_or_measure(temp, SAMPLE, Settings(), cache)
    assert not reused and len(calls) == 1 and json.loads(cache.read_text())["table"]["model_fp32"] == 1.0
    t2, reused = costmodel.load_or_measure(temp, SAMPLE, Settings(), cache)
    assert reused and len(calls) == 1 and t2 == t1
    big = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    assert costmodel.load_or_measure(temp, big, Settings(), cache)[1] is False and calls[-1] == (1, 3, 32, 32)
    assert costmodel.load_or_measure(temp, big, Settings(), cache)[1] is True
    monkeypatch.setattr(costmodel, "cpu_id", lambda: "another CPU [flags 000000000000]")
    assert costmodel.load_or_measure(temp, big, Settings(), cache)[1] is False
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert costmodel.load_or_measure(temp, big, Settings(), cache)[1] is False
    assert costmodel.load_or_measure(temp, big, Settings(), cache)[1] is True
    other, _ = prepare(models.mobile_block(8))
    assert costmodel.load_or_measure(other, big, Settings(), cache)[1] is False
    assert len(calls) == 5


def test_cpu_id_names_the_vnni_flag_when_present():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    assert ("avx512_vnni" in costmodel.cpu_id()) == (" avx512_vnni" in flags)


@pytest.mark.measured
def test_step2_follows_the_table_step1_recorded(tmp_path, monkeypatch):
    """step1 records its cost table in the .data meta; step2 places from it (not from a new measurement)."""
    path = tmp_path / "mobile.onnx"
    onnx.save(models.mobile_block(64), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 6)
    monkeypatch.setattr(costmodel, "measure", lambda model, sample, settings: _stub())
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"cost_model": "measured"})
    assert any("stub" in n for n in r1.notes) and (tmp_path / "ws" / ".mobile.cost.json").is_file()
    assert "e_r" in r1.cfg.read_text() and "wd" not in r1.cfg.read_text()
    monkeypatch.setattr(costmodel, "measure", lambda *a: pytest.fail("step2 measured again"))
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    q = onnx.load(str(r2.output))
    dw = next(n for n in q.graph.node if n.name == "dw")
    assert dw.input[1] == "wd", "the depthwise weight is read directly as float"
    rng = np.random.default_rng(5)
    for _ in range(3):
        feeds = {"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
        assert cosine(run(r2.output, feeds)[0], run(path, feeds)[0]) > 0.99


@pytest.mark.measured
def test_no_measure_falls_back_to_mac_counts_and_says_so(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hybridq.cli import app

    path = tmp_path / "mobile.onnx"
    onnx.save(models.mobile_block(8), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    monkeypatch.setattr(costmodel, "measure", lambda *a: pytest.fail("--no-measure measured"))
    res = CliRunner().invoke(app, ["step1", str(path), "--dataset", str(listing), "--out", str(tmp_path / "ws"), "--no-measure"])
    assert res.exit_code == 0, res.output
    assert "MAC counts" in res.output and "cost_model: macs" in (tmp_path / "ws" / "mobile.quantization.cfg").read_text()


def test_cost_model_rejects_other_values():
    with pytest.raises(ConfigError, match="cost_model 'fast' is not valid.*Use measured or macs"):
        Settings.from_dict({"cost_model": "fast"}, "hybridq.yaml")


def _proposal_run(tmp_path, monkeypatch, max_slowdown):
    """step1 --proposal on the concat-of-ranges CNN with a stubbed cost table: each layer 1 ms fp32, 0.1 ms int8."""
    from hybridq.api import ProposalOptions
    from hybridq.proposal import Target

    model = models.concat_ranges_cnn()
    temp, _ = prepare(model)
    names = costmodel.candidates(temp, Settings(float_stem=False))
    table = CostTable(fp32=dict.fromkeys(names, 1.0), int8=dict.fromkeys(names, 0.1), model_fp32=10.0, source="stub")
    monkeypatch.setattr(costmodel, "measure", lambda *a: table)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 12, 12)}, 16)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings=Settings(float_stem=False, cost_model="measured"),
                       proposal=ProposalOptions(Target(cosine=0.9999), max_float_fraction=1.0, max_slowdown=max_slowdown))
    q = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    int8 = [n for n, v in q.rewrite.layers.items() if v["precision"] not in ("float16", "float32") and n in names]
    return r1.proposal, names, int8


@pytest.mark.measured
@pytest.mark.parametrize("max_slowdown", [None, 1.1])
def test_the_proposal_respects_max_slowdown(tmp_path, monkeypatch, max_slowdown):
    p, names, int8 = _proposal_run(tmp_path, monkeypatch, max_slowdown)
    before, after, fp32 = p.latency_ms
    # independent: 10 ms fp32, each int8 layer saves 0.9 ms (kernels only)
    assert before == pytest.approx(10.0 - 0.9 * len(names)) and fp32 == 10.0
    assert after == pytest.approx(10.0 - 0.9 * len(int8))
    if max_slowdown is None:
        assert p.layers, "unbounded, the proposal floats layers to reach the target"
    else:
        assert after <= max_slowdown * before + 1e-9
        assert p.layers == {}, "one float layer adds 0.9 ms, over 10 % of the predicted 7.3 ms"


@pytest.mark.measured
def test_a_model_that_cannot_be_timed_is_placed_by_macs_and_says_why(tmp_path, monkeypatch):
    def broken(*a):
        raise RuntimeError("ORT could not load the timing graph")

    monkeypatch.setattr(costmodel, "measure", broken)
    temp, _ = prepare(models.mobile_block(8))
    table, notes = costmodel.for_step1(temp, SAMPLE, Settings(cost_model="measured"), tmp_path, "m")
    assert table is None and "timing the layers failed: ORT could not load the timing graph" in notes[0]
    assert make_plan(temp, Settings(), costs=table).layers["dw"].precision == "float32", "the MAC rule: depthwise 28 % of the compute"


def test_the_measured_remainder_is_charged_per_fp32_ms_and_exact_at_both_ends():
    """T(S) = T_fp32 + sum over S of (int8 - fp32 + r fp32), r = (T_int8 - T_fp32 - sum of kernel deltas) / sum fp32."""
    temp, _ = prepare(models.mobile_block(64))
    table = _stub(fast_dw=True)
    table.model_int8 = 2.9
    plan = make_plan(temp, Settings(float_stem=False, float_depthwise=False))
    layers, readers = _placement_inputs(temp, plan)
    names = {"stem", "expand", "dw", "project"}
    assert predicted_ms(layers, readers, table, set()) == pytest.approx(3.0)
    assert predicted_ms(layers, readers, table, names) == pytest.approx(2.9), "the measured all-int8 latency"
    # by hand: kernels 0.4+0.3+0.4+0.3 - (0.2+1.0+0.5+1.0) = -1.3, remainder 2.9 - 3.0 + 1.3 = 1.2 over 2.7 ms fp32
    r = 1.2 / 2.7
    assert table.remainder_rate() == pytest.approx(r)
    assert predicted_ms(layers, readers, table, {"expand", "dw"}) == pytest.approx(3.0 + (0.3 - 1.0 + r) + (0.4 - 0.5 + 0.5 * r))
    table.model_int8 = 0.0  # not measured (an older cache, a stub): kernels only, as before
    assert predicted_ms(layers, readers, table, names) == pytest.approx(3.0 - 1.3)


def _placement_inputs(temp, plan):
    from hybridq.plan import GraphView, QUANTIZABLE, _placement_layers

    g = GraphView(temp)
    quantized = {n: QUANTIZABLE[lp.op](g.by_name[n], g) for n, lp in plan.layers.items() if lp.precision == "default"}
    return _placement_layers(g, quantized)


def _best_ms(paths: list, feeds: dict, runs: int = 40) -> list[float]:
    """Best-of-runs latency (ms) of each model, 1 thread, runs interleaved: ORT timed here, apart from the cost model."""
    import time

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = [onnxruntime.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for p in paths]
    best = [float("inf")] * len(sessions)
    for s in sessions:
        s.run(None, feeds)
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1000.0)
    return best


@pytest.mark.slow  # a timing check: it read 23 % low once on a fresh checkout of a loaded Xeon; the bench holds the figures
@pytest.mark.measured
def test_the_predicted_latency_of_a_partly_int8_model_is_near_its_ort_latency(tmp_path):
    """The remainder is measured once for all-int8; the prediction for another placement (stem and project float) is
    checked against ONNX Runtime timing that model. Ratios to fp32, so a busy spell of a shared machine cancels out."""
    temp, _ = prepare(models.mobile_block(32, hw=56))
    sample = {"x": np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)}
    table = costmodel.measure(temp, sample, Settings())
    assert table.model_int8 > 0 and set(table.int8) == {"stem", "expand", "dw", "project"}
    keep_float = CostTable(fp32=dict.fromkeys(table.fp32, 1.0), int8={"stem": 2.0, "expand": 0.1, "dw": 0.1, "project": 2.0},
                           model_fp32=10.0, source="stub")
    everything = Settings(float_stem=False, float_depthwise=False, float_pooled=False, cost_model="macs")
    plan = make_plan(temp, everything, costs=keep_float)
    assert {n for n, lp in plan.layers.items() if lp.precision == "default"} == {"expand", "dw"}
    from hybridq.plan import predicted_latency

    predicted = predicted_latency(temp, plan, table)
    fp32_ms, part_ms = _best_ms([temp, costmodel._int8_model(temp, Settings(), keep_float)], sample)
    # kernels alone (no remainder) were 21-23 % low on an AMD EPYC; with it, within 1 % there (load 8), and 14-17 % low
    # on an Intel Xeon with AVX-512 VNNI (1.21-1.24 predicted against 1.44 measured, 4 runs): this toy block's Q/DQ
    # boundaries weigh more there than the remainder rate carries; the real models' figures are the bench's (cost section)
    assert predicted / table.model_fp32 == pytest.approx(part_ms / fp32_ms, rel=0.2)


@pytest.mark.measured
def test_the_whole_int8_latency_is_measured_and_cached_with_the_table(tmp_path, monkeypatch):
    temp, _ = prepare(models.mobile_block(16))
    cache = tmp_path / "m.cost.json"
    table, reused = costmodel.load_or_measure(temp, SAMPLE, Settings(), cache)
    assert not reused and table.model_int8 > 0 and table.model_fp32 > 0
    held = json.loads(cache.read_text())
    assert held["table"]["model_int8"] == table.model_int8 and held["key"]["format"] == costmodel.FORMAT
    again, reused = costmodel.load_or_measure(temp, SAMPLE, Settings(), cache)
    assert reused and again.model_int8 == table.model_int8 and again.remainder_rate() == table.remainder_rate()
    calls = _counting(monkeypatch)
    monkeypatch.setattr(costmodel, "FORMAT", costmodel.FORMAT + 1)  # what is measured changed: measured again
    assert costmodel.load_or_measure(temp, SAMPLE, Settings(), cache)[1] is False and len(calls) == 1


def test_step1_imports_nothing_it_does_not_use(tmp_path):
    """A fixed cost of every step1: the CLI and a step1 run on a fixture (no control flow, no proposal) import no plotting,
    no reference evaluator, no Ray, no Pillow (a .npy dataset) and no pydantic (typer < 0.29). Checked in a fresh interpreter, whose sys.modules holds only what that run imported."""
    import subprocess
    import sys

    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    heavy = ["matplotlib", "onnx.reference", "ray", "scipy", "pandas", "hybridq.analysis", "hybridq.report", "PIL", "pydantic"]
    code = (
        "import sys, hybridq.cli\n"
        f"try:\n    hybridq.cli.main(['step1', {str(path)!r}, '--dataset', {str(listing)!r}, '--out', {str(tmp_path / 'ws')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "print('onnx' in sys.modules and 'hybridq.api' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported, ran = out.stdout.strip().splitlines()[-2:]
    assert ran == "True" and (tmp_path / "ws" / "cnn.quantization.cfg").is_file()
    assert imported == "[]", f"step1 imported {imported}"


def test_with_boundaries_charged_the_prediction_is_still_exact_at_both_measured_ends(monkeypatch):
    monkeypatch.setattr(placement, "BOUNDARY_WEIGHT", 1.0)
    temp, _ = prepare(models.mobile_block(64))
    table = _stub(fast_dw=True)
    table.model_int8 = 2.9
    layers, readers = _placement_inputs(temp, make_plan(temp, Settings(float_stem=False, float_depthwise=False)))
    assert predicted_ms(layers, readers, table, set()) == pytest.approx(3.0)
    assert predicted_ms(layers, readers, table, {"stem", "expand", "dw", "project"}) == pytest.approx(2.9)
    # float project: its kernel back (1.0 - 0.3), minus its remainder share, plus a DQ on d_r it now needs
    # (remainder: 2.9 - 3.0 + 1.3 - (Q on x, absent from the stub: 0) = 1.2 over 2.7 ms fp32)
    assert predicted_ms(layers, readers, table, {"stem", "expand", "dw"}) == pytest.approx(2.9 + 0.7 - 1.2 / 2.7 + 0.1)


def test_max_slowdown_without_a_measured_cost_model_is_refused(tmp_path):
    """It bounds a predicted latency; with the MAC placement there is none, and it was once ignored without a word."""
    from hybridq.api import ProposalOptions
    from hybridq.errors import InputError
    from hybridq.proposal import Target

    path = tmp_path / "m.onnx"
    onnx.save(models.concat_ranges_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 12, 12)}, 4)
    with pytest.raises(InputError, match="--max-slowdown .* run step1 with --measure"):
        hybridq.step1(path, listing, out=tmp_path / "ws", settings=Settings(float_stem=False, speed_check=False),
                      proposal=ProposalOptions(Target(cosine=0.9999), max_float_fraction=1.0, max_slowdown=1.1))
