"""Calibration samples: the RKNN dataset.txt convention and image preprocessing.

A dataset source is a list file (one sample per line, k whitespace-separated
paths for a k-input model, relative to the list file, `#` comments), a
directory (supported files sorted by name) or a glob pattern (sorted). A line
may hold a single `.npz` for a multi-input model: it then feeds every input
from the array named like that input. Samples load lazily, one at a time, so
memory stays flat in the number of samples. Nothing in a list is executed:
arrays load with `allow_pickle=False`, and the preprocess hook is imported only
when `Preprocess.hook` is set.

Image conversions, explicit and in this order:
1. Decode with pillow; EXIF orientation is not applied (pixels as stored).
2. Mode: 16-bit grayscale (`I;16*`, `I`) is divided by 257 into 0-255 and
   clipped; `1`/`L`/`LA` become one gray channel (alpha dropped); `P`/`PA`
   go through RGBA to RGB; every other mode (`RGBA`, `CMYK`, `YCbCr`...) is
   converted to RGB, so alpha is dropped, never composited.
3. Channels: gray is replicated to 3 channels when the model wants 3; colour
   becomes one channel for a 1-channel model by ITU-R 601-2 luma
   (0.299 R + 0.587 G + 0.114 B), computed in float32.
4. Resize to the model's H, W: `none` (a mismatch is an error), `stretch`
   (pillow bilinear on float32 channels) or `letterbox` (keep aspect, center,
   pad with pixel value 0 before normalisation). A symbolic H or W takes the
   image's own size (`stretch`, `none`) or the aspect-kept size (`letterbox`).
5. Colour order: `bgr` reverses the channels; mean/std are given in the
   order fed to the model.
6. `(x - mean) / std` in float32, 0-255 pixel units (RKNN mean_values).
7. Layout `nchw` transposes HWC to CHW; a leading batch dim of 1 is added and
   the result cast to the input's dtype (integer inputs: rounded and clipped,
   and only without mean/std).

Steps 2 and 3 change what the file holds (alpha dropped, gray copied to three
channels, colour to gray, 16 bits to 8, CMYK/YCbCr to RGB); `Dataset.notes()`
says which happened, once per kind of change, with a count and the first file.

A hook `module.py:function` (or `package.module:function`) replaces all of
this for every file: `function(path, spec)` returns the model-ready array,
which is then checked like an `.npy` file.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from PIL import Image

from hybridq.errors import DatasetError, ModelError, did_you_mean

Dim = int | str | None
Hook = Callable[[str, "InputSpec"], np.ndarray]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
COLORS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
RESIZES = ("none", "stretch", "letterbox")

_SUPPORTED_TEXT = ", ".join(SUPPORTED_EXTENSIONS)
_COMMENT = re.compile(r"(^|\s)#.*")
_FLOAT_SEPARATOR = re.compile(r"\s*,\s*|\s+")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GRAY_MODES = ("1", "L", "LA")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


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


@dataclass(frozen=True)
class _ImagePlan:
    """How images become one input: layout, channel count, target size, mean and std."""

    layout: str
    channels: int
    height: int | None
    width: int | None
    mean: np.ndarray | None
    std: np.ndarray | None


class Dataset:
    """Samples named by a list file, directory or glob, loaded lazily one at a time."""

    def __init__(
        self, source: Path, inputs: list[InputSpec], entries: list[tuple[int, list[Path]]], preprocess: Preprocess | None = None
    ) -> None:
        self.source = Path(source)
        self.inputs = list(inputs)
        self.preprocess = preprocess or Preprocess()
        self._entries = [(line, list(paths)) for line, paths in entries]
        self._hook = _load_hook(self.preprocess.hook) if self.preprocess.hook else None
        self._plans: dict[str, _ImagePlan] = {}
        self._converted: dict[tuple[str, str], dict[Path, None]] = {}
        if self._hook is None:
            for i, spec in enumerate(self.inputs):
                if any(paths[i].suffix.lower() in IMAGE_EXTENSIONS for _, paths in self._entries):
                    self._plans[spec.name] = _image_plan(spec, self.preprocess)

    @property
    def image_inputs(self) -> list[str]:
        """Inputs fed from image files, which the image preprocessing (mean, std, color, layout, resize) applies to."""
        return list(self._plans)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self._entries)

    def notes(self) -> list[str]:
        """One line per kind of image conversion seen so far (alpha dropped, gray to RGB, ...), with a count and the first file."""
        return [
            f"image conversion: {what} in {_count(len(paths), 'image')} (first: '{next(iter(paths))}'): {how}."
            for (what, how), paths in self._converted.items()
        ]

    def entries(self) -> list[tuple[int, list[Path]]]:
        """(1-based list line, or 0 for a directory/glob; one path per input) for every sample."""
        return [(line, list(paths)) for line, paths in self._entries]

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Load one sample: input name -> array with a leading batch dim, in the input's dtype."""
        line, paths = self._entries[index]
        return {spec.name: self._load(spec, path, line) for spec, path in zip(self.inputs, paths)}

    def samples(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Load the first `limit` samples (all when None), one at a time."""
        count = self._count(limit)
        return (self.sample(i) for i in range(count))

    def batches(self, batch_size: int = 1, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Concatenate consecutive samples along axis 0; the last batch may be smaller."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch size {batch_size!r} is not a positive integer; use 1 or more.")
        if batch_size > 1:
            for spec in self.inputs:
                if spec.shape and isinstance(spec.shape[0], int):
                    raise DatasetError(
                        f"batch size {batch_size} needs a symbolic batch dim, but input {spec.name!r} has a fixed batch dim "
                        f"of {spec.shape[0]} (shape {_fmt(spec.shape)}); use batch size 1 or export the model with a dynamic batch axis."
                    )
        return self._batches(batch_size, self._count(limit))

    def _batches(self, batch_size: int, count: int) -> Iterator[dict[str, np.ndarray]]:
        """Generator behind `batches`, after its arguments were checked."""
        for start in range(0, count, batch_size):
            indices = range(start, min(start + batch_size, count))
            yield self._concat([(i, self.sample(i)) for i in indices])

    def _concat(self, chunk: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        """Join samples per input, refusing arrays whose non-batch shapes differ."""
        if len(chunk) == 1:
            return chunk[0][1]
        batch = {}
        for k, spec in enumerate(self.inputs):
            first_index, first = chunk[0][0], chunk[0][1][spec.name]
            for index, sample in chunk[1:]:
                if sample[spec.name].shape[1:] != first.shape[1:]:
                    raise DatasetError(
                        f"cannot batch input {spec.name!r}: {self._where(first_index, k)} gives shape {first.shape} but "
                        f"{self._where(index, k)} gives {sample[spec.name].shape}; use batch size 1 or set resize: stretch or letterbox."
                    )
            batch[spec.name] = np.concatenate([sample[spec.name] for _, sample in chunk], axis=0)
        return batch

    def _count(self, limit: int | None) -> int:
        """Number of samples to use for `limit`."""
        if limit is None:
            return len(self)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise DatasetError(f"sample limit {limit!r} is not a non-negative integer; give 0 or more, or no limit.")
        return min(limit, len(self))

    def _where(self, index: int, input_index: int) -> str:
        """The file feeding one input of one sample, with its list line when there is one."""
        line, paths = self._entries[index]
        return _where(paths[input_index], line, self.source)

    def _load(self, spec: InputSpec, path: Path, line: int) -> np.ndarray:
        """Load, convert and check the array one file gives to one input."""
        where = _where(path, line, self.source)
        if self._hook is not None:
            return _check_array(self._call_hook(spec, path, where), spec, where)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _check_array(_read_npy(path, where), spec, where)
        if suffix == ".npz":
            return _check_array(_read_npz_member(path, spec, where), spec, where)
        plan = self._plans.get(spec.name) or _image_plan(spec, self.preprocess)
        pixels, conversions = _read_image(path, spec, plan, self.preprocess, where)
        for conversion in conversions:
            self._converted.setdefault(conversion, {})[path] = None
        return pixels

    def _call_hook(self, spec: InputSpec, path: Path, where: str) -> np.ndarray:
        """Run the user's hook, turning its exceptions into a DatasetError naming the file."""
        assert self._hook is not None
        try:
            return self._hook(str(path), spec)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"{where}: preprocess hook {self.preprocess.hook!r} failed for input {spec.name!r} "
                f"({type(exc).__name__}: {exc}); fix the hook or remove the file from the dataset."
            ) from exc


