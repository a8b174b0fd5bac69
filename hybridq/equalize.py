"""Channel equalization: move an activation channel's scale into the weights of the layers that read it.

For a tensor t = act(producer(x)) with a positively homogeneous act (Relu, LeakyRelu,
MaxPool, ...), dividing the producer's output channel c by s_c > 0 divides t's channel c
by s_c: a layer's weights and bias; a LayerNorm's gamma and beta, as SmoothQuant does for
transformers; the constants of a Mul and Add by a scalar or per-channel constant (such as
PP-LCNet's learnable affine block after its HardSwish), which then hold one value per
channel. Multiplying every reader's input channel c by s_c (a Conv's, Gemm's or MatMul's
weights; a depthwise Conv's filter c) restores the fp32 function exactly. An outlier
channel that stretches t's per-tensor range is shrunk this way without losing information
(SmoothQuant, cross-layer equalization). The model is changed as data (initializers), so
step2 applies it without re-calibration; the tensor's new range comes with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import tensor_shapes
from .plan import GraphView

VIEWS = ("Reshape", "Flatten")
"""Ops that only reshape: one keeping its input's last axis keeps last-axis channels where they are."""
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "Identity", "Dropout")
"""Ops with f(x / s) = f(x) / s for s > 0 per channel (PRelu only with a per-channel or scalar slope)."""


@dataclass(frozen=True)
class Site:
    """Where channels of `tensor` can be rescaled: the producer that divides, the readers that multiply."""

    tensor: str
    producer: str
    path: tuple[str, ...]
    readers: tuple[str, ...]
    axis: int
    channels: int
    rank: int = 0  # rank of `tensor`: a scalar constant the site divides becomes one value per channel of that rank
    inputs: tuple[str, ...] = ()
    """The tensor each reader reads: the rescaled tensor, or a view of it (default: `tensor` for all)."""
    views: tuple[str, ...] = ()
    """Every tensor carrying the rescaled channels: the producer's (homogeneous path's) output and the views of it
    that feed readers (a Reshape or Flatten keeping the last axis, as ONNX Runtime puts before a Gemm on 3-D input)."""

    def carriers(self, g: GraphView) -> dict[str, int]:
        """Every tensor whose channels this equalization divides -> its channel axis counted from the end (-1: last):
        the producer's output, each op's on the way to the rescaled tensor, and its views."""
        axis = (self.axis % self.rank) - self.rank if self.rank else -1
        out = {g.by_name[self.producer].output[0]: axis}
        out.update({g.by_name[n].output[0]: axis for n in self.path})
        out.update({v: -1 if v != self.views[0] else axis for v in self.views})
        out.setdefault(self.tensor, axis)
        return out

    def reads(self, i: int) -> str:
        """The tensor reader ``i`` reads."""
        return self.inputs[i] if self.inputs else self.tensor


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _out_channel(node: onnx.NodeProto, g: GraphView) -> tuple[str, int, str | None] | None:
    """(weight, output-channel axis of the weight, bias or None) of a producer whose output channels can be divided.

    A bias must hold exactly one value per output channel (a Gemm's C of shape (N,) or (1, N)); a computed bias,
    or one that broadcasts otherwise, rules the producer out.
    """
    if len(node.input) < 2 or node.input[1] not in g.inits:
        return None
    w = g.inits[node.input[1]]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in g.inits:
        return None
    if node.op_type == "Conv":
        axis = 0
    elif node.op_type == "Gemm" and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0:
        axis = 0 if _attr(node, "transB", 0) else 1
    else:
        axis = None
    if axis is not None:
        n = int(w.dims[axis])
        if bias is not None and (int(np.prod(g.inits[bias].dims)) != n or any(d not in (1, n) for d in g.inits[bias].dims)):
            return None
        return node.input[1], axis, bias
    if node.op_type == "MatMul" and len(g.inits[node.input[1]].dims) == 2:
        return node.input[1], 1, None
    if node.op_type in ("LayerNormalization", "Mul") and _last_axis_vector(node, g, bias):
        return node.input[1], 0, bias  # LayerNorm's gamma (and beta), or the Mul by gamma that ends a written-out LayerNorm
    return None


def _last_axis_vector(node: onnx.NodeProto, g: GraphView, bias: str | None) -> bool:
    """Is input 1 of this LayerNormalization (normalising the last axis only) or Mul a 1-D per-channel vector, and its
    bias (LayerNorm's B) one of the same length? Dividing them divides the output's last-axis channels."""
    w = g.inits[node.input[1]]
    if len(w.dims) != 1 or w.dims[0] <= 1 or (node.op_type == "Mul" and (len(node.input) != 2 or node.input[0] in g.inits)):
        return False
    if node.op_type == "LayerNormalization" and _attr(node, "axis", -1) != -1:
        return False
    return bias is None or list(g.inits[bias].dims) == list(w.dims)


