"""The three step1 artifacts on disk, written atomically and bound together by hashes.

`<name>.model` is the temp model with its weights as ONNX external data in
`<name>.data`; its metadata holds a digest of the run (weights, settings,
statistics), so the hash of `<name>.model` that the `.data` and the cfg record
binds all three files. After the weights, `<name>.data` carries a zip archive (readable
from the file's end) with `meta.json` (format version, hash of `<name>.model`,
hash of the cfg as written, the preparation report) and the statistics of every
observed tensor. ONNX readers use only the weights' offsets, so the file stays
valid external data.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from ._fs import check_not_input, check_output_dir, output_target, publish_all, staging
from .errors import ArtifactMismatchError, InputError, ModelError, OutputError
from ._onnx import external_data_files, is_large, read_onnx, tag_external
from .observers import HistogramObserver, observer_kind

FORMAT_VERSION = 1
RUN_KEY = "hybridq.step1_run"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Save a model atomically; models over 2 GB get their weights in `<path>.data` beside it."""
    path = output_target(path)  # a symlink's target: staged beside it, the link kept
    with staging(path.parent) as tmp:
        target = tmp / path.name
        try:
            if is_large(model):
                big = onnx.ModelProto()
                big.CopyFrom(model)
                tag_external(big, path.name + ".data", min_bytes=1024)
                onnx.save_model(big, str(target))
                publish_all([(tmp / (path.name + ".data"), path.parent / (path.name + ".data")), (target, path)], tmp)
            else:
                onnx.save_model(model, str(target))
                publish_all([(target, path)], tmp)
        except OSError as exc:
            raise OutputError(f"Cannot write '{path}': {exc.strerror or exc}. Check the directory is writable and has space.") from exc


def step1_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """The three step1 artifacts in `out_dir`, checked before any work: none may be a directory, FIFO, device or socket."""
    paths = {"model": out_dir / f"{stem}.model", "data": out_dir / f"{stem}.data", "cfg": out_dir / f"{stem}.quantization.cfg"}
    for path in paths.values():
        output_target(path, "step1 output", "Remove it, or choose another --out.")
    return paths


def check_step1_outputs(out_dir: Path, stem: str, model: Path, dataset: str | Path) -> None:
    """Refuse, before any work, an --out that cannot be written, an artifact path that is a directory or special file,
    or one that is an input: the model, its external data (`cnn.data` beside `cnn.onnx`), the dataset list."""
    check_output_dir(out_dir, "step1 output directory (--out)")
    existing = [p for p in step1_paths(out_dir, stem).values() if p.exists()]
    if existing:
        inputs = {"the model": model, "the dataset list": Path(dataset)}
        inputs.update({f"the model's external data '{f.name}'": f for f in external_data_files(model)})
        for path in existing:
            check_not_input(path, inputs, "step1 output (in --out)")