def load_dataset(source: str | Path, inputs: list[InputSpec], preprocess: Preprocess | None = None) -> Dataset:
    """Resolve a list file, directory or glob into a Dataset, checking every path now."""
    pre = preprocess or Preprocess()
    if not inputs:
        raise DatasetError(
            f"dataset {str(source)!r}: the model has no inputs to feed (every graph input is an initializer);"
            " calibrate without a dataset."
        )
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if _wanted(p, pre)), key=lambda p: p.name)
        entries = _file_entries(files, inputs, pre, f"directory {str(path)!r}")
    elif path.is_file() and path.suffix.lower() in SUPPORTED_EXTENSIONS:
        entries = _file_entries([path], inputs, pre, f"file {str(path)!r}")
    elif path.is_file():
        entries = _parse_list(path, inputs, pre)
    elif glob.has_magic(str(source)):
        files = sorted((Path(p) for p in glob.glob(str(source), recursive=True) if _wanted(Path(p), pre)), key=str)
        entries = _file_entries(files, inputs, pre, f"glob {str(source)!r}")
    else:
        raise DatasetError(
            f"dataset {str(source)!r} does not exist; give a list file (dataset.txt), "
            "a directory of samples or a glob pattern such as 'images/*.jpg'."
        )
    return Dataset(path, inputs, entries, pre)