def in_channel(node: onnx.NodeProto, tensor: str, g: GraphView) -> tuple[str, int, int] | None:
    """(weight, input-channel axis of the weight, channel axis of the activation) of a reader that can absorb a scale."""
    if not node.input or node.input[0] != tensor or tensor in node.input[1:] or len(node.input) < 2 or node.input[1] not in g.inits:
        return None
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return node.input[1], 1, 1
    if node.op_type == "Conv" and depthwise(node, g):  # input channel c has filter c alone: scaled on the output axis
        return node.input[1], 0, 1
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        return node.input[1], 1 if _attr(node, "transB", 0) else 0, -1
    if node.op_type == "MatMul" and len(g.inits[node.input[1]].dims) == 2:
        return node.input[1], 0, -1
    return None


def depthwise(node: onnx.NodeProto, g: GraphView) -> bool:
    """Is this a depthwise Conv with one filter per input channel (weight [C, 1, ...], group C)?"""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in g.inits:
        return False
    dims, group = g.inits[node.input[1]].dims, _attr(node, "group", 1)
    return group > 1 and len(dims) >= 3 and dims[0] == group and dims[1] == 1


def _affine(node: onnx.NodeProto, g: GraphView, rank: int) -> str | None:
    """The constant of a Mul of a computed tensor (of this rank) by an initializer of its own that is a scalar or one
    value per channel of axis 1 ([C, 1, 1] or [1, C, 1, 1] for NCHW); None for any other node."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    const = [i for i in node.input if i in g.inits]
    if len(const) != 1 or len(g.consumer_nodes(const[0])) != 1:
        return None
    return const[0] if channel_constant(list(g.inits[const[0]].dims), rank) else None


def channel_constant(dims: list[int], rank: int) -> bool:
    """Does a constant of these dims, broadcast against a tensor of this rank, hold a scalar or one value per channel of
    axis 1 (its only dim other than 1, right-aligned, on axis 1)?"""
    if len(dims) > rank or rank < 2:
        return False
    padded = [1] * (rank - len(dims)) + dims
    return all(d == 1 for i, d in enumerate(padded) if i != 1)


def _walk_back(g: GraphView, tensor: str) -> tuple[list[str], onnx.NodeProto | None, onnx.NodeProto] | str:
    """From `tensor` up through homogeneous ops and at most one Add of a constant: (that path, the Add or None, the node
    that would divide its output channels), or why there is none."""
    path: list[str] = []
    node = g.producer_node(tensor)
    while node is not None and node.op_type in HOMOGENEOUS:
        if len(g.consumer_nodes(node.input[0])) != 1 or node.input[0] in g.outputs:
            return f"'{node.input[0]}' has other readers besides '{node.name}'"
        if node.op_type == "PRelu" and (len(node.input) < 2 or node.input[1] not in g.inits):
            return f"'{node.name}' has a computed slope"
        path.append(node.name)
        node = g.producer_node(node.input[0])
    bias_add = None
    if node is not None and node.op_type == "Add":
        # MatMul + Add(bias), or an affine Mul + Add: the bias is divided with the weight.
        const = [i for i in node.input if i in g.inits]
        other = [i for i in node.input if i not in g.inits]
        if len(const) != 1 or len(other) != 1 or len(g.consumer_nodes(other[0])) != 1 or len(g.consumer_nodes(const[0])) != 1 \
                or other[0] in g.outputs:
            return f"'{tensor}' comes from '{node.name}' (an Add that is not a bias of its own)"
        bias_add = node
        node = g.producer_node(other[0])
    if node is None:
        return f"'{tensor}' is not computed by a layer with weights"
    return path, bias_add, node


class _Shapes:
    """Tensor shapes of a model, inferred only when the model does not record one that is asked for."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.known, self.inferred = model, tensor_shapes(model), False

    def get(self, name: str) -> tuple | None:
        if name not in self.known and not self.inferred:
            self.known = {**tensor_shapes(onnx.shape_inference.infer_shapes(self.model)), **self.known}
            self.inferred = True
        return self.known.get(name)


def _keeps_last_axis(node: onnx.NodeProto, shapes: _Shapes) -> bool:
    """Is ``node`` a Reshape or Flatten whose output keeps its input's last axis (so channel c stays channel c)?"""
    if node.op_type not in VIEWS:
        return False
    a, b = shapes.get(node.input[0]), shapes.get(node.output[0])
    return bool(a) and bool(b) and isinstance(a[-1], int) and a[-1] > 1 and a[-1] == b[-1]


