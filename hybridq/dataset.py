"""Calibration samples: the RKNN dataset.txt convention and image preprocessing.

A dataset source is a list file (one sample per line, k whitespace-separated
paths for a k-input model, relative to the list file, `#` comments), a
directory (supported files sorted by name) or a glob pattern (sorted). A line
may hold a single `.npz` for a multi-input model: it then feeds every input
from the array named like that input. Samples load lazily, one at a time, so
memory stays flat in the number of samples. Nothing in a list is executed:
arrays load with `allow_pickle=False`, and the preprocess hook is imported only
when `Preprocess.hook` is set.

Images become inputs as :mod:`hybridq.images` describes (decode, convert,
resize, normalise, lay out). A hook `module.py:function` (or
`package.module:function`) replaces all of that for every file: `function(path, spec)` returns the model-ready array,
which is then checked like an `.npy` file.
"""

from __future__ import annotations

import copy
import glob
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from .errors import DatasetError, did_you_mean
from .images import image_plan, ImagePlan, read_image
from .inputs import (  # re-exported: the dataset's public names, as before
    ARRAY_EXTENSIONS,
    COLORS,
    IMAGE_EXTENSIONS,
    LAYOUTS,
    RESIZES,
    SUPPORTED_EXTENSIONS,
    Dim,
    Hook,
    InputSpec,
    Preprocess,
    fmt_shape,
    input_specs,
    parse_floats,
)

__all__ = [
    "ARRAY_EXTENSIONS", "COLORS", "IMAGE_EXTENSIONS", "LAYOUTS", "RESIZES", "SUPPORTED_EXTENSIONS", "ConversionRead",
    "Dataset", "Dim", "Hook", "InputSpec", "Preprocess", "input_specs", "load_callable", "load_dataset", "parse_floats",
]

_SUPPORTED_TEXT = ", ".join(SUPPORTED_EXTENSIONS)
_COMMENT = re.compile(r"(^|\s)#.*")

ConversionRead = tuple[str, str, int, int]
"""An image conversion one sample needed: (what, how, sample index, input index), as `Dataset.take_conversions` gives it."""


