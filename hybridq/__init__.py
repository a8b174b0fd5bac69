"""hybridq: hybrid post-training quantization of ONNX models, RKNN-Toolkit2 style."""

from __future__ import annotations

from ._version import __version__

__all__ = ["__version__", "step1", "step2", "analyze", "load_snapshot", "Settings", "Preprocess"]


def __getattr__(name: str):
    """Import the API lazily so `import hybridq` does no work."""
    if name in ("step1", "step2", "analyze", "load_snapshot", "Step1Result", "Step2Result"):
        from . import api

        return getattr(api, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    if name == "Preprocess":
        from .dataset import Preprocess

        return Preprocess
    raise AttributeError(name)
