"""Proposal: the cheapest verified fix that brings the outputs to a target.

Split as NNCF's accuracy control is: `ranker` (what to try first), `evaluator`
(how a candidate scores), `fixes` (the ladder of fixes, as cfg data) and
`search` (how they are climbed). Candidates are built with `hybridq.build`, the
same path step2 takes, and scored on real samples.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx

from ..build import Built, Edits, build, measured_costs
from ..calibration import session_for
from ..errors import InputError
from ..observers import HistogramObserver
from ..settings import Settings
from .evaluator import Evaluator, OutputScore, Score, Target
from .fixes import FIXES, Candidate, Context
from .search import DEFAULT_FLOAT_BUDGET, ProposalResult, Row, search

__all__ = [
    "DEFAULT_FLOAT_BUDGET", "FIXES", "Candidate", "Evaluator", "OutputScore", "ProposalResult", "Row", "Score", "Target", "moot_edits", "propose",
]


def propose(
    temp: onnx.ModelProto, observers: dict[str, HistogramObserver], meta: dict[str, Any], settings: Settings, base: Edits,
    samples: list[dict[str, np.ndarray]], evaluator: Evaluator, *, single: dict[str, float] | None = None,
    protected: set[str] | None = None, fallback: str | tuple[str, ...] = "float32", max_float_layers: int | None = None,
    max_float_fraction: float | None = DEFAULT_FLOAT_BUDGET, started_from: str = "the default quantization",
    analyse: Callable[[onnx.ModelProto, onnx.ModelProto], dict[str, float]] | None = None, where: str = "proposal",
    max_size_mb: float | None = None,
    max_slowdown: float | None = None,
) -> ProposalResult:
    """Climb the ladder of fixes from `base` (the cfg as the user left it); `protected` tensors are never changed.

    `samples` are those fixes are fitted on (outlier ranges, bias shifts); the evaluator scores on its own.
    `single` gives isolated layer errors (from a snapshot); otherwise `analyse(temp, quant)` computes them.
    `max_size_mb` is a model-size budget met first with int4 weights (ranked by `analyse` of an all-int4 build).
    `max_slowdown` bounds the predicted latency of the float layers added (step1's measured cost table).
    """
    written = meta.get("written_entries", {})
    costs = measured_costs(meta, settings)
    if max_slowdown is not None and costs is None:
        raise InputError("--max-slowdown bounds the latency the measured cost model predicts, and this step1 did not "
                         "measure one: run step1 with --measure (cost_model: measured), or bound the float compute "
                         "with --max-float-fraction / --max-float-layers instead.")

    def make(edits: Edits) -> Built:
        return build(temp, observers, meta, settings, edits, where=where)

    first = make(base)

    def single_errors() -> dict[str, float]:
        if single is not None:
            return single
        return analyse(temp, first.model) if analyse is not None else {}

    ctx = Context(temp, observers, settings, first.plan, written, set(protected or ()))
    return search(
        ctx, evaluator, make, base, first, single_errors, samples, lambda m: session_for(m, basic=False), fallback=fallback,
        max_float_layers=max_float_layers, max_float_fraction=max_float_fraction, started_from=started_from,
        max_bytes=int(max_size_mb * 1e6) if max_size_mb is not None else None,
        measure=(lambda m: analyse(temp, m)) if analyse is not None else None,
        costs=costs, max_slowdown=max_slowdown,
    )


def moot_edits(edited: set[str], floated: dict[str, str], model: onnx.ModelProto, built: onnx.ModelProto) -> list[str]:
    """Edited activation tensors the built model no longer quantizes because the proposal floated their readers."""
    quantized = {n.input[0] for n in built.graph.node if n.op_type == "QuantizeLinear"}
    weights = {i.name for i in model.graph.initializer}
    out = []
    for t in sorted(edited - weights - quantized):
        readers = sorted({n.name for n in model.graph.node if t in n.input} & set(floated))
        if readers:
            out.append(f"your edit of '{t}' no longer takes effect: the proposal keeps its reader{'s' if len(readers) > 1 else ''} "
                       f"{', '.join(readers)} {floated[readers[0]]}, so '{t}' is not quantized")
    return out
