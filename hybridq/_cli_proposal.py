"""How the CLI reports a proposal (step1 --proposal, propose): the candidate table, summary lines and JSON data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from ._console import table, warn

if TYPE_CHECKING:
    from .proposal import ProposalResult


def cost_line(p) -> str:
    """Float layers and float compute by cause: proposed, the user's own entries, policies (never contradicting each other)."""
    from collections import Counter

    from .cost import PROPOSED, USER

    kinds = Counter(v for v in p.layers.values() if not v.startswith("float"))  # npu's int16 rung, the size budget's int4
    text = f"  float layers proposed: {len(p.layers) - sum(kinds.values())}" + "".join(f"; {k} layers proposed: {n}" for k, n in sorted(kinds.items()))
    if p.existing:
        mine = Counter(p.existing.values())
        text += " (yours: " + ", ".join(f"{n} {prec}" for prec, n in sorted(mine.items())) + ")"
    c = p.cost
    if c is None:
        return text + f"; float compute {100 * p.float_fraction:.1f} %"
    text += f"; float compute {100 * c.fraction:.1f} % of the Conv/Gemm/MatMul MACs"
    parts = [f"{100 * c.share({PROPOSED}):.1f} % proposed"]
    if USER in c.cause.values():
        parts.append(f"{100 * c.share({USER}):.1f} % yours")
    policies = c.policies()
    if policies:
        names = ", ".join(f"{k}: {n} layer{'s' if n > 1 else ''}" for k, n in sorted(policies.items()))
        parts.append(f"{100 * c.policy_fraction:.1f} % by policy ({names})")
    return text + ": " + ", ".join(parts)


def proposal_report(p) -> tuple[list[Table], list[str], dict[str, Any]]:
    """The proposal's candidate table, summary lines and JSON data; its warnings go to stderr now."""
    warn(p.warnings)
    def num(v: float, fmt: str) -> str:
        return format(v, fmt) if v == v and abs(v) != float("inf") else ("inf" if v == float("inf") else str(v))

    logp = any(r.logp_snr_db is not None for r in p.table)  # Softmax outputs: compared on their log-probabilities
    rows = [[r.step, r.fix, num(r.cosine, ".5f"), num(r.snr_db, ".1f"), num(r.slice_snr_db, ".1f")]
            + ([num(r.logp_snr_db, ".1f") if r.logp_snr_db is not None else "-"] if logp else []) + [f"{100 * r.cost:.1f} %", r.outcome]
            for r in p.table]
    title = "candidates, cheapest fixes first (cosine and SNR: worst output, whole tensor or slice-normalised"
    title += "; compared by the log-probabilities of the Softmax outputs)" if logp else ")"
    tables = [table(title, ["step", "fix", "cosine", "SNR dB", "worst slice dB"] + (["log-prob SNR dB"] if logp else [])
                    + ["float compute" if p.cost_unit == "compute" else f"float share of {p.cost_unit}", "outcome"], rows)]
    lines = [f"Proposal: {p.choice}."] + ([f"  target: {p.target}"] if p.target else [])
    if p.edits:
        lines.append(f"  started from your edits, all kept in the cfg: {'; '.join(p.edits)}")
    lines += [
        f"  baseline ({p.baseline_label}): {p.baseline.describe()}",
        f"  predicted: {p.predicted.describe()}",
    ]
    if p.measured is not None:
        lines.append(f"  measured on the model step2 builds from the {'written ' if p.layers or p.entries else ''}cfg: {p.measured.describe()}")
    lines.append(cost_line(p) + f"; {p.evaluations} evaluations, {p.seconds:.1f} s")
    if p.latency_ms is not None:
        lines.append("  predicted latency (measured cost model, 1 thread): {1:.2f} ms, from {0:.2f} ms before the proposal; fp32 {2:.2f} ms".format(*p.latency_ms))
    if p.fixes:
        lines.append("  fixes kept (each commented in the cfg): " + "; ".join(p.fixes))
    lines += [f"  note: {n}." for n in p.notes]
    if not p.met:
        lines.append(not_met_advice(p))
    cost = p.cost
    data = {
        "layers": p.layers, "entries": list(p.entries), "fixes": p.fixes, "met": p.met, "choice": p.choice, "evaluations": p.evaluations,
        "candidates": [r.to_dict() for r in p.table], "candidate_cost_unit": p.cost_unit,
        "baseline": p.baseline.to_dict(), "baseline_label": p.baseline_label, "predicted": p.predicted.to_dict(),
        "measured": p.measured.to_dict() if p.measured else None, "float_fraction": p.float_fraction, "seconds": p.seconds,
        "predicted_ms": None if p.latency_ms is None else dict(zip(("before", "proposal", "fp32"), p.latency_ms)),
        "your_layers": p.existing, "your_edits": p.edits, "notes": p.notes, "target": p.target,
        "float_compute": None if cost is None else {
            "total": cost.fraction, "proposed": cost.share({"proposed"}), "yours": cost.share({"yours"}),
            "policy": cost.policy_fraction, "policies": cost.policies(), "layers": cost.cause,
        },
    }
    return tables, lines, data


def not_met_advice(p: ProposalResult) -> str:
    """What to do when the target was not met: the budget that stopped the search, and --eval unless it was given."""
    budget = "--max-float-layers" if p.budget_hit == "layers" else "--max-slowdown" if p.budget_hit == "slowdown" else "--max-float-fraction"
    task = "" if p.task_judged else ", or judge by your task metric (--eval)"
    return f"  The target was NOT met; the cfg holds the best candidate found. Loosen the target, raise the budget ({budget}){task}."
