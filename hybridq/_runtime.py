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


def l2_bytes(default: int = 512 << 10, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The level-2 cache of one core (Linux sysfs, under `root`), or `default` where it cannot be read."""
    try:
        for index in sorted(os.listdir(root)):
            base = f"{root}/{index}"
            with open(f"{base}/level") as lf, open(f"{base}/type") as tf, open(f"{base}/size") as sf:
                if lf.read().strip() == "2" and tf.read().strip() in ("Unified", "Data"):
                    size = sf.read().strip().upper()
                    return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError, KeyError):
        pass
    return default


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
    the session runs this CPU's default kernels instead (see :func:`is_exact`);
    and a float layer between Q/DQ stays float (``EXACT_DISABLED``).
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
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        return _open(model, so, providers, EXACT_DISABLED if exact_int8 and float_layer_between_qdq(model) else ())

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


EXACT_DISABLED = ("WeightBiasQuantization",)
"""ONNX Runtime graph transformers an exact session leaves out when the model has a float layer between a
DequantizeLinear and a QuantizeLinear: WeightBiasQuantization (ORT >= 1.20) quantizes that layer's float weights, so a
float32 layer of an npu model ran int8 in the simulation (PP-OCRv3 det: output cosine 0.966 measured, 0.955 with the
layer float). Elsewhere it stays: for int8 weights beside a float bias it only quantizes the bias, as ORT deploys them."""
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def float_layer_between_qdq(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> bool:
    """Does the model hold a float layer between Q/DQ that is float by design (step2's map says so: an npu model's
    float16/float32 fallback), which WeightBiasQuantization would quantize? Elsewhere (a cpu model, a QDQ model made
    by another tool) ONNX Runtime's CPU provider runs such a layer int8, and so does the simulation. Models given by
    path or bytes: not read, False."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        return False
    from ._onnx import qdq_map_flag

    return qdq_map_flag(model, "float_between_qdq") and bool(float_layers_between_qdq(model))


def float_layers_between_qdq(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul nodes with a float initializer weight that read a DequantizeLinear and write into QuantizeLinear
    only: the layers ONNX Runtime's WeightBiasQuantization (ORT >= 1.20) quantizes when it loads the model."""
    import onnx

    from ._onnx import GraphIndex

    g = model.graph
    floats = {i.name for i in g.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    index = GraphIndex(g)

    def quantized(t: str) -> bool:  # read by QuantizeLinear only, through a Relu or Clip ORT folds into the Q
        rs = index.consumer_nodes(t)
        if len(rs) == 1 and rs[0].op_type in ("Relu", "Clip"):
            rs = index.consumer_nodes(rs[0].output[0])
        return bool(rs) and all(r.op_type == "QuantizeLinear" for r in rs)

    def reads_dq(n: onnx.NodeProto) -> bool:
        p = index.producer_node(n.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    return [n.name for n in g.node
            if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in floats and reads_dq(n) and quantized(n.output[0])]


def _open(model: onnx.ModelProto | bytes | str | os.PathLike[str], so: Any, providers: list[str], disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    import onnxruntime as ort

    kw = {"providers": providers, "disabled_optimizers": list(disabled)} if disabled else {"providers": providers}
    if isinstance(model, bytes):
        return ort.InferenceSession(model, so, **kw)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), so, **kw)
    from ._onnx import is_large, save_external, serialized_within

    data = serialized_within(model)
    if data is not None or not is_large(model):
        return ort.InferenceSession(data if data is not None else model.SerializeToString(), so, **kw)
    with tempfile.TemporaryDirectory(prefix="hybridq-sess-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_external(model, path, "model.data")
        return ort.InferenceSession(path, so, **kw)