class Dataset:
    """Samples named by a list file, directory or glob, loaded lazily one at a time."""

    def __init__(
        self, source: Path, inputs: list[InputSpec], entries: list[tuple[int, list[Path]]], preprocess: Preprocess | None = None,
        columns: tuple[str, ...] = (),
    ) -> None:
        self.source = Path(source)
        self.inputs = list(inputs)
        self.preprocess = preprocess or Preprocess()
        self.columns = tuple(columns)  # the inputs before --fix-input (see load_dataset)
        self._entries = [(line, list(paths)) for line, paths in entries]
        self.selection: tuple[int, ...] = ()  # the listed samples this dataset holds (select); empty: all, in list order
        self._seed_note = ""
        self._hook = _load_hook(self.preprocess.hook) if self.preprocess.hook else None
        self._plans: dict[str, ImagePlan] = {}
        self._converted: dict[tuple[str, str], dict[Path, None]] = {}
        self._read: list[ConversionRead] | None = None  # a worker's copy: read since the last take_conversions
        if self._hook is None:
            for i, spec in enumerate(self.inputs):
                if any(paths[i].suffix.lower() in IMAGE_EXTENSIONS for _, paths in self._entries):
                    self._plans[spec.name] = image_plan(spec, self.preprocess)

    @property
    def image_inputs(self) -> list[str]:
        """Inputs fed from image files, which the image preprocessing (mean, std, color, layout, resize) applies to."""
        return list(self._plans)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self._entries)

    def notes(self) -> list[str]:
        """One line per kind of image conversion seen so far (alpha dropped, gray to RGB, ...), with a count and the first file."""
        out = [
            f"image conversion: {what} in {_count(len(paths), 'image')} (first: '{next(iter(paths))}'): {how}."
            for (what, how), paths in self._converted.items()
        ]
        out += [self._seed_note] if self._seed_note else []
        pre = self.preprocess
        given = [k for k, v in (("mean", pre.mean), ("std", pre.std), ("layout", pre.layout)) if v is not None]
        given += ["resize"] if pre.resize != "none" else []
        given += ["color bgr"] if pre.color == "bgr" else []
        if given and not self._plans and self._hook is None:
            out.append(f"{', '.join(given)} not applied: they apply to image files, and '{self.source}' lists none "
                       "(.npy/.npz samples are fed as stored; normalise them when you write them, or use a preprocess hook).")
        return out

    def entries(self) -> list[tuple[int, list[Path]]]:
        """(1-based list line, or 0 for a directory/glob; one path per input) for every sample."""
        return [(line, list(paths)) for line, paths in self._entries]

    def select(self, indices: tuple[int, ...]) -> "Dataset":
        """This dataset holding only the listed samples ``indices`` (0-based, in that order); a worker selects the same."""
        if not indices:
            return self
        out = copy.copy(self)
        out._read = None if self._read is None else []  # positions in this selection, not in the whole list
        out._entries = [self._entries[i] for i in indices]
        out.selection = tuple(int(i) for i in indices)
        return out

    def drawn(self, n: int | None, seed: int) -> "Dataset":
        """``n`` samples drawn at random (numpy's default generator seeded with ``seed``), kept in list order;
        with no ``n`` below the dataset's size, all of them (and a note that the seed drew nothing)."""
        if n is None or n >= len(self):
            self._seed_note = f"seed {seed} drew nothing: it draws --samples N of a larger dataset, and all {len(self)} samples were used."
            return self
        return self.select(tuple(sorted(np.random.default_rng(seed).choice(len(self), n, replace=False).tolist())))

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Load one sample: input name -> array with a leading batch dim, in the input's dtype."""
        line, paths = self._entries[index]
        sample = {}
        for k, (spec, path) in enumerate(zip(self.inputs, paths)):
            sample[spec.name], conversions = self._load(spec, path, line)
            for what, how in conversions:
                self._count_conversion(what, how, path)
                if self._read is not None:
                    self._read.append((what, how, index, k))
        return sample

    def log_conversions(self) -> Dataset:
        """Log the image conversions each read needs from now on (a worker's copy, which hands them on); returns self."""
        self._read = []
        return self

    def take_conversions(self) -> list[ConversionRead]:
        """The image conversions read since the last call, in reading order (none unless `log_conversions` was called)."""
        taken, self._read = self._read or [], None if self._read is None else []
        return taken

    def add_conversions(self, read: Iterable[ConversionRead]) -> None:
        """Count the conversions another copy of this dataset read (a worker's `take_conversions`) as if read here."""
        for what, how, index, k in read:
            self._count_conversion(what, how, self._entries[index][1][k])

    def _count_conversion(self, what: str, how: str, path: Path) -> None:
        """One file that needed this conversion (each file once, in first-read order)."""
        self._converted.setdefault((what, how), {})[path] = None

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
                        f"of {spec.shape[0]} (shape {fmt_shape(spec.shape)}); use batch size 1 or export the model with a dynamic batch axis."
                    )
                axis = _named_batch_axis(spec.shape)
                if axis:
                    raise DatasetError(
                        f"batch size {batch_size} joins samples along axis 0, but input {spec.name!r} names axis {axis} "
                        f"'{spec.shape[axis]}' as its batch (shape {fmt_shape(spec.shape)}): axis 0 is not a batch there; "
                        "use batch size 1."
                    )
        return self._batches(batch_size, self._count(limit))

    def batch(self, index: int, batch_size: int, count: int) -> dict[str, np.ndarray]:
        """Batch `index` of `batches(batch_size, limit=count)`, loaded alone (a worker reads only its own batches)."""
        return self._concat([(i, self.sample(i)) for i in range(index * batch_size, min((index + 1) * batch_size, count))])

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
                    # images reach here only through symbolic H/W, where each keeps its own size whatever resize says
                    kind = "images at one size" if spec.name in self._plans and self._hook is None else "samples of one shape"
                    fix = f"use batch size 1 or save {kind}"
                    raise DatasetError(
                        f"cannot batch input {spec.name!r}: {self._where(first_index, k)} gives shape {first.shape} but "
                        f"{self._where(index, k)} gives {sample[spec.name].shape}; {fix}."
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

    def _load(self, spec: InputSpec, path: Path, line: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Load, convert and check the array one file gives to one input; with the image conversions it needed."""
        where = _where(path, line, self.source)
        if self._hook is not None:
            return _check_array(self._call_hook(spec, path, where), spec, where), []
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _check_array(_read_npy(path, where), spec, where), []
        if suffix == ".npz":
            return _check_array(_read_npz_member(path, spec, where), spec, where), []
        plan = self._plans.get(spec.name) or image_plan(spec, self.preprocess)
        return read_image(path, spec, plan, self.preprocess, where)

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


def load_dataset(
    source: str | Path, inputs: list[InputSpec], preprocess: Preprocess | None = None, columns: tuple[str, ...] = (),
) -> Dataset:
    """Resolve a list file, directory or glob into a Dataset, checking every path now.

    `columns` are the model's inputs before `--fix-input` made some constant: a list line with a path for each
    of them is read by name, the fixed inputs' paths skipped (the same list serves the model and its fixed form).
    """
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
        entries = _parse_list(path, inputs, pre, columns)
    elif glob.has_magic(str(source)):
        files = sorted((Path(p) for p in glob.glob(str(source), recursive=True) if _wanted(Path(p), pre)), key=str)
        entries = _file_entries(files, inputs, pre, f"glob {str(source)!r}")
    elif path.exists():  # a FIFO, socket or device: reading a FIFO would wait for a writer forever
        raise DatasetError(
            f"dataset {str(source)!r} is not a regular file (a FIFO, socket or device); give a list file (dataset.txt), "
            "a directory of samples or a glob pattern such as 'images/*.jpg'."
        )
    else:
        raise DatasetError(
            f"dataset {str(source)!r} does not exist; give a list file (dataset.txt), "
            "a directory of samples or a glob pattern such as 'images/*.jpg'."
        )
    return Dataset(path, inputs, entries, pre, columns)


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


def _parse_list(list_path: Path, inputs: list[InputSpec], pre: Preprocess, columns: tuple[str, ...] = ()) -> list[tuple[int, list[Path]]]:
    """Parse a dataset.txt: k paths per line (or one .npz), comments and blanks skipped; a line with one path per
    name in `columns` gives the inputs' paths by name."""
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
        elif len(words) != k and len(words) == len(columns) and all(s.name in columns for s in inputs):
            words = [words[columns.index(s.name)] for s in inputs]  # the columns of inputs --fix-input fixed are skipped
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
    if _is_dir(path):
        files = "files" if pre.hook else "files with a supported extension"
        raise DatasetError(
            f"{here}: {word!r} is a directory ({str(path)!r}), and a list line names files; list the files in it, one "
            f"sample per line, or pass the directory itself as the dataset (--dataset {str(path)!r}: its {files}, sorted by "
            "name, are the samples; subdirectories are not read)."
        )
    if pre.hook is None and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DatasetError(
            f"{here}: {word!r} has extension {path.suffix or '(none)'!r}, which hybridq cannot read; "
            f"supported: {_SUPPORTED_TEXT}. Convert the file or load it with a preprocess hook."
        )
    try:
        found, exists = path.is_file(), path.exists()
    except OSError as exc:  # a name too long for the file system: several paths joined by commas, say
        raise DatasetError(f"{here}: {word[:80]!r}{'...' if len(word) > 80 else ''} is not a usable path ({exc.strerror or exc}); "
                           "separate the paths of a line with spaces, not commas.") from None
    if not found:
        state = "is not a file" if exists else "does not exist"
        raise DatasetError(
            f"{here}: {word!r} {state} (looked for {str(path)!r}; relative paths are relative to the list file);"
            " fix the path or remove the line."
        )
    return path


def _is_dir(path: Path) -> bool:
    """Whether `path` is a directory; False for a name the file system refuses (too long, say)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _count(n: int, noun: str) -> str:
    """'1 path', '3 paths'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(inputs: list[InputSpec]) -> str:
    """Input names, quoted, in order."""
    return ", ".join(repr(spec.name) for spec in inputs)




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
            alternative = f" or {fmt_shape(spec.shape[1:])} without the batch dim" if batch_optional else ""
            wildcard = " ('?' and named dims may be any size)" if any(not isinstance(d, int) for d in spec.shape) else ""
            raise DatasetError(
                f"{where}: array has shape {fmt_shape(array.shape)} but input {spec.name!r} expects "
                f"{fmt_shape(spec.shape)}{alternative}{wildcard}; save arrays of that shape."
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


def _named_batch_axis(shape: tuple) -> int | None:
    """The axis other than 0 whose symbolic name says batch (`[seq, batch, dim]`), when axis 0's does not; else None."""
    names = [d.lower() if isinstance(d, str) else "" for d in shape]
    if not names or "batch" in names[0]:
        return None
    return next((k for k, n in enumerate(names) if k and "batch" in n), None)


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




def load_callable(hook: str, what: str = "preprocess hook") -> Callable:
    """Import `path/to/module.py:function` or `package.module:function` (only when asked for) and return the function."""
    try:
        return _load_hook(hook)
    except DatasetError as exc:
        raise DatasetError(str(exc).replace("preprocess hook", what)) from None


def _load_hook(hook: str) -> Hook:
    """Import `path/to/module.py:function` or `package.module:function` and return the function."""
    module_ref, _, function_name = hook.rpartition(":")
    if not module_ref or not function_name:
        raise DatasetError(f"preprocess hook {hook!r} names no function: give path/to/module.py:function or package.module:function "
                           f"(the module, a colon, then the function's name).")
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
