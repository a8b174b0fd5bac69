"""Why a layer stays float: the policies' short names, and the words step1 uses when a layer has no quantized form."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import onnx

POLICY_NAMES = (
    ("stem Conv", "float_stem"),
    ("depthwise Conv", "float_depthwise"),
    ("Conv on a 1x1 pooled", "float_pooled"),
    ("ConvTranspose", "ConvTranspose"),
    ("Conv producing a graph output", "graph-output Conv"),
    ("detection-head Conv", "detection head"),
)
"""Short names for the plan's policy reasons (the setting that decides, where there is one)."""


def policy_name(reason: str) -> str:
    """The setting or rule behind a plan's policy reason, e.g. 'float_stem'."""
    for prefix, name in POLICY_NAMES:
        if reason.startswith(prefix):
            return name
    return reason.split(" (")[0].split(":")[0]


def nothing_quantized(layers: Mapping[str, Any], default_ops: Iterable[str]) -> str:
    """Why a plan quantizes no layer: the rules that kept the candidates float, or that there is no candidate."""
    rules = Counter(lp.reason for lp in layers.values() if lp.precision == "float32" and not lp.reason.startswith(NO_FORM))
    if not rules:
        return (f"no layer is quantized: the model has no {'/'.join(sorted(default_ops))} layer with a quantized form "
                "(quantize_ops in hybridq.yaml lists the ops to quantize).")
    why = ", ".join(f"{policy_name(reason)}: {n} layer{'s' if n > 1 else ''}" for reason, n in sorted(rules.items()))
    return (f"no layer is quantized: the rules keep every candidate float ({why}); set a float_* rule named "
            "here to false in hybridq.yaml, or list a layer in custom_quantize_layers, to quantize it.")


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The layers a missing quantized form is reported for (elementwise and shape ops without float tensors are not layers)."""
NO_FORM = "no quantized form"
"""The start of the reason of a quantize_ops layer that hybridq cannot quantize as it is."""


def no_quantized_form(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> str:
    """Why this Conv/Gemm/MatMul (an op quantize_ops lists) has no Q/DQ placement: it stays float32 and is named."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = next((inits[i] for i in node.input[:2] if i in inits), None)
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        why = "Gemm with transA=1"
    elif node.op_type == "MatMul" and node.input[0] in inits:
        why = "MatMul with its constant as the first input, W @ x: export it as x @ W or as a Gemm"
    elif weight is not None and len(weight.dims) != 2 and node.op_type in ("MatMul", "Gemm"):
        why = f"{node.op_type} with a weight of rank {len(weight.dims)}: hybridq quantizes 2-D weights; squeeze it in the exporter"
    else:
        why = f"{node.op_type} whose inputs are not a float activation and a constant weight"
    return f"{NO_FORM}: {why}"


def no_form_note(layers: Mapping[str, Any]) -> list[str]:
    """step1's note naming the quantize_ops layers (a plan's LayerPlans) left float32 for want of a quantized form."""
    found = [(n, lp.reason[len(NO_FORM) + 2:]) for n, lp in layers.items() if lp.reason.startswith(NO_FORM)]
    if not found:
        return []
    shown = "; ".join(f"'{n}' ({why})" for n, why in found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    return [f"{len(found)} layer(s) of quantize_ops stay float32, having no quantized form: {shown}."]


def policy_note(layers: Mapping[str, Any]) -> list[str]:
    """step1's note naming the layers the placement rules keep float32 (a plan's LayerPlans), grouped by rule."""
    by_rule: dict[str, list[str]] = {}
    for n, lp in layers.items():
        if lp.precision == "float32" and any(lp.reason.startswith(prefix) for prefix, _ in POLICY_NAMES):
            by_rule.setdefault(policy_name(lp.reason), []).append(n)
    if not by_rule:
        return []
    shown = "; ".join(f"{rule}: " + ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                      for rule, names in sorted(by_rule.items()))
    count = sum(len(v) for v in by_rule.values())
    return [f"{count} layer(s) stay float32 by the placement rules ({shown}). The float_* rules are settings in hybridq.yaml "
            "(false quantizes those layers); any layer can be set in custom_quantize_layers."]
