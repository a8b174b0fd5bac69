"""Cost-aware placement for `target: cpu`: which layers run int8 so the model is fastest on this CPU.

Pure data and arithmetic: a :class:`CostTable` (what each layer costs in fp32 and in int8, and
what a Q or DQ on each tensor costs, in milliseconds; measured by :mod:`hybridq.costmodel`) and
:func:`choose_int8`, which picks the set of int8 layers with the least predicted latency. The
prediction for a set S of int8 layers is

    T(S) = T_fp32 + sum over l in S of (int8_l - fp32_l) + sum over tensors t of boundary(t, S)

where boundary(t, S) is a QuantizeLinear on t when a layer in S reads t and t's producer is not
in S, plus a DequantizeLinear on t when t's producer is in S and some reader of t is not.

The profiled kernel times miss what the int8 model pays outside the layers' kernels (the Q/DQ and
layout Transposes at float ops, the profiler's per-node bias, memory traffic), which dominates a small
model. When the whole model was also timed with every costed layer int8 (``model_int8``), that
measured remainder R = T_int8 - T(all) is charged to each int8 layer in proportion to its fp32 time,
so T(S) is exact at both measured ends (no layer int8, every layer int8).
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any

IMPROVEMENT_MS = 1e-4
"""A move must save more than this (ms) to be taken: ties stay int8, as before."""
BOUNDARY_WEIGHT = 0.0
"""Share of a float boundary's measured Q/DQ time charged to a placement. A float layer between int8
ones also loses ONNX Runtime's NCHWc reorders and NHWC Transposes, which the per-layer times leave out;
the measured remainder (see above) holds what is left at the all-int8 end. Weighted 1, the predictions
on the PP-OCR models were no closer (rec 1 % -> 7 % off, det and cls unchanged; bench/cost.py, loaded machine)."""


@dataclass
class CostTable:
    """Milliseconds per layer (fp32, int8 kernel) and per tensor (Q, DQ), and the whole fp32 model, on one CPU."""

    fp32: dict[str, float] = field(default_factory=dict)
    int8: dict[str, float] = field(default_factory=dict)
    quantize: dict[str, float] = field(default_factory=dict)
    dequantize: dict[str, float] = field(default_factory=dict)
    model_fp32: float = 0.0
    model_int8: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the cache and the `.data` meta)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        """The table written by :meth:`to_dict`."""
        return cls(**{k: data[k] for k in ("fp32", "int8", "quantize", "dequantize", "model_fp32", "model_int8", "source") if k in data})

    def remainder_rate(self, boundaries: float = 0.0) -> float:
        """The measured remainder (ms) per fp32 ms of layer moved to int8, 0 when unmeasured:
        (T_int8 - T_fp32 - sum of kernel deltas - the all-int8 model's charged boundaries) / sum fp32."""
        names = sorted(n for n in self.int8 if n in self.fp32)  # one summation order: a cached table reads back equal
        base = math.fsum(self.fp32[n] for n in names)
        if self.model_int8 <= 0 or self.model_fp32 <= 0 or base <= 0:
            return 0.0
        kernels = math.fsum(self.int8[n] - self.fp32[n] for n in names)
        return (self.model_int8 - self.model_fp32 - kernels - boundaries) / base


@dataclass(frozen=True)
class Layer:
    """A candidate int8 layer as placement sees it: the activations it reads and the tensor its Q would sit on."""

    inputs: tuple[str, ...]
    output: str | None


@dataclass
class Placement:
    """The chosen int8 layers, the predicted latency of the model with them, and of the model in fp32."""

    int8: set[str]
    predicted_ms: float
    fp32_ms: float


class _Costs:
    """T(S) - T_fp32 for sets of layers, and its change when one layer flips."""

    def __init__(self, layers: dict[str, Layer], readers: dict[str, list[str]], table: CostTable) -> None:
        self.layers, self.readers, self.t = layers, readers, table
        self.producer = {lay.output: n for n, lay in layers.items() if lay.output}
        self.reads: dict[str, list[str]] = {}
        for n, lay in layers.items():
            for t in lay.inputs:
                self.reads.setdefault(t, []).append(n)
        every = set(layers)
        self.rate = table.remainder_rate(sum(self.tensor(t, every) for t in self._tensors(every)))

    def tensor(self, t: str, s: set[str]) -> float:
        """The Q and DQ that tensor t needs when the layers in s run int8."""
        prod = self.producer.get(t)
        cost = 0.0
        if prod not in s and any(r in s for r in self.reads.get(t, ())):
            cost += self.t.quantize.get(t, 0.0)
        if prod in s and any(r not in s for r in self.readers.get(t, ())):
            cost += self.t.dequantize.get(t, 0.0)
        return cost * BOUNDARY_WEIGHT

    def own(self, n: str) -> float:
        """Layer n's int8 kernel minus its fp32 kernel, plus its share of the measured remainder."""
        return self.t.int8[n] - self.t.fp32[n] * (1.0 - self.rate)

    def _tensors(self, s: set[str]) -> set[str]:
        return {t for n in s for t in (*self.layers[n].inputs, self.layers[n].output) if t}

    def total(self, s: set[str]) -> float:
        return sum(self.own(n) for n in s) + sum(self.tensor(t, s) for t in self._tensors(s))

    def flip(self, n: str, s: set[str]) -> float:
        """T(s with n flipped) - T(s)."""
        lay = self.layers[n]
        near = {t for t in (*lay.inputs, lay.output) if t}
        other = s ^ {n}
        sign = 1.0 if n not in s else -1.0
        return sign * self.own(n) + sum(self.tensor(t, other) - self.tensor(t, s) for t in near)


def _components(s: set[str], c: _Costs) -> list[set[str]]:
    """Runs of int8 layers joined by a tensor one writes and another reads, in a stable order."""
    seen: set[str] = set()
    runs: list[set[str]] = []
    for start in sorted(s):
        if start in seen:
            continue
        run, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n in run:
                continue
            run.add(n)
            lay = c.layers[n]
            near = [c.producer.get(t) for t in lay.inputs] + (c.reads.get(lay.output, []) if lay.output else [])
            todo += [m for m in near if m in s and m not in run]
        seen |= run
        runs.append(run)
    return runs


def choose_int8(
    layers: dict[str, Layer], readers: dict[str, list[str]], table: CostTable, fixed: frozenset[str] | set[str] = frozenset(),
) -> Placement:
    """The int8 layers (among those the table costs) giving the least predicted latency; the rest stay float.

    A local search from all-int8: flip single layers, or move a whole run of int8 layers to float,
    while it saves time; if int8 does not pay at all, no layer is chosen. Layers the table does not
    cost are left out of the search (the caller keeps them as they were); layers in `fixed` stay int8.
    """
    costed = {n: lay for n, lay in layers.items() if n in table.fp32 and n in table.int8}
    c = _Costs(costed, readers, table)
    s = set(costed)
    pinned = s & set(fixed)
    for _ in range(4 * len(costed) + 4):
        best, move = -IMPROVEMENT_MS, None
        for n in sorted(set(costed) - pinned):
            d = c.flip(n, s)
            if d < best:
                best, move = d, {n}
        base = c.total(s)
        for run in _components(s - pinned, c):
            if len(run) > 1:
                d = c.total(s - run) - base
                if d < best:
                    best, move = d, run
        if move is None:
            break
        s ^= move
    delta = c.total(s)
    if delta >= c.total(pinned):
        s, delta = pinned, c.total(pinned)
    return Placement(s, table.model_fp32 + delta, table.model_fp32)


def predicted_ms(layers: dict[str, Layer], readers: dict[str, list[str]], table: CostTable, int8: set[str]) -> float:
    """Predicted model latency (ms) when exactly the layers in `int8` (those the table costs) run int8."""
    costed = {n: lay for n, lay in layers.items() if n in table.fp32 and n in table.int8}
    c = _Costs(costed, readers, table)
    return table.model_fp32 + c.total({n for n in int8 if n in costed})
