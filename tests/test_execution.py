"""The execution back ends: in-process, local workers and Ray give the same artifacts byte for byte; a lost worker is a clear error.

Ray tests share one module-scoped local instance (hybridq attaches to a running instance instead of starting one).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import hybridq
from hybridq.api import ProposalOptions
from hybridq.artifacts import read_step1
from hybridq.cli import main
from hybridq.errors import HybridqError, InputError, WorkerLost
from hybridq.execution import Execution, Shard, contiguous, execute, threads_per_worker
from hybridq.observers import HistogramObserver
from hybridq.proposal import Evaluator, Target
from tests import models
from tests.conftest import cosine, run

KILL_HOOK = '''
import os, signal
from pathlib import Path
import numpy as np


def load(path, spec):
    """Loads a .npy sample; kills its own process on the marked sample unless it is the test's own process."""
    path = Path(path)
    driver = int((path.parent / "driver.pid").read_text())
    if path.name == (path.parent / "kill.name").read_text().strip() and os.getpid() != driver:
        os.kill(os.getpid(), signal.SIGKILL)
    return np.load(path)
'''


def cli(capsys, *args: object) -> tuple[int, str]:
    """Run `hybridq args...` in-process; returns (exit code, stdout + stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out + captured.err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cnn20(tmp_path: Path) -> dict[str, Path]:
    """The residual CNN with 20 samples: more than the 8 batches whose min/max-only tensors are observed."""
    path = tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), path)
    return {"model": path, "dataset": models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 20), "dir": tmp_path}


def _step1_digests(ws: dict[str, Path], name: str, execution: Execution | None, **kw) -> tuple[str, str, str]:
    r = hybridq.step1(ws["model"], ws["dataset"], out=ws["dir"] / name, execution=execution, **kw)
    return _digest(r.model), _digest(r.data), _digest(r.cfg)


def test_histogram_partials_merge_to_the_same_state_in_any_order_and_match_numpy():
    rng = np.random.default_rng(0)
    # batches with very different ranges: merging must re-bin exactly whatever came first
    batches = [rng.normal(0, s, 3000).astype(np.float32) for s in (0.01, 5.0, 0.3, 40.0, 1.0, 2.0)]
    whole = HistogramObserver()
    for b in batches:
        whole.update(b)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 4, 0, 5, 1, 3]):
        parts = [HistogramObserver(), HistogramObserver()]
        for k, i in enumerate(order):
            parts[k % 2].update(batches[i])
        merged = HistogramObserver()
        for p in reversed(parts):
            merged.merge(p)
        assert (merged.min, merged.max, merged.count, merged.exponent, merged.start) == (
            whole.min, whole.max, whole.count, whole.exponent, whole.start)
        np.testing.assert_array_equal(merged.counts, whole.counts)
    # independent check: numpy's floor binning of all values on the final width
    x = np.concatenate(batches).astype(np.float64)
    idx = np.floor(x / whole.width).astype(np.int64) - whole.start
    np.testing.assert_array_equal(np.bincount(idx, minlength=len(whole.counts)), whole.counts)
    assert (whole.min, whole.max) == (float(x.min()), float(x.max()))


def test_shards_are_contiguous_and_threads_fit_the_cores():
    assert list(contiguous(10, 4)) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert list(contiguous(2, 4)) == [(0, 1), (1, 2)]
    assert threads_per_worker(2, 2) == 1 and threads_per_worker(3, 8) == 2 and threads_per_worker(4, 2) == 1


def test_step1_artifacts_are_byte_identical_on_every_worker_count(cnn20):
    base = _step1_digests(cnn20, "inproc", None)
    assert _step1_digests(cnn20, "w2", Execution(workers=2)) == base
    assert _step1_digests(cnn20, "w3", Execution(workers=3)) == base
    # batches of 3 (20 samples: the last has 2) are sharded whole
    dynamic = models.residual_cnn()
    for value in (dynamic.graph.input[0], dynamic.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    batched = dict(cnn20, model=cnn20["dir"] / "dyn.onnx")
    onnx.save(dynamic, batched["model"])
    assert _step1_digests(batched, "b3", None, batch_size=3) == _step1_digests(batched, "b3w2", Execution(workers=2), batch_size=3)
    # the statistics are the data's: the output (min/max only, from the first 8 batches of the whole run, though
    # shard 2 of 4 runs batches 5-9) has the range ONNX Runtime computes over samples 0-7
    w2 = cnn20["dir"] / "w2"
    bundle = read_step1(w2 / "cnn.model", w2 / "cnn.data", None, w2 / "cnn.quantization.cfg")
    xs = [np.load(cnn20["dir"] / "data" / f"x_{i}.npy") for i in range(20)]
    outs = np.concatenate([run(cnn20["model"], {"x": x})[0].ravel() for x in xs[:8]])
    obs = bundle.observers["logits"]
    assert obs.count == 8 and not obs.bins
    assert (obs.min, obs.max) == pytest.approx((float(outs.min()), float(outs.max())), rel=1e-5, abs=1e-6)


def test_two_runs_in_flight_on_two_cores_give_the_same_bytes(cnn20, monkeypatch):
    # Two cores: two one-thread runs at once beside the binning (batches observed in order, the switch
    # away from the min/max outputs after batch 8 included); the artifacts are those of one run at a time.
    from hybridq import _runtime, calibration

    pools, openers = [], []

    class Pool(calibration.ThreadPoolExecutor):
        def __init__(self, max_workers: int, **kw) -> None:
            # the runs' pools; the one that opens the session without min/max outputs beside the first batches apart
            (openers if kw.get("thread_name_prefix") == "hybridq-calib-open" else pools).append(max_workers)
            super().__init__(max_workers, **kw)

    monkeypatch.setattr(calibration, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(_runtime, "cores", lambda: 2)
    paired = _step1_digests(cnn20, "pair", None)
    assert pools == [1, 1]  # the second one-run pool opens once the first batch proved small
    assert openers == [1], "20 batches: the second session opens beside the first 8"
    monkeypatch.setattr(calibration, "PAIR_BYTES", -1)
    assert _step1_digests(cnn20, "single", None) == paired and pools == [1, 1, 1]
    monkeypatch.setattr(_runtime, "cores", lambda: 3)
    assert _step1_digests(cnn20, "three", None) == paired and pools == [1, 1, 1, 1]


def _analyze_manifest(ws: dict[str, Path], quant: Path, name: str, execution: Execution | None) -> tuple[bytes, dict]:
    r = hybridq.analyze(ws["model"], quant, ws["dataset"], dump=ws["dir"] / name, execution=execution)
    return (ws["dir"] / name / "manifest.json").read_bytes(), {le.layer: le.entire.cosine for le in r.layers}


def test_analyze_manifest_is_identical_on_every_back_end(cnn20):
    r1 = hybridq.step1(cnn20["model"], cnn20["dataset"], out=cnn20["dir"] / "ws")
    quant = hybridq.step2(r1.model, r1.data, r1.cfg, cnn20["dir"] / "q.onnx").output
    base, cos = _analyze_manifest(cnn20, quant, "snap", None)
    assert _analyze_manifest(cnn20, quant, "snap_in", Execution())[0] == base
    assert _analyze_manifest(cnn20, quant, "snap_w2", Execution(workers=2))[0] == base
    # without a snapshot (compiled float32 metrics, not the snapshot's float64 sums) each back end agrees too
    plain = [{le.layer: (le.entire.cosine, le.entire.snr_db, le.single and le.single.cosine) for le in
              hybridq.analyze(cnn20["model"], quant, cnn20["dataset"], execution=e).layers} for e in (None, Execution(), Execution(workers=2))]
    assert plain[0] == plain[1] == plain[2]
    # the output's cosine is the textbook one, averaged over the samples
    xs = [np.load(cnn20["dir"] / "data" / f"x_{i}.npy") for i in range(20)]
    pairs = [(run(cnn20["model"], {"x": x})[0], run(quant, {"x": x})[0]) for x in xs]
    assert cos["fc"] == pytest.approx(np.mean([cosine(f, q) for f, q in pairs]), abs=1e-9)
    assert json.loads(base)["n_samples"] == 20


EVAL_HOOK = '''
import os, signal
from pathlib import Path
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).parent


