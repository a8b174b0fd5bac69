"""Fixed inputs and control-flow folding: inputs turned into constants, `If` nodes replaced by their taken branch.

A scripted export often wraps a network in `If` branches on an input that is fixed in deployment
(a sample rate, a mode flag) or on a static shape. `fix_inputs` makes such inputs initializers
(RKNN-Toolkit2's ``load_onnx(input_initial_val=...)``); `fold_control_flow` then evaluates each
`If` condition that depends only on constants and static shapes (with onnx.reference on the few
nodes computing it) and inlines the taken branch, repeatedly, so nested Ifs fold too. Every node
that stays says why. onnxscript's optimizer folds Ifs too, but it rewrites the whole graph (other
folds, new names), which would break the stable names the cfg and analysis rely on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._onnx import GraphIndex, describe_error, outer_reads, subgraphs
from .errors import InputError, did_you_mean

FIXED_INPUTS_PROP = "hybridq.fixed_inputs"
"""``metadata_props`` key of the step2 model: the inputs step1 fixed (JSON), so analyze fixes them in the fp32 model too."""
INPUT_ORDER_PROP = "hybridq.input_order"
"""``metadata_props`` key: the inputs before fix_inputs (JSON list), so a dataset list with a column per input still reads."""

NON_CONSTANT_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
"""Ops whose output is not a function of their inputs: a condition computed through one never folds."""


@dataclass
class FoldReport:
    """What folding did: the inputs fixed, the Ifs folded (-> branch taken), the control-flow nodes kept (-> why)."""

    fixed: dict[str, Any] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and the `.data` meta."""
        return {"fixed_inputs": dict(self.fixed), "folded": dict(self.folded), "kept": dict(self.kept)}


