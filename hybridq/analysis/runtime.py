"""Another runtime beside the simulation: what it computes at the model outputs, against fp32 and against hybridq.

RKNN-Toolkit2's accuracy analysis with a board attached adds a `runtime_error` column; this is that
column for runtimes hybridq can drive itself. A runtime is an entry of the explicit RUNTIMES table:
`cpu` is ONNX Runtime's CPU provider with this CPU's default int8 kernels (on x86 without VNNI they
add pairs of products in a saturating int16: the deployment's figures, where the simulation is
exact); `openvino` is ONNX Runtime's OpenVINO provider, when installed. Per output: a runtime run as
a black box exposes no intermediate tensors without changing what it fuses. Dumped tensors of a
device are read from a folder instead (`hybridq analyze --from RKNN_DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from .. import _runtime
from ..errors import InputError
from .results import RuntimeRow


@dataclass(frozen=True)
class Runtime:
    """How to open a session of one runtime, and what to call it in tables."""

    label: str
    open: Callable[[onnx.ModelProto], Any]


def _cpu(model: onnx.ModelProto) -> Any:
    return _runtime.session(model, exact_int8=False, optimization="all")


def _openvino(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        raise InputError("--runtime openvino needs ONNX Runtime's OpenVINO provider, which is not installed here; "
                         "`pip install onnxruntime-openvino` (in place of onnxruntime) provides it.")
    return _runtime.session(model, exact_int8=False, optimization="all", provider="OpenVINOExecutionProvider")


RUNTIMES: dict[str, Runtime] = {
    "cpu": Runtime("ONNX Runtime CPU, this CPU's default int8 kernels", _cpu),
    "openvino": Runtime("ONNX Runtime OpenVINO provider", _openvino),
}


def runtime_for(spec: str) -> Runtime:
    """The RUNTIMES entry named `spec`; an unknown name is an InputError listing the valid ones."""
    if spec not in RUNTIMES:
        raise InputError(f"--runtime {spec!r} is not a runtime hybridq can run; use one of: {', '.join(RUNTIMES)} "
                         "(device dumps: `hybridq analyze --from RKNN_DIR`).")
    return RUNTIMES[spec]


def compare_runtime(fp32: onnx.ModelProto, quant: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]], spec: str) -> list[RuntimeRow]:
    """Per model output: the runtime against fp32 and against hybridq's exact simulation, averaged over the samples."""
    from ..metrics import Accumulator

    runtime = runtime_for(spec)
    device = runtime.open(quant)
    simulator = _runtime.session(quant, exact_int8=True, optimization="all")
    reference = _runtime.session(fp32, optimization="all")
    names = [o.name for o in device.get_outputs()]
    vs_fp32 = {n: Accumulator() for n in names}
    vs_sim = {n: Accumulator() for n in names}
    for feeds in samples:
        ref = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
        sim = simulator.run(names, feeds)
        for name, got, exact in zip(names, device.run(names, feeds), sim):
            if name in ref:
                vs_fp32[name].add(ref[name], got)
            vs_sim[name].add(exact, got)
    return [RuntimeRow(n, runtime.label, vs_fp32[n].result(), vs_sim[n].result()) for n in names]
