"""Every ONNX Runtime session hybridq opens: CPU provider, exact int8, threads, arena, models over 2 GB.

:func:`session` is the one place that builds ``SessionOptions``; calibration,
analysis, preparation and the RKNN facade's simulator call it. onnxruntime is
imported on first use, so ``import hybridq`` stays light.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Literal

from .kernels import X64_PRECISION_KEY, u8s8_saturates

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

_ARENA: list[bool] = []


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def register_shared_arena() -> None:
    """Register, once per process, an ONNX Runtime CPU arena that sessions opened with ``shared_arena`` share."""
    if _ARENA:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
    except Exception:  # registered already (by the host program): share that one
        pass
    _ARENA.append(True)


def session(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    exact_int8: bool = False,
    threads: int = 0,
    optimization: Literal["basic", "all"] | None = None,
    mem_pattern: bool = True,
    shared_arena: bool = False,
    log_level: int | None = None,
    optimized_model: str | None = None,
    optimized_external_data: str | None = None,
    provider: str = "CPUExecutionProvider",
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over ``model`` (a proto, its serialized bytes, or the path of a model file).

    ``exact_int8``: int8 products as the model defines them, on every CPU
    (:mod:`hybridq.kernels`); where ONNX Runtime's rewrite fails on the model,
    the session runs this CPU's default kernels instead (see :func:`is_exact`).
    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core).
    ``optimization``: graph optimization level (None: ONNX Runtime's default).
    ``mem_pattern`` False stops ONNX Runtime reserving a second copy of the
    activations when many are fetched. ``shared_arena``: allocate from the
    process's shared CPU arena (:func:`register_shared_arena`). ``log_level``: ONNX
    Runtime's log severity (None: its default). ``optimized_model``: also write
    the optimized graph there (its large initializers into
    ``optimized_external_data`` beside it when given). A proto over 2 GB goes
    through a temporary file with external data. ``provider``: the execution provider (the CPU one unless a
    runtime is compared, see :mod:`hybridq.analysis.runtime`). ``profile_prefix``: record ONNX Runtime's
per-node profile into a JSON file starting with this path (read with ``end_profiling``). Errors of ONNX Runtime
    propagate; callers name the model in their own message.
    """
    import onnxruntime as ort

    def make(exact: bool) -> ort.InferenceSession:
        so = ort.SessionOptions()
        if optimization is not None:
            so.graph_optimization_level = {
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            }[optimization]
        if exact:
            so.log_severity_level = 4  # a failed exact attempt is retried: not an error to print
            so.add_session_config_entry(X64_PRECISION_KEY, "1")
        elif log_level is not None:
            so.log_severity_level = log_level
        so.intra_op_num_threads = threads
        if not mem_pattern:
            so.enable_mem_pattern = False
        if shared_arena:
            register_shared_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        if optimized_model is not None:
            so.optimized_model_filepath = optimized_model
            if optimized_external_data is not None:
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized_external_data)
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return _open(model, so, [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"])

    if not (exact_int8 and u8s8_saturates()):
        return make(False)
    try:
        return make(True)
    except Exception:  # ORT's rewrite fails on some models (e.g. quantize_static output after quant_pre_process)
        return make(False)


def is_exact(sess: ort.InferenceSession) -> bool:
    """Does ``sess`` compute int8 products exactly (this CPU's kernels are exact, or the exact option took)?"""
    if not u8s8_saturates():
        return True
    try:
        return sess.get_session_options().get_session_config_entry(X64_PRECISION_KEY) == "1"
    except RuntimeError:  # the option was not set
        return False


def _open(model: onnx.ModelProto | bytes | str | os.PathLike[str], so: Any, providers: list[str]) -> ort.InferenceSession:
    import onnxruntime as ort

    if isinstance(model, bytes):
        return ort.InferenceSession(model, so, providers=providers)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), so, providers=providers)
    from ._onnx import is_large, save_external, serialized_within

    data = serialized_within(model)
    if data is not None or not is_large(model):
        return ort.InferenceSession(data if data is not None else model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="hybridq-sess-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_external(model, path, "model.data")
        return ort.InferenceSession(path, so, providers=providers)
