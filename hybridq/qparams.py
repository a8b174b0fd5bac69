"""Quantization parameters: integer ranges per dtype, and scale / zero point from a real range.

Pure functions, no graph or file knowledge. Rounding is round-half-to-even, as
ONNX QuantizeLinear specifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

FLOAT_DTYPES = ("float16", "float32")
ALL_DTYPES = ("uint8", "int8", "int16", "float16", "float32")

# RKNN-Toolkit2 long names, accepted on input.
DTYPE_ALIASES = {
    "asymmetric_quantized-u8": "uint8",
    "asymmetric_quantized-8": "int8",
    "asymmetric_quantized-16": "int16",
    "dynamic_fixed_point-i8": "int8",
    "dynamic_fixed_point-i16": "int16",
    "u8": "uint8",
    "i8": "int8",
    "i16": "int16",
    "fp16": "float16",
    "fp32": "float32",
    "float": "float32",
}

NUMPY = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32}
ONNX = {
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
    "uint16": TensorProto.UINT16,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
}


def normalize_dtype(name: str) -> str | None:
    """Canonical dtype name, or None when unknown."""
    name = str(name).strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    return name if name in ALL_DTYPES or name == "uint16" else None


def qrange(dtype: str, symmetric: bool) -> tuple[int, int]:
    """Integer range [qmin, qmax]; signed symmetric drops the most negative value (-127..127) so 0 sits in the middle."""
    info = np.iinfo(NUMPY[dtype])
    qmin, qmax = int(info.min), int(info.max)
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def levels(dtype: str) -> int:
    """Number of quantization steps of an integer dtype (255 for 8 bit)."""
    info = np.iinfo(NUMPY[dtype])
    return int(info.max) - int(info.min)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (one per channel, or one element per tensor) and the axis they run along."""

    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


def compute_qparams(rmin, rmax, dtype: str, symmetric: bool, axis: int | None = None) -> QParams:
    """Scale and zero point mapping [rmin, rmax] onto dtype.

    The range is first widened to hold 0, so that zero is exactly representable.
    asymmetric: scale = (rmax - rmin) / (qmax - qmin), zp = round(qmin - rmin / scale), clipped.
    symmetric:  a = max(|rmin|, |rmax|); signed: scale = a / qmax, zp = 0;
                unsigned: scale = 2a / (qmax - qmin), zp = (qmin + qmax + 1) / 2 (128 for uint8).
    Degenerate: an empty or all-zero range (scale 0), or a scale too small for
    float32, gives scale 1.0, so every value quantizes to the zero point.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64).reshape(-1), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64).reshape(-1), 0.0)
    qmin, qmax = qrange(dtype, symmetric)
    if symmetric:
        a = np.maximum(np.abs(rmin), np.abs(rmax))
        if qmin < 0:
            scale = a / qmax
            zp = np.zeros_like(a)
        else:
            scale = 2 * a / (qmax - qmin)
            zp = np.full_like(a, (qmin + qmax + 1) // 2)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        zp = None
    tiny = scale < np.finfo(np.float32).tiny
    scale = np.where(tiny, 1.0, scale).astype(np.float32)
    if zp is None:
        zp = np.where(tiny, qmin, np.rint(qmin - rmin / scale.astype(np.float64)))
    zp = np.clip(zp, qmin, qmax).astype(NUMPY[dtype])
    return QParams(dtype, scale, zp, axis)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.size == 1:
        return p.reshape(())
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """q = clip(round_half_even(x / scale) + zp, qmin, qmax) in the integer dtype."""
    info = np.iinfo(NUMPY[qp.dtype])
    scale = _broadcast(qp.scale, x.ndim, qp.axis).astype(np.float32)
    zp = _broadcast(qp.zero_point, x.ndim, qp.axis).astype(np.int64)
    with np.errstate(over="ignore"):  # |x| / tiny scale overflows to inf, then clips to the dtype's bound
        q = np.rint(x.astype(np.float32) / scale).astype(np.float64) + zp
    return np.clip(q, info.min, info.max).astype(NUMPY[qp.dtype])


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """x = (q - zp) * scale in float32."""
    scale = _broadcast(qp.scale, q.ndim, qp.axis).astype(np.float32)
    zp = _broadcast(qp.zero_point, q.ndim, qp.axis).astype(np.int64)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def range_of(qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """The real range [min, max] a set of parameters can represent."""
    qmin, qmax = np.iinfo(NUMPY[qp.dtype]).min, np.iinfo(NUMPY[qp.dtype]).max
    z = qp.zero_point.astype(np.float64)
    s = qp.scale.astype(np.float64)
    return (qmin - z) * s, (qmax - z) * s


def weight_qparams(w: np.ndarray, dtype: str, axis: int | None) -> tuple[QParams, np.ndarray, np.ndarray]:
    """Symmetric parameters for a weight, per channel along `axis` or per tensor; also returns the min and max used."""
    if axis is None:
        lo, hi = np.array([w.min()]), np.array([w.max()])
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        lo, hi = moved.min(axis=1), moved.max(axis=1)
    return compute_qparams(lo, hi, dtype, symmetric=True, axis=axis), lo, hi
