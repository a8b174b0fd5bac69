"""Measuring: per-tensor accumulation of one sample's errors, added to the totals in sample order.

:meth:`Measure.sample` runs where the sample runs (a worker) and compares each
tensor as soon as its arrays exist; :meth:`Measure.add` adds a sample's
figures in the caller, in sample order; :meth:`Measure.layers` gives the rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from ..cost import concrete_shapes
from ..errors import ArtifactMismatchError
from ..graph import tensor_shapes
from ..metrics import Accumulator, Metrics, SliceAccumulator, channel_axis, metrics_many, sample_metrics, slice_sums
from .graphs import AnalysisGraph, compared_names
from .matching import AnalysisPlan, ComparedTensor
from .results import LayerError, OutputMatch, SampleSink

class SegmentRunner(Protocol):
    """What :meth:`Measure.sample` runs a sample on (:class:`~hybridq.analysis.running.Runner`)."""

    exact_failed: bool

    def run(self, sample: dict[str, np.ndarray], index: int) -> Iterator[dict[str, np.ndarray]]:
        """Each segment's outputs in turn."""
        ...


@dataclass
class SampleErrors:
    """One sample's measurements, made by a worker and added to the totals in sample order."""

    index: int
    values: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)  # entire[, single]
    shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # shape and dtype
    skipped: set[str] = field(default_factory=set)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # fp32, quant (dump only)
    slices: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # model outputs: axis, slice_sums
    whole: dict[str, np.ndarray] = field(default_factory=dict)  # model outputs: the whole tensor's (a.a, b.b, a.b, d.d)
    unequal: dict[str, str] = field(default_factory=dict)  # not compared: fp32 and quantized shapes (data-dependent)
    matches: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer or bool outputs: values that differ, values
    exact_failed: bool = False  # measured on this CPU's default int8 kernels although exact ones were asked for
    nonfinite: dict[str, tuple[int, int]] = field(default_factory=dict)  # +-inf/NaN left out: (equal infinities, values that differ)