def evaluate(path):
    """A task figure (higher is better: minus the output's mean distance from fp32's on a fixed input); logs its pid;
    kills its own process when marked unless it is the test's own process."""
    with open(HERE / "eval.pids", "a") as log:
        log.write(f"{os.getpid()}\\n")
    if (HERE / "kill.eval").exists() and os.getpid() != int((HERE / "driver.pid").read_text()):
        os.kill(os.getpid(), signal.SIGKILL)
    x = np.linspace(-2, 2, 8 * 12 * 12, dtype=np.float32).reshape(1, 8, 12, 12)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return -float(np.abs(run(path).astype(np.float64) - run(HERE / "m.onnx")).mean())


def broken(path):
    """Fails on a worker (the test's own process computes fp32's figure)."""
    if os.getpid() != int((HERE / "driver.pid").read_text()):
        raise ValueError("no labels on this node")
    return 0.0
'''


@pytest.fixture
def concat16(tmp_path: Path) -> dict[str, Path]:
    """The concat-of-ranges CNN (the proposal has several candidates per step on it), 16 samples, and the --eval hook."""
    onnx.save(models.concat_ranges_cnn(), tmp_path / "m.onnx")
    (tmp_path / "evalhook.py").write_text(EVAL_HOOK)
    (tmp_path / "driver.pid").write_text(str(os.getpid()))
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 12, 12)}, 16)
    return {"model": tmp_path / "m.onnx", "dataset": listing, "dir": tmp_path, "eval": tmp_path / "evalhook.py"}


def _proposal(ws: dict[str, Path], name: str, execution: Execution | None, eval_fn: str | None = None) -> tuple:
    """step1 --proposal's choice, evaluations, candidate table, scores, and the digests of its cfg and data."""
    target = Target(cosine=None, eval_fn=eval_fn) if eval_fn else Target(cosine=0.995)
    opts = ProposalOptions(target, max_float_fraction=1.0, execution=execution)
    r = hybridq.step1(ws["model"], ws["dataset"], out=ws["dir"] / name, settings=hybridq.Settings(float_stem=False), proposal=opts,
                      execution=execution)
    p = r.proposal
    return (p.layers, p.entries, p.choice, p.evaluations, [row.to_dict() for row in p.table], p.baseline.to_dict(), p.predicted.to_dict(),
            p.measured.to_dict(), _digest(r.cfg), _digest(r.data))


def _remote_scoring(monkeypatch) -> list[int]:
    """Shards of every candidate-scoring run sent to execute (appended to the list returned)."""
    from hybridq.proposal import evaluator

    sent: list[int] = []

    def spy(job, shards, *args, **kw):
        shards = list(shards)
        sent.append(len(shards))
        return execute(job, shards, *args, **kw)

    monkeypatch.setattr(evaluator, "execute", spy)
    return sent


def test_proposal_choices_tables_and_cfg_are_identical_with_workers(monkeypatch, concat16):
    sent = _remote_scoring(monkeypatch)
    base = _proposal(concat16, "one", None)
    assert not sent, "in-process by default"
    assert _proposal(concat16, "two", Execution(workers=2)) == base
    assert sent and all(n >= 2 for n in sent), "a step's candidates went to the workers side by side"
    assert base[0] or base[1], "the proposal chose something on this model"
    # `propose` on a step1 cfg: the same written cfg and table whether its candidates are scored here or on workers
    r = hybridq.step1(concat16["model"], concat16["dataset"], out=concat16["dir"] / "plain", settings=hybridq.Settings(float_stem=False))
    proposed = []
    for name, execution in (("p_here", None), ("p_two", Execution(workers=2))):
        shutil.copytree(r.cfg.parent, concat16["dir"] / name)
        cfg = concat16["dir"] / name / r.cfg.name
        p, _ = hybridq.propose(cfg, concat16["dataset"], options=ProposalOptions(Target(cosine=0.995), max_float_fraction=1.0, execution=execution))
        proposed.append((cfg.read_bytes(), [row.to_dict() for row in p.table], p.measured.to_dict()))
    assert proposed[0] == proposed[1] and proposed[0][0] != r.cfg.read_bytes()


def _softmax_model(wiggle: float) -> onnx.ModelProto:
    """y = Softmax(x + wiggle * Sin(5x), axis 1) over x [1, C, 8] with C dynamic: wiggle 0 is the fp32 model, others candidates."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["f"], value=helper.make_tensor("f", TensorProto.FLOAT, [], [5.0])),
             helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", TensorProto.FLOAT, [], [wiggle])),
             helper.make_node("Mul", ["x", "f"], ["x5"]), helper.make_node("Sin", ["x5"], ["s"]), helper.make_node("Mul", ["s", "w"], ["ws"]),
             helper.make_node("Add", ["x", "ws"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "C", 8]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "softmax", [io[0]], [io[1]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_scores_side_by_side_in_this_process_equal_one_at_a_time(monkeypatch):
    """On two cores an in-process evaluator scores a generator's candidates two at a time, one ONNX Runtime thread each:
    the figures are those of one candidate at a time on every core, in candidate order."""
    import threading

    from hybridq.proposal import evaluator as ev

    rng = np.random.default_rng(5)
    samples = [{"x": rng.normal(0, 1, (1, 4, 8)).astype(np.float32)} for _ in range(4)]
    fp32, wiggles = _softmax_model(0.0), (0.1, 0.3, 0.6, 0.9, 1.2)
    here = Evaluator(fp32, samples, Target(cosine=0.99))
    alone = [here.score(_softmax_model(w)).to_dict() for w in wiggles]
    monkeypatch.setattr(ev._runtime, "cores", lambda: 2)
    where, real = [], ev.Evaluator._scored

    def spy(self, model, limit, threads=0):
        where.append((threading.current_thread().name, threads))
        return real(self, model, limit, threads)

    monkeypatch.setattr(ev.Evaluator, "_scored", spy)
    before = here.evaluations
    got = [s.to_dict() for s in here.score_many(_softmax_model(w) for w in wiggles)]
    assert got == alone and len({str(g) for g in got}) == len(wiggles)
    assert here.evaluations - before == len(wiggles)
    assert len(where) == len(wiggles) and all(name.startswith("hybridq-score") and threads == 1 for name, threads in where)


def test_scores_on_workers_are_bit_identical_and_match_numpy():
    rng = np.random.default_rng(3)
    # channels 3, 3, 5, 3: from sample 2 on the output is compared whole (dynamic channel count), as analyze does
    samples = [{"x": rng.normal(0, 1, (1, c, 8)).astype(np.float32)} for c in (3, 3, 5, 3)]
    fp32, cands = _softmax_model(0.0), [_softmax_model(0.3), _softmax_model(0.6)]
    here = Evaluator(fp32, samples, Target(cosine=0.99))
    far = Evaluator(fp32, samples, Target(cosine=0.99), Execution(workers=4))  # 2 shards per candidate: samples split
    for limit in (None, 2):
        local = [s.to_dict() for s in here.score_many(cands, limit)]
        assert [s.to_dict() for s in far.score_many(cands, limit)] == local
        for cand, got in zip(cands, local):
            pairs = [(run(fp32, x)[0].astype(np.float64), run(cand, x)[0].astype(np.float64)) for x in samples[:limit]]
            xy, xx, yy = (sum(float((a * b).sum()) for a, b in products) for products in
                          ([(r, q) for r, q in pairs], [(r, r) for r, _ in pairs], [(q, q) for _, q in pairs]))
            assert got["outputs"]["y"]["cosine"] == pytest.approx(xy / math.sqrt(xx * yy), rel=1e-12)
            flips = sum(int((r.argmax(axis=1) != q.argmax(axis=1)).sum()) for r, q in pairs)
            assert (got["flips"], got["decisions"]) == (flips, sum(r.shape[2] for r, _ in pairs)) and flips > 0
            # slices only while the channel count holds: samples 0-1 alone have 3 slices, all four samples none
            assert (got["outputs"]["y"]["worst_slice"] is None) == (limit is None)
            # candidates are compared on the log-probabilities: Softmax's logits centred along its axis, from numpy
            def centred(w, x):
                z = x.astype(np.float64) + w * np.sin(5 * x.astype(np.float64))
                return z - z.mean(axis=1, keepdims=True)
            w = float(onnx.numpy_helper.to_array(cand.graph.node[1].attribute[0].t))
            lz = [(centred(0.0, f["x"]), centred(w, f["x"])) for f in samples[:limit]]
            err, sig = sum(float(((a - b) ** 2).sum()) for a, b in lz), sum(float((a ** 2).sum()) for a, _ in lz)
            cross, qq = sum(float((a * b).sum()) for a, b in lz), sum(float((b ** 2).sum()) for _, b in lz)
            logp = got["log_probabilities"]["y"]
            assert logp["snr_db"] == pytest.approx(10 * math.log10(sig / err), rel=1e-6)
            assert logp["cosine"] == pytest.approx(cross / math.sqrt(sig * qq), rel=1e-6)  # float32 Softmax
    assert here.evaluations == far.evaluations == 4
    scored = here.score(cands[0])
    assert here.quality(scored) == scored.logp["y"].cosine < scored.worst_cosine


def test_eval_runs_on_the_workers_and_gives_the_same_figure(concat16):
    spec = f"{concat16['eval']}:evaluate"
    samples = [{"x": np.load(concat16["dir"] / "data" / f"x_{i}.npy")} for i in range(4)]
    fp32 = onnx.load(concat16["model"])
    cands = [_scaled_first_conv(fp32, s) for s in (1.01, 0.9)]
    local = Evaluator(fp32, samples, Target(cosine=None, eval_fn=spec)).score_many(cands)
    pids = concat16["dir"] / "eval.pids"
    pids.write_text("")
    far = Evaluator(fp32, samples, Target(cosine=None, eval_fn=spec), Execution(workers=2))
    assert [s.to_dict() for s in far.score_many(cands)] == [s.to_dict() for s in local]
    ran = [int(p) for p in pids.read_text().split()]
    assert ran[0] == os.getpid() and len(ran) == 3 and os.getpid() not in ran[1:], "fp32's figure here, the candidates' on workers"
    # the figure is the hook's own, computed here independently
    x = np.linspace(-2, 2, 8 * 12 * 12, dtype=np.float32).reshape(1, 8, 12, 12)
    want = -float(np.abs(run(cands[1], {"x": x})[0].astype(np.float64) - run(fp32, {"x": x})[0]).mean())
    assert local[1].task == pytest.approx(want, rel=1e-6) and local[1].task < local[0].task < 0
    # an --eval function that fails on a worker is the same one-paragraph error as here
    failing = Evaluator(fp32, samples, Target(cosine=None, eval_fn=f"{concat16['eval']}:broken"), Execution(workers=2))
    with pytest.raises(InputError, match=r"--eval function .*broken' failed: ValueError: no labels on this node"):
        failing.score_many(cands)


def _scaled_first_conv(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """A copy of the model with its first weight scaled: a candidate whose outputs differ from fp32's."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = out.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * np.float32(scale), w.name))
    return out


def test_a_worker_killed_during_the_proposal_is_a_clear_error_and_leaves_artifacts(capsys, concat16):
    out = concat16["dir"] / "out"
    args = ["step1", concat16["model"], "-d", concat16["dataset"], "--out", out, "--proposal", "--eval", f"{concat16['eval']}:evaluate",
            "--workers", "2"]
    code, text = cli(capsys, *args)
    assert code == 0, text
    before = {p.name: _digest(p) for p in out.iterdir()}
    (concat16["dir"] / "kill.eval").write_text("")  # the --eval function, on a worker, kills its process
    code, text = cli(capsys, *args)
    assert code == 1, text
    assert "ended abruptly" in text and "(signal 9)" in text and "Traceback" not in text
    assert {p.name: _digest(p) for p in out.iterdir()} == before, "no artifact half-written, none replaced"


def _kill_setup(ws: dict[str, Path], victim: str) -> None:
    (ws["dir"] / "data" / "driver.pid").write_text(str(os.getpid()))
    (ws["dir"] / "data" / "kill.name").write_text(victim)
    (ws["dir"] / "hook.py").write_text(KILL_HOOK)


def test_a_killed_worker_ends_step1_with_a_clear_error_and_leaves_artifacts(capsys, cnn20):
    out = cnn20["dir"] / "out"
    args = ["step1", str(cnn20["model"]), "-d", str(cnn20["dataset"]), "--out", str(out), "--preprocess", str(cnn20["dir"] / "hook.py") + ":load"]
    _kill_setup(cnn20, "none")
    assert cli(capsys, *args, "--workers", "2")[0] == 0
    before = {p.name: _digest(p) for p in out.iterdir()}
    _kill_setup(cnn20, "x_13.npy")  # read by a worker only
    code, text = cli(capsys, *args, "--workers", "2")
    assert code == 1, text
    assert "ended abruptly while it ran samples 10-14 (signal 9)" in text and "Traceback" not in text
    assert {p.name: _digest(p) for p in out.iterdir()} == before, "no artifact half-written, none replaced"


def test_a_killed_worker_ends_analyze_and_bad_flags_are_usage_errors(capsys, cnn20):
    r1 = hybridq.step1(cnn20["model"], cnn20["dataset"], out=cnn20["dir"] / "ws")
    _kill_setup(cnn20, "x_5.npy")
    with pytest.raises(WorkerLost, match="samples 5-5"):
        hybridq.analyze(cnn20["model"], r1.cfg, cnn20["dataset"], execution=Execution(workers=2),
                        preprocess={"hook": str(cnn20["dir"] / "hook.py") + ":load"}, force_preprocess=True)
    with pytest.raises(InputError, match="--workers"):
        Execution(workers=-1).validate()
    code, text = cli(capsys, "analyze", cnn20["model"], r1.cfg, "-d", cnn20["dataset"], "--workers", "-2")
    assert code == 2 and "--workers must be" in text


class _Squares:
    """A tiny job: each shard returns its items squared; finish returns how many shards this worker ran."""

    def start(self, threads: int) -> None:
        self.ran = 0

    def run(self, shard: Shard, progress) -> list[int]:
        self.ran += 1
        progress(shard.samples)
        return [i * i for i in shard.items]

    def finish(self) -> int:
        return self.ran


@pytest.mark.parametrize("execution", [None, Execution(workers=3)])
def test_results_come_back_in_shard_order_and_progress_counts_every_sample(execution):
    got, counted = [], []
    finals = execute(_Squares(), (Shard(k, (k, k + 100), 2) for k in range(12)), execution, lambda s, r: got.append((s.index, r)),
                     counted.append)
    assert got == [(k, [k * k, (k + 100) ** 2]) for k in range(12)]
    assert sum(counted) == 24 and sum(finals) == 12


def test_ray_is_not_imported_unless_asked():
    import subprocess

    code = ("import sys, hybridq.api, hybridq.cli, hybridq.execution, hybridq.analysis, hybridq.calibration_job\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert res.stdout.strip() == "[]"


def test_ray_missing_is_a_usage_error_naming_the_extra(monkeypatch, cnn20):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` then raises ImportError, as without the extra
    with pytest.raises(InputError, match=r"pip install 'hybridq\[ray\]'"):
        hybridq.step1(cnn20["model"], cnn20["dataset"], out=cnn20["dir"] / "out", execution=Execution(ray="local"))
    assert not (cnn20["dir"] / "out").exists() or not any((cnn20["dir"] / "out").iterdir())


def test_local_workers_are_no_more_than_the_shards_and_a_failed_start_is_named(monkeypatch):
    """--workers beyond the shards forks only one worker a shard (3000 on 8 samples took a minute); a worker the OS cannot
    start (out of processes or file descriptors) is a one-paragraph error, not "can only join a started process"."""
    import multiprocessing.context as mpc

    from hybridq import _workers

    started = []
    real = mpc.ForkProcess.start

    def count(self):
        started.append(self)
        return real(self)

    monkeypatch.setattr(mpc.ForkProcess, "start", count)
    got = []
    shards = [Shard(k, (k,), 1) for k in range(3)]
    _workers.run_local(_Squares(), iter(shards), 50, None, lambda s, r: got.append(r), lambda n: None)  # a stream, as analyze's
    assert len(started) == 3 and got == [[0], [1], [4]]

    def fail_second(self):
        if started:
            raise OSError(24, "Too many open files")
        started.append(self)
        return real(self)

    started.clear()
    monkeypatch.setattr(mpc.ForkProcess, "start", fail_second)
    with pytest.raises(HybridqError, match=r"could not start worker 2 of 3 \(Too many open files\).*use fewer --workers"):
        _workers.run_local(_Squares(), shards, 3, None, lambda s, r: None, lambda n: None)
    assert not started[0].is_alive()


def test_ray_init_leaves_the_clis_sigterm_handler_in_place(monkeypatch):
    """ray.init installs a SIGTERM handler of its own (a C++ trace, exit 15, sometimes a false error): the one the CLI
    installed is put back, so SIGTERM under --ray ends as without it (exit 143, its paragraph, artifacts untouched)."""
    import signal
    import types

    from hybridq import _ray

    def init(**kw):
        signal.signal(signal.SIGTERM, lambda *a: None)
        fake.up = True

    fake = types.SimpleNamespace(up=False, is_initialized=lambda: fake.up, init=init, shutdown=lambda: setattr(fake, "up", False))
    monkeypatch.setattr(_ray, "_import_ray", lambda: fake)
    ours = lambda *a: None  # noqa: E731
    old = signal.signal(signal.SIGTERM, ours)
    try:
        with _ray.connected("local") as (ray, started):
            assert started and signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_ray_address_where_nothing_listens_is_refused_at_once(monkeypatch, cnn20):
    """ray.init retries such an address for ever, deaf to Ctrl-C: a TCP connection is tried first, and refused it is a
    usage error naming the address (a fake Ray: no cluster is started)."""
    import socket
    import types

    from hybridq import _ray

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: pytest.fail("ray.init must not be reached"))
    monkeypatch.setattr(_ray, "_import_ray", lambda: fake)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match=rf"cannot connect to the Ray cluster at '{re.escape(address)}': nothing accepts"):
            hybridq.step1(cnn20["model"], cnn20["dataset"], out=cnn20["dir"] / "out", execution=Execution(ray=address))


def test_an_eval_directory_of_a_dead_process_is_removed(tmp_path, monkeypatch):
    """A scoring worker killed mid --eval leaves its temporary directory (test_a_worker_killed_...): the next --eval run
    removes those of dead processes, never a live one's."""
    import subprocess
    import sys
    import tempfile

    from hybridq.proposal.evaluator import task_score

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    left = tmp_path / f"hybridq-eval-{dead.stdout.strip()}-abc"
    mine = tmp_path / f"hybridq-eval-{os.getpid()}-abc"
    for d in (left, mine):
        d.mkdir()
        (d / "candidate.onnx").write_bytes(b"x")
    seen = []
    assert task_score(lambda p: seen.append(p) or 0.5, "m.py:f", b"model") == 0.5
    assert not left.exists() and mine.exists()
    assert Path(seen[0]).parent.name.startswith(f"hybridq-eval-{os.getpid()}-") and not Path(seen[0]).parent.exists()
