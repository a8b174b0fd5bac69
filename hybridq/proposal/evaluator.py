"""How a candidate is scored: its outputs against fp32, whole tensor and slice by slice, and an optional task metric.

A whole-tensor cosine is dominated by the output's largest values: an output that
concatenates box coordinates (0-320) with class scores (0-1) keeps 0.9995 while its
scores are noise. Each output is therefore also compared slice by slice along its
channel axis (:func:`hybridq.metrics.channel_axis`), each slice normalised by its
own energy. A candidate meets the target by the rule analyze's verdict uses
(:func:`hybridq.metrics.output_ok`: whole tensor and every slice); candidates are
compared by a smooth figure, the lower of the whole-tensor and the slice-normalised
cosine (mean slice cosine), since the single worst slice of a sequence model (one
ambiguous time step) moves by chance from candidate to candidate. For an output a
Softmax writes, the decision is its argmax: a candidate that flips clearly more
decisions than the current state is not taken, whatever its cosine (bias correction
on PP-OCR rec raised the output cosine and lowered character accuracy by flipping
blanks); "clearly" is beyond the noise of counting, sqrt of the flips compared.
Such an output's candidates are also compared on its log-probabilities (floored at
LOGP_FLOOR, centred along the class axis: above the floor, the logits up to the shift Softmax ignores),
not on the probabilities: near-one probabilities hide the margins a decision rests on.
On PP-OCR rec (16 samples), probability cosine ranked a proposal scoring char acc 0.965
above the default int8 model (0.968) and mse ranges (0.981) last; log-probability SNR
puts the default model below mse ranges, bias correction and the 0.979 proposal.
The target is still judged on the outputs as analyze judges them. An integer output
is no measure of closeness (a class index changed from 1 to 2 is not "nearer" than
from 0 to 4): its values are compared with fp32's, those that differ counted as flipped
decisions, and where a deciding op (an ArgMax, a threshold, NonMaxSuppression) computes
it from float tensors, those are judged in its place (:mod:`hybridq.proposal.judged`).

Each sample's sums are kept apart and added in sample order, so a candidate scored on
workers (:class:`ScoringJob`, any :mod:`hybridq.execution` back end) scores the same bit
for bit as one scored here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import _runtime
from .._fs import process_tempdir
from ..calibration import session_for
from ..dataset import load_callable
from ..errors import InputError
from ..inputs import portable_spec
from ..execution import Execution, Progress, Shard, contiguous, execute
from ..metrics import SNR_DEFAULT, SliceAccumulator, SliceMetrics, channel_axis, is_distribution, normalised, output_ok, slice_sums
from .judged import Decision, integer_outputs, log_probabilities, softmax_axes


@dataclass
class Target:
    """What every output must reach (cosine, and SNR of the worst slice), and optionally a task metric.

    The default is analyze's verdict: cosine 0.99 and worst-slice SNR 20 dB. A measure set to None does not constrain:
    `Target(cosine=0.95, snr_db=None)` is a cosine target alone (with the 20 dB beside it, the cosine would be moot:
    0.95 is about 10 dB)."""

    cosine: float | None = 0.99
    snr_db: float | None = SNR_DEFAULT
    eval_fn: str | None = None
    max_drop: float = 0.01

    def thresholds(self) -> tuple[float, float]:
        """(cosine, slice SNR) as analyze's verdict takes them; an unset one does not constrain."""
        return (self.cosine if self.cosine is not None else -1.0), (self.snr_db if self.snr_db is not None else -math.inf)

    def describe(self) -> str:
        """The target as enforced, for the report."""
        parts = ([f"cosine >= {self.cosine:g} on every output, whole tensor and each slice"] if self.cosine is not None else []) + (
            [f"worst-slice SNR >= {self.snr_db:g} dB"] if self.snr_db is not None else [])
        if self.eval_fn:
            parts.append(f"task score of {self.eval_fn} at most {self.max_drop:g} below fp32's")
        return "; ".join(parts) or "none"


