"""ONNX plumbing shared by every stage: the graph index, the opset helper, models over 2 GB.

No stage builds its own producer/consumer dicts, reads ``opset_import`` or
calls ``onnx.version_converter``: they use :class:`GraphIndex`,
:func:`main_opset` and :func:`convert_opset`. :func:`infer_shapes` is onnx's
shape inference without carrying the weights through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper, numpy_helper, version_converter

from .errors import ModelError

LARGE_MODEL_BYTES = 1_800_000_000
"""Above this size a model cannot be one protobuf (2 GB limit): it goes through files with external data."""


# --------------------------------------------------------------------------- graph index


class GraphIndex:
    """Read-only lookups over one graph's nodes: producer, consumers and nodes by name.

    Node positions (indices into :attr:`nodes`) are stored, so callers that
    copy or reorder nodes can keep their own lists; :meth:`producer_node` and
    :meth:`consumer_nodes` give the nodes themselves. Empty names (optional
    inputs or outputs left out) are not indexed; a tensor written twice (an
    invalid graph) maps to its last writer. With ``subgraph_reads``, a node
    whose subgraphs read a main-graph tensor (:func:`outer_reads`) is also
    one of its consumers.
    """

    def __init__(self, nodes: onnx.GraphProto | Iterable[onnx.NodeProto], *, subgraph_reads: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = list(nodes.node if isinstance(nodes, onnx.GraphProto) else nodes)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.by_name: dict[str, onnx.NodeProto] = {}
        for k, node in enumerate(self.nodes):
            self.by_name[node.name] = node
            for o in node.output:
                if o:
                    self.producer[o] = k
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(k)
            for r in outer_reads(node) if subgraph_reads else ():
                self.consumers.setdefault(r, []).append(k)

    def producer_node(self, tensor: str) -> onnx.NodeProto | None:
        """The node writing ``tensor``, or None (graph input, initializer or unknown)."""
        k = self.producer.get(tensor)
        return None if k is None else self.nodes[k]

    def consumer_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes reading ``tensor`` as a direct input, in graph order."""
        return [self.nodes[k] for k in self.consumers.get(tensor, [])]

    def tensors(self) -> set[str]:
        """Every tensor a node writes."""
        return set(self.producer)


# --------------------------------------------------------------------------- subgraphs


def _outer_refs(g: onnx.GraphProto) -> set[str]:
    """Tensors a subgraph reads from enclosing scopes."""
    local = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    refs: set[str] = set()
    for n in g.node:
        refs.update(i for i in n.input if i and i not in local)
        for sg in subgraphs(n):
            refs.update(r for r in _outer_refs(sg) if r not in local)
    refs.update(o.name for o in g.output if o.name not in local)
    return refs


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs in a node's attributes (If branches, Loop and Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors a node's subgraphs read from the main graph."""
    return sorted({r for sg in subgraphs(node) for r in _outer_refs(sg)})


QDQ_MAP_KEY = "hybridq.qdq_map"
"""``metadata_props`` key of the step2 model's map for analysis (JSON; :class:`hybridq.qdq.QdqMap` writes and reads it)."""


def qdq_map_flag(model: onnx.ModelProto, key: str) -> bool:
    """Is `key` true in the model's step2 map? (False without a map, or with one that is not a JSON object.)"""
    import json

    for p in model.metadata_props:
        if p.key == QDQ_MAP_KEY:
            try:
                doc = json.loads(p.value)
            except json.JSONDecodeError:
                return False
            return isinstance(doc, dict) and doc.get(key) is True
    return False


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every name the graph still reads: node inputs, what its nodes' subgraphs read from it, and its outputs. An
    initializer replaced for some layers is dropped only when it is not among them."""
    return {i for n in graph.node for i in n.input} | {r for n in graph.node for r in outer_reads(n)} | {o.name for o in graph.output}


# --------------------------------------------------------------------------- opset


def main_opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset version the model imports (0 when it imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` at ai.onnx opset ``target`` (``onnx.version_converter``), metadata kept.

    The converter runs on a copy without the weights' data (:func:`_set_aside`: it reads no weight,
    and copies each one several times; rec 46 -> 15 ms), which the result gets back.
    The converter's exception propagates; :func:`describe_error` gives its one-line summary.
    """
    light, aside = _set_aside(model)
    new = _put_back(version_converter.convert_version(light, target), aside)
    del new.metadata_props[:]
    new.metadata_props.extend(model.metadata_props)
    _name_after_originals(new.graph, model.graph)
    return new


