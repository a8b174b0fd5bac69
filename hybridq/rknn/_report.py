"""What the facade logs about hybridq's results, as RKNN-style (level, message) lines; and what a built model is.

Pure functions of the results `hybridq.step1` / `hybridq.step2` return: :mod:`._facade` prints the lines
(`I` only when verbose, `W` always).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from .._onnx import main_opset, subgraphs

Line = tuple[str, str]
"""(level, message): level 'I' (verbose only) or 'W' (always)."""


def step1_lines(res: Any) -> list[Line]:
    """step1's notes (I), its warnings and a model its speed check kept float (W), then its proposal."""
    # the kept-float note may have a sentence appended in `notes` ("The proposal was not run ..."): it is the W line below
    lines: list[Line] = [("I", f"note: {note}") for note in res.notes if not (res.kept_float and note.startswith(res.kept_float))]
    lines += [("W", warning) for warning in res.warnings]
    if res.kept_float:
        lines.append(("W", f"int8 was not applied: {res.kept_float} From a script: rknn.config(..., speed_check=False) quantizes "
                           "anyway (a hybridq option), as does config(target_platform=...) (every layer int8, as on an NPU)."))
    return lines + proposal_lines(res.proposal)


def proposal_lines(p: Any) -> list[Line]:
    """The proposal's choice, figures and float layers; a W line when it missed the target (none without a proposal)."""
    if p is None:
        return []
    lines: list[Line] = [("I", f"proposal: {p.choice}; int8 baseline {p.baseline.describe()}; predicted {p.predicted.describe()}.")]
    if p.measured is not None:
        lines.append(("I", f"proposal measured on the model step2 builds from the cfg: {p.measured.describe()}."))
    lines.append(("I", f"proposal: {len(p.layers)} float layers ({', '.join(p.layers) or 'none'}), float compute {100 * p.float_fraction:.1f} %."))
    if p.entries:
        lines.append(("I", f"proposal: fixes on {', '.join(p.entries)}."))
    if not p.met:
        lines.append(("W", "the proposal did NOT meet the target; the cfg holds the best candidate found. "
                           "Lower auto_hybrid_cos_thresh or edit the cfg by hand."))
    return lines


def step2_lines(res: Any) -> list[Line]:
    """What step2 built: layers per precision, sizes, how each cfg entry resolved, its notes (I) and warnings (W)."""
    counts = ", ".join(f"{v} {k}" for k, v in sorted(res.layers.items()))
    lines: list[Line] = [("I", f"built: {counts}; {res.size_fp32 / 1e6:.2f} MB fp32 -> {res.size_quant / 1e6:.2f} MB.")]
    lines += [("I", f"custom_quantize_layers {r.entry!r}: {r.requested} -> node {r.node!r} runs {r.effective} ({r.how}).") for r in res.resolved]
    lines += [("I", f"note: {n}") for n in res.notes]
    return lines + [("W", w) for w in res.warnings]


def model_kind(path: Path) -> str:
    """What a built model is, said from its operators: 'an ONNX model (QDQ, opset 13)', or a float one."""
    model = onnx.load(str(path), load_external_data=False)
    if has_qdq(model.graph):
        return f"an ONNX model (QDQ, opset {main_opset(model)})"
    return f"a float ONNX model (no quantization operators, opset {main_opset(model)})"


def has_qdq(graph: onnx.GraphProto) -> bool:
    """Whether `graph` (or a subgraph of it) has a QuantizeLinear or DequantizeLinear node, in any domain."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or any(has_qdq(g) for g in subgraphs(n)) for n in graph.node)
