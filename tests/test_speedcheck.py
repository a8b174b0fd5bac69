"""step1's speed check: the default int8 model timed whole against fp32; kept float, in the cfg, where int8 does not pay.

Timings are stubbed (a fixture's speed is this machine's business; the bench times the real models); what is
checked is the decision, what the cfg and step2's model say, and that the timed models are the right ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import hybridq
from hybridq import costmodel, speedcheck
from hybridq.placement import CostTable
from hybridq.config import load_cfg
from tests import models
from tests.conftest import run

pytestmark = pytest.mark.speed_check


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _stub(monkeypatch, fp32_ms: float, int8_ms: float, seen: list | None = None) -> None:
    def timed(fp32, int8, feed, threads, outputs=None, window=None):
        int8 = int8() if callable(int8) else int8  # step1 hands over the function building it
        if seen is not None:
            seen.append((fp32, int8, threads))
        return fp32_ms, int8_ms

    monkeypatch.setattr(speedcheck, "time_pair", timed)


def test_int8_slower_keeps_every_default_layer_float_in_the_cfg(cnn_ws, tmp_path, monkeypatch):
    _stub(monkeypatch, fp32_ms=1.0, int8_ms=1.1)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws")
    assert any("int8 is slower than fp32 for this model on this CPU" in n for n in s1.notes)
    cfg = load_cfg(s1.cfg)
    assert cfg.custom and set(cfg.custom.values()) == {"float32"}
    text = s1.cfg.read_text()
    assert "speed check: int8 is slower than fp32" in text and "1.1 ms int8 vs 1 ms fp32" in text
    s2 = hybridq.step2(s1.model, s1.data, s1.cfg, tmp_path / "q.onnx")
    assert "QuantizeLinear" not in _ops(s2.output) and "DequantizeLinear" not in _ops(s2.output)
    x = np.load(next(p for p in (cnn_ws["dir"] / "data").iterdir() if p.suffix == ".npy"))
    ref, out = run(cnn_ws["model"], {"x": x})[0], run(s2.output, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)  # the fp32 function, shipped as is


def test_int8_faster_changes_nothing_and_times_the_default_int8_model(cnn_ws, tmp_path, monkeypatch):
    seen: list = []
    _stub(monkeypatch, fp32_ms=2.0, int8_ms=1.0, seen=seen)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws")
    assert any(n.startswith("speed check: the int8 model is faster") for n in s1.notes)
    assert not load_cfg(s1.cfg).custom
    assert [t for _, _, t in seen] == [1]  # one thread: the per-core cost
    fp32, int8, _ = seen[0]
    assert "QuantizeLinear" not in {n.op_type for n in fp32.graph.node}
    s2 = hybridq.step2(s1.model, s1.data, s1.cfg, tmp_path / "q.onnx")
    assert sorted(n.op_type for n in int8.graph.node) == sorted(n.op_type for n in onnx.load(str(s2.output)).graph.node)


def test_a_proposal_on_a_model_kept_float_says_it_did_not_run(cnn_ws, tmp_path, monkeypatch):
    _stub(monkeypatch, fp32_ms=1.0, int8_ms=1.2)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws", proposal=hybridq.ProposalOptions())
    assert s1.proposal is None and any("The proposal was not run: no layer is quantized." in n for n in s1.notes)


def test_speed_check_false_quantizes_anyway(cnn_ws, tmp_path, monkeypatch):
    _stub(monkeypatch, fp32_ms=1.0, int8_ms=5.0)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws", settings={"speed_check": False})
    assert not load_cfg(s1.cfg).custom and not any("speed check" in n or "not faster" in n for n in s1.notes)


def test_a_model_that_cannot_be_timed_is_placed_by_the_mac_rules(cnn_ws, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("no memory for a second session")

    monkeypatch.setattr(speedcheck, "time_pair", fails)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws")
    assert not load_cfg(s1.cfg).custom
    assert any("speed check: not run (no memory for a second session)" in n for n in s1.notes)


@pytest.mark.measured
def test_the_measured_cost_models_placement_is_checked_too(tmp_path, monkeypatch):
    """The table predicts a whole model from its parts; the layers it left int8 are timed whole as well, and kept float
    when that model is not faster (PP-OCR cls on a Xeon: the table's placement ran 1.27 ms against 1.16 ms fp32)."""
    path = tmp_path / "mobile.onnx"
    onnx.save(models.mobile_block(64), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    table = CostTable(fp32={"stem": 0.2, "expand": 1.0, "dw": 0.5, "project": 1.0}, int8={"stem": 0.4, "expand": 0.3, "dw": 0.9, "project": 0.3},
                      quantize={"s_r": 0.05, "e_r": 0.1, "d_r": 0.1}, dequantize={"e_r": 0.1, "d_r": 0.1}, model_fp32=3.0, source="stub")
    monkeypatch.setattr(costmodel, "measure", lambda *a: table)
    seen: list = []
    _stub(monkeypatch, fp32_ms=1.0, int8_ms=1.1, seen=seen)
    s1 = hybridq.step1(path, listing, out=tmp_path / "ws", settings={"cost_model": "measured", "float_stem": False})
    cfg = load_cfg(s1.cfg)
    assert cfg.custom == {"expand": "float32", "project": "float32"}, "the layers the table left int8; stem and dw it keeps float itself"
    assert any("int8 is slower than fp32 for this model on this CPU (1 thread: 1.1 ms int8 vs 1 ms fp32)" in n for n in s1.notes)
    s2 = hybridq.step2(s1.model, s1.data, s1.cfg, tmp_path / "q.onnx")
    assert "QuantizeLinear" not in _ops(s2.output)
    timed = {n.op_type for n in seen[0][1].graph.node}
    assert "QuantizeLinear" in timed, "the timed model had the table's int8 layers"


def test_the_speed_check_and_the_bias_correction_share_one_build_of_the_default_model(cnn_ws, tmp_path, monkeypatch):
    from hybridq import build as build_module

    builds = []  # every build goes through build.apply_fixes first
    real = build_module.apply_fixes
    monkeypatch.setattr(build_module, "apply_fixes", lambda *a, **k: builds.append(1) or real(*a, **k))
    seen: list = []
    _stub(monkeypatch, fp32_ms=2.0, int8_ms=1.0, seen=seen)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws", settings={"bias_correction": True})
    assert len(seen) == 1 and "bias_correction" in s1.cfg.read_text().split("quantize_parameters:")[1]
    assert len(builds) == 1


def test_the_margin_decides() -> None:
    assert speedcheck.SpeedCheck(1.0, 0.96).pays and not speedcheck.SpeedCheck(1.0, 0.96).slower
    assert not speedcheck.SpeedCheck(1.0, 0.98).pays and not speedcheck.SpeedCheck(1.0, 1.02).slower  # within MARGIN: as fast
    assert speedcheck.SpeedCheck(1.0, 1.04).slower and speedcheck.SpeedCheck(1.0, 1.2).slower


def test_a_tie_keeps_the_model_int8(cnn_ws, tmp_path, monkeypatch):
    """Within MARGIN either way the two are as fast: the model stays int8 and the note says so (a bench's step1 read
    PP-OCR det at 91 ms int8 against 91 ms fp32 where its latency rounds measured 0.87x, and shipped it float)."""
    _stub(monkeypatch, fp32_ms=1.0, int8_ms=1.02)
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "ws")
    assert not load_cfg(s1.cfg).custom
    assert [n for n in s1.notes if n.startswith("speed check: the int8 model is as fast as fp32") and "kept int8" in n], s1.notes
    s2 = hybridq.step2(s1.model, s1.data, s1.cfg, tmp_path / "q.onnx")
    assert "QuantizeLinear" in _ops(s2.output)


def test_time_pair_reports_real_times_of_both_models(cnn_ws) -> None:
    """Unstubbed: the same model on both sides takes the same time within a wide band (a sanity check of the timer)."""
    m = onnx.load(str(cnn_ws["model"]))
    x = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    a, b = speedcheck.time_pair(m, m, x, 1)
    assert a > 0 and b > 0 and 0.25 < a / b < 4


@pytest.mark.parametrize("int8_ms, runs", [(50.0, 1), (78.0, 1), (82.0, speedcheck.MIN_RUNS), (99.0, speedcheck.UNCLEAR_RUNS),
                                            (110.0, speedcheck.UNCLEAR_RUNS), (130.0, speedcheck.UNCLEAR_RUNS),
                                            ([130.0] * 4 + [90.0] * 9, speedcheck.UNCLEAR_RUNS)])
def test_an_unclear_outcome_gets_more_runs_before_a_model_is_kept_float(monkeypatch, int8_ms, runs):
    """int8 below DECISIVE x fp32 decides after one timed run; a clear "pays" after MIN_RUNS; a ratio within CLEAR (where
    a few noisy runs once kept PP-OCR det float) or a clear "slower" takes at least UNCLEAR_RUNS of each model: three slow
    int8 runs (a disturbed spell, 130 ms) then 90 ms ones end "pays", where they once kept the model float. Sessions and
    clocks are fakes: each run advances the clock by its model's ms (a list: one per run, warm-up first)."""
    clock = [0.0]

    class Fake:
        def __init__(self, ms):
            self.ms, self.count = ms, 0

        def get_inputs(self):
            return []

        def run(self, names, feed):
            clock[0] += (self.ms[self.count] if isinstance(self.ms, list) else self.ms) / 1e3
            self.count += 1

    made = iter([Fake(100.0), Fake(int8_ms)])
    sessions = []
    monkeypatch.setattr(speedcheck._runtime, "session", lambda *a, **k: sessions.append(next(made)) or sessions[-1])
    monkeypatch.setattr(speedcheck.time, "thread_time", lambda: clock[0])
    monkeypatch.setattr(speedcheck.time, "perf_counter", lambda: clock[0])
    fp32_ms, got = speedcheck.time_pair(None, None, {}, 1)
    assert (fp32_ms, got) == pytest.approx((100.0, min(int8_ms[1:]) if isinstance(int8_ms, list) else int8_ms))
    assert [s.count for s in sessions] == [runs + 1, runs + 1], "a warm-up run, then the timed ones"




def test_the_int8_model_is_built_while_the_fp32_session_opens(monkeypatch):
    """Given the function that builds the int8 model, time_pair builds it once, beside the fp32 session's opening, and
    times the model it built; the sessions still open fp32 first (fakes, as above)."""
    events: list[str] = []

    class Fake:
        def __init__(self, model):
            self.model = model

        def get_inputs(self):
            return []

        def run(self, names, feed):
            return [self.model]

    def opened(model, **kwargs):
        events.append(f"session {model}")
        return Fake(model)

    def build():
        events.append("build")
        return "int8 model"

    monkeypatch.setattr(speedcheck._runtime, "session", opened)
    ticks = iter(range(10**6))
    monkeypatch.setattr(speedcheck.time, "thread_time", lambda: float(next(ticks)))  # each run takes one tick
    outputs: list = []
    speedcheck.time_pair("fp32 model", build, {}, 1, outputs=outputs)
    assert events.count("build") == 1 and events.index("session fp32 model") < events.index("session int8 model")
    assert events.index("build") < events.index("session int8 model")
    assert outputs == [["fp32 model"], ["int8 model"]], "the warm-up outputs of fp32, then of the model built"

def test_a_busy_machine_does_not_keep_the_model_float(cnn_ws, tmp_path, monkeypatch):
    """'Slower' measured while other work ran is not trusted: the MAC placement stays, and the note says why."""
    monkeypatch.setattr(speedcheck, "check", lambda temp, int8, feed: speedcheck.SpeedCheck(1.0, 1.05, others=1.2))
    s1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "busy")
    assert not load_cfg(s1.cfg).custom
    assert [n for n in s1.notes if n.startswith("speed check: not decided") and "other work used 1.2 cores" in n], s1.notes
    monkeypatch.setattr(speedcheck, "check", lambda temp, int8, feed: speedcheck.SpeedCheck(1.0, 1.05, others=0.1))
    quiet = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=tmp_path / "quiet")
    assert load_cfg(quiet.cfg).custom and set(load_cfg(quiet.cfg).custom.values()) == {"float32"}


