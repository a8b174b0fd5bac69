"""What step1 recorded about its inputs, read back from any artifact, and checked against what a command is given.

step1 records two things: the preprocessing it calibrated with (`Preprocess.to_dict()`; only when
some input was read from images or through a hook, since it applies to nothing else) and the
range of every float model input it saw (min, max, mean, std over all calibration samples). Both go
into the cfg header (preprocessing), the `.data` meta (both) and the step2 model's `metadata_props`
(both, as JSON under PREPROCESS_KEY and INPUT_RANGES_KEY). `analyze`, `propose` and the RKNN facade read
them from whatever they are given (a cfg, a `.data` file or a QDQ model), so no flag has to be repeated.

Range check (`range_warnings`): an input whose evaluation values span more than RANGE_RATIO x the
calibrated width (max - min), or whose mean is more than MEAN_STDS calibrated standard deviations
away from the calibrated mean, gets a warning naming the input. A forgotten `--std 58` makes the
range ~58x wider; a forgotten `--mean 123` moves the mean by ~2 standard deviations of a normalised image.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import fold
from ._onnx import read_onnx
from ._version import __version__
from .artifacts import read_meta, sha256_file
from .dataset import Preprocess
from .errors import DatasetError, InputError

PREPROCESS_KEY = "hybridq.preprocess"
INPUT_RANGES_KEY = "hybridq.input_ranges"
SOURCE_KEY = "hybridq.source_sha256"
"""sha256 of the fp32 files that are a step2 model's float reference (the model step1 was given, its temp model):
analyze notes a FLOAT_MODEL that is another file."""
OTHER_SOURCE = "is not the file step1 quantized"
"""The words of that note (the verdict's next step reads them)."""
RANGE_RATIO = 2.0
MEAN_STDS = 1.0
CFG_SUFFIX = ".quantization.cfg"

PreprocessArg = Preprocess | Mapping[str, Any] | None


ROWS_KEY = ""
"""batch_figures' entry for the batch's rows (no input has an empty name): the length of its first input's axis 0."""


def batch_figures(batch: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Min, max, sum, sum of squares and size of every float input of one batch (integer and empty inputs skipped), and
    under ROWS_KEY its rows: axis 0 of its first input, along which the dataset batches its entries."""
    first = next(iter(batch.values()), None)
    figures = {ROWS_KEY: [float(first.shape[0] if first is not None and first.ndim else 1)]}
    for name, arr in batch.items():
        if arr.dtype.kind != "f" or arr.size == 0:
            continue
        # one float64 copy, squared in place, and min/max on the input's own dtype: the same sums, 3x faster (step1's main thread)
        y = arr.astype(np.float64)
        total = y.sum()
        np.square(y, out=y)
        figures[name] = [float(arr.min()), float(arr.max()), float(total), float(y.sum()), float(arr.size)]
    return figures


class InputStats:
    """Running min, max, mean and std of every float input over the batches it sees (one pass, O(1) memory)."""

    def __init__(self) -> None:
        self._acc: dict[str, list[float]] = {}
        self.rows = 0  # axis 0 of the first input, summed over the batches

    def samples_in(self, inputs: list[Any], entries: int) -> int | None:
        """The samples `entries` dataset entries held when they hold batches: rows along axis 0 (the axis the dataset
        batches on) of the first input (an InputSpec) when its axis 0 is not fixed and that is not one per entry; else None."""
        leading = inputs[0].shape[0] if inputs and inputs[0].shape else 1
        return self.rows if not isinstance(leading, int) and self.rows and self.rows != entries else None

    def update(self, batch: Mapping[str, np.ndarray]) -> None:
        """Fold one batch (input name -> array) in; integer and empty inputs are skipped."""
        self.fold(batch_figures(batch))

    def fold(self, figures: Mapping[str, list[float]]) -> None:
        """Fold one batch's `batch_figures` in (a worker computes them; the caller folds them in batch order)."""
        self.rows += int(figures.get(ROWS_KEY, [0])[0])
        for name, (lo, hi, s, ss, n) in ((k, v) for k, v in figures.items() if k != ROWS_KEY):
            acc = self._acc.get(name)
            if acc is None:
                self._acc[name] = [lo, hi, s, ss, n]
            else:
                acc[0], acc[1] = min(acc[0], lo), max(acc[1], hi)
                acc[2] += s
                acc[3] += ss
                acc[4] += n

    def watch(self, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Mapping[str, np.ndarray]]:
        """Yield the batches unchanged, updating the statistics on the way."""
        for batch in batches:
            self.update(batch)
            yield batch

    def to_dict(self) -> dict[str, dict[str, float]]:
        """{input: {min, max, mean, std}} as plain floats."""
        out = {}
        for name, (lo, hi, s, ss, n) in self._acc.items():
            mean = s / n
            out[name] = {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0))}
        return out


