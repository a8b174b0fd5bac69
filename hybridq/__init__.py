"""hybridq: hybrid post-training quantization of ONNX models, RKNN-Toolkit2 style.

The public API, every CLI command as a function that returns a typed result and prints nothing::

    import hybridq

    s1 = hybridq.step1("model.onnx", "dataset.txt", out="ws")
    s2 = hybridq.step2(s1.model, s1.data, s1.cfg, "ws/model.q.onnx")
    report = hybridq.analyze("model.onnx", s2.output, "dataset.txt")

Names are imported on first use, so `import hybridq` loads neither ONNX nor ONNX Runtime.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__

_PUBLIC: dict[str, str] = {
    # The commands.
    "step1": "api",
    "step2": "api",
    "analyze": "api",
    "propose": "api",
    "load_snapshot": "api",
    # RKNN-Toolkit2 interop (SPEC section 12).
    "import_rknn_cfg": "rknn.cfg",
    "export_rknn_cfg": "rknn.cfg",
    "read_rknn_dump": "dumps",
    "compare_rknn_dump": "dumps",
    # Options.
    "Settings": "settings",
    "Preprocess": "dataset",
    "ProposalOptions": "api",
    "Target": "proposal",
    "Execution": "execution",
    # Results.
    "Step1Result": "api",
    "Step2Result": "api",
    "LayerResolution": "api",
    "AnalysisResult": "analysis",
    "LayerError": "analysis",
    "ProposalResult": "proposal",
    "Score": "proposal",
    "RknnImportResult": "rknn.cfg",
    "RknnExportResult": "rknn.cfg",
    "RknnDump": "dumps",
    "RknnLayerMetrics": "dumps",
    # Errors.
    "HybridqError": "errors",
    "InputError": "errors",
    "ModelError": "errors",
    "DatasetError": "errors",
    "ConfigError": "errors",
    "ArtifactMismatchError": "errors",
    "OutputError": "errors",
    "WorkerLost": "errors",
    "ExitCode": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use, so `import hybridq` does no work."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hybridq' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API, loaded or not, and the module's dunder attributes."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
