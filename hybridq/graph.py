"""Load an ONNX model and prepare the temp model: the fp32 graph step2 will quantize.

Preparation makes weights initializers, upgrades old opsets, folds constants and
BatchNorm (ONNX Runtime's basic, standard-op-only optimizer), infers shapes and
gives every node a unique, stable name. Names of tensors and nodes that survive
are kept; what was fused is reported.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import _runtime, fold
from ._onnx import GraphIndex, convert_opset, describe_error, main_opset, outer_reads, read_onnx_bytes, save_external, serialized_within, subgraphs
from ._onnx import infer_shapes as _infer_shapes
from .errors import InputError, ModelError, OutputError, did_you_mean

MIN_OPSET = 13


class Namer:
    """Fresh, deterministic tensor names that never collide with existing ones."""

    def __init__(self, used: Iterable[str]) -> None:
        self.used = set(used)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}#{k}"
        self.used.add(name)
        return name


@dataclass
class PrepReport:
    """What preparation changed: opset, constants lifted, nodes fused away (old name -> new producer)."""

    opset_from: int
    opset_to: int
    constants_lifted: int = 0
    renamed: dict[str, list[str]] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)
    original_nodes: dict[str, list[str]] = field(default_factory=dict)
    control_flow: fold.FoldReport = field(default_factory=fold.FoldReport)
    initializer_inputs: list[str] = field(default_factory=list)  # graph inputs that were initializers: now constants


def load_model(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read and check an ONNX model; every failure is a ModelError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"Model file '{p}' does not exist. Check the path, or run `hybridq step1` first if it is a step1 artifact.")
    if p.is_dir():
        raise ModelError(f"Model path '{p}' is a directory; give the path of an .onnx file.")
    if not p.is_file():  # a FIFO or device: reading a FIFO would wait for a writer forever
        raise ModelError(f"Model path '{p}' is not a regular file (a FIFO or device); give the path of an .onnx file.")
    model, data = read_onnx_bytes(p, load_external_data=load_external_data)
    if not model.graph.node:
        raise ModelError(f"Model file '{p}' holds no graph nodes; it is empty or not an ONNX model.")
    try:
        # The file's own bytes, else the model serialized; over 2 GB the checker reads it from its path.
        data = data if data is not None else serialized_within(model)
        onnx.checker.check_model(data if data is not None else str(p), full_check=False)
    except Exception as exc:
        raise ModelError(f"Model file '{p}' is not a valid ONNX graph: {str(exc).splitlines()[0]}. Fix the exporter output.") from exc
    return model


def name_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Give unnamed or duplicate nodes a unique `<OpType>_<n>` name in place; returns old -> new names for renamed ones."""
    taken = Counter(n.name for n in model.graph.node if n.name)
    seen: set[str] = set()
    renamed: dict[str, list[str]] = {}
    counters: Counter[str] = Counter()
    for node in model.graph.node:
        if node.name and taken[node.name] == 1:
            seen.add(node.name)
            continue
        old = node.name
        while True:
            candidate = f"{old or node.op_type}_{counters[old or node.op_type]}"
            counters[old or node.op_type] += 1
            if candidate not in taken and candidate not in seen:
                break
        node.name = candidate
        seen.add(candidate)
        if old:
            renamed.setdefault(old, []).append(candidate)
    return renamed


def lift_constants(model: onnx.ModelProto) -> int:
    """Turn `Constant` nodes of the main graph into initializers (Paddle2ONNX stores weights this way)."""
    keep, lifted = [], 0
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or node.output[0] in graph_outputs:
            keep.append(node)
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
        elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if "float" in attr.name else np.int64
            tensor = numpy_helper.from_array(np.array(value, dtype=dtype))
        else:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        lifted += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return lifted


def initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Take the initializers out of the graph inputs, in place; returns their names in input order.

    Before IR 4 every initializer had to be a graph input (old PyTorch exports); later ones list them when asked
    (`keep_initializers_as_inputs=True`), which makes each a default a caller may replace. A quantized model stores
    its weights quantized: they are constants here, as analyze already takes them (only the other inputs are fed).
    """
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name in inits]
    if names:
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return names


def initializer_inputs_note(names: list[str], ir_version: int) -> list[str]:
    """What step1 says when weights were also graph inputs an IR >= 4 model lets a caller replace (IR 3 had to list them)."""
    if not names or ir_version < 4:
        return []
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [f"{len(names)} initializer(s) were also graph inputs ({shown}; an exporter's keep_initializers_as_inputs): the "
            "temp and quantized models take them as constants, their stored values, and are fed the other inputs only."]


def modern_ir(model: onnx.ModelProto) -> None:
    """Raise the IR version to what the opsets need (at least 4), in place.

    Before IR 4 every initializer is also listed as a graph input; an initializer added later (a lifted Constant,
    a scale) is then not a graph input, which IR 3 forbids. Those input entries go (:func:`initializer_inputs`).
    """
    if model.ir_version < 4:
        initializer_inputs(model)
    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, need, 4)


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Ops whose constant inputs become int8 weights and int32 biases, one per layer."""


