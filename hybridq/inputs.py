"""What a model's inputs take, and how the user says how to preprocess them (plain data, validated).

:class:`InputSpec` is one model input (name, shape, dtype), :func:`input_specs`
reads them from a model; :class:`Preprocess` holds the RKNN-style image
options (mean, std, colour order, layout, resize, hook), validated on
construction. Reading files is :mod:`hybridq.dataset`'s job; turning an image
into an input is :mod:`hybridq.images`'.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx

from .errors import DatasetError, ModelError, did_you_mean

Dim = int | str | None
Hook = Callable[[str, "InputSpec"], np.ndarray]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
COLORS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
RESIZES = ("none", "stretch", "letterbox")

_FLOAT_SEPARATOR = re.compile(r"\s*,\s*|\s+")



@dataclass(frozen=True)
class InputSpec:
    """One model input; a str or None dim is symbolic or unknown and matches any size."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, in graph order."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise ModelError(
                f"model input {value.name!r} is a {kind or 'value of unknown type'}, not a tensor; "
                "hybridq can only feed tensor inputs. Re-export the model with plain tensor inputs."
            )
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(
                f"model input {value.name!r} has ONNX element type {tensor.elem_type}, which has no "
                "numpy equivalent; re-export the model with a float32 or integer input."
            ) from exc
        specs.append(InputSpec(value.name, tuple(_onnx_dim(d) for d in tensor.shape.dim), dtype))
    return specs


def _onnx_dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    """A fixed positive size, a symbolic name, or None when unknown."""
    if dim.WhichOneof("value") == "dim_value" and dim.dim_value > 0:
        return int(dim.dim_value)
    return dim.dim_param or None


def portable_spec(spec: str) -> str:
    """`path/to/module.py:function` with an absolute path (a worker, or a later run, may start elsewhere);
    `package.module:function` as is."""
    module_ref, _, function_name = spec.rpartition(":")
    if module_ref.endswith(".py") or "/" in module_ref or "\\" in module_ref:
        return f"{Path(module_ref).resolve()}:{function_name}"
    return spec


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing with RKNN conventions; values are validated on construction."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color: str = "rgb"
    layout: str | None = None
    resize: str = "none"
    hook: str | None = None

    def __post_init__(self) -> None:
        for field in ("mean", "std"):
            values = getattr(self, field)
            if values is not None:
                object.__setattr__(self, field, _as_floats(values, field))
        if self.std is not None and any(v <= 0 for v in self.std):
            raise DatasetError(
                f"std {list(self.std)} has a value <= 0; every std must be positive "
                "(0-255 pixel units, e.g. 58.395,57.12,57.375)."
            )
        object.__setattr__(self, "color", _choice(self.color, COLORS, "color"))
        object.__setattr__(self, "resize", _choice(self.resize, RESIZES, "resize"))
        if self.layout is not None:
            object.__setattr__(self, "layout", _choice(self.layout, LAYOUTS, "layout"))
        if self.hook is not None:
            module, _, function = self.hook.rpartition(":")
            if not module or not function:
                raise DatasetError(
                    f"preprocess hook {self.hook!r} is not of the form path/to/module.py:function; "
                    "give the module file and the function name separated by ':'."
                )
            defaults = {f.name: f.default for f in fields(self)}
            options = ("mean", "std", "color", "layout", "resize")
            changed = [name for name in options if getattr(self, name) != defaults[name]]
            if changed:
                raise DatasetError(
                    f"preprocess hook {self.hook!r} returns model-ready arrays, so {', '.join(changed)} would be ignored; "
                    "drop those options or apply them inside the hook."
                )
            object.__setattr__(self, "hook", portable_spec(self.hook))  # recorded so: analyze may run from elsewhere


    def to_dict(self) -> dict[str, object]:
        """The options as plain data (lists, strings), as step1 records them; an unset layout or hook is left out."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: object, where: str) -> "Preprocess":
        """Rebuild from `to_dict` output (a cfg header, a `.data` meta, model metadata); `where` names the source in errors."""
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: the recorded preprocessing {data!r} is not a mapping; re-run step1 to record it again.")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise DatasetError(
                    f"{where}: unknown preprocessing key {key!r}.{did_you_mean(str(key), known)} Valid keys: {', '.join(known)}."
                )
        try:
            return cls(**data)
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None

    def differences(self, other: "Preprocess") -> list[tuple[str, object, object]]:
        """(option, this value, other value) for every option that differs; a one-value mean/std equals its per-channel copy."""
        out: list[tuple[str, object, object]] = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("mean", "std") and mine is not None and theirs is not None:
                a, b = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
                if a.size == b.size or 1 in (a.size, b.size):
                    if np.allclose(np.broadcast_to(a, max(a.shape, b.shape)), np.broadcast_to(b, max(a.shape, b.shape)), rtol=1e-6, atol=1e-9):
                        continue
            elif mine == theirs:
                continue
            out.append((f.name, list(mine) if isinstance(mine, tuple) else mine, list(theirs) if isinstance(theirs, tuple) else theirs))
        return out


def _as_floats(values: object, what: str) -> tuple[float, ...]:
    """Normalise a mean/std given as text or a sequence into a tuple of finite floats."""
    if isinstance(values, str):
        return parse_floats(values, what)
    try:
        floats = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"{what} {values!r} is not a list of numbers;"
            " give per-channel values such as 123.675,116.28,103.53."
        ) from exc
    if not floats or not all(math.isfinite(v) for v in floats):
        raise DatasetError(f"{what} {list(floats)} must hold one or more finite numbers, e.g. 123.675,116.28,103.53.")
    return floats


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Lower-case `value` and check it is one of `choices`."""
    normal = str(value).lower()
    if normal not in choices:
        raise DatasetError(
            f"{what} {value!r} is not one of {', '.join(choices)};"
            f" pick one of those.{did_you_mean(normal, choices)}"
        )
    return normal


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """Parse '123.675,116.28,103.53' (commas or spaces, optional [ ]) into finite floats."""
    body = text.strip().strip("[]").strip()
    items = _FLOAT_SEPARATOR.split(body) if body else []
    if not items:
        raise DatasetError(f"{what}: {text!r} is empty; give comma-separated numbers such as 123.675,116.28,103.53.")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not item or not math.isfinite(value):
            raise DatasetError(
                f"{what}: {item!r} in {text!r} is not a finite number;"
                " give comma-separated numbers such as 123.675,116.28,103.53."
            )
        values.append(value)
    return tuple(values)


def fmt_shape(shape: tuple[Dim, ...]) -> str:
    """A shape with symbolic dims by name and unknown ones as '?'."""
    dims = ["?" if d is None else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