def fp32_source_at(output: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """{role: path} when `output` is the fp32 model step1 was given, else {}: the path step1 recorded (a relative one read
    from the working directory), or any file with that model's recorded hash (the model moved, or another spelling)."""
    recorded = meta.get("source_model")
    with contextlib.suppress(OSError):
        if recorded and os.path.samefile(output, recorded):
            return {"the fp32 model step1 was given": Path(recorded)}
        if meta.get("source_sha256") and output.is_file() and sha256_file(output) == meta["source_sha256"]:
            return {f"the fp32 model step1 was given (by its bytes; step1 read it as '{recorded}')": output}
    return {}


@dataclass
class Step1Bundle:
    """What step2 reads back: the temp model with weights, the statistics and the step1 metadata."""

    model: onnx.ModelProto
    observers: dict[str, HistogramObserver]
    meta: dict[str, Any]
    model_path: Path
    data_path: Path


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A zip member with a fixed timestamp, so the same run gives a byte-identical `.data`."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def run_digest(model: onnx.ModelProto, meta: dict[str, Any], stats: dict[str, bytes]) -> str:
    """Hex sha256 of what makes one step1 run: every weight, the metadata and the statistics.

    Stored in the temp model's metadata (key RUN_KEY), so the hash of `<name>.model` that
    the `.data` and the cfg record binds all three files, weights and statistics included.
    """
    h = hashlib.sha256()
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.HasField("raw_data"):  # fed as bytes: a tensor over 2 GB cannot be serialized
            h.update(tensor.name.encode("utf-8"))
            h.update(json.dumps([tensor.data_type, list(tensor.dims)]).encode("utf-8"))
            h.update(tensor.raw_data)
        else:
            h.update(tensor.SerializeToString())
    h.update(json.dumps(meta, sort_keys=True).encode("utf-8"))
    for name, data in stats.items():
        h.update(name.encode("utf-8"))
        h.update(data)
    return h.hexdigest()


def write_step1(
    out_dir: Path,
    stem: str,
    model: onnx.ModelProto,
    observers: dict[str, HistogramObserver],
    meta: dict[str, Any],
    render_cfg,
) -> dict[str, Path]:
    """Write `<stem>.model`, `<stem>.data`, `<stem>.quantization.cfg` atomically, as one unit.

    `render_cfg(model_sha256) -> str` makes the cfg text once the model hash is known.
    An existing cfg that differs from what the previous step1 wrote is first copied
    to a timestamped `.bak`. If writing fails or is interrupted, the previous three
    files are left as they were. Returns the written paths (plus `backup` when one was made).
    """
    paths = step1_paths(out_dir, stem)
    names = list(observers)
    stats = {f"stats/{i}.{key}.npy": _npy_bytes(arr) for i, name in enumerate(names) for key, arr in observers[name].state().items()}
    with staging(out_dir) as tmp:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        props = [p for p in work.metadata_props if p.key != RUN_KEY]
        del work.metadata_props[:]
        work.metadata_props.extend(props)
        work.metadata_props.add(key=RUN_KEY, value=run_digest(work, dict(meta, stat_tensors=names), stats))
        try:
            # weights go to the data file; small tensors (a Resize's scales, a Reshape's shape) stay inline: ONNX Runtime
            # reads shape-giving inputs only from the model itself, so it could not load the temp model otherwise
            tag_external(work, paths["data"].name, min_bytes=1024)
            onnx.save_model(work, str(tmp / paths["model"].name))
            model_sha = sha256_file(tmp / paths["model"].name)
            cfg_text = render_cfg(model_sha)
            (tmp / paths["cfg"].name).write_text(cfg_text, encoding="utf-8")
            full_meta = dict(meta, format_version=FORMAT_VERSION, model_sha256=model_sha, cfg_sha256=sha256_text(cfg_text), stat_tensors=names)
            data_file = tmp / paths["data"].name
            if not data_file.exists():
                data_file.write_bytes(b"")
            # zlib level 1: the histograms deflate 2.6x faster than at the default 6, for 13 % more bytes
            # (small detector, 24 samples: 74 -> 28 ms of every step1)
            with zipfile.ZipFile(data_file, mode="a") as zf:
                zf.writestr(_zip_entry("meta.json"), json.dumps(full_meta, sort_keys=True), compresslevel=1)
                for name, data in stats.items():
                    zf.writestr(_zip_entry(name), data, compresslevel=1)
            written = dict(paths)
            backup = backup_if_edited(paths["cfg"], paths["data"])
            if backup:
                written["backup"] = backup
            publish_all([(tmp / paths[key].name, paths[key]) for key in ("data", "model", "cfg")], tmp)
        except OSError as exc:
            raise OutputError(
                f"Cannot write the step1 artifacts into '{out_dir}': {exc.strerror or exc}. "
                "Any previous artifacts there were left as they were; free some space or fix the permissions and re-run."
            ) from exc
    return written


def backup_if_edited(cfg: Path, data: Path, new_text: str | None = None) -> Path | None:
    """Copy an existing cfg to `<cfg>.<timestamp>.bak` before it is replaced, if it holds edits.

    No backup when the cfg is byte-identical to what step1 last wrote (nothing of the user's
    to lose), or to `new_text`, the text about to replace it (nothing changes).
    """
    if not cfg.is_file():  # missing, or a FIFO or device the write refuses (reading one could block)
        return None
    if new_text is not None and cfg.read_bytes() == new_text.encode("utf-8"):
        return None
    try:
        previous = read_meta(data).get("cfg_sha256")
    except InputError:
        previous = None
    if previous == sha256_file(cfg):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bak = cfg.with_name(f"{cfg.name}.{stamp}.bak")
    n = 1
    while bak.exists():
        bak = cfg.with_name(f"{cfg.name}.{stamp}-{n}.bak")
        n += 1
    shutil.copy2(cfg, bak)
    return bak


def read_meta(data_path: Path) -> dict[str, Any]:
    """The metadata in a `.data` artifact; InputError if the file is not one."""
    try:
        with zipfile.ZipFile(data_path) as zf:
            return json.loads(zf.read("meta.json"))
    except FileNotFoundError:
        raise InputError(f"Data file '{data_path}' does not exist. step1 writes it beside the .model file.") from None
    except IsADirectoryError:
        raise InputError(f"Data file '{data_path}' is a directory. Pass the <name>.data file written by step1.") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        why = {zipfile.BadZipFile: "it holds no step1 statistics", KeyError: "it has no step1 metadata",
               json.JSONDecodeError: "its step1 metadata is damaged"}.get(type(exc), str(exc))
        raise InputError(f"'{data_path}' is not a hybridq .data artifact ({why}). Pass the <name>.data file written by step1, or re-run step1.") from None


_KINDS = {"model": "the ONNX model", "data": "the data file", "cfg": "the cfg"}
_SLOTS = {"model": "the model (<name>.model)", "data": "the data file (<name>.data)", "cfg": "the cfg (<name>.quantization.cfg)"}


def artifact_kind(path: Path) -> str | None:
    """What a step1 artifact is by its content, whatever its name: 'model', 'data', 'cfg', or None.

    'data' holds the weights and then a zip; 'model' is ONNX protobuf, whose first field is ir_version (tag 0x08);
    'cfg' is UTF-8 text naming quantize_parameters or custom_quantize_layers.
    """
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if zipfile.is_zipfile(path):
            return "data"
    except OSError:
        return None
    if head[:1] == b"\x08":
        return "model"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    return "cfg" if "\0" not in text and ("quantize_parameters" in text or "custom_quantize_layers" in text) else None


def check_order(model_path: Path, data_path: Path, cfg_path: Path) -> None:
    """Refuse step1 artifacts given in the wrong places, naming each misplaced file (the order is MODEL DATA CFG)."""
    given = {"model": Path(model_path), "data": Path(data_path), "cfg": Path(cfg_path)}
    wrong = [f"{_KINDS[kind]} '{path}' where {_SLOTS[slot]} goes"
             for slot, path in given.items() if (kind := artifact_kind(path)) not in (None, slot)]
    if wrong:
        raise InputError(
            f"The step1 artifacts are out of order: you passed {', '.join(wrong[:-1])}{' and ' if len(wrong) > 1 else ''}{wrong[-1]}. "
            "The order is MODEL DATA CFG: hybridq step2 <name>.model <name>.data <name>.quantization.cfg -o OUT.onnx."
        )


def _check_readable(model_path: Path) -> None:
    """A temp model that is no ONNX (truncated, overwritten) is named as such, not as one from another run."""
    try:
        read_onnx(model_path, load_external_data=False)
    except ModelError as exc:
        raise InputError(
            f"Temp model '{model_path}' could not be read as ONNX ({type(exc.__cause__).__name__}); it is truncated or corrupt. "
            "Re-run step1 to write it again (your cfg edits are kept in a .bak)."
        ) from None


def read_step1(model_path: str | Path, data_path: str | Path, cfg_model_sha: str | None, cfg_path: str | Path) -> Step1Bundle:
    """Load and cross-check the artifacts; a file in the wrong place or from another run is named."""
    model_path, data_path = Path(model_path), Path(data_path)
    check_order(model_path, data_path, Path(cfg_path))
    if not model_path.is_file():
        state = "is not a file" if model_path.exists() else "does not exist"
        raise InputError(f"Temp model '{model_path}' {state}. Pass the <name>.model written by step1.")
    if data_path.exists() and not data_path.is_file():  # a FIFO would be read forever; a missing file is read_meta's to name
        raise InputError(f"Data file '{data_path}' is not a file. Pass the <name>.data written by step1.")
    meta = read_meta(data_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactMismatchError(f"'{data_path}' has format version {meta.get('format_version')}, this hybridq reads {FORMAT_VERSION}. Re-run step1.")
    try:
        model_sha = sha256_file(model_path)
    except OSError as exc:
        raise InputError(f"Temp model '{model_path}' cannot be read: {exc.strerror or exc}.") from None
    data_sha = meta.get("model_sha256")
    if model_sha != data_sha:
        _check_readable(model_path)
        if cfg_model_sha == data_sha:
            culprit = f"'{model_path}' does not belong with the others"
        elif cfg_model_sha == model_sha:
            culprit = f"'{data_path}' does not belong with the others"
        else:
            culprit = f"'{model_path}', '{data_path}' and the cfg '{cfg_path}' all come from different runs"
        raise ArtifactMismatchError(
            f"The artifacts come from different step1 runs: {culprit} "
            f"(model hash {model_sha[:12]}, data file records {str(data_sha)[:12]}, cfg records {str(cfg_model_sha)[:12]}). "
            "Pass the .model, .data and .cfg written by the same step1 run, or re-run step1."
        )
    if cfg_model_sha is not None and cfg_model_sha != model_sha:
        raise ArtifactMismatchError(
            f"The cfg '{cfg_path}' was written for another model (it records hash {str(cfg_model_sha)[:12]}, '{model_path}' is "
            f"{model_sha[:12]}). Use the cfg from the same step1 run, or copy your edits into it."
        )
    try:
        model = onnx.load(str(model_path), load_external_data=False)
        for tensor in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_path.name
        external_data_helper.load_external_data_for_model(model, str(data_path.parent))
    except Exception as exc:
        raise InputError(f"Cannot read the temp model '{model_path}' with weights from '{data_path}': {exc}. Re-run step1.") from exc
    observers = {}
    with zipfile.ZipFile(data_path) as zf:
        for i, name in enumerate(meta.get("stat_tensors", [])):
            kind = observer_kind(name)
            state = {k: np.lib.format.read_array(io.BytesIO(zf.read(f"stats/{i}.{k}.npy"))) for k in kind.STATE_KEYS}
            observers[name] = kind.from_state(state)
    return Step1Bundle(model, observers, meta, model_path, data_path)


def edited_cfg_entries(out_dir: Path, stem: str) -> dict[str, Any] | None:
    """The entries the previous step1 wrote into `<stem>.quantization.cfg` when the user has edited that cfg since
    (the base their edits are measured from), else None (no cfg, no readable `.data`, or not edited)."""
    cfg, data = out_dir / f"{stem}.quantization.cfg", out_dir / f"{stem}.data"
    if not cfg.is_file() or not data.is_file():
        return None
    try:
        meta = read_meta(data)
    except InputError:
        return None
    return None if meta.get("cfg_sha256") == sha256_file(cfg) else meta.get("written_entries")


def why_edits_do_not_apply(cfg_header: dict[str, Any], old_entries: dict[str, Any], header: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why a user's edited cfg (its `hybridq:` header) cannot carry over to a new step1 run (None when it can): it must
    belong to the same temp model, and have been edited from the entries this run wrote again (same model, data, settings)."""
    def ranges(entries: Any) -> Any:  # ori_min/ori_max are for reference (a newer hybridq may write them differently)
        return {t: {k: v for k, v in e.items() if k not in ("ori_min", "ori_max")} for t, e in (entries or {}).items()}

    if ranges(json.loads(json.dumps(meta.get("written_entries")))) != ranges(old_entries):
        return "this run calibrated other ranges than the run it was edited from (another model, dataset, sample count or settings)"
    if cfg_header.get("model_sha256") != header.get("model_sha256"):
        return "its header's model_sha256 names another temp model than the one this run wrote"
    return None