def fold_conv_affine(model: onnx.ModelProto) -> dict[str, str]:
    """Fold the constant Mul/Add chain after a Conv into its weight and bias, in place; returns folded node -> Conv.

    A scale and shift written after a Conv (PP-LCNet's learnable affine blocks: Mul and Add by a one-element constant)
    cost ONNX Runtime a pass over the tensor each, in fp32 and int8 alike, and its own Conv+Mul/Add fusions refuse a
    one-element operand of rank 1 (PP-OCR det: 28 such chains, 104 -> 93 ms a run on one thread). Operands are
    :func:`channel_constant` initializers; the Conv's output must have no other reader, and no operand may be a graph
    input (fed at run time). The weights must be untied (:func:`untie_weights`): each scaled one is its Conv's own.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    index = GraphIndex(g, subgraph_reads=True)  # an If/Loop body reading a tensor is one of its readers
    outputs, fed = {o.name for o in g.output}, {i.name for i in g.input}
    taken = set(inits) | set(index.producer) | set(index.consumers) | fed
    folded: dict[str, str] = {}
    gone: set[int] = set()
    for conv in index.nodes:
        w = inits.get(conv.input[1]) if conv.op_type == "Conv" and conv.domain in ("", "ai.onnx") and len(conv.input) > 1 else None
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        # the weight is changed in place: read by this Conv alone and not a graph output; neither it nor the bias is a
        # value the caller may feed instead
        own = (w is not None and len(index.consumer_nodes(w.name)) == 1 and w.name not in outputs | fed
               and (not bias_name or (bias_name in inits and bias_name not in fed)))
        if not own or w.data_type != TensorProto.FLOAT or len(w.dims) < 3:
            continue
        channels, rank = int(w.dims[0]), len(w.dims)
        scale, shift, tail, out = np.ones(channels), np.zeros(channels), [], conv.output[0]
        while out not in outputs and len(readers := index.consumer_nodes(out)) == 1 and readers[0].op_type in ("Mul", "Add"):
            node = readers[0]
            other = node.input[1] if node.input[0] == out else node.input[0]
            value = None if other in fed or node.domain not in ("", "ai.onnx") else channel_constant(inits.get(other), channels, rank)
            if value is None:
                break
            scale, shift = (scale * value, shift * value) if node.op_type == "Mul" else (scale, shift + value)
            tail.append(node)
            out = node.output[0]
        if not tail:
            continue
        weight = numpy_helper.to_array(w).astype(np.float64) * scale.reshape((-1,) + (1,) * (rank - 1))
        w.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), w.name))
        bias = (numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros(channels)) * scale + shift
        if bias_name and len(index.consumer_nodes(bias_name)) == 1 and bias_name not in outputs:
            inits[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        else:
            name = fresh_name(f"{conv.name}.folded_bias", taken)
            g.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
            del conv.input[2:]
            conv.input.append(name)
        conv.output[0] = out
        folded.update((n.name, conv.name) for n in tail)
        gone.update(id(n) for n in tail)
    if gone:
        keep = [n for n in index.nodes if id(n) not in gone]  # one rebuild, after the loop over the nodes
        del g.node[:]
        g.node.extend(keep)
        used = {i for n in g.node for i in n.input} | {r for n in g.node for r in outer_reads(n)} | outputs
        for i in [i for i in g.initializer if i.name not in used and i.name in index.consumers and i.name not in fed]:
            g.initializer.remove(i)  # operands the folded nodes alone read
    return folded


def channel_constant(t: onnx.TensorProto | None, channels: int, rank: int) -> np.ndarray | None:
    """A float32 constant broadcast over a Conv output of `rank` dims (N, C, spatial...) as one value, or one per channel
    along axis 1 ([C,1,..] or [1,C,1,..]), as a vector of `channels` values; None for any other operand (a rank-1 [C]
    runs along the last axis, not the channels)."""
    if t is None or t.data_type != TensorProto.FLOAT:
        return None
    dims, v = list(t.dims), numpy_helper.to_array(t).astype(np.float64)
    if v.size == 1 and len(dims) <= rank:
        return np.full(channels, float(v.reshape(-1)[0]))
    if v.size == channels and len(dims) in (rank - 1, rank) and dims[len(dims) - (rank - 1)] == channels:
        return v.reshape(-1)
    return None


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first not in `taken`, which then holds it."""
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def untie_weights(model: onnx.ModelProto) -> int:
    """Give each Conv/ConvTranspose/Gemm/MatMul its own copy of a weight or bias initializer it shares with an earlier
    one, in place; returns the copies made. A quantized weight belongs to one layer (its scales, its precision, its
    bias quantized with that layer's input scale), so a shared one was quantized for the last reader only. An initializer
    that is also a graph input stays shared: the caller may feed it, and a copy would not see the fed value."""
    inits = {i.name: i for i in model.graph.initializer}
    fed = {i.name for i in model.graph.input}
    taken = set(inits) | {o for n in model.graph.node for o in n.output} | fed
    seen: set[str] = set()
    copies = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED or node.domain not in ("", "ai.onnx"):
            continue
        for idx in range(1, len(node.input)):
            name = node.input[idx]
            if name not in inits or name in fed:
                continue
            if name not in seen:
                seen.add(name)
                continue
            new = fresh_name(f"{name}_{node.name}", taken)
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = new
            model.graph.initializer.append(copy)
            node.input[idx] = new
            copies += 1
    return copies


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """Convert to opset `target` when older (per-channel QDQ needs opset 13)."""
    if main_opset(model) >= target:
        return model
    try:
        return convert_opset(model, target)
    except Exception as exc:
        raise ModelError(
            f"Could not upgrade the model from opset {main_opset(model)} to {target} ({describe_error(exc)}). "
            "Re-export the model with opset >= 13."
        ) from exc


@contextlib.contextmanager
def _temp_dir(prefix: str) -> Iterator[str]:
    """A temporary directory, or an OutputError naming the temp location when it cannot be made."""
    try:
        holder = tempfile.TemporaryDirectory(prefix=prefix)
    except OSError as exc:
        raise OutputError(
            f"Cannot create a temporary directory in '{tempfile.gettempdir()}': {exc.strerror or exc}. "
            "Free space there, or point TMPDIR at a writable directory."
        ) from exc
    with holder as tmp:
        yield tmp


