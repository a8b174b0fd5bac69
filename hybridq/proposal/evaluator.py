"""How a candidate is scored: its outputs against fp32, whole tensor and slice by slice, and an optional task metric.

A whole-tensor cosine is dominated by the output's largest values: an output that
concatenates box coordinates (0-320) with class scores (0-1) keeps 0.9995 while its
scores are noise. Each output is therefore also compared slice by slice along axis 1
(the channel axis of NCHW maps and of [N, 4 + classes, anchors] detections, the time
axis of [N, T, classes] sequences), every slice normalised to unit energy so that each
counts the same: the *normalised* cosine is the mean of the slices' cosines, the
normalised SNR the signal-to-noise ratio of the normalised slices pooled. The target
checks the whole tensor and the normalised figure; the worst single slice is reported
(one ambiguous time step of a sequence model can sit far below the rest while the
task metric does not move).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..calibration import session_for
from ..errors import InputError

SLICE_AXIS = 1


@dataclass
class Target:
    """What every output must reach: cosine (whole and worst slice), and/or SNR, and optionally a task metric."""

    cosine: float | None = 0.99
    snr_db: float | None = None
    eval_fn: str | None = None
    max_drop: float = 0.01


@dataclass
class OutputScore:
    """One output of one candidate: whole-tensor and worst-slice figures, pooled over the samples."""

    cosine: float
    snr_db: float
    norm_cosine: float
    norm_snr_db: float
    slice_cosine: float
    slice_snr_db: float
    worst_slice: int | None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_float(v) for k, v in vars(self).items()}


@dataclass
class Score:
    """A candidate's quality on every output, and the task score when an --eval function is given."""

    outputs: dict[str, OutputScore]
    task: float | None = None

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
        return {"outputs": {k: v.to_dict() for k, v in self.outputs.items()}, "task": self.task}

    def describe(self) -> str:
        text = (f"output cosine {self.worst_cosine:.5f}, SNR {self.worst_snr:.1f} dB (worst of whole tensor and slice-normalised), "
                f"worst slice SNR {self.worst_slice_snr:.1f} dB")
        return text + (f", task {self.task:.4f}" if self.task is not None else "")


def _json_float(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class SliceSums:
    """Float64 sums per slice along axis 1 (r.r, q.q, r.q, d.d), added sample by sample in order."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = np.asarray(ref, np.float64)
        q = np.asarray(test, np.float64)
        if r.ndim <= SLICE_AXIS:
            r, q = r.reshape(1, -1), q.reshape(1, -1)
        else:
            r = np.moveaxis(r, SLICE_AXIS, 0).reshape(r.shape[SLICE_AXIS], -1)
            q = np.moveaxis(q, SLICE_AXIS, 0).reshape(q.shape[SLICE_AXIS], -1)
        d = r - q
        s = np.stack([(r * r).sum(1), (q * q).sum(1), (r * q).sum(1), (d * d).sum(1)])
        self.sums = s if self.sums is None else self.sums + s

    def score(self) -> OutputScore:
        rr, qq, rq, dd = self.sums
        whole = _cos_snr(rr.sum(), qq.sum(), rq.sum(), dd.sum())
        per = [_cos_snr(*c) for c in zip(rr, qq, rq, dd)]
        live = [i for i in range(len(per)) if rr[i] > 0 or qq[i] > 0]
        if not live:
            return OutputScore(*whole, *whole, *whole, None)
        norm_cos = float(np.mean([per[i][0] for i in live]))
        nsr = [dd[i] / rr[i] if rr[i] > 0 else math.inf for i in live]
        total = float(np.sum(nsr))
        norm_snr = math.inf if total == 0 else 10.0 * math.log10(len(live) / total)
        worst = min(live, key=lambda i: (per[i][1], per[i][0]))
        return OutputScore(whole[0], whole[1], norm_cos, norm_snr, per[worst][0], per[worst][1], worst if len(per) > 1 else None)


def _cos_snr(rr: float, qq: float, rq: float, dd: float) -> tuple[float, float]:
    """Cosine and SNR from sums; two zero tensors are identical (cosine 1, SNR +inf)."""
    if rr == 0 and qq == 0:
        return 1.0, math.inf
    cos = float(rq / math.sqrt(rr * qq)) if rr > 0 and qq > 0 else 0.0
    snr = math.inf if dd == 0 else (-math.inf if rr == 0 else 10.0 * math.log10(rr / dd))
    return cos, snr


class Evaluator:
    """Scores candidate models on fixed samples against the fp32 outputs (computed once)."""

    def __init__(self, fp32: onnx.ModelProto, samples: list[dict[str, np.ndarray]], target: Target) -> None:
        self.samples = samples
        self.target = target
        sess = session_for(fp32, basic=False)
        self.names = [o.name for o in sess.get_outputs()]
        self.ref = [sess.run(self.names, s) for s in samples]
        self.evaluations = 0
        self._eval = None
        self.fp32_task = None
        if target.eval_fn:
            from ..dataset import load_callable

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
        sums = {n: SliceSums() for n in self.names}
        for feeds, ref in list(zip(self.samples, self.ref))[:limit]:
            for name, r, q in zip(self.names, ref, sess.run(self.names, feeds)):
                sums[name].add(r, q)
        task = self._task(model) if self._eval and limit is None else None
        return Score({n: s.score() for n, s in sums.items()}, task)

    def met(self, s: Score) -> bool:
        """Does a score reach the target on every output (whole tensor and worst slice)?"""
        t = self.target
        if t.cosine is not None and s.worst_cosine < t.cosine:
            return False
        if t.snr_db is not None and s.worst_snr < t.snr_db:
            return False
        if self._eval is not None and s.task is not None and self.fp32_task is not None and s.task < self.fp32_task - t.max_drop:
            return False
        return True

    def quality(self, s: Score) -> float:
        """One number to compare candidates by (higher is better): the task score, else the measure the target names."""
        if s.task is not None:
            return s.task
        if self.target.cosine is None and self.target.snr_db is not None:
            return s.worst_snr
        return s.worst_cosine