@dataclass
class Record:
    """What an artifact records: the preprocessing (None: nothing recorded) and the calibrated input ranges."""

    source: str
    preprocess: dict[str, Any] | None = None
    input_ranges: dict[str, dict[str, float]] = field(default_factory=dict)


def step1_siblings(path: str | Path) -> tuple[Path, Path] | None:
    """The `.model` and `.data` beside a step1 cfg, or None when ``path`` is no cfg.

    A cfg is known by its name (`<name>.quantization.cfg`) or, renamed, by its `hybridq:` header line.
    """
    p = Path(path)
    if p.name.endswith(CFG_SUFFIX):
        stem = p.name[: -len(CFG_SUFFIX)]
    elif _has_cfg_header(p):
        from .config import load_cfg

        model = load_cfg(p).header.get("model")
        if not model:
            raise InputError(f"'{p}' looks like a step1 cfg but its header names no model; pass the cfg step1 wrote.")
        stem = Path(str(model)).stem
    else:
        return None
    return p.with_name(f"{stem}.model"), p.with_name(f"{stem}.data")


def cfg_siblings(path: str | Path) -> tuple[Path, Path] | None:
    """:func:`step1_siblings` of a cfg given as the model to analyze, checked: the model is built from them."""
    siblings = step1_siblings(path)
    if siblings is not None and not siblings[0].is_file():
        raise InputError(
            f"'{path}' is a step1 cfg, so the model is built from the step1 artifacts beside it, but '{siblings[0]}' does "
            f"not exist. Keep the cfg in its step1 folder, beside {siblings[0].name} and {siblings[1].name}, or build the "
            "model with `hybridq step2` and pass the .onnx it writes."
        )
    return siblings


def recorded_cfg(quant: str | Path, folders: Iterable[str | Path]) -> Path | None:
    """The step1 cfg a step2 model was built from: the one `*.quantization.cfg` in ``folders`` or one level below them
    (step1's --out) whose header's ``model_sha256`` (its temp model) the model records among its float references
    (``hybridq.source_sha256``); None for a model hybridq did not build, or when none or several match."""
    path = Path(quant)
    model = read_onnx(path, load_external_data=False) if path.is_file() and path.suffix == ".onnx" else None
    recorded = set(next((p.value for p in model.metadata_props if p.key == SOURCE_KEY), "").split()) if model else set()
    found: dict[Path, Path] = {}  # resolved -> as found
    for folder in dict.fromkeys(Path(f) for f in folders) if recorded else ():
        for cfg in [*folder.glob("*" + CFG_SUFFIX), *folder.glob("*/*" + CFG_SUFFIX)]:
            try:
                with open(cfg, "rb") as f:
                    sha = re.search(rb"(?m)^  model_sha256:[ \t]*([0-9a-f]{64})[ \t]*\r?$", f.read(65536))
            except OSError:  # unreadable: not the one
                continue
            if sha is not None and sha.group(1).decode() in recorded:
                found.setdefault(cfg.resolve(), cfg)
    return next(iter(found.values())) if len(found) == 1 else None


def _has_cfg_header(path: Path) -> bool:
    """True for a text file whose first 64 KiB hold the cfg's top-level `hybridq:` line (a FIFO or device is not read)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return b"\0" not in head and re.search(rb"(?m)^hybridq:[ \t]*(#[^\n]*)?\r?$", head) is not None


def fixed_inputs_of(quant: Path) -> dict[str, Any]:
    """The inputs step1 fixed for a step2 model (its metadata) or a cfg (its `.data` meta); empty for other models."""
    siblings = step1_siblings(quant)
    if siblings is not None:
        data = siblings[1]
        return read_meta(data).get("control_flow", {}).get("fixed_inputs", {}) if data.is_file() else {}
    return fold.recorded_fixed_inputs(read_onnx(quant, load_external_data=False)) if quant.is_file() else {}


def step1_record(
    model_path: Path, dataset: str | Path, n: int, recorded_pre: dict[str, Any] | None, entries: dict[str, dict[str, Any]],
    settings: Any, report: Any, input_stats: InputStats, costs: Any = None, seed: int | None = None,
    shared_own: dict[str, dict[str, Any]] | None = None, inputs: list[Any] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What step1 records: the cfg header (its ``model_sha256`` filled in when the model is written) and the `.data` meta
    (with `shared_own`, the own scale/zero_point of tensors the cfg lists with their shared group's, when there are any).
    ``samples`` counts the samples calibrated: where the `n` dataset entries held batches (the first of `inputs` with
    its axis 0 not fixed: :meth:`InputStats.samples_in`), their rows, with ``dataset_entries: n`` beside them."""
    rows = input_stats.samples_in(list(inputs), n)
    counts = {"samples": rows, "dataset_entries": n} if rows else {"samples": n}
    header = {
        "version": __version__,
        "model": model_path.name,
        "model_sha256": "",
        "dataset": str(dataset),
        **counts,
        "preprocess": recorded_pre,
    }
    meta = {
        "tool_version": __version__,
        "source_model": str(model_path),
        "source_sha256": sha256_file(model_path),
        "written_entries": entries,
        "written_settings": settings.to_dict(),
        "original_nodes": report.original_nodes,
        "renamed": report.renamed,
        "fused": report.fused,
        "dataset": str(dataset),
        **counts,
        "preprocess": recorded_pre,
        "input_ranges": input_stats.to_dict(),
        "control_flow": report.control_flow.to_dict(),
        "cost": costs.to_dict() if costs else None,
    }
    if seed is not None:  # the samples were drawn with it (--seed)
        header["seed"] = seed
    if shared_own:
        meta["shared_own"] = shared_own
    return header, meta