def _wanted(path: Path, pre: Preprocess) -> bool:
    """Whether a directory/glob match is a sample: a supported file, or any visible file with a hook."""
    if not path.is_file() or path.name.startswith("."):
        return False
    return pre.hook is not None or path.suffix.lower() in SUPPORTED_EXTENSIONS


def _file_entries(files: list[Path], inputs: list[InputSpec], pre: Preprocess, what: str) -> list[tuple[int, list[Path]]]:
    """One sample per file; several inputs only when every file is an .npz feeding them all."""
    if not files:
        kinds = "no files" if pre.hook else f"no files with a supported extension ({_SUPPORTED_TEXT})"
        raise DatasetError(
            f"dataset {what} holds {kinds};"
            " point it at your samples or write a list file (dataset.txt)."
        )
    if len(inputs) > 1:
        odd = next((f for f in files if pre.hook or f.suffix.lower() != ".npz"), None)
        if odd is not None:
            raise DatasetError(
                f"dataset {what} gives one file per sample, such as {str(odd)!r}, but the model has {len(inputs)} inputs "
                f"({_names(inputs)}); write a list file with {len(inputs)} paths per line in that order, "
                "or use .npz files holding one array per input name."
            )
    return [(0, [f] * len(inputs)) for f in files]


def _parse_list(list_path: Path, inputs: list[InputSpec], pre: Preprocess) -> list[tuple[int, list[Path]]]:
    """Parse a dataset.txt: k paths per line (or one .npz), comments and blanks skipped."""
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"dataset list {str(list_path)!r} is not UTF-8 text (byte {exc.start}); give a text file with one sample per line, "
            f"or a sample file with a supported extension ({_SUPPORTED_TEXT})."
        ) from exc
    except OSError as exc:
        raise DatasetError(
            f"dataset list {str(list_path)!r} cannot be read ({exc.strerror or exc});"
            " check its permissions."
        ) from exc
    base = list_path.absolute().parent
    k = len(inputs)
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = _COMMENT.sub("", raw).split()
        if not words:
            continue
        here = f"dataset list {str(list_path)!r} line {number}"
        if len(words) == 1 and k > 1 and words[0].lower().endswith(".npz") and pre.hook is None:
            words = words * k
        elif len(words) != k:
            npz = " or one .npz holding an array per input name" if k > 1 else ""
            raise DatasetError(
                f"{here}: {_count(len(words), 'path')} ({' '.join(words)}) but the model has {_count(k, 'input')} "
                f"({_names(inputs)}); put {_count(k, 'whitespace-separated path')} per line in that order{npz}. "
                "Paths cannot contain spaces."
            )
        entries.append((number, [_list_path(word, base, here, pre) for word in words]))
    if not entries:
        raise DatasetError(
            f"dataset list {str(list_path)!r} is empty (only blank or # comment lines);"
            " add one sample per line, e.g. 'images/cat.jpg'."
        )
    return entries


