"""Does int8 pay for this model on this CPU? The default int8 model timed whole against fp32 after calibration.

The MAC rules place layers without timing them, and the measured cost model predicts the whole model
from its layers' parts (PP-OCR cls on a Xeon: its placement predicted 0.94 ms, ran 1.27 ms). On a model
whose layers are all small the Q/DQ boundaries cost what the int8 kernels save, and the int8 model is
slower than fp32 (PP-OCR cls, one thread: 1.24 ms int8 against 1.13 ms fp32 on a Xeon with AVX-512
VNNI, 0.84 against 0.83 ms on an EPYC). step1 then keeps every default layer float, each commented in
the cfg, and says so; the setting ``speed_check: false`` quantizes anyway. The check runs once, in
step1: the cfg carries its outcome, so step2 builds the same model on any machine.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from . import _runtime
from .plan import QuantPlan

MARGIN = 0.03
"""int8 is faster, or slower, than fp32 on one thread only by more than this (the noise of interleaved runs on a
shared machine is about this size); in between the two are as fast, and the model stays int8: a tie is no reason to
ship float, and it is what a busy sibling core reads for a faster int8 model (PP-OCR det read 91 ms int8 against
91 ms fp32 in a bench's step1, where its latency rounds measured 85 against 98 ms). One thread is the per-core cost,
as the measured cost model ranks layers (costmodel.THREADS): timings on every core swing by more than the difference
here (PP-OCR det on a 2-core Xeon: 97 ms int8 against 99 and 115 ms fp32 in two runs of the same step1)."""
BUDGET_S = 1.0
"""Timing budget, spent only while the outcome is unclear: then at least UNCLEAR_RUNS runs of each model, and at most
MAX_S seconds in all. Keeping a model float is a large change: three runs of PP-OCR det (130 ms each, all a 0.4 s
budget allowed) once put it at 136 ms int8 against 138 ms fp32, where the other step1 checks measured 0.85-0.91."""
MIN_RUNS = 3
UNCLEAR_RUNS = 7
MAX_S = 5.0
CLEAR = (0.85, 1.15)
"""After MIN_RUNS, an int8/fp32 ratio of the least times below the first decides at once; above the second, after
UNCLEAR_RUNS; between them the budget is spent. "Not faster" keeps the model float, so it needs the runs: three runs of
PP-OCR det on a shared VM read 102 ms int8 against 101 ms fp32 where the latency rounds measured 0.85x, and three on an
idle 2-core EPYC 124 ms int8 against 98 ms fp32 (1.26x, past CLEAR) where a step1 a minute later read 91 against 96."""
DECISIVE = 0.8
"""An int8/fp32 ratio below this after the first timed run of each decides "int8 pays" at once: one-thread CPU times of
a run vary by a few per cent, not by 20 % (a small detector: 4.1 ms int8 against 8.5 ms fp32 on a Xeon, 7.75 against
12.8 ms on an EPYC, where 0.6 took two more runs of each, 40 ms of step1). Only "pays" is decided so early: it keeps
the placement the MAC rules chose, while "slower" keeps the model float and needs the runs below."""


BUSY = 0.5
"""Cores' worth of other work on the machine while timing above which a "not faster" is not trusted. Other work on a
core's sibling slows the int8 kernels more than fp32 ones (they share the vector units): PP-OCR det, timed while
another process ran ONNX Runtime on the second core of a 2-core Xeon, read 168 ms int8 against 171 ms fp32 (idle:
108 against 125)."""


@dataclass
class SpeedCheck:
    """Least CPU milliseconds per run of the fp32 and the default int8 model, on one thread, and how many cores'
    worth of other processes' work ran meanwhile (0.0 where that cannot be read). Beyond MARGIN either way int8
    `pays` or is `slower`; in between the two are as fast."""

    fp32_ms: float
    int8_ms: float
    others: float = 0.0
    outputs: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # the warm-up run's outputs: fp32, int8

    @property
    def pays(self) -> bool:
        return self.int8_ms < (1.0 - MARGIN) * self.fp32_ms

    @property
    def slower(self) -> bool:
        return self.int8_ms > (1.0 + MARGIN) * self.fp32_ms

    def describe(self) -> str:
        return f"1 thread: {self.int8_ms:.3g} ms int8 vs {self.fp32_ms:.3g} ms fp32"


def time_pair(
    fp32: onnx.ModelProto, int8: onnx.ModelProto | Callable[[], onnx.ModelProto], feed: dict[str, np.ndarray], threads: int,
    outputs: list[list[np.ndarray]] | None = None, window: list | None = None,
) -> tuple[float, float]:
    """Least CPU milliseconds per run of each model on `threads` threads (1 for CPU time to be the run's), runs interleaved.

    With one intra-op thread ONNX Runtime computes in the calling thread, so this thread's CPU time is the run's
    cost, which other work on a shared machine does not inflate as it does wall time; the least of the runs is the
    one it disturbed least (as :mod:`hybridq.costmodel` times). Wall-time medians flipped PP-OCR det on a loaded
    2-core Xeon: 146 ms int8 against 149 ms fp32 in one step1, where the latency rounds measured 120 against 146 ms.
    `int8` may be the function that builds the model: the fp32 session opens beside the build, and the int8 one beside
    fp32's warm-up run (ONNX Runtime releases the GIL while it opens a session; small detector: 30 ms of step1), but no
    timed run has anything beside it. `outputs`, when given, receives each model's outputs of the warm-up run (fp32's,
    then int8's). `window`, when given, receives a CPU sample (:func:`_cpu_sample`) before the first timed run and one
    after the last: the other work the machine did while the runs were timed, not while the model was built.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridq-speed") as pool:
        opening = pool.submit(_runtime.session, fp32, threads=threads, log_level=3)
        built = int8() if callable(int8) else int8
        sessions = [opening.result()]
        opening = pool.submit(_runtime.session, built, threads=threads, log_level=3)
        warm = _warm(sessions[0], feed, outputs)
        sessions.append(opening.result())
    feeds = [warm, _warm(sessions[1], feed, outputs)]
    runs: list[list[float]] = [[], []]
    if window is not None:
        window.append(_cpu_sample())
    start = time.perf_counter()
    while True:
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.thread_time()
            s.run(None, f)
            runs[k].append((time.thread_time() - t0) * 1e3)
        ratio, spent = min(runs[1]) / min(runs[0]), time.perf_counter() - start
        if len(runs[0]) < MIN_RUNS and ratio >= DECISIVE:
            continue
        enough = len(runs[0]) >= UNCLEAR_RUNS
        if ratio < CLEAR[0] or (ratio > CLEAR[1] and enough) or (spent > BUDGET_S and enough) or spent > MAX_S or len(runs[0]) >= 200:
            if window is not None:
                window.append(_cpu_sample())
            return min(runs[0]), min(runs[1])


def _warm(session, feed: dict[str, np.ndarray], outputs: list[list[np.ndarray]] | None) -> dict[str, np.ndarray]:
    """One untimed run of `session` (first-run allocations and kernel selection); its feed, for the timed runs."""
    own = {i.name: feed[i.name] for i in session.get_inputs()}
    out = session.run(None, own)
    if outputs is not None:
        outputs.append(out)
    return own


def check(temp: onnx.ModelProto, int8: onnx.ModelProto | Callable[[], onnx.ModelProto], feed: dict[str, np.ndarray]) -> SpeedCheck:
    """Time the default int8 model (built as step2 builds the cfg; or the function building it) against `temp`, on one
    thread, and measure the other work the machine did meanwhile."""
    outputs: list[list[np.ndarray]] = []
    window: list = []
    fp32_ms, int8_ms = time_pair(temp, int8, feed, threads=1, outputs=outputs, window=window)
    others = _others(window[0], window[1]) if len(window) == 2 else 0.0
    return SpeedCheck(fp32_ms, int8_ms, others, (outputs[0], outputs[1]) if len(outputs) == 2 else None)


def _cpu_sample() -> tuple[float | None, float, float]:
    """(CPU seconds all processes have run, from /proc/stat, or None off Linux; this process' CPU seconds; wall seconds)."""
    busy = None
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait is work
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def _others(a: tuple[float | None, float, float], b: tuple[float | None, float, float]) -> float:
    """Cores' worth of other processes' work between two samples (0.0 when unknown or too short to tell)."""
    if a[0] is None or b[0] is None or b[2] - a[2] < 0.05:
        return 0.0
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


def default_layers(plan: QuantPlan) -> list[str]:
    """The layers the default placement quantizes (neither the cfg nor a policy chose their precision)."""
    return sorted(n for n, lp in plan.layers.items() if lp.reason == "default")


def decide(
    temp: onnx.ModelProto, int8: Callable[[], onnx.ModelProto], plan: QuantPlan, feed: dict[str, np.ndarray],
) -> tuple[dict[str, str], dict[str, str], str, SpeedCheck | None]:
    """:func:`check` of the model `int8()` builds, then what step1 writes: custom_quantize_layers entries keeping every
    default layer float (none when int8 pays), their comments, step1's note, and the check (None when it failed)."""
    try:
        result = check(temp, int8, feed)
    except Exception as exc:  # timing is an optimisation: a model that cannot be timed whole is placed by the MAC rules
        why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return {}, {}, f"speed check: not run ({why}); placed by the MAC rules alone.", None
    if result.pays:
        return {}, {}, f"speed check: the int8 model is faster than fp32 on this CPU ({result.describe()}).", result
    if not result.slower:
        return {}, {}, (f"speed check: the int8 model is as fast as fp32 on this CPU, within the {MARGIN:.0%} the timing "
                        f"resolves ({result.describe()}): kept int8."), result
    if result.others > BUSY:
        return {}, {}, (f"speed check: not decided ({result.describe()}, while other work used {result.others:.1f} cores, "
                        "which slows int8 more than fp32): placed by the MAC rules; run step1 on a quiet machine to check."), result
    names = default_layers(plan)
    why = f"speed check: int8 is slower than fp32 for this model on this CPU ({result.describe()})"
    note = (f"int8 is slower than fp32 for this model on this CPU ({result.describe()}): kept {len(names)} layer{'s' if len(names) != 1 else ''} float "
            "in the cfg; delete them from custom_quantize_layers to quantize them anyway (or re-run step1 with `speed_check: false` "
            "in hybridq.yaml: a step1 setting).")
    return {n: "float32" for n in names}, {n: why for n in names}, note, result
