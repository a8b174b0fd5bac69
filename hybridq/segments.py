"""Split an analysis graph into consecutive segments, each run by its own ONNX Runtime session.

Why: the analysis graph holds the fp32 graph, the quantized graph and the
isolated layers side by side, and in one session ONNX Runtime runs one of
them to the end before the next, so every compared tensor lives until the
end of the run and is read back from main memory. Run segment by segment,
each holding a few compared layers of all three graphs (nodes ordered by a
depth-first walk from the compared tensors), the tensors are compared while
they are still in cache and freed right after.

Fusion groups are never cut: a node stays with the DequantizeLinear nodes
that feed it and the QuantizeLinear nodes it feeds, so ONNX Runtime fuses the
QDQ groups into the same integer kernels as in one session. A
DequantizeLinear read by several nodes is first copied per reader, as ONNX
Runtime itself does before fusing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from ._onnx import outer_reads


@dataclass
class Segment:
    """One consecutive part of the graph: a model and the tensors it reads and writes."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


def _unique_dq(
    nodes: list[onnx.NodeProto], outer: list[list[str]], graph_outputs: set[str], used: set[str], types: dict[str, int]
) -> tuple[list[onnx.NodeProto], list[list[str]]]:
    """Give each reader of a shared DequantizeLinear output its own copy (the original keeps graph outputs).

    ``outer`` holds each node's subgraph reads (:func:`outer_reads`); both lists are returned with the copies
    inserted. A reader that is rewired is copied first: the nodes of ``nodes`` are never changed.
    """
    dq_outs = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear" and len(n.output) == 1}
    readers: dict[str, list[int]] = defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            if i in dq_outs:
                readers[i].append(k)
        for r in outer[k]:
            readers[r].append(-1)  # read by a subgraph: never rewired
    extra: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    nodes = list(nodes)
    copied: set[int] = set()
    for n in nodes:
        if n.op_type != "DequantizeLinear" or len(n.output) != 1:
            continue
        out = n.output[0]
        rs = readers.get(out, [])
        if -1 in rs or len(set(rs)) + (out in graph_outputs) < 2:
            continue
        keep_first = out not in graph_outputs
        for j, r in enumerate(sorted(set(rs))):
            if j == 0 and keep_first:
                continue
            name, c = f"{out}/dq{j}", j
            while name in used:
                c += 1
                name = f"{out}/dq{c}"
            used.add(name)
            if out in types:
                types[name] = types[out]
            copy = _copy(n)
            copy.output[0] = name
            copy.name = f"{n.name or out}/dq{c}"
            extra[r].append(copy)
            if r not in copied:
                nodes[r] = _copy(nodes[r])
                copied.add(r)
            reader = nodes[r]
            for p, i in enumerate(reader.input):
                if i == out:
                    reader.input[p] = name
    result: list[onnx.NodeProto] = []
    result_outer: list[list[str]] = []
    for k, n in enumerate(nodes):
        result.extend(extra.get(k, []))
        result_outer.extend([] for _ in extra.get(k, []))
        result.append(n)
        result_outer.append(outer[k])
    return result, result_outer


class _Groups:
    """Union-find over node indices: the nodes that must share a segment."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _fusion_groups(nodes: list[onnx.NodeProto], producer: dict[str, int], readers: dict[str, list[int]]) -> _Groups:
    groups = _Groups(len(nodes))
    for k, n in enumerate(nodes):
        if n.op_type == "DequantizeLinear" and n.output and len(readers.get(n.output[0], [])) == 1:
            groups.union(k, readers[n.output[0]][0])
        if n.op_type == "QuantizeLinear" and n.input and n.input[0] in producer:
            groups.union(k, producer[n.input[0]])
    return groups


def _order(
    reads: list[list[str]],
    producer: dict[str, int],
    groups: _Groups,
    targets: Sequence[Sequence[str]],
    weights: Sequence[float],
    budget: float,
) -> list[list[int]]:
    """Node indices per segment: groups in depth-first order from each target, a cut once the targets' weights reach ``budget``."""
    root = [groups.find(k) for k in range(len(reads))]
    members: dict[int, list[int]] = defaultdict(list)
    for k, g in enumerate(root):
        members[g].append(k)
    deps: dict[int, list[int]] = {}
    for g, ks in members.items():
        seen: dict[int, None] = {}  # ordered set
        for k in ks:
            for name in reads[k]:
                p = producer.get(name)
                if p is not None and root[p] != g:
                    seen[root[p]] = None
        deps[g] = list(seen)
    done: set[int] = set()
    segments: list[list[int]] = [[]]
    load = 0.0
    for target, weight in zip(targets, weights):
        for name in target:
            p = producer.get(name)
            if p is None or root[p] in done:
                continue
            stack: list[tuple[int, bool]] = [(root[p], False)]
            while stack:
                g, leave = stack.pop()
                if g in done:
                    continue
                if leave:
                    done.add(g)
                    segments[-1].extend(members[g])
                    continue
                stack.append((g, True))
                stack.extend((d, False) for d in reversed(deps[g]) if d not in done)
        load += weight
        if load >= budget:
            segments.append([])
            load = 0.0
    return [sorted(s) for s in segments if s]


