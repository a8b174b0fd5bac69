"""RKNN-Toolkit2's names and conventions mapped to hybridq's: option tables, config values, errors.

Plain translation, no pipeline work: :mod:`hybridq.rknn._facade` uses these to
turn an RKNN call into a call of hybridq's API.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import HybridqError, InputError, did_you_mean
from ..observers import ALGORITHMS
from ..settings import canonical

# quantized_dtype -> (activation dtype, activation qtype, weight dtype); RKNN-Toolkit1 names too.
QUANTIZED_DTYPES: dict[str, tuple[str, str, str]] = {
    "w8a8": ("uint8", "asym", "int8"),
    "w8a16": ("int16", "sym", "int8"),
    "w16a16i": ("int16", "sym", "int16"),
    "w16a16i_dfp": ("int16", "sym", "int16"),
    "asymmetric_quantized-8": ("int8", "asym", "int8"),
    "asymmetric_quantized-u8": ("uint8", "asym", "int8"),
    "asymmetric_affine-u8": ("uint8", "asym", "int8"),
    "dynamic_fixed_point-i8": ("int8", "sym", "int8"),
    "dynamic_fixed_point-8": ("int8", "sym", "int8"),
    "dynamic_fixed_point-i16": ("int16", "sym", "int16"),
    "dynamic_fixed_point-16": ("int16", "sym", "int16"),
}
UNSUPPORTED_DTYPES = {"w4a16": "hybridq stores 4-bit weights per layer, for MatMul/Gemm only (as ONNX Runtime's MatMulNBits), not as "
                               "a whole-model dtype; use w8a8 or w8a16 here and set those layers to int4 (alias w4a16) in the cfg's "
                               "custom_quantize_layers, or let the proposal choose them with a size budget (--max-size-mb)"}
QUANTIZED_ALGORITHMS = {"normal": "minmax", "kl_divergence": "kl", "mmse": "mse"}

# config() options that only mean something on a Rockchip NPU, with their RKNN defaults.
NPU_ONLY_OPTIONS: dict[str, Any] = {
    "quantized_hybrid_level": 0,
    "optimization_level": 3,
    "custom_string": None,
    "remove_weight": False,
    "compress_weight": False,
    "inputs_yuv_fmt": None,
    "single_core_mode": False,
    "dynamic_input": None,
    "model_pruning": False,
    "op_target": None,
    "quantize_weight": False,
    "remove_reshape": False,
    "sparse_infer": False,
    "enable_flash_attention": False,
}

# RKNN methods hybridq does not provide, with what to do instead.
UNSUPPORTED_METHODS = {
    "load_tensorflow": "hybridq reads ONNX only; export the model to ONNX (tf2onnx) and call load_onnx",
    "load_tflite": "hybridq reads ONNX only; convert the model with tf2onnx and call load_onnx",
    "load_caffe": "hybridq reads ONNX only; convert the model to ONNX and call load_onnx",
    "load_darknet": "hybridq reads ONNX only; convert the model to ONNX and call load_onnx",
    "load_pytorch": "hybridq reads ONNX only; export with torch.onnx.export and call load_onnx",
    "eval_perf": "there is no NPU to profile; time rknn.inference or the exported model in ONNX Runtime",
    "eval_memory": "there is no NPU to measure; the exported model runs in ONNX Runtime",
    "export_encrypted_rknn_model": "hybridq writes plain ONNX, which cannot be encrypted for an NPU driver",
    "codegen": "hybridq writes ONNX; deploy it with ONNX Runtime's C/C++ API",
    "gen_cpp_demo": "hybridq writes ONNX; deploy it with ONNX Runtime's C/C++ API",
    "reg_custom_op": "custom ops must be registered with ONNX Runtime itself",
    "optimize_onnx": "step1 already prepares the graph (fusions, shape inference) in <name>.model",
    "list_devices": "hybridq runs on this machine's CPU through ONNX Runtime; there are no devices",
}


class _Failed(Exception):
    """A method gave up after logging its error; the wrapper turns it into -1."""


def _rknn_method(fail: Any = -1) -> Callable:
    """Run an RKNN method: HybridqError -> `E name: message` on stderr and `fail`; no traceback.

    With HYBRIDQ_DEBUG=1 (or RKNN(verbose='debug')) unexpected exceptions propagate.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._cleanup.alive:
                self._log("E", fn.__name__, "this RKNN object was released; create a new one with RKNN().")
                return fail
            try:
                return fn(self, *args, **kwargs)
            except _Failed:
                return fail
            except HybridqError as exc:
                self._log("E", fn.__name__, str(exc))
                return fail
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                if self._debug:
                    raise
                self._log("E", fn.__name__, f"internal error: {type(exc).__name__}: {exc}. "
                                            "Set HYBRIDQ_DEBUG=1 for the traceback and report it.")
                return fail

        return run

    return wrap