def _view_source(tensor: str, g: GraphView, shapes: _Shapes) -> str:
    """The tensor ``tensor`` is a last-axis-keeping view of (itself when it is none)."""
    node = g.producer_node(tensor)
    while node is not None and _keeps_last_axis(node, shapes):
        tensor = node.input[0]
        node = g.producer_node(tensor)
    return tensor


def _readers(source: str, g: GraphView, shapes: _Shapes) -> tuple[list[onnx.NodeProto], list[str], list[str]] | str:
    """(readers, the tensor each reads, every tensor carrying the channels) of ``source``, each reader taking it
    directly or through one last-axis-keeping view; or why some reader cannot absorb a scale."""
    readers: list[onnx.NodeProto] = []
    inputs: list[str] = []
    views = [source]
    todo = [(r, source) for r in g.consumer_nodes(source)]
    if not todo or source in g.outputs:
        return f"'{source}' is a model output or has no reader"
    for r, t in todo:
        if t == source and _keeps_last_axis(r, shapes) and r.output[0] not in g.outputs and g.consumer_nodes(r.output[0]):
            views.append(r.output[0])
            todo.extend((c, r.output[0]) for c in g.consumer_nodes(r.output[0]))
            continue
        info = in_channel(r, t, g)
        if info is None:
            return f"'{t}' is read by '{r.name}' ({r.op_type}), which cannot absorb a per-channel scale"
        if t != source and info[2] != -1:  # a view keeps the last axis only: a Conv reading it takes another
            return f"'{t}', a reshaped view of '{source}', is read by '{r.name}' ({r.op_type}) along another axis than its last"
        if len(g.consumer_nodes(info[0])) != 1:
            return f"weight '{info[0]}' of '{r.name}' is shared with other nodes"
        readers.append(r)
        inputs.append(t)
    return readers, inputs, views


def find_site(model: onnx.ModelProto, tensor: str, g: GraphView | None = None) -> Site | str:
    """The equalization site of `tensor`, or why there is none (a sentence for the candidate table)."""
    g = g or GraphView(model)
    shapes = _Shapes(model)
    source = _view_source(tensor, g, shapes)
    walked = _walk_back(g, source)
    if isinstance(walked, str):
        return walked
    path, bias_add, node = walked
    shape = shapes.get(source)
    rank = len(shape) if shape else None
    prod = _out_channel(node, g)
    affine = _affine(node, g, rank) if prod is None and rank else None
    if (prod is None and affine is None) or (bias_add is not None and prod is not None and node.op_type not in ("MatMul", "Mul")):
        return f"'{tensor}' is produced by '{node.name}' ({node.op_type}), whose output channels cannot be rescaled"
    weight = prod[0] if prod is not None else affine
    produced_axis = 1 if node.op_type == "Conv" or affine is not None else -1  # where the producer writes its output channels
    if len(g.consumer_nodes(weight)) != 1:
        return f"weight '{weight}' of '{node.name}' is shared with other nodes"
    found = _readers(source, g, shapes)
    if isinstance(found, str):
        return found
    readers, inputs, views = found
    axes = {info[2] for info in (in_channel(r, i, g) for r, i in zip(readers, inputs)) if info is not None}
    if len(axes) != 1:
        return f"the readers of '{source}' take its channels along different axes"
    reader_axis = axes.pop()
    if rank is None or reader_axis % rank != produced_axis % rank or (len(views) > 1 and produced_axis != -1):
        return f"'{node.name}' writes its channels on another axis than the readers of '{tensor}' take them"
    if produced_axis != 1 and any(g.by_name[n].op_type == "MaxPool" for n in path):
        return f"a MaxPool between '{node.name}' and '{tensor}' pools along the channel axis"
    for n in path:
        inner = [i for i in g.by_name[n].input if i not in g.inits]
        if len(inner) != 1:
            return f"'{n}' between '{node.name}' and '{tensor}' reads more than one computed tensor"
    channels = int(g.inits[weight].dims[prod[1]]) if prod is not None else shape[1] if isinstance(shape[1], int) else 0
    if channels < 1:
        return f"the channels of '{tensor}' are not known (axis 1 of its shape {shape})"
    if bias_add is not None:
        dims = list(g.inits[next(i for i in bias_add.input if i in g.inits)].dims)
        ok = channel_constant(dims, rank) and int(np.prod(dims)) in (1, channels) if affine else len(dims) == 1 and dims[0] == channels
        if not ok:
            return f"'{bias_add.name}' adds a bias that is not one value per channel"
    full_path = tuple(path) + ((bias_add.name,) if bias_add is not None else ())
    return Site(tensor, node.name, full_path, tuple(r.name for r in readers), reader_axis, channels, rank, tuple(inputs), tuple(views))


