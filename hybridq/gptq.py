"""4-bit block quantization of a weight matrix: plain round-to-nearest and GPTQ (error-compensating) rounding.

Both return the same thing, codes in [-8, 7] and one scale per block of `block`
consecutive input features (K) of each output column, so the packing and the
runtime do not care which rounding made them. GPTQ (Frantar et al., 2022)
quantizes the K rows one at a time and spreads each row's rounding error over
the rows not yet quantized, weighted by the inverse of the Hessian H = X^T X of
the layer's calibration inputs; it minimises ||X W - X W_q||^2, the layer's
output error on the calibration data, instead of ||W - W_q||^2.
"""

from __future__ import annotations

import numpy as np

QMIN, QMAX = -8, 7
DAMP = 0.01
"""GPTQ adds DAMP x mean(diag H) to the diagonal so H is safely invertible (the paper's default)."""
LAZY = 128
"""Rows quantized between two full updates of the remaining rows (the paper's lazy batch)."""


def block_scales(w: np.ndarray) -> np.ndarray:
    """Scale of each column of a block `w` [rows, N]: the signed value of largest magnitude maps to -8 (llama.cpp Q4_0).

    That uses all 16 codes: every other value, |x| <= |m|, lands in [-8, 8], and only x = -m clips to 7.
    """
    idx = np.argmax(np.abs(w), axis=0)
    m = w[idx, np.arange(w.shape[1])]
    scale = m / QMIN
    return np.where(scale == 0, 1.0, scale)


def _round(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x / scale), QMIN, QMAX)


def quantize_rtn(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest of `w` [K, N] per block of K: codes [K, N] (int8, in [-8, 7]) and scales [ceil(K / block), N]."""
    w = np.asarray(w, dtype=np.float64)
    k = w.shape[0]
    codes = np.empty(w.shape, dtype=np.int8)
    scales = np.empty(((k + block - 1) // block, w.shape[1]))
    for b, start in enumerate(range(0, k, block)):
        s = block_scales(w[start:start + block])
        scales[b] = s
        codes[start:start + block] = _round(w[start:start + block], s)
    return codes, scales


def dequantize(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """The float weight [K, N] that codes [K, N] and block scales stand for."""
    return codes.astype(np.float64) * np.repeat(scales, block, axis=0)[: codes.shape[0]]


def _inverse_factor(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1 (dampened), the row weights GPTQ spreads errors with."""
    h = np.array(h, dtype=np.float64)
    diag = np.arange(h.shape[0])
    h[diag, diag] += DAMP * max(float(np.mean(np.diag(h))), 1e-12)
    lower = np.linalg.cholesky(h)
    inv = np.linalg.inv(lower)
    return np.linalg.cholesky(inv.T @ inv).T


def quantize_gptq(w: np.ndarray, h: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of `w` [K, N] given H = X^T X [K, K] of its inputs: codes and block scales as :func:`quantize_rtn`.

    A block's scales are taken from the weights as updated when GPTQ reaches the block (the paper's groups).
    Inputs that were always zero (H[i, i] = 0) get weight 0 there: they never contribute to the output.
    """
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    u = _inverse_factor(h)
    codes = np.empty(w.shape, dtype=np.int8)
    scales = np.empty(((k + block - 1) // block, w.shape[1]))
    for i1 in range(0, k, LAZY):
        i2 = min(i1 + LAZY, k)
        errs = np.empty((i2 - i1, w.shape[1]))
        for i in range(i1, i2):
            if i % block == 0:
                scales[i // block] = block_scales(w[i:i + block])
            s = scales[i // block]
            q = _round(w[i], s)
            codes[i] = q
            err = (w[i] - q * s) / u[i, i]
            w[i + 1:i2] -= np.outer(u[i, i + 1:i2], err)
            errs[i - i1] = err
        w[i2:] -= u[i1:i2, i2:].T @ errs
    return codes, scales
