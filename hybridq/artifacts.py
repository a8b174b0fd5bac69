"""The three step1 artifacts on disk, written atomically and bound together by hashes.

`<name>.model` is the temp model with its weights as ONNX external data in
`<name>.data`. After the weights, `<name>.data` carries a zip archive (readable
from the file's end) with `meta.json` (format version, hash of `<name>.model`,
hash of the cfg as written, the preparation report) and the statistics of every
observed tensor. ONNX readers use only the weights' offsets, so the file stays
valid external data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import ArtifactMismatchError, InputError, OutputError
from .observers import HistogramObserver

FORMAT_VERSION = 1


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


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside the outputs, removed afterwards whatever happens."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hybridq-", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"Cannot write into '{out_dir}': {exc.strerror or exc}. Choose a writable --out directory.") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(src: Path, dst: Path) -> None:
    """Move a finished file into place atomically (same filesystem)."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(src, 0o666 & ~umask)
    os.replace(src, dst)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temp file in the same directory and rename it into place."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(Exception):
            os.unlink(tmp)
        raise OutputError(f"Cannot write '{path}': {exc.strerror or exc}. Check the directory exists, is writable and has space.") from exc


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Save a model atomically; models over 2 GB get their weights in `<path>.data` beside it."""
    path = Path(path)
    with staging(path.parent) as tmp:
        target = tmp / path.name
        try:
            if model.ByteSize() > 1_900_000_000:
                onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
                publish(tmp / (path.name + ".data"), path.parent / (path.name + ".data"))
            else:
                onnx.save_model(model, str(target))
            publish(target, path)
        except OSError as exc:
            raise OutputError(f"Cannot write '{path}': {exc.strerror or exc}. Check the directory is writable and has space.") from exc


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


def write_step1(
    out_dir: Path,
    stem: str,
    model: onnx.ModelProto,
    observers: dict[str, HistogramObserver],
    meta: dict[str, Any],
    render_cfg,
) -> dict[str, Path]:
    """Write `<stem>.model`, `<stem>.data`, `<stem>.quantization.cfg` atomically.

    `render_cfg(model_sha256) -> str` makes the cfg text once the model hash is known.
    An existing cfg that differs from what the previous step1 wrote is first copied
    to a timestamped `.bak`. Returns the written paths (plus `backup` when one was made).
    """
    paths = {
        "model": out_dir / f"{stem}.model",
        "data": out_dir / f"{stem}.data",
        "cfg": out_dir / f"{stem}.quantization.cfg",
    }
    with staging(out_dir) as tmp:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        try:
            onnx.save_model(
                work, str(tmp / paths["model"].name), save_as_external_data=True, all_tensors_to_one_file=True,
                location=paths["data"].name, size_threshold=0,
            )
            model_sha = sha256_file(tmp / paths["model"].name)
            cfg_text = render_cfg(model_sha)
            (tmp / paths["cfg"].name).write_text(cfg_text, encoding="utf-8")
            names = list(observers)
            full_meta = dict(meta, format_version=FORMAT_VERSION, model_sha256=model_sha, cfg_sha256=sha256_text(cfg_text), stat_tensors=names)
            data_file = tmp / paths["data"].name
            if not data_file.exists():
                data_file.write_bytes(b"")
            with zipfile.ZipFile(data_file, mode="a", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("meta.json", json.dumps(full_meta, sort_keys=True))
                for i, name in enumerate(names):
                    for key, arr in observers[name].state().items():
                        zf.writestr(f"stats/{i}.{key}.npy", _npy_bytes(arr))
        except OSError as exc:
            raise OutputError(f"Cannot write the step1 artifacts into '{out_dir}': {exc.strerror or exc}. Check free space and permissions.") from exc
        written = dict(paths)
        backup = backup_if_edited(paths["cfg"], paths["data"])
        if backup:
            written["backup"] = backup
        for key in ("data", "model", "cfg"):
            publish(tmp / paths[key].name, paths[key])
    return written


def backup_if_edited(cfg: Path, data: Path) -> Path | None:
    """Copy an existing cfg to `<cfg>.<timestamp>.bak` unless it is byte-identical to what step1 last wrote."""
    if not cfg.exists():
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
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise InputError(f"'{data_path}' is not a hybridq .data artifact ({exc}). Pass the <name>.data file written by step1, or re-run step1.") from None


def read_step1(model_path: str | Path, data_path: str | Path, cfg_model_sha: str | None, cfg_path: str | Path) -> Step1Bundle:
    """Load and cross-check the artifacts; a mismatch names the file that does not belong."""
    model_path, data_path = Path(model_path), Path(data_path)
    if not model_path.exists():
        raise InputError(f"Temp model '{model_path}' does not exist. Pass the <name>.model written by step1.")
    meta = read_meta(data_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactMismatchError(f"'{data_path}' has format version {meta.get('format_version')}, this hybridq reads {FORMAT_VERSION}. Re-run step1.")
    model_sha = sha256_file(model_path)
    data_sha = meta.get("model_sha256")
    if model_sha != data_sha:
        culprit = f"'{model_path}'" if cfg_model_sha == data_sha else f"'{data_path}'"
        raise ArtifactMismatchError(
            f"The artifacts come from different step1 runs: {culprit} does not belong with the others "
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
            state = {k: np.lib.format.read_array(io.BytesIO(zf.read(f"stats/{i}.{k}.npy"))) for k in ("scalars", "ints", "counts")}
            observers[name] = HistogramObserver.from_state(state)
    return Step1Bundle(model, observers, meta, model_path, data_path)
