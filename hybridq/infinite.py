"""Layers kept float because a tensor they would quantize holds +-Inf.

Transformer exports build attention masks with -inf (``masked_fill(mask, float("-inf"))``) and add them to the
scores before the Softmax. No integer type holds Inf, and the finite values alone (often just 0) would map the
mask to nothing, so a layer that reads or writes such a tensor quantized stays float32, with a cfg comment.
Calibration leaves the infinite values out of the statistics and flags the tensor
(:attr:`hybridq.observers.HistogramObserver.infinite`).
"""

from __future__ import annotations

from collections.abc import Callable

from .observers import HistogramObserver
from .plan import QuantPlan

ROUNDS = 8
"""Re-plans at most: floating a layer can move a Q/DQ onto another reader of the tensor."""


def touching(plan: QuantPlan, observers: dict[str, HistogramObserver]) -> dict[str, str]:
    """Quantized layers of `plan` that read or write a tensor holding +-Inf -> why they must stay float."""
    out: dict[str, str] = {}
    for t, tp in plan.tensors.items():
        obs = observers.get(t)
        if obs is None or not obs.infinite:
            continue
        layers = [r for r in tp.readers if r in plan.layers] + ([tp.producer] if tp.layer_output and tp.producer in plan.layers else [])
        for layer in layers:
            if plan.layers[layer].precision not in ("float32", "float16"):
                out.setdefault(layer, f"float: '{t}' holds +-Inf (an attention mask?), which int8 cannot represent")
    return out


def keep_float(
    plan: QuantPlan, observers: dict[str, HistogramObserver], replan: Callable[[dict[str, str]], QuantPlan],
) -> tuple[QuantPlan, dict[str, str], dict[str, str]]:
    """`plan` re-made (`replan(layer -> precision)`) until no quantized tensor holds +-Inf; the float32 layers and their
    comments. Unchanged when no observer is flagged."""
    floats: dict[str, str] = {}
    why: dict[str, str] = {}
    for _ in range(ROUNDS):
        found = touching(plan, observers)
        if not found:
            break
        why.update(found)
        floats.update(dict.fromkeys(found, "float32"))
        plan = replan(dict(floats))
    return plan, floats, why