def read_record(artifact: str | Path) -> Record:
    """The record of a step1 cfg (from its `.data` beside it, else its header), a `.data` file, or an ONNX model."""
    path = Path(artifact)
    siblings = step1_siblings(path)
    if siblings is not None:
        data = siblings[1]
        if data.is_file():
            meta = read_meta(data)
            if "preprocess" in meta:
                return Record(f"'{path}' (recorded in '{data.name}')", meta.get("preprocess"), meta.get("input_ranges") or {})
        from .config import load_cfg

        header = load_cfg(path).header
        return Record(f"'{path}'", header.get("preprocess") or None)
    if path.suffix == ".data":
        meta = read_meta(path)
        return Record(f"'{path}'", meta.get("preprocess"), meta.get("input_ranges") or {})
    model = read_onnx(path, load_external_data=False) if path.is_file() else None
    if model is None:
        return Record(f"'{path}'")
    return record_of_model(model, f"'{path}'")


def record_of_model(model: onnx.ModelProto, source: str) -> Record:
    """The record step2 wrote into a model's metadata_props (empty for models hybridq did not build)."""
    props = {p.key: p.value for p in model.metadata_props}
    rec = Record(source)
    try:
        if PREPROCESS_KEY in props:
            rec.preprocess = json.loads(props[PREPROCESS_KEY])
        if INPUT_RANGES_KEY in props:
            rec.input_ranges = json.loads(props[INPUT_RANGES_KEY])
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: metadata '{PREPROCESS_KEY}'/'{INPUT_RANGES_KEY}' is not valid JSON ({exc}); rebuild the model with step2.") from None
    return rec


def check_header(header: Mapping[str, Any], meta: Mapping[str, Any], cfg: str | Path) -> None:
    """Refuse a cfg whose `hybridq: preprocess:` header no longer matches what step1 calibrated with (the `.data` meta)."""
    if "preprocess" not in meta or not header.get("preprocess"):
        return
    where = f"{cfg}: hybridq: preprocess:"
    if not isinstance(header["preprocess"], Mapping) or not isinstance(meta["preprocess"], Mapping):
        raise InputError(
            f"{where} holds {header['preprocess']!r}, but step1 recorded "
            f"{'no preprocessing (its samples were arrays, fed as stored)' if meta['preprocess'] is None else meta['preprocess']}; "
            "the preprocessing is fixed by calibration. Restore the header as step1 wrote it (or re-run step1)."
        )
    written = Preprocess.from_dict(dict(meta["preprocess"]), where)
    diffs = written.differences(Preprocess.from_dict(dict(header["preprocess"]), where))
    if diffs:
        listed = "; ".join(f"{name}: calibrated with {_fmt(a)}, header says {_fmt(b)}" for name, a, b in diffs)
        raise InputError(
            f"{where} was edited ({listed}), but preprocessing is fixed by calibration and cannot be changed in the cfg. "
            "Restore the header, or re-run step1 with the new options (and copy your edits into the new cfg)."
        )


def model_props(preprocess: dict[str, Any] | None, input_ranges: dict[str, Any] | None, sources: Iterable[str] = ()) -> dict[str, str]:
    """The metadata_props step2 writes: the record as compact, sorted JSON, and the sha256 of each fp32 file that is
    this model's float reference (the model step1 was given, its temp model), space-separated."""
    sources = [s for s in sources if s]
    props = {SOURCE_KEY: " ".join(sources)} if sources else {}
    if preprocess is not None:
        props[PREPROCESS_KEY] = json.dumps(preprocess, sort_keys=True)
    if input_ranges:
        props[INPUT_RANGES_KEY] = json.dumps(input_ranges, sort_keys=True)
    return props


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" for v in value)
    return "(not set)" if value is None else str(value)