def ort_basic_optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, Conv+BN/Add/Mul fusion, identity removal: ORT's basic level, standard ops only."""
    out = _basic_optimized(model)
    # ORT's optimizer may drop the model's metadata; keep the original's.
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    used = {n.domain for n in out.graph.node} | {"", "ai.onnx"}
    keep = [o for o in out.opset_import if o.domain in used]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _basic_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ONNX Runtime's basic level leaves it, through temporary files (errors name the model or TMPDIR)."""
    with _temp_dir("hybridq-prep-") as tmp:
        src = os.path.join(tmp, "in.onnx")
        dst = os.path.join(tmp, "out.onnx")
        data = serialized_within(model)  # one serialization, no ByteSize pass first
        large = data is None
        try:
            if large:
                save_external(model, src, "in.data")
            else:
                with open(src, "wb") as f:
                    f.write(data)
        except OSError as exc:
            raise OutputError(
                f"Cannot write a temporary copy of the model into '{tmp}': {exc.strerror or exc}. "
                "Free space there, or point TMPDIR at a directory with room."
            ) from exc
        try:
            _runtime.session(
                src, optimization="basic", log_level=3, optimized_model=dst, optimized_external_data="out.data" if large else None
            )
        except Exception as exc:
            raise ModelError(
                f"ONNX Runtime cannot load this model: {str(exc).splitlines()[0]}. "
                "hybridq calibrates with ONNX Runtime, so the fp32 model must run there first."
            ) from exc
        return onnx.load(dst)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape and type inference with data propagation, run without the weights' data (:func:`hybridq._onnx.infer_shapes`:
    no weight is serialized, parsed or copied for it); the model is returned unchanged when inference fails on an exotic op."""
    try:
        return _infer_shapes(model, data_prop=True)
    except Exception:
        return model


def fill_types(model: onnx.ModelProto) -> None:
    """Give the main graph's node outputs that shape inference left untyped the element type ONNX Runtime gives them,
    in place, as value_info (a model whose types are all inferred is unchanged).

    ONNX types nothing a com.microsoft op (Gelu, FusedMatMul) writes, nor what follows from it; every later stage reads
    the types (layers to quantize, the Casts of a float16 layer). ONNX Runtime types them when it loads the model with
    them as outputs; nothing is run. A tensor it gives no tensor type stays untyped.
    """
    g = model.graph
    entries = {v.name: v for v in list(g.output) + list(g.value_info)}
    typed = {n for n, v in entries.items() if v.type.tensor_type.elem_type} | {i.name for i in g.input} | {i.name for i in g.initializer}
    missing = list(dict.fromkeys(o for n in g.node for o in n.output if o and o not in typed))
    if not missing:
        return
    declared, outputs = len(g.output), {o.name for o in g.output}
    g.output.extend(onnx.ValueInfoProto(name=n) for n in missing if n not in outputs)
    try:
        found = {o.name: o.type for o in _runtime.session(model, optimization="basic", log_level=3).get_outputs()}
    except Exception:  # the caller then meets the tensors untyped, as before
        found = {}
    finally:
        del g.output[declared:]
    for name in missing:
        kind = found.get(name, "")
        elem = getattr(TensorProto, kind[len("tensor("):-1].upper(), 0) if kind.startswith("tensor(") else 0
        if elem:
            entry = entries[name] if name in entries else g.value_info.add(name=name)
            entry.type.tensor_type.elem_type = elem


def prepare(model: onnx.ModelProto, fixed_inputs: Mapping[str, Any] | None = None) -> tuple[onnx.ModelProto, PrepReport]:
    """Return the temp model (a new proto) and what changed; the input model is not modified.

    ``fixed_inputs`` (input name -> value) become constants; `If` nodes whose condition is then constant fold (fold.py).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    report = PrepReport(opset_from=main_opset(work), opset_to=main_opset(work))
    report.initializer_inputs = initializer_inputs(work)
    modern_ir(work)
    report.renamed = name_nodes(work)
    original = {n.name: (n.op_type, list(n.output)) for n in work.graph.node}
    read_by: dict[str, list[str]] = {}
    for n in work.graph.node:
        for i in n.input:
            read_by.setdefault(i, []).append(n.name)
    report.constants_lifted = lift_constants(work)
    fixed = _fix(work, fixed_inputs, report)
    work = _fold_ifs(fixed, report)
    try:
        work = _optimized(work, report)
    except ModelError as exc:
        if not report.control_flow.folded:
            raise
        # an inlined branch can make static shapes clash that the If hid (a [1] where a scalar is wanted): keep the Ifs
        why = f"kept: ONNX Runtime cannot load the graph with this If's branch inlined ({str(exc).split(': ', 1)[-1][:160]})"
        report.control_flow.kept.update(dict.fromkeys(report.control_flow.folded, why))
        report.control_flow.folded = {}
        work = _optimized(fixed, report)
    name_nodes(work)
    untie_weights(work)
    folded = fold_conv_affine(work)
    work = infer_shapes(work)
    fill_types(work)
    index = GraphIndex(work.graph)
    # ONNX Runtime names a fusion after the node it grew from ("fc1/MatMulAddFusion": the Add's output is now its own)
    fused_into = {n.name.rsplit("/", 1)[0]: n.name for n in work.graph.node
                  if "/" in n.name and n.name not in original and n.name.rsplit("/", 1)[0] in original}
    for name, (op, outputs) in original.items():
        report.original_nodes[name] = outputs
        if name in index.by_name or op == "Constant" or name in report.control_flow.folded:
            continue
        report.fused[name] = (folded.get(name) or next((p.name for o in outputs if (p := index.producer_node(o)) is not None), "")
                              or fused_into.get(name, "")
                              # ONNX Runtime fused it into a Conv whose next tail node was folded: that Conv
                              or next((folded[r] for o in outputs for r in read_by.get(o, []) if r in folded), ""))
    return work, report