def parse_fix_input(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` from the command line: VALUE is a number, a JSON list (``[1,2]``) or comma-separated numbers."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or not name or not raw:
        raise InputError(f"--fix-input '{text}' is not NAME=VALUE; write e.g. --fix-input sample_rate=16000 or --fix-input mode=[1,0].")
    try:
        value = json.loads(f"[{raw}]" if "," in raw and not raw.startswith("[") else raw)
    except json.JSONDecodeError:
        raise InputError(f"--fix-input {name}: value '{raw}' is not a number or a list of numbers; write e.g. {name}=16000 or {name}=[1,2].") from None
    return name, value


def fix_inputs(model: onnx.ModelProto, values: Mapping[str, Any], where: str = "--fix-input / fixed_inputs") -> onnx.ModelProto:
    """A copy of ``model`` where each named graph input is an initializer holding its value (cast to the input's dtype)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    g = work.graph
    inits = {i.name for i in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    if values and not input_order(work):
        work.metadata_props.add(key=INPUT_ORDER_PROP, value=json.dumps(list(inputs)))
    for name, value in values.items():
        if name not in inputs:
            valid = ", ".join(inputs) or "(none)"
            raise InputError(f"{where}: '{name}' is not an input of the model.{did_you_mean(name, list(inputs))} Its inputs are: {valid}.")
        arr = _input_array(inputs[name], value, where)
        g.initializer.append(numpy_helper.from_array(arr, name))
        g.input.remove(inputs[name])
    return work


def input_order(model: onnx.ModelProto) -> tuple[str, ...]:
    """The model's inputs before fix_inputs made some constant, as it recorded them (empty when it fixed none)."""
    value = next((p.value for p in model.metadata_props if p.key == INPUT_ORDER_PROP), "")
    try:
        names = json.loads(value) if value else []
    except json.JSONDecodeError:
        return ()
    return tuple(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else ()


def _input_array(vi: onnx.ValueInfoProto, value: Any, where: str) -> np.ndarray:
    """``value`` as an array of the input's element type and declared shape; InputError when it does not fit."""
    name, t = vi.name, vi.type.tensor_type
    kind = helper.tensor_dtype_to_string(t.elem_type).replace("TensorProto.", "").lower()
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        raw = np.asarray(value)
        if raw.dtype.kind not in "biuf":
            raise ValueError("not numeric")
        arr = raw.astype(dtype)
    except (ValueError, TypeError, KeyError):
        raise InputError(f"{where}: value {value!r} for '{name}' is not a number or a list of numbers of its type "
                         f"({kind}); write e.g. {name}=16000.") from None
    if np.issubdtype(dtype, np.integer) and not np.array_equal(arr, raw):
        raise InputError(f"{where}: '{name}' is an integer input ({kind}), but {value!r} is not a whole number; give a whole number.")
    if not t.HasField("shape"):
        return arr
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if all(d is not None for d in dims) and arr.size == int(np.prod(dims, dtype=np.int64)):
        return arr.reshape(dims)
    if arr.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims, arr.shape)):
        return arr
    shape = [d if d is not None else "?" for d in dims]
    raise InputError(f"{where}: value for '{name}' has shape {list(arr.shape)}, but the input is declared {shape}; give a value of that shape.")


def record_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """The metadata_props step2 writes for the inputs step1 fixed (none when it fixed none)."""
    fixed = meta.get("control_flow", {}).get("fixed_inputs", {})
    return {FIXED_INPUTS_PROP: json.dumps(fixed, sort_keys=True)} if fixed else {}


def recorded_fixed_inputs(model: onnx.ModelProto) -> dict[str, Any]:
    """The inputs step2 recorded as fixed in ``model`` (empty for other models)."""
    value = next((p.value for p in model.metadata_props if p.key == FIXED_INPUTS_PROP), "")
    try:
        fixed = json.loads(value) if value else {}
    except json.JSONDecodeError:
        return {}
    return fixed if isinstance(fixed, dict) else {}


def as_fixed(model: onnx.ModelProto, fixed: Mapping[str, Any], where: str) -> onnx.ModelProto:
    """``model`` with those of ``fixed`` that are still its inputs made constants and its Ifs folded, as step1 did."""
    names = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    wanted = {k: v for k, v in fixed.items() if k in names}
    return fold_control_flow(fix_inputs(model, wanted, where))[0] if wanted else model


def fold_control_flow(model: onnx.ModelProto, report: FoldReport | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """A copy of ``model`` with every `If` whose condition is constant replaced by its taken branch (nested ones too)."""
    report = report or FoldReport()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    while True:
        static = _static_shapes(work)
        index = GraphIndex(work.graph, subgraph_reads=True)
        consts = {i.name for i in work.graph.initializer}
        for node in list(work.graph.node):
            if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                continue
            value, why = _evaluate(work, index, consts, static, node.input[0])
            if value is None:
                report.kept[node.name] = f"If '{node.name}' stays float: its condition '{node.input[0]}' {why}"
                continue
            if value.size != 1:
                report.kept[node.name] = f"If '{node.name}' stays float: its condition '{node.input[0]}' holds {value.size} values, not one"
                continue
            taken = "then_branch" if bool(value.reshape(-1)[0]) else "else_branch"
            _inline(work, node, taken)
            report.folded[node.name] = taken
            report.kept.pop(node.name, None)
            break
        else:
            break
    if report.folded:
        _prune(work)
    _note_other_control_flow(work, report)
    return work, report


def _prune(model: onnx.ModelProto) -> None:
    """Drop, in place, the nodes and initializers no output depends on any more (conditions, untaken weights)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in list(node.input) + outer_reads(node) if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _note_other_control_flow(model: onnx.ModelProto, report: FoldReport) -> None:
    """Reasons for the control-flow nodes that stay: Loop/Scan, and the nodes inside branches that stay."""
    for node in model.graph.node:
        if not subgraphs(node):
            continue
        if node.name not in report.kept:
            report.kept[node.name] = f"{node.op_type} '{node.name}' stays float: hybridq does not unroll {node.op_type} bodies"
        for inner in _nested(node):
            report.kept.setdefault(inner.name or inner.output[0], f"{inner.op_type} '{inner.name}' is inside '{node.name}', which stays")


def _nested(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Control-flow nodes anywhere inside ``node``'s subgraphs."""
    out: list[onnx.NodeProto] = []
    for sg in subgraphs(node):
        for n in sg.node:
            if subgraphs(n):
                out.append(n)
                out.extend(_nested(n))
    return out


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes of the main graph's tensors (shape inference; empty when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    return shapes


def _evaluate(model: onnx.ModelProto, index: GraphIndex, consts: set[str], static: dict[str, list[int]], tensor: str) -> tuple[np.ndarray | None, str]:
    """The value of ``tensor`` when it depends only on initializers and static shapes, else None and why not."""
    cone: dict[str, onnx.NodeProto] = {}
    shaped: dict[str, np.ndarray] = {}
    runtime: list[str] = []
    dynamic: list[str] = []
    stack = [tensor]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or not t or t in consts:
            continue
        seen.add(t)
        node = index.producer_node(t)
        if node is None:
            runtime.append(t)
        elif node.op_type in NON_CONSTANT_OPS:
            return None, f"is computed through the random op '{node.name}'"
        elif node.op_type in ("Shape", "Size") and node.input[0] in static:
            shaped[t] = _shape_value(node, static[node.input[0]])
        elif node.op_type in ("Shape", "Size"):
            dynamic.append(node.input[0])
        else:
            cone[node.name] = node
            stack.extend(list(node.input) + outer_reads(node))
    if runtime:
        names = ", ".join(f"'{r}'" for r in sorted(runtime))
        fixes = " ".join(f"--fix-input {r}=VALUE" for r in sorted(runtime))
        return None, f"depends on the model input(s) {names}; if they are constant in deployment, fix them with `{fixes}` (RKNN: load_onnx(input_initial_val=...))"
    if dynamic:
        names = ", ".join(f"'{d}'" for d in sorted(set(dynamic)))
        return None, f"depends on the shape of {names}, which is not static; give the inputs static shapes (RKNN: input_size_list) or fix them with --fix-input"
    return _run_cone(model, cone, shaped, tensor)


def _shape_value(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    """The output of a Shape (with its start/end) or Size node on a tensor of static ``shape``."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)  # ONNX clamps as Python slices do


def _run_cone(model: onnx.ModelProto, cone: dict[str, onnx.NodeProto], shaped: dict[str, np.ndarray], tensor: str) -> tuple[np.ndarray | None, str]:
    """Evaluate the nodes computing ``tensor`` (graph order) with onnx.reference."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name in cone]
    if not nodes and tensor in shaped:
        return shaped[tensor], ""
    needed = {i for n in nodes for i in list(n.input) + outer_reads(n)} | {tensor}
    tensors = [inits[i] for i in sorted(needed) if i in inits] + [numpy_helper.from_array(v, k) for k, v in shaped.items()]
    out = helper.make_tensor_value_info(tensor, onnx.TensorProto.UNDEFINED, None)
    graph = helper.make_graph(nodes, "condition", [], [out], initializer=tensors)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    from onnx.reference import ReferenceEvaluator  # imported here: ~0.2 s that a model without control flow never needs

    try:
        (value,) = ReferenceEvaluator(sub).run(None, {})
    except Exception as exc:
        return None, f"could not be evaluated from constants ({describe_error(exc)})"
    return np.asarray(value), ""


def _all_names(graph: onnx.GraphProto, skip: str = "") -> set[str]:
    """Every tensor name in a graph and its subgraphs (except those of node ``skip``), to keep inlined names from clashing."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.output)
        for sg in subgraphs(n) if n.name != skip else ():
            names |= _all_names(sg)
    return names


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors in place in ``graph`` and every subgraph (reads, writes, initializers, outputs)."""
    for n in graph.node:
        for k, i in enumerate(n.input):
            n.input[k] = mapping.get(i, i)
        for k, o in enumerate(n.output):
            n.output[k] = mapping.get(o, o)
        for sg in subgraphs(n):
            _rename(sg, mapping)
    for i in graph.initializer:
        i.name = mapping.get(i.name, i.name)
    for o in graph.output:
        o.name = mapping.get(o.name, o.name)


def _inline(model: onnx.ModelProto, node: onnx.NodeProto, taken: str) -> None:
    """Replace the If ``node`` in place by the nodes of its ``taken`` branch, writing the If's outputs."""
    g = model.graph
    branch = onnx.GraphProto()
    branch.CopyFrom(next(a.g for a in node.attribute if a.name == taken))
    used = _all_names(g, skip=node.name) - set(node.output)
    local = {i.name for i in branch.initializer} | {o for n in branch.node for o in n.output if o}
    mapping: dict[str, str] = {}
    for name in sorted(local & used):
        k = 2
        while f"{name}#{k}" in used or f"{name}#{k}" in local:
            k += 1
        mapping[name] = f"{name}#{k}"
        used.add(mapping[name])
    _rename(branch, mapping)
    produced = {o for n in branch.node for o in n.output if o}
    outputs: dict[str, str] = {}
    extra: list[onnx.NodeProto] = []
    for src, target in zip([o.name for o in branch.output], node.output):
        if not target:
            continue
        if src in produced and src not in outputs:
            outputs[src] = target
        else:
            extra.append(helper.make_node("Identity", [outputs.get(src, src)], [target], name=f"{node.name}/{target}_Identity"))
    _rename(branch, outputs)
    node_names = {n.name for n in g.node if n.name != node.name}
    for n in branch.node:
        if not n.name or n.name in node_names:
            base = f"{node.name}/{n.name or n.op_type}"
            n.name, k = base, 2
            while n.name in node_names:  # two unnamed nodes of one type in the branch
                n.name, k = f"{base}_{k}", k + 1
        node_names.add(n.name)
    g.initializer.extend(branch.initializer)
    at = list(g.node).index(node)
    new = list(g.node[:at]) + list(branch.node) + extra + list(g.node[at + 1:])
    del g.node[:]
    g.node.extend(new)