@dataclass
class OutputScore:
    """One output of one candidate: whole tensor, slice-normalised and worst slice, pooled over the samples."""

    cosine: float
    snr_db: float
    norm_cosine: float
    norm_snr_db: float
    slices: SliceMetrics | None

    @property
    def slice_snr_db(self) -> float:
        return self.slices.snr_db[self.slices.worst] if self.slices else self.snr_db

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "snr_db": self.snr_db, "norm_cosine": self.norm_cosine, "norm_snr_db": self.norm_snr_db,
                "worst_slice": None if self.slices is None else {"axis": self.slices.axis, "index": self.slices.worst,
                                                                  "cosine": self.slices.cosine[self.slices.worst],
                                                                  "snr_db": self.slice_snr_db}}


@dataclass
class Score:
    """A candidate's quality on every output, decisions flipped on Softmax outputs, and the task score (--eval).

    `logp` holds the Softmax outputs' log-probability comparison (whole tensor), by which candidates are compared.
    """

    outputs: dict[str, OutputScore]
    task: float | None = None
    flips: int = 0
    decisions: int = 0
    logp: dict[str, OutputScore] = field(default_factory=dict)
    per_sample: list[tuple[float, float]] = field(default_factory=list)
    """(compared cosine, compared SNR) of each sample alone: what :meth:`Evaluator.resolution` pairs between candidates."""

    @property
    def compared_cosine(self) -> float:
        """:attr:`worst_cosine` with each Softmax output's log-probability cosine in place of its own."""
        return min(self.logp[n].cosine if n in self.logp else min(o.cosine, o.norm_cosine) for n, o in self.outputs.items())

    @property
    def compared_snr(self) -> float:
        """:attr:`worst_snr` with each Softmax output's log-probability SNR in place of its own."""
        return min(self.logp[n].snr_db if n in self.logp else min(o.snr_db, o.norm_snr_db) for n, o in self.outputs.items())

    @property
    def logp_snr(self) -> float | None:
        """The lowest log-probability SNR of the Softmax outputs (None: the model has none)."""
        return min(o.snr_db for o in self.logp.values()) if self.logp else None

    @property
    def worst_cosine(self) -> float:
        """The lowest cosine of any output, whole tensor or slice-normalised."""
        return min(min(o.cosine, o.norm_cosine) for o in self.outputs.values())

    @property
    def worst_snr(self) -> float:
        """The lowest SNR in dB of any output, whole tensor or slice-normalised."""
        return min(min(o.snr_db, o.norm_snr_db) for o in self.outputs.values())

    @property
    def worst_slice_snr(self) -> float:
        """The lowest SNR of any single slice of any output."""
        return min(o.slice_snr_db for o in self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": {k: v.to_dict() for k, v in self.outputs.items()}, "task": self.task,
                "flips": self.flips, "decisions": self.decisions, "log_probabilities": {k: v.to_dict() for k, v in self.logp.items()}}

    def describe(self) -> str:
        text = (f"output cosine {self.worst_cosine:.5f}, SNR {self.worst_snr:.1f} dB (worst of whole tensor and slice-normalised, "
                "errors pooled over the samples, as analyze's verdict judges them), "
                f"worst slice SNR {self.worst_slice_snr:.1f} dB")
        if self.logp_snr is not None:
            text += f", log-probability SNR {self.logp_snr:.1f} dB"
        if self.decisions:
            text += f", {self.flips}/{self.decisions} decisions (argmax, integer values) differ from fp32"
        return text + (f", task {self.task:.4f}" if self.task is not None else "")


