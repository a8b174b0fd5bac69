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
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._onnx import GraphIndex
from ..calibration import session_for
from ..dataset import load_callable
from ..errors import InputError
from ..metrics import SNR_DEFAULT, SliceAccumulator, SliceMetrics, channel_axis, normalised, output_ok, slice_sums


@dataclass
class Target:
    """What every output must reach (cosine, and SNR of the worst slice), and optionally a task metric."""

    cosine: float | None = 0.99
    snr_db: float | None = None
    eval_fn: str | None = None
    max_drop: float = 0.01

    def thresholds(self) -> tuple[float, float]:
        """(cosine, slice SNR) as analyze's verdict takes them; an unset one does not constrain."""
        cos = self.cosine if self.cosine is not None else -1.0
        snr = self.snr_db if self.snr_db is not None else (SNR_DEFAULT if self.cosine is not None else -math.inf)
        return cos, snr


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
    """A candidate's quality on every output, decisions flipped on Softmax outputs, and the task score (--eval)."""

    outputs: dict[str, OutputScore]
    task: float | None = None
    flips: int = 0
    decisions: int = 0

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
                "flips": self.flips, "decisions": self.decisions}

    def describe(self) -> str:
        text = (f"output cosine {self.worst_cosine:.5f}, SNR {self.worst_snr:.1f} dB (worst of whole tensor and slice-normalised), "
                f"worst slice SNR {self.worst_slice_snr:.1f} dB")
        if self.decisions:
            text += f", {self.flips}/{self.decisions} argmax decisions differ from fp32"
        return text + (f", task {self.task:.4f}" if self.task is not None else "")


class _OutputSums:
    """Float64 sums of one output, per slice along its channel axis (one slice when it has none)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.axis = channel_axis(shape)
        self.shape = tuple(shape)
        self.acc = SliceAccumulator(self.axis if self.axis is not None else 0)

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        if self.axis is not None and np.shape(ref)[self.axis] != self.shape[self.axis]:
            self._whole_only()  # the channel count changes between samples (dynamic shapes): as analyze does, no slices
        if self.axis is None:
            ref, test = np.reshape(ref, (1, -1)), np.reshape(test, (1, -1))
        self.acc.add_sums(slice_sums(ref, test, self.acc.axis))

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


class Evaluator:
    """Scores candidate models on fixed samples against the fp32 outputs (computed once)."""

    def __init__(self, fp32: onnx.ModelProto, samples: list[dict[str, np.ndarray]], target: Target) -> None:
        self.samples = samples
        self.target = target
        sess = session_for(fp32, basic=False)
        self.names = [o.name for o in sess.get_outputs()]
        self.ref = [sess.run(self.names, s) for s in samples]
        self.class_axis = {n: a for n, a in _softmax_axes(fp32, self.names).items()
                           if all(_is_distribution(r[self.names.index(n)], a) for r in self.ref)}
        self.evaluations = 0
        self._eval = None
        self.fp32_task = None
        if target.eval_fn:
            self._eval = load_callable(target.eval_fn, "--eval function")
            self.fp32_task = self._task(fp32)

    def _task(self, model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="hybridq-eval-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            onnx.save_model(model, str(path))
            try:
                return float(self._eval(str(path)))
            except Exception as exc:
                raise InputError(f"The --eval function {self.target.eval_fn!r} failed: {type(exc).__name__}: {exc}. It must take a model path and return a number.") from exc

    def score(self, model: onnx.ModelProto, limit: int | None = None) -> Score:
        """Run the candidate on the samples (the first `limit` only, for a quick sensitivity); one evaluation."""
        self.evaluations += 1
        sess = session_for(model, basic=False)
        sums = {n: _OutputSums(np.shape(r)) for n, r in zip(self.names, self.ref[0])} if self.ref else {}
        flips = decisions = 0
        for feeds, ref in list(zip(self.samples, self.ref))[:limit]:
            for name, r, q in zip(self.names, ref, sess.run(self.names, feeds)):
                sums[name].add(r, q)
                axis = self.class_axis.get(name)
                if axis is not None:
                    agree = np.argmax(r, axis=axis) == np.argmax(q, axis=axis)
                    flips += int(agree.size - np.count_nonzero(agree))
                    decisions += int(agree.size)
        task = self._task(model) if self._eval and limit is None else None
        return Score({n: s.score() for n, s in sums.items()}, task, flips, decisions)

    def met(self, s: Score) -> bool:
        """Does a score reach the target on every output, by analyze's verdict rule (whole tensor and every slice)?"""
        t = self.target
        cos, snr = t.thresholds()
        if not all(output_ok(o.cosine, o.snr_db, o.slices, cos, snr) for o in s.outputs.values()):
            return False
        if self._eval is not None and s.task is not None and self.fp32_task is not None and s.task < self.fp32_task - t.max_drop:
            return False
        return True

    def quality(self, s: Score) -> float:
        """One number for how good a candidate is (higher is better): the task score, else the measure the target names."""
        if s.task is not None:
            return s.task
        if self.target.cosine is None and self.target.snr_db is not None:
            return s.worst_snr
        return s.worst_cosine

    def flips_more(self, a: Score, b: Score) -> bool:
        """Does `a` flip clearly more argmax decisions than `b` (beyond sqrt of the two counts; never with a task score)?"""
        if a.task is not None or not a.decisions:
            return False
        return a.flips - b.flips > max(1.0, math.sqrt(a.flips + b.flips))

    def better(self, a: Score, b: Score) -> bool:
        """Is `a` a better candidate than `b`: higher quality, without clearly more flipped decisions?"""
        return self.quality(a) > self.quality(b) and not self.flips_more(a, b)


RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
"""Ops that move a Softmax's values without changing them (exporters wrap an N-d Softmax in Flatten ... Reshape)."""


def _softmax_axes(model: onnx.ModelProto, outputs: list[str]) -> dict[str, int]:
    """Outputs a Softmax (or LogSoftmax) writes, directly or through reshapes, with the axis its decision is taken along.

    Through a reshape the decision axis is the last one: kept only where the fp32 outputs are a distribution along
    it (see :func:`_is_distribution`), since a reshape may move the normalised axis.
    """
    index = GraphIndex(model.graph)
    axes: dict[str, int] = {}
    for name in outputs:
        node, reshaped = index.producer_node(name), False
        while node is not None and node.op_type in RESHAPES:
            node, reshaped = index.producer_node(node.input[0]), True
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            axes[name] = -1 if reshaped else next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axes


def _is_distribution(ref: np.ndarray, axis: int) -> bool:
    """Are the values along `axis` probabilities (or log-probabilities) summing to one?"""
    p = np.asarray(ref, dtype=np.float64)
    if p.ndim == 0 or p.shape[axis] < 2:
        return False
    if p.max(initial=0.0) <= 0.0:  # LogSoftmax
        p = np.exp(p)
    return bool(p.min() >= -1e-6 and np.allclose(p.sum(axis=axis), 1.0, atol=1e-3))