def _name_after_originals(graph: onnx.GraphProto, before: onnx.GraphProto) -> None:
    """Name each node the converter added after the original node it serves: ``softmax_Reshape`` rather than
    ``Reshape_0`` for the Reshape an opset-11 Softmax on 4-D gains, so a row, a cfg entry or an advice names it.

    A node is original when it keeps an original node's name, or its op and outputs (an unnamed one); the node it
    serves is the original one the converter adapted (its outputs changed), else a named original neighbour. No
    ``/`` in the name: that is how ONNX Runtime names its fusions (see graph.prepare)."""
    names = {n.name: tuple(n.output) for n in before.node if n.name}
    kept = {(n.op_type, tuple(n.output)) for n in before.node}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    added = [n for n in graph.node if n.name not in names and (n.op_type, tuple(n.output)) not in kept]

    def neighbours(n: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [producer[i] for i in n.input if i in producer] + [r for o in n.output for r in readers.get(o, [])]

    # the adapted original a new node touches, or one it reaches through other new nodes (a Shape feeding the Reshape)
    owners = {id(n): m.name for n in added for m in neighbours(n) if m.name in names and tuple(m.output) != names[m.name]}
    grew = True
    while grew:
        grew = False
        for n in added:
            if id(n) not in owners and (via := next((owners[id(m)] for m in neighbours(n) if id(m) in owners), None)):
                owners[id(n)], grew = via, True
    taken = {n.name for n in graph.node}
    for n in added:
        owner = owners.get(id(n)) or next((m.name for m in neighbours(n) if m.name in names), None)
        if owner is None:
            continue
        name, k = f"{owner}_{n.op_type}", 2
        while name in taken:
            name, k = f"{owner}_{n.op_type}_{k}", k + 1
        taken.discard(n.name)
        taken.add(name)
        n.name = name


def infer_shapes(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` of ``model``, run on a copy without the weights' data (rec 8 -> 2 ms).

    The result holds the weights again. Exceptions of shape inference propagate.
    """
    light, aside = _set_aside(model)
    return _put_back(onnx.shape_inference.infer_shapes(light, data_prop=data_prop), aside)


_ASIDE_BYTES = 1024
_SHAPE_DATA = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell (graph inputs, outputs, value_info, initializers)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model))  # types only: the weights' data is not needed back
    except Exception:  # a model shape inference cannot handle: the caller learns the types at run time
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large weights hold no data (their names, dims and types kept): enough for shape
    inference and compute estimates, at a fraction of a full copy's cost."""
    return _set_aside(model)[0]


def _set_aside(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[tuple[bool, str], onnx.TensorProto]]:
    """A copy of ``model`` whose weights (main-graph initializers and Constant values of over 1 KB of raw data,
    integer shape data excepted) hold no data, and those weights by (is initializer, name)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    aside: dict[tuple[bool, str], onnx.TensorProto] = {}

    def heavy(t: onnx.TensorProto) -> bool:
        return len(t.raw_data) > _ASIDE_BYTES and t.data_type not in _SHAPE_DATA

    for t, orig in zip(light.graph.initializer, model.graph.initializer):
        if heavy(orig):
            aside[(True, orig.name)] = orig
            t.ClearField("raw_data")
    for n, orig in zip(light.graph.node, model.graph.node):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            for a, b in zip(n.attribute, orig.attribute):
                if a.name == "value" and heavy(b.t):
                    aside[(False, n.output[0])] = b.t
                    a.t.ClearField("raw_data")
    return light, aside


def _put_back(model: onnx.ModelProto, aside: dict[tuple[bool, str], onnx.TensorProto]) -> onnx.ModelProto:
    """``model`` with the weights :func:`_set_aside` took out in place again (by name); returns ``model``."""
    if not aside:
        return model
    for t in model.graph.initializer:
        if (True, t.name) in aside:
            t.CopyFrom(aside[(True, t.name)])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and (False, n.output[0]) in aside:
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(aside[(False, n.output[0])])
    return model


def scalar_value(name: str, inits: Mapping[str, onnx.TensorProto], producer: onnx.NodeProto | None) -> float | None:
    """The value of a one-element constant: an initializer in `inits`, or `producer` when it is a Constant node; else None.

    The element count is read off the dims first, so a weight is never converted to find it is not a scalar."""
    tensor = inits.get(name)
    if tensor is None and producer is not None and producer.op_type == "Constant":
        tensor = next((a.t for a in producer.attribute if a.name == "value"), None)
    if tensor is None or math.prod(tensor.dims) != 1:
        return None
    return float(numpy_helper.to_array(tensor).reshape(-1)[0])


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``, for error messages that quote a library's failure."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- models over 2 GB


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model; over 2 GB, where protobuf cannot size it, the size of its tensor data."""
    try:
        return model.ByteSize()
    except EncodeError:
        return sum(len(t.raw_data) for t in external_data_helper._get_all_tensors(model))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model's tensors (initializers, Constant values, subgraphs' too): nearly all of its size,
    summed per tensor where ``ByteSize`` walks every message (PP-OCR rec's analysis graph: 8 against 30 ms)."""
    return sum(t.ByteSize() for t in external_data_helper._get_all_tensors(model))


_WIDE = {onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8, onnx.TensorProto.COMPLEX64: 8,
         onnx.TensorProto.COMPLEX128: 16}
"""Bytes per element of the element types wider than 4 bytes (the others take at most 4)."""


def _raw_bytes_bound(tensors: Iterable[onnx.TensorProto]) -> int:
    """An upper bound of the tensors' raw data bytes, from their shapes: reading ``raw_data`` copies every weight
    (5.8 MB of a small detector: ~3 ms and 1400 page faults a call, in a process that serializes its model 6 times)."""
    return sum(math.prod(t.dims) * _WIDE.get(t.data_type, 4) for t in tensors)


def serialized_within(model: onnx.ModelProto, limit: int | None = None) -> bytes | None:
    """The model's bytes if they are at most `limit` (None: LARGE_MODEL_BYTES), serialized once (no ByteSize first); else None."""
    limit = LARGE_MODEL_BYTES if limit is None else limit
    inits = model.graph.initializer
    if _raw_bytes_bound(inits) > limit and sum(len(t.raw_data) for t in inits) > limit:
        return None
    try:
        data = model.SerializeToString()
    except Exception:  # over protobuf's 2 GB
        return None
    return data if len(data) <= limit else None


def is_large(model: onnx.ModelProto) -> bool:
    """Must this model be saved with external data?"""
    return model_bytes(model) > LARGE_MODEL_BYTES


def tag_external(model: onnx.ModelProto, location: str, min_bytes: int = 0) -> None:
    """Mark tensors with raw data of at least `min_bytes` as external data in `location` (written by onnx.save_model).

    Done by hand because onnx's save_as_external_data checks `location` against the current
    directory, not the model's, and refuses when a file of that name happens to sit there.
    """
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= min_bytes:
            external_data_helper.set_external_data(tensor, location=location)


def save_external(model: onnx.ModelProto, path: str, location: str) -> None:
    """Save a copy of the model with its weights (>= 1 KB tensors) in `location` beside it."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    tag_external(work, location, min_bytes=1024)
    onnx.save_model(work, str(path))


def external_data_files(path: str | Path) -> list[Path]:
    """The files a model file's tensors keep their data in (external data, beside it); none for an unreadable file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    return external_data_paths(model, Path(path).parent)


def external_data_paths(model: onnx.ModelProto, directory: Path) -> list[Path]:
    """The files, in `directory`, that a model read without its external data keeps its tensors in."""
    where = {e.value for t in external_data_helper._get_all_tensors(model)
             if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    return sorted(directory / w for w in where)


def read_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load``; a file that is not ONNX (truncated, corrupt, an image) is a ModelError naming it."""
    return read_onnx_bytes(path, load_external_data=load_external_data)[0]


def read_onnx_bytes(path: str | Path, *, load_external_data: bool = True) -> tuple[onnx.ModelProto, bytes | None]:
    """:func:`read_onnx`, and the file's bytes when they are the whole model (binary protobuf, no external data, at most
    LARGE_MODEL_BYTES; else None): what the checker would otherwise get by serializing the model again (5.8 MB of a
    small detector: 5-10 ms, most of it the page faults of the new buffers)."""
    try:
        fmt = onnx.serialization.registry.get_format_from_file_extension(Path(path).suffix) or "protobuf"
        with open(path, "rb") as f:
            data: bytes | None = f.read()
        model = onnx.load_model_from_string(data, format=fmt)
        tensors = external_data_helper._get_all_tensors(model)
        if fmt != "protobuf" or len(data) > LARGE_MODEL_BYTES or (
                load_external_data and any(external_data_helper.uses_external_data(t) for t in tensors)):
            data = None
        if load_external_data:
            missing = [p for p in external_data_paths(model, Path(path).parent) if not p.is_file()]
            if missing:
                raise ModelError(f"Model file '{path}' keeps its weights in external data file(s) that are missing: "
                                 f"{', '.join(repr(str(p)) for p in missing)}. Put the data file(s) the exporter wrote beside the "
                                 "model, under the name(s) the model gives (copy them with it).")
            external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        return model, data
    except ModelError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, external data raises OSError
        raise ModelError(
            f"Model file '{path}' could not be read as ONNX ({type(exc).__name__}: {exc}). "
            "It may be truncated, corrupt or not an ONNX file; re-export or re-download it."
        ) from exc