@dataclass
class _Config:
    """What config() set, already mapped to hybridq's names."""

    mean_values: list[tuple[float, ...]] | None = None
    std_values: list[tuple[float, ...]] | None = None
    bgr: bool = False
    dtype: str = "uint8"
    qtype: str = "asym"
    weight_dtype: str = "int8"
    qmethod: str = "channel"
    algorithm: str = "minmax"
    float_dtype: str = "float16"
    cos_thresh: float = 0.98
    euc_thresh: float | None = None
    npu_only: dict[str, Any] = field(default_factory=dict)
    target: str = "cpu"  # target_platform given: hybridq's npu target (every operator in int8, as RKNN's simulator)
    speed_check: bool = True  # hybridq's own: the cpu target keeps the model float where int8 is not faster here


def _per_input(values: Any, what: str) -> list[tuple[float, ...]] | None:
    """RKNN's [[...], ...] (one list per input) or the older flat [...] as a list of tuples."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not values:
        raise InputError(f"{what} must be a list of per-channel lists, one per input, e.g. [[123.675, 116.28, 103.53]]; got {values!r}.")
    lists = [values] if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else values
    out = []
    for sub in lists:
        if not isinstance(sub, (list, tuple)) or not sub or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sub):
            raise InputError(f"{what} must be a list of per-channel lists of numbers, e.g. [[123.675, 116.28, 103.53]]; got {values!r}.")
        out.append(tuple(float(v) for v in sub))
    return out


def _single(values: list[tuple[float, ...]] | None, n_inputs: int, what: str) -> tuple[float, ...] | None:
    """The one mean/std hybridq's dataset loader applies to every image input."""
    if values is None:
        return None
    if len(values) not in (1, n_inputs):
        raise InputError(f"{what} has {len(values)} lists but the model has {n_inputs} input(s); give one list per input.")
    if any(v != values[0] for v in values[1:]):
        raise InputError(f"{what} differs between inputs ({values}); hybridq applies one mean/std to every image input. "
                         "Use the same values for all inputs, or feed the other inputs as preprocessed .npy files.")
    return values[0]


def _algorithm(quantized_algorithm: Any) -> str:
    """hybridq's algorithm for RKNN's `quantized_algorithm` (hybridq's own names work too); an InputError for others."""
    algo = str(quantized_algorithm)
    if algo in ALGORITHMS:
        algo = next((k for k, v in QUANTIZED_ALGORITHMS.items() if v == algo), algo)
    if algo not in QUANTIZED_ALGORITHMS and algo not in ALGORITHMS:
        extra = " ('gdq' tunes weights by gradient descent on the NPU toolchain; hybridq has no equivalent, try 'mmse')" if algo == "gdq" else ""
        raise InputError(f"quantized_algorithm {algo!r} is not supported{extra}.{did_you_mean(algo, QUANTIZED_ALGORITHMS)} Use one of: {', '.join(QUANTIZED_ALGORITHMS)}.")
    return canonical("algorithm", algo)


def _qmethod(quantized_method: Any) -> str:
    """RKNN's `quantized_method` checked: 'channel' or 'layer' (group quantization is refused)."""
    if canonical("qmethod", quantized_method) is None:
        why = " (group quantization has no ONNX QDQ form that ONNX Runtime's CPU kernels run)" if str(quantized_method).startswith("group") else ""
        raise InputError(f"quantized_method {quantized_method!r} is not supported{why}; use 'channel' or 'layer'.")
    return quantized_method


def _absolute(dataset: Any, base: Path) -> str:
    """A dataset argument (list file, directory or glob) made absolute against `base`."""
    return os.path.join(base, os.fspath(dataset))