@dataclass(frozen=True)
class _Layout:
    """How one output's samples are summed: per slice along `axis` (None: one whole-tensor slice), whole from sample `switch` on.

    `switch` is the first sample whose channel count differs from sample 0's (dynamic shapes): from there on, as analyze
    does, no slices. Known from the fp32 shapes alone, so a worker that sums samples 8-15 sums them as one process would.
    """

    axis: int | None
    switch: int | None

    @classmethod
    def of(cls, shapes: list[tuple[int, ...]]) -> "_Layout":
        axis = channel_axis(shapes[0])
        switch = None if axis is None else next((k for k, s in enumerate(shapes) if s[axis] != shapes[0][axis]), None)
        return cls(axis, switch)

    def sums(self, k: int, ref: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Sample `k`'s float64 sums (xx, yy, xy, dd per slice)."""
        if self.axis is None or (self.switch is not None and k >= self.switch):
            return slice_sums(np.reshape(ref, (1, -1)), np.reshape(test, (1, -1)), 0)
        return slice_sums(ref, test, self.axis)


class _OutputSums:
    """Float64 sums of one output, per slice along its channel axis (one slice when it has none), added in sample order."""

    def __init__(self, layout: _Layout) -> None:
        self.layout, self.axis = layout, layout.axis
        self.acc = SliceAccumulator(self.axis if self.axis is not None else 0)

    def add(self, k: int, sums: np.ndarray | None) -> None:
        """Add sample `k`'s sums (None: the sample is left out, its place in the order kept)."""
        if k == self.layout.switch:
            self._whole_only()
        if sums is not None:
            self.acc.add_sums(sums)

    def _whole_only(self) -> None:
        """Fold the slices seen so far into one whole-tensor slice and stop slicing."""
        self.axis = None
        whole = SliceAccumulator(0)
        if self.acc.sums is not None:
            whole.add_sums(self.acc.sums.sum(axis=1, keepdims=True))
        self.acc = whole

    def score(self) -> OutputScore:
        per = self.acc.result()
        xx, yy, xy, dd = (float(v) for v in self.acc.sums.sum(axis=1))
        whole = SliceAccumulator(0)
        whole.add_sums(np.array([[xx], [yy], [xy], [dd]]))
        w = whole.result()
        if self.axis is None:
            return OutputScore(w.cosine[0], w.snr_db[0], w.cosine[0], w.snr_db[0], None)
        ncos, nsnr = normalised(per)
        return OutputScore(w.cosine[0], w.snr_db[0], ncos, nsnr, per)


SamplePart = tuple[list[np.ndarray], int, int]
"""One sample's part of a score: each output's sums (in output order), argmax decisions flipped, decisions taken."""


def judged_session(model: onnx.ModelProto, decisions: list[Decision], threads: int = 0) -> Any:
    """A session over `model` that also writes each decided tensor under its :attr:`Decision.fetch` name."""
    if not decisions:
        return session_for(model, basic=False, threads=threads)
    nodes = [n for d in decisions for n in d.nodes(model)]
    return session_for(model, [f for d in decisions for f in d.fetch], basic=False, threads=threads, nodes=nodes)


@dataclass
class Scoring:
    """What scoring a candidate needs besides the candidate: the samples, their fp32 outputs and how to sum them (sent to workers).

    `names` are the judged outputs as fetched (an ArgMax's float input under :attr:`Decision.fetch`), `labels` the model
    outputs they stand for; `exact` the other integer outputs, fetched after them and compared value for value.
    """

    samples: list[dict[str, np.ndarray]]
    ref: list[list[np.ndarray]]
    names: list[str]
    layouts: list[_Layout]
    class_axis: dict[str, int]
    eval_fn: str | None
    labels: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    exact: list[str] = field(default_factory=list)

    def session(self, model: onnx.ModelProto, threads: int = 0) -> Any:
        """:func:`judged_session` of `model` for these decisions."""
        return judged_session(model, self.decisions, threads)

    def parts(self, sess: Any, indices: Iterable[int]) -> list[SamplePart]:
        """Run the candidate's session on the samples `indices`; each sample's sums and decisions."""
        from ..analysis.measuring import differing  # here: importing the analysis package costs every step1 ~25 ms

        out: list[SamplePart] = []
        counted = {f for d in self.decisions for f in d.fetch}  # a decided output's own values count its decisions
        for k in indices:
            ref, flips, decisions, sums = self.ref[k], 0, 0, []
            logp = []
            values = sess.run(self.names + self.exact, self.samples[k])
            for name, layout, r, q in zip(self.names, self.layouts, ref, values):
                sums.append(layout.sums(k, r, q))
                axis = self.class_axis.get(name)
                if axis is not None:
                    if name not in counted:
                        agree = np.argmax(r, axis=axis) == np.argmax(q, axis=axis)
                        flips += int(agree.size - np.count_nonzero(agree))
                        decisions += int(agree.size)
                    is_log = float(np.max(r)) <= 0.0  # the fp32 output of a LogSoftmax
                    lr, lq = (np.reshape(log_probabilities(v, axis, is_log), (1, -1)) for v in (r, q))
                    logp.append(slice_sums(lr, lq, 0))
            for r, q in zip(ref[len(self.names):], values[len(self.names):]):
                flips, decisions = flips + differing(r, q), decisions + max(np.size(r), np.size(q))
            out.append((sums + logp, flips, decisions))
        return out

    def merge(self, parts: Iterable[SamplePart], task: float | None) -> Score:
        """The score of every sample's part, added in sample order (the first part is sample 0's), with the compared
        figures of each sample alone (from PAIRED_MIN samples on, see :meth:`Evaluator.resolution`)."""
        parts = list(parts)
        score = self._merged(parts, task)
        if len(parts) >= PAIRED_MIN:
            for i in range(len(parts)):
                out = self._merged(parts, None, only=i)
                score.per_sample.append((out.compared_cosine, out.compared_snr))
        return score

    def _merged(self, parts: list[SamplePart], task: float | None, only: int | None = None) -> Score:
        dist = [n for n in self.names if n in self.class_axis]
        sums = [_OutputSums(layout) for layout in self.layouts] + [_OutputSums(_Layout(None, None)) for _ in dist]
        flips = decisions = 0
        for k, (per_output, f, d) in enumerate(parts):
            for acc, s in zip(sums, per_output):
                acc.add(k, s if only is None or k == only else None)
            if only is None or k == only:
                flips, decisions = flips + f, decisions + d
        n, label = len(self.names), dict(zip(self.names, self.labels or self.names))
        return Score({label[name]: s.score() for name, s in zip(self.names, sums)}, task, flips, decisions,
                     {label[name]: s.score() for name, s in zip(dist, sums[n:])})


def task_score(eval_fn: Callable[[str], Any], spec: str, model: onnx.ModelProto | bytes) -> float:
    """The --eval function's figure for `model`, saved to a temporary file it reads (its error as an InputError)."""
    with process_tempdir("hybridq-eval-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        if isinstance(model, bytes):
            path.write_bytes(model)
        else:
            onnx.save_model(model, str(path))
        try:
            score = float(eval_fn(str(path)))
        except Exception as exc:
            raise InputError(f"The --eval function {spec!r} failed: {type(exc).__name__}: {exc}. It must take a model path and return a number.") from exc
    if not math.isfinite(score):
        raise InputError(f"The --eval function {spec!r} returned {score} for a model: a target cannot be judged by it. "
                         "Make it return a finite number (e.g. accuracy in [0, 1]) for every model.")
    return score


class ScoringJob:
    """Score candidates on a worker (a :class:`hybridq.execution.Job`): a shard is one candidate's samples, or its --eval run.

    A shard's payload is (candidate, serialized model, "samples" | "task"); the --eval function is imported here by its
    spec, never pickled. The session of the last candidate is kept: a worker often runs several shards of one.
    """

    def __init__(self, scoring: Scoring) -> None:
        self.scoring = scoring
        self._threads, self._eval, self._held = 0, None, (-1, None)

    def start(self, threads: int) -> None:
        self._threads, self._held = threads, (-1, None)

    def run(self, shard: Shard, progress: Progress) -> list[SamplePart] | float:
        which, blob, kind = shard.payload
        if kind == "task":
            if self._eval is None:
                self._eval = load_callable(str(self.scoring.eval_fn), "--eval function")
            return task_score(self._eval, str(self.scoring.eval_fn), blob)
        if self._held[0] != which:
            self._held = (which, self.scoring.session(onnx.load_from_string(blob), self._threads))
        parts = self.scoring.parts(self._held[1], shard.items)
        progress(shard.samples)
        return parts

    def finish(self) -> None:
        self._held = (-1, None)


def score_remote(scoring: Scoring, models: Iterable[onnx.ModelProto], count: int, task: bool, execution: Execution) -> list[Score]:
    """Each model's score on the first `count` samples, computed on `execution`'s workers and merged in sample order.

    A candidate's samples are split into contiguous shards when there are more workers than candidates (a list of them).
    """
    chunks = max(1, (execution.workers or 1) // len(models)) if isinstance(models, Sized) and len(models) else 1
    parts: list[list[SamplePart]] = []
    tasks: list[float | None] = []

    def shards() -> Iterator[Shard]:
        k = 0
        for i, model in enumerate(models):  # a generator builds the next candidate while the workers score
            blob = model.SerializeToString()
            parts.append([])
            tasks.append(None)
            for a, b in contiguous(count, chunks):
                yield Shard(k, tuple(range(a, b)), b - a, (i, blob, "samples"))
                k += 1
            if task:
                yield Shard(k, (), 0, (i, blob, "task"))
                k += 1

    def arrived(shard: Shard, result: Any) -> None:
        which, _, kind = shard.payload
        if kind == "task":
            tasks[which] = result
        else:
            parts[which] += result  # shards arrive in shard order: a candidate's samples in sample order

    execute(ScoringJob(scoring), shards(), execution, arrived)
    return [scoring.merge(p, t) for p, t in zip(parts, tasks)]


class Evaluator:
    """Scores candidate models on fixed samples against the fp32 outputs (computed once).

    With an `execution` of its own workers (hybridq.execution), :meth:`score_many` scores candidates side by side on them.
    """

    def __init__(self, fp32: onnx.ModelProto, samples: list[dict[str, np.ndarray]], target: Target, execution: Execution | None = None) -> None:
        self.samples = samples
        self.target = target
        self.execution = execution
        decided, exact = integer_outputs(fp32)
        self.names, labels = [], []
        for o in fp32.graph.output:
            d = decided.get(o.name)
            self.names += d.fetch if d else [] if o.name in exact else [o.name]
            labels += d.labels if d else [] if o.name in exact else [o.name]
        if not self.names:
            raise InputError(f"Every output of the model ({', '.join(exact)}) is an integer tensor that no ArgMax, threshold or "
                             "NonMaxSuppression computes from a float tensor: the proposal has nothing to judge by cosine. Mark a "
                             "float tensor as a model output, or choose the float layers by analyze's figures.")
        self.notes = [d.note() for d in decided.values()] + [
            f"output '{n}' is integer, computed from no float tensor the proposal can judge: it counts the output's values that "
            "differ from fp32's as flipped decisions" for n in exact if n not in decided]
        sess = judged_session(fp32, list(decided.values()))
        self.ref = [sess.run(self.names + exact, s) for s in samples]
        sources = {s: f for d in decided.values() for s, f in zip(d.sources, d.fetch)}
        softmax = {**softmax_axes(fp32, self.names), **{sources[t]: a for t, a in softmax_axes(fp32, list(sources)).items()}}
        self.class_axis = {n: a for n, a in softmax.items() if all(is_distribution(r[self.names.index(n)], a) for r in self.ref)}
        layouts = [_Layout.of([np.shape(ref[i]) for ref in self.ref]) for i in range(len(self.names))] if self.ref else []
        self.evaluations = 0
        self._eval = None
        self.fp32_task = None
        spec = portable_spec(target.eval_fn) if target.eval_fn else None
        self.scoring = Scoring(samples, self.ref, self.names if self.ref else [], layouts, self.class_axis, spec,
                               labels if self.ref else [], list(decided.values()), exact)
        if spec:
            self._eval = load_callable(spec, "--eval function")
            self.fp32_task = self._task(fp32)

    def _task(self, model: onnx.ModelProto) -> float:
        return task_score(self._eval, str(self.target.eval_fn), model)

    def score(self, model: onnx.ModelProto, limit: int | None = None) -> Score:
        """Run the candidate on the samples (the first `limit` only, for a quick sensitivity); one evaluation."""
        self.evaluations += 1
        return self._scored(model, limit)

    def _scored(self, model: onnx.ModelProto, limit: int | None, threads: int = 0) -> Score:
        """:meth:`score` without counting it; ONNX Runtime on `threads` threads (0: one per core)."""
        sess = self.scoring.session(model, threads)
        parts = self.scoring.parts(sess, range(len(self.samples[:limit])))
        return self.scoring.merge(parts, self._task(model) if self._eval and limit is None else None)

    def score_many(self, models: Iterable[onnx.ModelProto], limit: int | None = None) -> list[Score]:
        """:meth:`score` of each model, the same figures bit for bit; side by side on the execution's workers when it has
        them, else on this process' cores (:meth:`_side_by_side`).

        `models` may be a generator: each candidate is then built here while the workers score the ones before it.
        """
        remote = self.execution is not None and (self.execution.backend == "ray" or self.execution.workers > 1)  # 1 worker: no gain
        many = not isinstance(models, Sized) or len(models) > 1
        if remote and many:
            scores = score_remote(self.scoring, models, len(self.samples[:limit]), self._eval is not None and limit is None, self.execution)
            self.evaluations += len(scores)
            return scores
        side = min(_runtime.cores(), SIDE_BY_SIDE)
        if many and side > 1 and self.execution is None and not (self._eval is not None and limit is None):
            return self._side_by_side(models, limit, side)
        return [self.score(m, limit) for m in models]

    def _side_by_side(self, models: Iterable[onnx.ModelProto], limit: int | None, width: int) -> list[Score]:
        """Each model scored on one of `width` threads, one ONNX Runtime thread each (it releases the GIL while it runs),
        each candidate built here meanwhile; scores in model order. One-thread sessions gave the outputs of sessions on
        every core bit for bit on PP-OCR rec, det and rec `target: npu` (the remote path relies on the same), and a test
        checks the figures against one-at-a-time scoring."""
        scores: list[Score] = []
        pending: deque[Future[Score]] = deque()
        with ThreadPoolExecutor(width, thread_name_prefix="hybridq-score") as pool:
            for model in models:
                pending.append(pool.submit(self._scored, model, limit, 1))
                while len(pending) > width:
                    scores.append(pending.popleft().result())
            scores.extend(f.result() for f in pending)
        self.evaluations += len(scores)
        return scores

    def met(self, s: Score) -> bool:
        """Does a score reach the target on every output, by analyze's verdict rule (whole tensor and every slice)?"""
        t = self.target
        cos, snr = t.thresholds()
        if not all(output_ok(o.cosine, o.snr_db, o.slices, cos, snr) for o in s.outputs.values()):
            return False
        if self._eval is not None and s.task is not None and self.fp32_task is not None and not s.task >= self.fp32_task - t.max_drop:
            return False
        return True

    def quality(self, s: Score) -> float:
        """One number for how good a candidate is (higher is better): the task score, else the measure the target names."""
        if s.task is not None:
            return s.task
        return s.compared_snr if self._by_snr else s.compared_cosine

    @property
    def quality_name(self) -> str:
        """What :meth:`quality` measures, to print beside its value."""
        return "task score" if self._eval is not None else "output SNR dB" if self._by_snr else "output cosine"

    @property
    def _by_snr(self) -> bool:
        """Does the target name an SNR alone (the quality measure is then the SNR, else the cosine)?"""
        return self.target.cosine is None and self.target.snr_db is not None

    def as_good(self, a: Score, b: Score) -> bool:
        """Is `a` as good as `b` within what the measure resolves (:meth:`resolution`): a task score no lower, an error
        (1 - cosine taken as a noise-to-signal ratio) within that many dB of b's, per sample on average where each
        sample was scored alone, else pooled; never with clearly more flipped decisions."""
        if self.flips_more(a, b):
            return False
        if a.task is not None and b.task is not None:
            return a.task >= b.task
        d = self._paired(a, b)
        gap = sum(d) / len(d) if d else self._db(a.compared_cosine, a.compared_snr) - self._db(b.compared_cosine, b.compared_snr)
        return gap >= -self.resolution(a, b)

    def _paired(self, a: Score, b: Score) -> list[float] | None:
        """Per-sample dB differences of `a` over `b` (None: too few samples, or a figure not finite)."""
        n = len(a.per_sample)
        if n < PAIRED_MIN or len(b.per_sample) != n:
            return None
        d = [self._db(*x) - self._db(*y) for x, y in zip(a.per_sample, b.per_sample)]
        return d if all(math.isfinite(v) for v in d) else None

    def _db(self, cosine: float, snr: float) -> float:
        """The quality measure in dB: the SNR, or 1 - cosine as a noise-to-signal ratio."""
        return snr if self._by_snr else -10.0 * math.log10(max(1.0 - cosine, 1e-30))

    def resolution(self, a: Score, b: Score) -> float:
        """dB by which `a` and `b` must differ to be told apart on these samples: twice the standard error of their
        per-sample dB differences (each sample scored alone, paired across the candidates), at least RESOLUTION_DB.

        Paired, a sample that moves both candidates alike cancels out, and one sample's swing counts as one of n. The
        leave-one-out error of the pooled figures it replaced let a single hard sample veto: PP-OCR det's 8 worst layers
        set float gained 2.1 dB over its 16 samples (14 better by 1.2-4.6 dB, two worse by 0.2 and 3.8) and were judged
        unresolved (2.3 dB); on 40 unseen pages they gain 3.5 dB (37 better)."""
        d = self._paired(a, b)
        if d is None:
            return RESOLUTION_DB
        n, mean = len(d), sum(d) / len(d)
        return max(RESOLUTION_DB, 2.0 * math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n))

    def flips_more(self, a: Score, b: Score) -> bool:
        """Does `a` flip clearly more argmax decisions than `b` (beyond sqrt of the two counts; never with a task score)?"""
        if a.task is not None or not a.decisions:
            return False
        return a.flips - b.flips > max(1.0, math.sqrt(a.flips + b.flips))

    def better(self, a: Score, b: Score) -> bool:
        """Is `a` a better candidate than `b`: higher quality, without clearly more flipped decisions?"""
        return self.quality(a) > self.quality(b) and not self.flips_more(a, b)


RESOLUTION_DB = 0.5
"""Candidates whose output errors differ by less than this are alike: below the target, the cheaper one is kept."""
PAIRED_MIN = 4
"""Samples from which a score carries each sample's figures and :meth:`Evaluator.resolution` is estimated."""

SIDE_BY_SIDE = 2
"""Candidates scored at once in this process at most, one core each: two one-thread runs side by side do more than one
run on two threads, whose layers are too small to split well. PP-OCR rec, `target: npu`, on a 2-core Xeon: its 64
sensitivity runs 12.3 -> 10.0 s, `step1 --proposal` 49.4 -> 45.5 s, the same table and cfg."""