class Measure:
    """Per-tensor accumulators; :meth:`sample` runs in the workers, :meth:`add` in the caller, in sample order."""

    def __init__(
        self, plan: AnalysisPlan, ag: AnalysisGraph, exact: bool, outputs: Iterable[str] = (), compiled: bool = True,
        shapes: dict[str, tuple[int | str | None, ...]] | None = None,
    ) -> None:
        self.plan, self.ag, self.exact, self.compiled = plan, ag, exact, compiled  # compiled: the numba kernel (else numpy blocks)
        self.inferred = shapes or {}  # fp32 shapes inferred for the first sample's input shapes: a data-dependent dim is open
        self.unequal: dict[str, list[tuple[int, str]]] = defaultdict(list)  # tensor -> (sample, shapes) not compared
        self.counted: set[str] = set()  # tensors compared on at least one sample
        self.compared_on: dict[str, list[int]] = defaultdict(list)  # tensor -> the samples it was compared on, in order
        self.n_samples = 0
        self.outputs = frozenset(outputs)  # model outputs get the per-slice measure too
        self.slices: dict[str, SliceAccumulator] = {}
        self.whole: dict[str, np.ndarray] = {}  # model outputs: sums over the samples, for the pooled figures
        self.ragged: set[str] = set()
        self.slices_dropped: set[str] = set()  # outputs sliced on some samples, not on others: judged whole, and said so
        self.entire = {tp.tensor: Accumulator() for tp in plan.tensors}
        self.single = {t: Accumulator() for t in ag.single_views}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.exact_failed = False
        self.matches: dict[str, list[int]] = {}  # integer or bool outputs: values that differ, values, samples
        self.nonfinite: dict[str, list[int]] = {}  # tensor -> non-finite values left out: equal infinities, differing, samples
        self.todo = {tp.tensor: (tp, compared_names(tp, ag)) for tp in plan.tensors + plan.exact}
        self.wanted = {x for _, names in self.todo.values() for x in names}
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for t, (_, names) in self.todo.items():
            for x in names:
                self.by_name[x].append(t)

    def sample(self, runner: SegmentRunner, sample: dict[str, np.ndarray], n: int) -> SampleErrors:
        """Run one sample segment by segment, measuring each tensor as soon as its arrays exist.

        The arrays are still in cache then, and dropped right after (kept
        for the snapshot in ``exact`` mode).
        """
        res = SampleErrors(n, exact_failed=runner.exact_failed)
        waiting: dict[str, np.ndarray] = {}
        done: set[str] = set()
        for out in runner.run(sample, n):
            waiting.update((k, v) for k, v in out.items() if k in self.wanted)
            for tp, vals in self.ready(waiting, done):
                self._measure(tp, vals, res)
        return res

    def ready(self, have: dict[str, np.ndarray], done: set[str]) -> list[tuple[ComparedTensor, list[np.ndarray]]]:
        """Tensors not in ``done`` whose compared arrays are all in ``have``, with those arrays.

        Adds them to ``done`` and drops from ``have`` the arrays no other
        pending tensor needs, so a sample's tensors are freed as it goes.
        """
        out = []
        for x in list(have):
            for t in self.by_name.get(x, []):
                tp, names = self.todo[t]
                if t not in done and all(y in have for y in names):
                    done.add(t)
                    out.append((tp, [have[y] for y in names]))
        for tp, _ in out:
            for y in self.todo[tp.tensor][1]:
                if y in have and all(u in done for u in self.by_name[y]):
                    del have[y]
        return out

    def _measure(self, tp: ComparedTensor, vals: list[np.ndarray], res: SampleErrors) -> None:
        """One tensor of one sample: its metrics against each view (and its arrays for a dump)."""
        t, a, tests = tp.tensor, vals[0], vals[1:]
        if a.dtype.kind != "f" and t not in self.outputs:
            res.skipped.add(t)  # not a float tensor after all (types were unknown)
            return
        if res.index == 0:  # the totals keep the first sample's shape and dtype
            res.shapes[t] = (tuple(a.shape), str(a.dtype))
        raw = (a, tests[0])  # a dump keeps the values; the figures compare what the readers tell apart:
        for b in tests:
            if a.shape != b.shape:
                if not self.data_dependent(t, a.shape, b.shape):
                    raise ArtifactMismatchError(
                        f"tensor {t!r} has shape {a.shape} in the float model but its quantized view "
                        f"{tp.view!r} has shape {b.shape} (sample {res.index}): the quantized model was not built from "
                        "this float model. Pass the fp32 model given to step1 as FLOAT_MODEL."
                    )
                res.unequal[t] = f"fp32 {a.shape} vs quantized {b.shape}"
                if self.exact and a.dtype.kind == "f":
                    res.arrays[t] = raw
                return
        if a.dtype.kind != "f":  # an integer or bool output (an ArgMax, a mask): value for value
            res.matches[t] = (differing(a, tests[0]), int(a.size))
            return
        if tp.bounds is not None:  # beyond their saturation points (HardSwish below -3) all values are one to them
            a, tests = np.clip(a, *tp.bounds), [np.clip(b, *tp.bounds) for b in tests]
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite value on either side makes the distance non-finite
            values = [sample_metrics(a, b) for b in tests] if self.exact else metrics_many(a, tests, compiled=self.compiled)
        if not all(np.isfinite(v[1]) for v in values):  # +-inf or NaN (an attention mask's -inf): compared apart
            pairs, res.nonfinite[t] = finite_part(a, tests)
            values = [sample_metrics(x, y) for x, y in pairs]
            a, tests = pairs[0][0], [y for _, y in pairs]  # the output's sums below: the first view's pair
        res.values[t] = values
        if self.exact:
            res.arrays[t] = raw
        if t in self.outputs:  # pooled over the samples, as the proposal judges them: per slice, and the whole tensor
            fast = self.compiled and not self.exact
            if (axis := channel_axis(a.shape)) is not None:
                res.slices[t] = (axis, slice_sums(a, tests[0], axis, fast=fast))
            res.whole[t] = res.slices[t][1].sum(axis=1) if t in res.slices else slice_sums(a.reshape(1, -1), tests[0].reshape(1, -1), 0, fast=fast)[:, 0]

    def data_dependent(self, t: str, fp: tuple[int, ...], quant: tuple[int, ...]) -> bool:
        """Do the fp32 and quantized shapes of ``t`` differ only in dims its inferred shape leaves open (set by the data,
        as after NonZero or NonMaxSuppression)? A different rank or static dim is another model's tensor."""
        dims = self.inferred.get(t)
        if dims is None or len(dims) != len(fp):
            dims = (None,) * len(fp)  # not inferred: any dim may be the data's
        return len(fp) == len(quant) and all(x == y or not isinstance(d, int) for x, y, d in zip(fp, quant, dims))

    def add(self, res: SampleErrors) -> None:
        """Add one sample's measurements to the totals (samples must come in order)."""
        self.exact_failed |= res.exact_failed
        self.n_samples += 1
        self.counted.update(res.values)
        self.counted.update(res.matches)
        for t, shapes in res.unequal.items():
            self.unequal[t].append((res.index, shapes))
        for t, counts in res.nonfinite.items():
            acc = self.nonfinite.setdefault(t, [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + counts[0], acc[1] + counts[1], acc[2] + 1
        for t, (differ, total) in res.matches.items():
            acc = self.matches.setdefault(t, [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + differ, acc[1] + total, acc[2] + 1
        if res.index == 0:
            self.skipped |= res.skipped
            for t, (shape, dtype) in res.shapes.items():
                self.shapes[t], self.dtypes[t] = shape, dtype
        for t, values in res.values.items():
            if t in self.skipped:
                continue
            self.compared_on[t].append(res.index)
            self.entire[t].add_values(values[0])
            if len(values) > 1:
                self.single[t].add_values(values[1])
        for t, sums in res.whole.items():
            if t not in self.skipped:
                self.whole[t] = self.whole[t] + sums if t in self.whole else sums.copy()
        for t in self.outputs.intersection(res.values).difference(res.slices):
            self.ragged.add(t)  # no slice axis on this sample (an axis of length 1): no per-slice measure
            if self.slices.pop(t, None) is not None:
                self.slices_dropped.add(t)
        for t, (axis, sums) in res.slices.items():
            if t in self.ragged:
                self.slices_dropped.add(t)
            if t in self.skipped or t in self.ragged:
                continue
            acc = self.slices.setdefault(t, SliceAccumulator(axis))
            if acc.axis != axis or (acc.sums is not None and acc.sums.shape != sums.shape):
                self.ragged.add(t)  # the slice axis moved or changed length between samples: no per-slice measure
                self.slices_dropped.add(t)
                del self.slices[t]
                continue
            acc.add_sums(sums)

    def notes(self) -> list[str]:
        """What was left out: non-finite values (:func:`finite_part`); tensors whose fp32 and quantized shapes differed on
        some sample (set by the data)."""
        notes = [nonfinite_note(self.nonfinite)] if self.nonfinite else []
        if self.slices_dropped:
            notes.append(f"no worst-slice figure for output(s) {', '.join(sorted(self.slices_dropped))}: the slice axis changed length "
                         "(or vanished) between samples, so the slices cannot be pooled; the output is judged on the whole tensor")
        if not self.unequal:
            return notes
        told = [
            f"{t!r}: {runs[0][1]} on sample {runs[0][0]}; not compared on {len(runs)} of {self.n_samples} sample(s)"
            + ("" if t in self.counted else ", so no row")
            for t, runs in self.unequal.items()
        ]
        return notes + ["shape depends on the data, so the fp32 and quantized shapes differ: " + "; ".join(told)]

    def dump(self, sink: SampleSink, res: SampleErrors) -> None:
        """Append one sample's arrays, in plan order, to the snapshot."""
        sink.add_sample({tp.tensor: res.arrays[tp.tensor] for tp in self.plan.tensors if tp.tensor in res.arrays})

    def _result(self, acc: Accumulator, tensor: str) -> Metrics:
        """The accumulator's figures; for a tensor left out on some samples, ``per_sample["sample"]`` holds the run's index
        of each value, so the worst sample is named by its place in the run, not among the compared ones."""
        m = acc.result()
        seen = self.compared_on.get(tensor, [])
        if seen != list(range(len(seen))):  # one index per value: both are added in Measure.add, together
            m.per_sample["sample"] = [float(i) for i in seen]
        return m

    def layers(self) -> list[LayerError]:
        """One row per measured tensor, in graph order."""
        return [
            LayerError(
                tensor=tp.tensor,
                layer=tp.layer,
                op_type=tp.op_type,
                shape=self.shapes[tp.tensor],
                dtype=self.dtypes[tp.tensor],
                entire=self._result(self.entire[tp.tensor], tp.tensor),
                single=self._result(self.single[tp.tensor], tp.tensor) if tp.tensor in self.single else None,
                quant_tensor=tp.view,
                precision=tp.precision,
                folded=tp.folded,
                slices=self.slices[tp.tensor].result() if tp.tensor in self.slices else None,
                bounds=tp.bounds,
                pooled=_pooled(self.whole[tp.tensor]) if tp.tensor in self.whole else None,
                nonfinite=(self.nonfinite[tp.tensor][0], self.nonfinite[tp.tensor][1]) if tp.tensor in self.nonfinite else None,
            )
            for tp in self.plan.tensors
            if tp.tensor not in self.skipped and tp.tensor not in self.matches and self.dtypes.get(tp.tensor, "float")[0] == "f"
            and (tp.tensor in self.counted or tp.tensor not in self.unequal)
        ]

    def exact_outputs(self) -> list[OutputMatch]:
        """The integer or bool model outputs compared value for value on at least one sample, in plan order."""
        return [
            OutputMatch(tp.tensor, tp.layer, self.dtypes[tp.tensor], self.shapes[tp.tensor], *self.matches[tp.tensor])
            for tp in self.plan.tensors + self.plan.exact if tp.tensor in self.matches
        ]

    def why_not(self, tensor: str) -> str | None:
        """Why model output ``tensor`` has no figures, when the samples tell: its shapes differed on every sample."""
        runs = self.unequal.get(tensor)
        if not runs:
            return None
        return (f"its shape depends on the data and the fp32 and quantized shapes differed on all {len(runs)} sample(s) "
                f"({runs[0][1]} on sample {runs[0][0]})")


def finite_part(a: np.ndarray, tests: list[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[int, int]]:
    """``a`` and each view as a pair, with every value that is not finite on both sides set to 0 on both (so it adds
    nothing to any sum), and, for the first view, how many were equal infinities (both models agree: an attention mask's -inf) and how
    many differ (NaN, or infinite in one model only, or infinities of opposite sign)."""
    out, counts = [], (0, 0)
    for k, b in enumerate(tests):
        keep = np.isfinite(a) & np.isfinite(b)
        if k == 0:
            agree = int(np.count_nonzero((a == b) & ~keep))
            counts = (agree, int(keep.size - np.count_nonzero(keep)) - agree)
        out.append((np.where(keep, a, 0).astype(a.dtype, copy=False), np.where(keep, b, 0).astype(b.dtype, copy=False)))
    return out, counts


def differing(a: np.ndarray, b: np.ndarray) -> int:
    """How many values of two integer or bool tensors differ; every one when their shapes differ (data-dependent)."""
    if np.shape(a) != np.shape(b):
        return max(int(np.size(a)), int(np.size(b)))
    return int(np.count_nonzero(np.asarray(a) != np.asarray(b)))


def nonfinite_note(counts: dict[str, list[int]]) -> str:
    """The note on the non-finite values left out of the figures, per tensor."""
    told = [f"{t!r}: {agree} equal infinities" + (f", {differ} that differ" if differ else "") + f" on {n} sample(s)"
            for t, (agree, differ, n) in counts.items()]
    return ("non-finite values (+-inf, NaN) are left out of the figures; equal infinities in both models agree (an "
            "attention mask's -inf), any other (NaN, or infinite in one model only) differs and makes an output CHECK: "
            + "; ".join(told))


def _pooled(sums: np.ndarray) -> tuple[float, float]:
    """Whole-tensor cosine and SNR of the sums of every sample (the proposal's figures for an output)."""
    acc = SliceAccumulator(0)
    acc.add_sums(sums.reshape(4, 1))
    m = acc.result()
    assert m is not None
    return m.cosine[0], m.snr_db[0]


def target_bytes(
    fm: onnx.ModelProto, plan: AnalysisPlan, targets: list[list[str]], sample: dict[str, np.ndarray] | None
) -> tuple[list[float], dict[str, tuple[int | str | None, ...]]]:
    """Bytes each target's compared arrays take for ``sample`` (unknown sizes get the mean), and the fp32 shapes they
    come from: inferred for ``sample``'s input shapes, so a dim left open is set by the data (:meth:`Measure.data_dependent`)."""
    shapes = tensor_shapes(concrete_shapes(fm, sample)) if sample is not None else {}
    sizes: list[float | None] = []
    for tp, names in zip(plan.tensors + plan.exact, targets):
        dims = shapes.get(tp.tensor)
        known = dims is not None and all(isinstance(d, int) and d > 0 for d in dims)
        sizes.append(4.0 * len(names) * float(np.prod(dims)) if known else None)  # type: ignore[arg-type]
    seen = [x for x in sizes if x is not None]
    fill = sum(seen) / len(seen) if seen else float(1 << 20)
    return [fill if x is None else x for x in sizes], shapes
