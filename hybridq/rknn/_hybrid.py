"""RKNN's `custom_hybrid` pairs resolved to the temp model's layers, before step1 writes anything.

`hybrid_quantization_step1(custom_hybrid=[[input_tensor, output_tensor], ...])` keeps in float every
layer on a path from each input tensor to its output tensor. The names are checked, and the layers
found, on the temp model `hybridq.graph.prepare` makes of the loaded model (the one step1 writes as
`<name>.model`), so a misspelled name fails before the workspace changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .._onnx import GraphIndex
from ..errors import InputError, did_you_mean
from ..graph import float_layers_between, load_model, prepare


@dataclass
class CustomHybrid:
    """The layers `custom_hybrid` sets to float (temp-model node name -> the pair that chose it) and what was followed."""

    layers: dict[str, str]
    pairs: list[str]
    notes: list[str] = field(default_factory=list)


def check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """`custom_hybrid` as (input tensor, output tensor) pairs; anything else is an InputError."""
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise InputError(f"custom_hybrid must be a list of [input_tensor, output_tensor] pairs, got {pairs!r}.")
    return [(str(src), str(dst)) for src, dst in pairs]


def resolve(pairs: Any, model: Path) -> CustomHybrid:
    """The temp-model layers on every path from each pair's input tensor to its output tensor (the model is prepared
    here as step1 prepares it; nothing is written). An unknown tensor or a pair with no layer between is an InputError."""
    checked = check_pairs(pairs)
    original = load_model(model)
    temp, report = prepare(original)
    return layers_between(checked, temp.graph, original.graph, report.fused)


def layers_between(pairs: list[tuple[str, str]], g: onnx.GraphProto, original: onnx.GraphProto, fused: dict[str, str]) -> CustomHybrid:
    """Nodes of the temp graph `g` between each pair's tensors; a tensor the fusions removed (`fused`: original node ->
    temp node) is followed from its producer in `original` to the node that absorbed it."""
    index = GraphIndex(g)
    by_name = index.by_name
    tensors = index.tensors() | {i.name for i in g.input}
    out = CustomHybrid({}, [f"[{src}, {dst}]" for src, dst in pairs])

    def find(t: str, role: str) -> list[str]:
        if t in tensors:
            return [t]
        prod = next((n.name for n in original.node if t in n.output), None)
        node = prod if prod in by_name else fused.get(prod or "", "")
        if node in by_name:
            out.notes.append(f"custom_hybrid {role} tensor {t!r} was fused into {node!r} in the temp model; using its output.")
            return list(by_name[node].output)
        raise InputError(f"custom_hybrid {role} tensor {t!r} is not a tensor of the model.{did_you_mean(t, sorted(tensors))} "
                         "Give tensor names (node outputs, as Netron shows them), not node names.")

    for src, dst in pairs:
        starts, ends = find(src, "input"), find(dst, "output")
        on_path = float_layers_between(g, starts, ends, index)
        if not on_path:
            raise InputError(f"custom_hybrid pair [{src!r}, {dst!r}]: no layer lies on a path from {src!r} to {dst!r}; "
                             "the first name must be the input of the subgraph and the second an output computed from it.")
        for n in on_path:
            out.layers.setdefault(n, f"[{src}, {dst}]")
    return out