def _list_path(word: str, base: Path, here: str, pre: Preprocess) -> Path:
    """Resolve one path of a list line against the list's directory and check it exists."""
    path = Path(word)
    if not path.is_absolute():
        path = base / path
    if pre.hook is None and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DatasetError(
            f"{here}: {word!r} has extension {path.suffix or '(none)'!r}, which hybridq cannot read; "
            f"supported: {_SUPPORTED_TEXT}. Convert the file or load it with a preprocess hook."
        )
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DatasetError(
            f"{here}: {word!r} {state} (looked for {str(path)!r}; relative paths are relative to the list file);"
            " fix the path or remove the line."
        )
    return path


def _count(n: int, noun: str) -> str:
    """'1 path', '3 paths'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(inputs: list[InputSpec]) -> str:
    """Input names, quoted, in order."""
    return ", ".join(repr(spec.name) for spec in inputs)


def _fmt(shape: tuple[Dim, ...]) -> str:
    """A shape with symbolic dims by name and unknown ones as '?'."""
    dims = ["?" if d is None else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _where(path: Path, line: int, source: Path) -> str:
    """'file' or 'file' (line N of 'list') for error messages."""
    return f"{str(path)!r} (line {line} of {str(source)!r})" if line else repr(str(path))


def _shape_matches(shape: tuple[int, ...], want: tuple[Dim, ...]) -> bool:
    """Equal rank and equal size at every fixed dim; symbolic dims match anything."""
    return len(shape) == len(want) and all(not isinstance(w, int) or w == s for s, w in zip(shape, want))


def _check_array(array: object, spec: InputSpec, where: str) -> np.ndarray:
    """Check dtype kind, shape (batch dim of 1 may be missing) and finiteness, then cast."""
    if not isinstance(array, np.ndarray):
        raise DatasetError(
            f"{where}: got a {type(array).__name__} for input {spec.name!r}, not a numpy array;"
            " return or save an np.ndarray."
        )
    if array.dtype.kind != spec.dtype.kind:
        raise DatasetError(
            f"{where}: array has dtype {array.dtype} but input {spec.name!r} expects {spec.dtype}; "
            f"save it as {spec.dtype} (e.g. array.astype(np.{spec.dtype.name}))."
        )
    if not _shape_matches(array.shape, spec.shape):
        batch_optional = bool(spec.shape) and (spec.shape[0] == 1 or not isinstance(spec.shape[0], int))
        if not (batch_optional and _shape_matches(array.shape, spec.shape[1:])):
            alternative = f" or {_fmt(spec.shape[1:])} without the batch dim" if batch_optional else ""
            wildcard = " ('?' and named dims may be any size)" if any(not isinstance(d, int) for d in spec.shape) else ""
            raise DatasetError(
                f"{where}: array has shape {_fmt(array.shape)} but input {spec.name!r} expects "
                f"{_fmt(spec.shape)}{alternative}{wildcard}; save arrays of that shape."
            )
        array = array[np.newaxis]
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.ascontiguousarray(array, dtype=spec.dtype)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise DatasetError(
            f"{where}: {bad} of {array.size} values for input {spec.name!r} are NaN or Inf (after casting to {spec.dtype}); "
            "fix or remove this sample."
        )
    return array


def _read_npy(path: Path, where: str) -> np.ndarray:
    """Load a plain .npy array without unpickling."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(
            f"{where}: cannot read this .npy file ({type(exc).__name__}: {exc}); save a plain numeric array "
            "with np.save (pickled object arrays are refused)."
        ) from exc
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise DatasetError(
            f"{where}: this .npy file is an .npz archive;"
            " rename it to .npz or save a single array with np.save."
        )
    return loaded