def reader_weights(site: Site, g: GraphView) -> list[tuple[str, int]]:
    """(weight, its input-channel axis) of each reader: what the scales multiply."""
    return [in_channel(g.by_name[name], site.reads(i), g)[:2] for i, name in enumerate(site.readers)]


def scaled_weights(site: Site, g: GraphView) -> list[str]:
    """Every weight the equalization changes: the producer's (divided; not an affine constant) and the readers'."""
    prod = _out_channel(g.by_name[site.producer], g)
    return ([prod[0]] if prod is not None else []) + [w for w, _ in reader_weights(site, g)]


def reader_absmax(model: onnx.ModelProto, site: Site, g: GraphView | None = None) -> np.ndarray:
    """Largest |weight| of each input channel over all readers (what a scale multiplies)."""
    g = g or GraphView(model)
    out = np.zeros(site.channels)
    for weight, axis in reader_weights(site, g):
        w = np.abs(g.init_array(weight))
        out = np.maximum(out, np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(axis=1))
    return out


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Per-channel scales s_c = (a_c / median a)^alpha * (median w / w_c)^(1 - alpha), SmoothQuant's balance.

    Typical channels get s close to 1, an outlier channel a scale that meets its weights halfway.
    Channels that are all zero (a_c = 0) or whose weights are zero keep s = 1.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    if not ok.any():
        return np.ones_like(a)
    am, wm = np.median(a[ok]), np.median(w[ok])
    s = np.ones_like(a)
    s[ok] = (a[ok] / am) ** alpha * (wm / w[ok]) ** (1.0 - alpha)
    return s


def _scaled(g: GraphView, name: str, factor: np.ndarray, axis: int | None) -> onnx.TensorProto:
    """The initializer times `factor` along `axis` (None: a bias with one value per channel, whatever its shape)."""
    arr = g.init_array(name).astype(np.float64)
    if axis is None:
        return numpy_helper.from_array((arr.reshape(-1) * factor).reshape(arr.shape).astype(g.init_array(name).dtype), name)
    shape = [1] * arr.ndim
    shape[axis] = -1
    return numpy_helper.from_array((arr * factor.reshape(shape)).astype(g.init_array(name).dtype), name)


def _per_channel(g: GraphView, name: str, factor: np.ndarray, rank: int) -> onnx.TensorProto:
    """A scalar or per-channel constant (of an affine Mul or Add) times `factor`, as one value per channel of axis 1
    (shape [1, C, 1, ...] for a tensor of this rank)."""
    arr = g.init_array(name)
    shape = (1, factor.size) + (1,) * (rank - 2)
    full = np.broadcast_to(arr.astype(np.float64).reshape((1,) * (rank - arr.ndim) + arr.shape), shape)
    return numpy_helper.from_array((full * factor.reshape(shape)).astype(arr.dtype), name)


def apply(model: onnx.ModelProto, site: Site, scales: np.ndarray) -> onnx.ModelProto:
    """A copy of the model with `site.tensor`'s channel c divided by scales[c], the fp32 function unchanged."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    apply_in_place(work, site, scales)
    return work


def apply_in_place(work: onnx.ModelProto, site: Site, scales: np.ndarray) -> None:
    """`apply` on the model itself (a caller that applies several fixes copies once)."""
    s = np.asarray(scales, np.float64).reshape(-1)
    if s.size != site.channels or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"equalization of '{site.tensor}' needs {site.channels} positive scales, got {s.size}")
    g = GraphView(work)
    replace: dict[str, onnx.TensorProto] = {}
    prod = _out_channel(g.by_name[site.producer], g)
    if prod is None:  # a Mul by a scalar or per-channel constant (find_site checked it): one value per channel from now on
        const = _affine(g.by_name[site.producer], g, site.rank)
        if const is None:
            raise ValueError(f"'{site.producer}' no longer divides the channels of '{site.tensor}'")
        replace[const] = _per_channel(g, const, 1.0 / s, site.rank)
    else:
        weight, axis, bias = prod
        replace[weight] = _scaled(g, weight, 1.0 / s, axis)
        if bias is not None:
            replace[bias] = _scaled(g, bias, 1.0 / s, None)
    for name in site.path:
        node = g.by_name[name]
        if node.op_type == "Add":
            b = next(i for i in node.input if i in g.inits)
            replace[b] = _per_channel(g, b, 1.0 / s, site.rank) if prod is None else _scaled(g, b, 1.0 / s, None)
    for w, in_axis in reader_weights(site, g):
        replace[w] = _scaled(g, w, s, in_axis)
    for init in work.graph.initializer:
        if init.name in replace:
            init.CopyFrom(replace[init.name])