def split(
    model: onnx.ModelProto,
    targets: Sequence[Sequence[str]],
    types: dict[str, int],
    weights: Sequence[float],
    budget: float,
) -> list[Segment] | None:
    """Segments computing every tensor of ``targets`` (groups compared together, in order), or None.

    A segment ends once the ``weights`` of its targets (their bytes, say)
    add up to ``budget``. ``types`` gives element types of the tensors
    (extended for new copies);
    None when a tensor crossing segments has no known type or the graph has
    sparse initializers: run the whole model as one segment then.
    """
    g = model.graph
    if g.sparse_initializer:
        return None
    outputs = {o.name for o in g.output}
    used = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    nodes, outer = _unique_dq(list(g.node), [outer_reads(n) for n in g.node], outputs, used, types)
    # every tensor each node reads, its subgraphs' outer references included
    reads = [[i for i in n.input if i] + o for n, o in zip(nodes, outer)]
    writes = [[o for o in n.output if o] for n in nodes]
    producer = {o: k for k, w in enumerate(writes) for o in w}
    readers: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(reads):
        for name in dict.fromkeys(r):
            readers[name].append(k)
    groups = _fusion_groups(nodes, producer, readers)
    parts = _order(reads, producer, groups, targets, weights, budget)
    seg_of = {k: s for s, ks in enumerate(parts) for k in ks}
    wanted = {name for t in targets for name in t}
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name: i for i in g.input}
    last_read: dict[str, int] = {}
    for name, ks in readers.items():
        segs = [seg_of[k] for k in ks if k in seg_of]
        if segs:
            last_read[name] = max(segs)
    result: list[Segment] = []
    for s, ks in enumerate(parts):
        made = {o for k in ks for o in writes[k]}
        seg_reads = list(dict.fromkeys(name for k in ks for name in reads[k]))
        ins = [r for r in seg_reads if r not in made and r not in inits]
        if any(r not in graph_inputs and r not in types for r in ins):
            return None
        outs = [o for k in ks for o in writes[k] if o in wanted or last_read.get(o, -1) > s]
        sub = _shell(model)
        sg = sub.graph
        sg.node.extend(nodes[k] for k in ks)
        sg.initializer.extend(inits[r] for r in seg_reads if r in inits)
        sg.input.extend(graph_inputs[r] if r in graph_inputs else _value_info(r, types[r]) for r in ins)
        sg.output.extend(_value_info(o, types.get(o)) for o in outs)
        result.append(Segment(sub, ins, outs))
    return result


def _value_info(name: str, elem_type: int | None) -> onnx.ValueInfoProto:
    """A tensor of ``elem_type`` and unknown shape (``helper.make_tensor_value_info``'s proto); no type when None."""
    vi = onnx.ValueInfoProto(name=name)
    if elem_type:
        vi.type.tensor_type.elem_type = elem_type
    return vi


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """An empty model with ``model``'s versions, opsets and functions."""
    sub = onnx.ModelProto(
        ir_version=model.ir_version, producer_name=model.producer_name, domain=model.domain, model_version=model.model_version
    )
    sub.opset_import.extend(model.opset_import)
    sub.functions.extend(model.functions)
    sub.graph.name = model.graph.name
    return sub


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    return n