def _read_npz_member(path: Path, spec: InputSpec, where: str) -> np.ndarray:
    """Load the array named like the input from an .npz archive."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(
            f"{where}: cannot read this .npz file ({type(exc).__name__}: {exc}); write it with np.savez(path, **{{name: array}}) "
            "with one array per input name."
        ) from exc
    if isinstance(loaded, np.ndarray):
        raise DatasetError(
            f"{where}: this .npz file holds a single .npy array;"
            f" write it with np.savez(path, {spec.name}=array) or rename it to .npy."
        )
    with loaded as archive:
        keys = list(archive.files)
        if spec.name not in keys:
            raise DatasetError(
                f"{where}: the .npz has no array named {spec.name!r} (it holds {', '.join(map(repr, keys)) or 'nothing'}); "
                f"save one array per input name, e.g. np.savez(path, **{{{spec.name!r}: array}}).{did_you_mean(spec.name, keys)}"
            )
        try:
            return archive[spec.name]
        except Exception as exc:
            raise DatasetError(
                f"{where}: array {spec.name!r} in this .npz cannot be read ({type(exc).__name__}: {exc});"
                " save plain numeric arrays."
            ) from exc


def _image_plan(spec: InputSpec, pre: Preprocess) -> _ImagePlan:
    """Work out how images feed `spec`, refusing inputs images cannot feed."""
    shape = spec.shape
    if len(shape) != 4:
        raise DatasetError(
            f"input {spec.name!r} has shape {_fmt(shape)}, but images can only feed 4-D inputs (NCHW or NHWC); "
            "feed it with .npy/.npz files or a preprocess hook."
        )
    if spec.dtype.kind not in "fiu":
        raise DatasetError(
            f"input {spec.name!r} has dtype {spec.dtype}, which images cannot feed;"
            " use .npy/.npz files or a preprocess hook."
        )
    layout = pre.layout or _infer_layout(spec)
    c_dim, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    channels = c_dim if isinstance(c_dim, int) else 3
    if channels not in (1, 3):
        raise DatasetError(
            f"input {spec.name!r} (shape {_fmt(shape)}, layout {layout}) wants {channels} channels, but images give 1 or 3; "
            "check the layout option or feed .npy/.npz files."
        )
    mean = _per_channel(pre.mean, channels, "mean", spec)
    std = _per_channel(pre.std, channels, "std", spec)
    if spec.dtype.kind in "iu" and (mean is not None or std is not None):
        raise DatasetError(
            f"input {spec.name!r} is {spec.dtype}, but mean/std give fractional values; drop mean/std for this model "
            "(it normalises internally) or feed .npy files."
        )
    return _ImagePlan(layout, channels, _fixed(height), _fixed(width), mean, std)


def _fixed(dim: Dim) -> int | None:
    """The size of a fixed dim, None for a symbolic one."""
    return dim if isinstance(dim, int) else None


def _infer_layout(spec: InputSpec) -> str:
    """NCHW when axis 1 has 1 or 3 channels, NHWC when axis 3 has, else ask the user."""
    if spec.shape[1] in (1, 3):
        return "nchw"
    if spec.shape[3] in (1, 3):
        return "nhwc"
    raise DatasetError(
        f"cannot infer the layout of input {spec.name!r} with shape {_fmt(spec.shape)}: neither axis 1 nor axis 3 "
        "has 1 or 3 channels; set layout to nchw or nhwc."
    )


def _per_channel(values: tuple[float, ...] | None, channels: int, what: str, spec: InputSpec) -> np.ndarray | None:
    """Broadcast one value to every channel, or check there is one value per channel."""
    if values is None:
        return None
    if len(values) not in (1, channels):
        raise DatasetError(
            f"{what} {list(values)} has {len(values)} values but input {spec.name!r} takes {channels}-channel images; "
            f"give 1 or {channels} values."
        )
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()


def _read_image(path: Path, spec: InputSpec, plan: _ImagePlan, pre: Preprocess, where: str) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode, convert, resize, reorder, normalise and lay out one image for `spec`.

    Returns the array and the conversions that changed its content, each as (what, how) (see `Dataset.notes`).
    """
    try:
        with Image.open(path) as image:
            image.load()
            conversions = _mode_conversions(image)
            pixels = _pixels(image)
    except Exception as exc:
        raise DatasetError(
            f"{where}: cannot read this image ({type(exc).__name__}: {exc}); check it is a valid "
            f"{'/'.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} file or remove it from the dataset."
        ) from exc
    if plan.channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
        conversions.append(("grayscale", f"the gray channel is copied to R, G and B for the 3-channel input {spec.name!r}"))
    elif plan.channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ _LUMA)[..., np.newaxis]
        conversions.append(("colour", f"turned into one gray channel (0.299 R + 0.587 G + 0.114 B) for the 1-channel input {spec.name!r}"))
    pixels = _fit(pixels, plan, pre.resize, spec, where)
    if pre.color == "bgr":
        pixels = pixels[..., ::-1]
    if plan.mean is not None:
        pixels = pixels - plan.mean
    if plan.std is not None:
        pixels = pixels / plan.std
    if plan.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    batch = pixels[np.newaxis]
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        batch = np.clip(np.rint(batch), info.min, info.max)
    return np.ascontiguousarray(batch, dtype=spec.dtype), conversions