def _fix(model: onnx.ModelProto, fixed_inputs: Mapping[str, Any] | None, report: PrepReport) -> onnx.ModelProto:
    """The given inputs made constants (the model itself when none is given)."""
    if fixed_inputs:
        model = fold.fix_inputs(model, fixed_inputs)
        report.control_flow.fixed = {k: np.asarray(v).tolist() for k, v in fixed_inputs.items()}
    return model


def _fold_ifs(model: onnx.ModelProto, report: PrepReport) -> onnx.ModelProto:
    """The Ifs with a constant condition replaced by their taken branch (the model itself when it has no subgraph)."""
    if any(subgraphs(n) for n in model.graph.node):
        model, _ = fold.fold_control_flow(model, report.control_flow)
    return model


def _optimized(model: onnx.ModelProto, report: PrepReport) -> onnx.ModelProto:
    """Opset 13 at least, the IR it needs, then ONNX Runtime's basic optimizations."""
    model = upgrade_opset(model)
    modern_ir(model)
    report.opset_to = main_opset(model)
    return ort_basic_optimize(model)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor in the main graph (inputs, outputs, value_info, initializers)."""
    types: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:  # a Constant's type is its value's (the opset converter writes untyped ones: ReduceMean's axes)
        if node.op_type == "Constant" and node.output and node.output[0] not in types and node.attribute:
            a = node.attribute[0]
            t = a.t.data_type if a.name == "value" else _CONSTANT_TYPES.get(a.name)
            if t:
                types[node.output[0]] = t
    return types


_CONSTANT_TYPES = {"value_float": TensorProto.FLOAT, "value_floats": TensorProto.FLOAT, "value_int": TensorProto.INT64,
                   "value_ints": TensorProto.INT64, "value_string": TensorProto.STRING, "value_strings": TensorProto.STRING}


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Static or symbolic shape of every tensor with a known rank."""
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Float32 tensors computed at run time in the main graph (graph inputs and node outputs), in graph order."""
    types = tensor_types(model)
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for vi in model.graph.input:
        if vi.name not in inits and types.get(vi.name) == onnx.TensorProto.FLOAT:
            names.append(vi.name)
    for node in model.graph.node:
        for o in node.output:
            if o and types.get(o) == onnx.TensorProto.FLOAT:
                names.append(o)
    return names


def has_subgraphs(model: onnx.ModelProto) -> list[str]:
    """Names of main-graph nodes that carry subgraphs (If, Loop, Scan); these stay float."""
    return [n.name for n in model.graph.node if subgraphs(n)]


def cut_model(
    proto: onnx.ModelProto, path: Path, inputs: list[str] | None, sizes: list[list[int]] | None,
    initial: list[Any] | None, outputs: list[str] | None,
) -> onnx.ModelProto:
    """A copy of ``proto`` cut at tensors ``inputs`` / ``outputs``, inputs fixed to ``sizes`` or to constants ``initial``.

    (RKNN's ``load_onnx(inputs=, outputs=, input_size_list=, input_initial_val=)``.) ``path`` names the
    model in errors; a size list may leave out the batch dim. ``proto`` is not modified.
    """
    g = proto.graph
    inits = {i.name for i in g.initializer}
    tensors = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    model_inputs = [i.name for i in g.input if i.name not in inits]
    for name in list(inputs or []) + list(outputs or []):
        if name not in tensors:
            raise InputError(f"'{name}' is not a tensor of {path}.{did_you_mean(name, sorted(tensors))} Give tensor names as Netron shows them.")
    if sizes is not None and inputs is None and len(sizes) != len(model_inputs):
        raise InputError(f"input_size_list has {len(sizes)} shapes but {path} has {len(model_inputs)} inputs ({', '.join(model_inputs)}); give one shape per input.")
    if inputs is not None and sizes is not None and len(sizes) != len(inputs):
        raise InputError(f"input_size_list has {len(sizes)} shapes but inputs names {len(inputs)} tensors; give one shape per input.")
    model = proto
    if inputs is not None or outputs is not None:
        try:
            model = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model(list(inputs or model_inputs), list(outputs or [o.name for o in g.output]))
        except Exception as exc:
            raise InputError(f"cannot cut {path} at inputs {inputs} / outputs {outputs}: {exc}") from None
        del model.opset_import[:]
        model.opset_import.extend(proto.opset_import)
        model.ir_version = proto.ir_version
    g = model.graph
    names = list(inputs or [i.name for i in g.input if i.name not in {x.name for x in g.initializer}])
    by_name = {i.name: i for i in g.input}
    if sizes is not None:
        for name, size in zip(names, sizes):
            dims = by_name[name].type.tensor_type.shape.dim
            size = list(size)
            if len(size) == len(dims) - 1:
                size = [1] + size  # RKNN lists often leave out the batch dim
            if len(size) != len(dims):
                raise InputError(f"input_size_list gives {size} for '{name}', which has {len(dims)} dims.")
            for d, v in zip(dims, size):
                d.ClearField("dim_param")
                d.dim_value = int(v)
        del g.value_info[:]  # shapes are inferred again by step1
    if initial is not None:  # checked and cast as --fix-input is; the Ifs they decide fold in step1
        model = fold.fix_inputs(model, {name: val for name, val in zip(names, initial) if val is not None}, where="input_initial_val")
    return model


def float_layers_between(g: onnx.GraphProto, starts: list[str], ends: list[str], index: GraphIndex | None = None) -> list[str]:
    """Nodes (by name, graph order) on some path from a tensor in ``starts`` to one in ``ends`` that write a float tensor."""
    index = index or GraphIndex(g)
    down: set[str] = set()
    stack = [c for t in starts for c in index.consumer_nodes(t)]
    while stack:
        n = stack.pop()
        if n.name not in down:
            down.add(n.name)
            stack.extend(c for o in n.output for c in index.consumer_nodes(o))
    up: set[str] = set()
    stack = [p for t in ends if (p := index.producer_node(t)) is not None]
    while stack:
        n = stack.pop()
        if n.name not in up:
            up.add(n.name)
            stack.extend(p for t in n.input if (p := index.producer_node(t)) is not None)
    float_out = _float_outputs(g)
    return [n.name for n in g.node if n.name in down and n.name in up and any(o in float_out for o in n.output)]


def _float_outputs(g: onnx.GraphProto) -> set[str]:
    """Tensors known to be float: graph inputs/outputs/value_info typed FLOAT, and outputs of nodes with float inputs."""
    typed = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    return {o for n in g.node for o in n.output if typed.get(o, TensorProto.FLOAT) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
