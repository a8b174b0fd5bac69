"""What to try first: layers ranked by isolated error, and activation tensors with outlier channels.

Local (isolated) error is cheap and pre-ranks layers; it can be fooled by a tensor
whose one huge channel dominates its cosine while the small channels its readers
need are wiped out. Per-channel ranges of the fp32 activations, from one pass over
the proposal samples, find those tensors directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..calibration import session_for
from ..plan import GraphView, QuantPlan

OUTLIER_RATIO = 8.0
"""A channel is an outlier when its largest |value| is this many times the median channel's."""


def local_rank(single: dict[str, float], plan: QuantPlan, model: onnx.ModelProto) -> list[tuple[str, float]]:
    """Quantized layers, worst isolated cosine first; an absorbed Relu/Clip's error counts for its producer."""
    g = GraphView(model)
    quantized = {n for n, lp in plan.layers.items() if lp.precision not in ("float16", "float32")}
    worst: dict[str, float] = {}
    for node, cos in single.items():
        target = node
        if node not in quantized and node in g.by_name:
            prod = g.producer_node(g.by_name[node].input[0]) if g.by_name[node].input else None
            target = prod.name if prod is not None else node
        if target in quantized and not math.isnan(cos):
            worst[target] = min(cos, worst.get(target, 1.0))
    return sorted(worst.items(), key=lambda kv: (kv[1], kv[0]))


@dataclass
class ChannelStats:
    """Per-channel min and max of one activation tensor over the proposal samples, along `axis`."""

    tensor: str
    axis: int
    rank: int
    min: np.ndarray
    max: np.ndarray
    samples: int = 1  # how many samples min and max are over

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))

    def outliers(self) -> np.ndarray:
        """Indices of channels whose |values| reach OUTLIER_RATIO x the median channel's."""
        a = self.absmax
        live = a[a > 0]
        if live.size < 4:
            return np.zeros(0, np.int64)
        return np.flatnonzero(a > OUTLIER_RATIO * np.median(live))

    def ratio(self) -> float:
        a = self.absmax
        live = a[a > 0]
        return float(a.max() / np.median(live)) if live.size else 1.0


def channel_axis(tensor: str, g: GraphView, rank: int) -> int:
    """Axis 1 for tensors that Conv-like layers read (NCHW), else the last axis (Gemm/MatMul features)."""
    if rank <= 1:
        return 0
    readers = g.consumer_nodes(tensor)
    if any(r.op_type in ("Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization") for r in readers) or rank == 4:
        return 1
    return rank - 1


def channel_stats(fp32: onnx.ModelProto, samples: list[dict[str, np.ndarray]], tensors: list[str]) -> dict[str, ChannelStats]:
    """Per-channel ranges of `tensors` in the fp32 model, one pass per sample."""
    if not tensors or not samples:
        return {}
    g = GraphView(fp32)
    sess = session_for(fp32, tensors, basic=True, lean=True)
    out: dict[str, ChannelStats] = {}
    for feeds in samples:
        for name, value in zip(tensors, sess.run(tensors, feeds)):
            v = np.asarray(value)
            if v.ndim == 0 or v.size == 0:
                continue
            st = out.get(name)
            axis = st.axis if st is not None else channel_axis(name, g, v.ndim)
            flat = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
            lo, hi = flat.min(1).astype(np.float64), flat.max(1).astype(np.float64)
            if st is None:
                out[name] = ChannelStats(name, axis, v.ndim, lo, hi)
            elif st.min.shape == lo.shape:
                st.min, st.max, st.samples = np.minimum(st.min, lo), np.maximum(st.max, hi), st.samples + 1
    return out


def outlier_tensors(stats: dict[str, ChannelStats], limit: int) -> list[ChannelStats]:
    """Tensors with outlier channels, the most extreme first, at most `limit`."""
    found = [s for s in stats.values() if s.outliers().size]
    return sorted(found, key=lambda s: -s.ratio())[:limit]