def _mode_conversions(image: Image.Image) -> list[tuple[str, str]]:
    """The content changes `_pixels` makes to an image of this mode, as (what, how)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return [(f"16-bit pixels (mode {mode})", "divided by 257 into 0-255")]
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return [("an alpha channel", "dropped, not composited over a background")]
    if mode not in _GRAY_MODES + ("RGB", "P"):
        return [(f"mode {mode}", "converted to RGB by pillow")]
    return []


def _pixels(image: Image.Image) -> np.ndarray:
    """HxWxC float32 in 0-255 with C = 1 (gray) or 3 (RGB), per the module docstring."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image).astype(np.float32) / 257.0, 0.0, 255.0)
        return gray[..., np.newaxis]
    if image.mode in _GRAY_MODES:
        return np.asarray(image.convert("L"), dtype=np.float32)[..., np.newaxis]
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _fit(pixels: np.ndarray, plan: _ImagePlan, mode: str, spec: InputSpec, where: str) -> np.ndarray:
    """Bring an image to the input's H, W per `mode`; symbolic dims follow the image."""
    height, width = pixels.shape[:2]
    target_h = plan.height if plan.height is not None else height
    target_w = plan.width if plan.width is not None else width
    if (height, width) == (target_h, target_w):
        return pixels
    if mode == "none":
        raise DatasetError(
            f"{where}: image is {width}x{height} (width x height) but input {spec.name!r} expects {target_w}x{target_h}; "
            "set resize to stretch or letterbox, or resize the files beforehand."
        )
    if mode == "stretch":
        return _resize(pixels, target_w, target_h)
    scale = min(t / s for t, s in ((plan.height, height), (plan.width, width)) if t is not None)
    new_h, new_w = max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
    box_h = plan.height if plan.height is not None else new_h
    box_w = plan.width if plan.width is not None else new_w
    new_h, new_w = min(new_h, box_h), min(new_w, box_w)
    canvas = np.zeros((box_h, box_w, pixels.shape[2]), dtype=np.float32)
    top, left = (box_h - new_h) // 2, (box_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(pixels, new_w, new_h)
    return canvas


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow bilinear resize of each float32 channel to width x height."""
    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32)) for c in range(pixels.shape[2])]
    resized = [np.asarray(p.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) for p in planes]
    return np.stack(resized, axis=2)


def load_callable(hook: str, what: str = "preprocess hook") -> Callable:
    """Import `path/to/module.py:function` or `package.module:function` (only when asked for) and return the function."""
    try:
        return _load_hook(hook)
    except DatasetError as exc:
        raise DatasetError(str(exc).replace("preprocess hook", what)) from None


def _load_hook(hook: str) -> Hook:
    """Import `path/to/module.py:function` or `package.module:function` and return the function."""
    module_ref, _, function_name = hook.rpartition(":")
    if module_ref.endswith(".py") or "/" in module_ref or "\\" in module_ref:
        module = _import_file(Path(module_ref), hook)
    else:
        try:
            module = importlib.import_module(module_ref)
        except Exception as exc:
            raise DatasetError(
                f"cannot import preprocess hook module {module_ref!r} (hook {hook!r}): {type(exc).__name__}: {exc}; "
                "give path/to/module.py:function or an importable module."
            ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        raise DatasetError(
            f"preprocess hook module {module_ref!r} has no function {function_name!r} (hook {hook!r}); "
            f"it defines {', '.join(map(repr, names)) or 'no public functions'}.{did_you_mean(function_name, names)}"
        )
    return function


def _import_file(path: Path, hook: str) -> ModuleType:
    """Execute a hook module file under a private module name."""
    if not path.is_file():
        raise DatasetError(
            f"preprocess hook module {str(path)!r} does not exist (hook {hook!r});"
            " give path/to/module.py:function."
        )
    name = "hybridq_hook_" + re.sub(r"\W", "_", str(path.absolute()))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DatasetError(
            f"preprocess hook module {str(path)!r} cannot be imported (hook {hook!r});"
            " give a Python .py file."
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise DatasetError(
            f"cannot import preprocess hook module {str(path)!r} (hook {hook!r}): {type(exc).__name__}: {exc}; fix the module."
        ) from exc
    return module
