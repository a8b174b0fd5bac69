"""numba-compiled kernels, loaded on demand: the one place that imports numba (an optional speed-up, never required)."""

from __future__ import annotations

from typing import Any, Callable


def compiled(kernels: list[tuple[Callable[..., Any], tuple[Any, ...]]], **options: Any) -> tuple[Callable[..., Any], ...] | None:
    """Each function compiled by numba (machine code cached on disk) and run once on its warm-up arguments, so it is
    compiled, or loaded from the cache, now; None where numba is missing or cannot compile for this platform.
    `options` are numba.njit's beyond nogil, cache, no bounds checks and numpy's error model."""
    try:
        import numba

        jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", **options)
        out = tuple(jit(fn) for fn, _ in kernels)
        for kernel, (_, warm) in zip(out, kernels):
            kernel(*warm)
    except Exception:  # no numba, or no compiler back end for this platform
        return None
    return out