def test_other_work_is_measured_from_proc_stat() -> None:
    """A child process burning one core while this one sleeps: other work is seen (about one core; Linux)."""
    import subprocess
    import sys
    import time

    if speedcheck._cpu_sample()[0] is None:
        pytest.skip("no /proc/stat here")
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    time.sleep(0.3)  # the interpreter started and is spinning
    before = speedcheck._cpu_sample()
    time.sleep(0.8)
    busy = speedcheck._others(before, speedcheck._cpu_sample())
    child.wait()
    assert busy > 0.4, busy  # about 1.0; a CPU quota on the spinning child may give it less than a core


def test_other_work_is_sampled_around_the_timed_runs_only(monkeypatch):
    """The CPU samples that tell a busy machine are taken after the warm-up runs and after the last timed run, so the
    build and the session openings before them do not dilute the other processes' share."""
    events: list[str] = []

    class Fake:
        def get_inputs(self):
            return []

        def run(self, names, feed):
            events.append("run")
            return []

    monkeypatch.setattr(speedcheck._runtime, "session", lambda *a, **k: Fake())
    monkeypatch.setattr(speedcheck, "_cpu_sample", lambda: events.append("sample") or (None, 0.0, 0.0))
    ticks = iter(range(10**6))
    monkeypatch.setattr(speedcheck.time, "thread_time", lambda: float(next(ticks)))
    window: list = []
    speedcheck.time_pair("fp32", lambda: events.append("build") or "int8", {}, 1, window=window)
    assert len(window) == 2 and events.index("build") < events.index("sample")
    assert events[:4] == ["build", "run", "run", "sample"] and events[-1] == "sample", events