def choose_preprocess(record: Record, given: PreprocessArg, force: bool = False) -> Preprocess | None:
    """The preprocessing to use: the recorded one, or `given` where it agrees; a disagreement is an InputError unless `force`.

    `given` is a full Preprocess (every option compared), or a mapping of only the options the user set
    (the others come from the record). Nothing recorded: `given` is used as is. With `force`, `given` wins outright.
    """
    if given is None:
        return Preprocess.from_dict(record.preprocess, record.source) if record.preprocess is not None else None
    if record.preprocess is None or force:
        return given if isinstance(given, Preprocess) else Preprocess.from_dict(dict(given), "the given preprocessing")
    recorded = Preprocess.from_dict(record.preprocess, record.source)
    if isinstance(given, Preprocess):
        wanted = given
    else:
        try:
            wanted = Preprocess.from_dict({**recorded.to_dict(), **dict(given)}, "the given preprocessing")
        except DatasetError as exc:
            raise InputError(
                f"{exc} {record.source} records the preprocessing step1 calibrated with ({describe(record.preprocess)}), and the "
                "options given do not combine with it. Drop the preprocessing options, or add --force-preprocess "
                "(force_preprocess=True in Python) to use only the ones given."
            ) from None
    # a layout step1 did not record was inferred from the model: a given one is not a contradiction
    diffs = [d for d in recorded.differences(wanted) if not (d[0] == "layout" and d[1] is None)]
    if not diffs:
        return wanted
    listed = "; ".join(f"{name}: recorded {_fmt(rec)}, given {_fmt(giv)}" for name, rec, giv in diffs)
    raise InputError(
        f"{record.source} records the preprocessing step1 calibrated with, and the options given disagree with it ({listed}). "
        "Results measured with other preprocessing than calibration are wrong. Drop those options (the recorded values "
        "are used), or, if these inputs really need different preprocessing (e.g. .npy files normalised already), "
        "add --force-preprocess (force_preprocess=True in Python)."
    )


def describe(preprocess: Mapping[str, Any] | None) -> str:
    """'mean 123.675,116.28,103.53, std 58.395,57.12,57.375, color rgb, resize none' for messages."""
    if not preprocess:
        return "nothing recorded"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in preprocess.items())


def range_warnings(calibrated: Mapping[str, Mapping[str, float]], seen: Mapping[str, Mapping[str, float]], source: str) -> list[str]:
    """One warning per input whose evaluation values fall far outside the calibrated ones (rule in the module docstring)."""
    out = []
    for name, ev in seen.items():
        cal = calibrated.get(name)
        if not cal:
            continue
        width_c, width_e = cal["max"] - cal["min"], ev["max"] - ev["min"]
        reasons = []
        if width_e > RANGE_RATIO * width_c:
            reasons.append(f"a range {width_e / width_c:.3g}x as wide" if width_c > 0 else "a spread where calibration saw a constant")
        if abs(ev["mean"] - cal["mean"]) > MEAN_STDS * cal["std"] and (cal["std"] > 0 or ev["mean"] != cal["mean"]):
            off = abs(ev["mean"] - cal["mean"]) / cal["std"] if cal["std"] > 0 else math.inf
            reasons.append(f"a mean {off:.3g} calibrated standard deviations away")
        if reasons:
            out.append(
                f"input '{name}': these samples span [{ev['min']:.4g}, {ev['max']:.4g}] (mean {ev['mean']:.4g}) but step1 calibrated "
                f"on [{cal['min']:.4g}, {cal['max']:.4g}] (mean {cal['mean']:.4g}), as recorded in {source}: {' and '.join(reasons)}. "
                "Check that they are preprocessed like the calibration data (mean/std, color, layout); otherwise the figures "
                "measure inputs the quantization ranges were not set for."
            )
    return out


def source_note(float_model: str | Path, quant: onnx.ModelProto) -> str | None:
    """A note when `float_model` is not the file the quantized model's step1 was given (None when it is, or unknown)."""
    recorded = next((p.value for p in quant.metadata_props if p.key == SOURCE_KEY), "").split()
    if not recorded:
        return None
    if sha256_file(Path(float_model)) in recorded:
        return None
    return (f"FLOAT_MODEL '{float_model}' {OTHER_SOURCE} (sha256 differs from {recorded[0][:12]}...): "
            "if it is another network, the figures compare two different models; pass the fp32 model given to step1.")
