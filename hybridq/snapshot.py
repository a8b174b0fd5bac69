"""Snapshots of an analysis: arrays, ``manifest.json``, read back without running a model.

Layout of a snapshot directory ``DIR``::

    DIR/manifest.json        AnalysisResult.to_dict(): per tensor its layer, op type,
                             shape, dtype, files ("fp32", "quant": paths relative to DIR,
                             null when not dumped), metrics ("entire", "single") and, for
                             model outputs, "slices" (per-slice cosine and SNR)
    DIR/fp32/<safe>.npy      the fp32 tensor, samples stacked on axis 0
    DIR/quant/<safe>.npy     the quantized model's view of it, same layout

The manifest is strict JSON: a non-finite metric value (an infinite SNR of two
identical tensors, say) is written as ``null`` and listed under the top-level
``"nonfinite"`` object, which maps its JSON Pointer to ``"inf"``, ``"-inf"`` or
``"nan"`` (:func:`hybridq.metrics.to_strict_json`); manifests that wrote such
values as those strings are still read. A dump writes the whole snapshot (arrays, manifest,
reports) into a stage inside ``DIR`` (``.hybridq-snapshot-<pid>-*``), then swaps it in for
the older one with renames (:func:`hybridq._fs.swap_files`): interrupted or failed, ``DIR``
keeps the older snapshot whole; files the snapshot did not write stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from hashlib import sha1
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import onnx

from ._fs import JOURNAL, TEMP_PREFIX, pid_alive, publish, roll_back, swap_files, write_atomic
from .analysis.results import AnalysisResult
from .errors import InputError, OutputError, did_you_mean

MANIFEST = "manifest.json"
STAGE_PREFIX = f"{TEMP_PREFIX}snapshot-"
"""Start of the stage a dump writes its snapshot into, inside DIR: then the process id and ``-``."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 120


def safe_names(names: list[str], stem_of: Callable[[str], str] | None = None) -> dict[str, str]:
    """File stems for tensor names: characters outside ``[A-Za-z0-9._-]`` become ``_`` (or ``stem_of(name)``).

    Deterministic in the order given: a stem already taken (compared without
    case, for case-insensitive file systems) gets ``_2``, ``_3``, ...; long
    names are cut to _MAX_STEM bytes and keep a short hash of the full name; a stem that would be
    empty or start with a dot starts with ``_``.
    """
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = stem_of(name) if stem_of is not None else _UNSAFE.sub("_", name)
        if len(stem.encode()) > _MAX_STEM:
            stem = stem.encode()[:_MAX_STEM].decode(errors="ignore") + "_" + sha1(name.encode()).hexdigest()[:8]
        if not stem or stem.startswith("."):
            stem = "_" + stem
        cand, k = stem, 1
        while cand.lower() in taken:
            k += 1
            cand = f"{stem}_{k}"
        taken.add(cand.lower())
        out[name] = cand
    return out


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], total: int | None = None) -> bytes:
    """A version 1.0 ``.npy`` header, space-padded to ``total`` bytes (a multiple of 64)."""
    body = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(dtype),
        tuple(shape),
    )
    raw = body.encode("latin1")
    if total is None:
        total = -(-(10 + len(raw) + 1) // 64) * 64
    pad = total - 10 - len(raw) - 1
    if pad < 0:
        raise ValueError("npy header does not fit its reserved space")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", total - 10) + raw + b" " * pad + b"\n"


class _NpyAppender:
    """Appends samples to one ``.npy`` file; the header's sample count is fixed up at the end."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.count = 0
        # reserve room for any sample count up to 10**15
        self.reserved = len(_npy_header(self.dtype, (10**15, *self.shape)))
        self.fh: BinaryIO | None = open(self.tmp, "wb")
        self.fh.write(_npy_header(self.dtype, (0, *self.shape), self.reserved))

    def append(self, a: np.ndarray) -> None:
        assert self.fh is not None
        self.fh.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.count += 1

    def finish(self) -> None:
        assert self.fh is not None
        self.fh.seek(0)
        self.fh.write(_npy_header(self.dtype, (self.count, *self.shape), self.reserved))
        self.fh.close()
        self.fh = None
        publish(self.tmp, self.path)

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.tmp.unlink(missing_ok=True)


DISK_RESERVE = 1 << 30
"""Without --max-bytes a dump stops before it leaves less than this free on its disk (or 5 % of the disk, the larger):
a 640x640 detector writes 0.7 GB of arrays per sample, so 100 samples could fill a disk and fail the run."""
ORPHAN_AGE_S = 600.0  # a dump appends to its temp files sample by sample: one untouched this long is no live dump's


def _sweep_orphans(directory: Path) -> None:
    """Remove the `.<name>.npy.<pid>.tmp` files of a dump that was killed (SIGKILL skips our cleanup): no process of that
    id runs here and the file was not written for ORPHAN_AGE_S (a dump on another host sharing the disk keeps writing)."""
    now = time.time()
    for tmp in directory.glob(".*.npy.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        try:
            stale = now - tmp.stat().st_mtime > ORPHAN_AGE_S
        except OSError:
            continue
        if stale and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _newest(directory: Path) -> float:
    """The latest modification time of `directory` and anything under it."""
    times = [directory.stat().st_mtime]
    for p in directory.rglob("*"):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times)


def recover(root: Path) -> None:
    """Clear the stages that dumps into `root` left when killed (SIGKILL, a crash): a swap cut short between two renames is
    rolled back first, so `root` holds the older snapshot again. A stage of a live process, or one still being written
    (by another host, whose process looks dead here), stays."""
    now = time.time()
    for stage in root.glob(f"{STAGE_PREFIX}*"):
        pid = stage.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if not stage.is_dir() or not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if not (stage / JOURNAL).exists() and now - _newest(stage) <= ORPHAN_AGE_S:
            continue
        roll_back(root, stage)
        shutil.rmtree(stage, ignore_errors=True)


class ArrayDump:
    """Streams the fp32 and quant arrays of each sample into ``DIR/fp32`` and ``DIR/quant``.

    With ``max_bytes``: the tensors of the first sample are kept in graph
    order while they fit; each further sample is written only if all its kept
    tensors still fit; then writing stops. Metrics are unaffected; the result
    says what was left out (:attr:`AnalysisResult.dump_message`).

    Given to :func:`hybridq.analysis.analyze` as its
    :class:`~hybridq.analysis.results.SampleSink`: the engine calls
    :meth:`start`, :meth:`add_sample` per sample, then :meth:`finish` or
    :meth:`abort`; nothing is created before :meth:`start`. Everything is written
    into a stage inside ``DIR``; :meth:`commit` swaps it in, :meth:`abort` drops it.
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.names: dict[str, str] = {}
        self.order: list[str] = []
        self.max_bytes = max_bytes
        self.files: dict[str, tuple[_NpyAppender, _NpyAppender]] = {}
        self.kept: list[str] | None = None
        self.varying: list[str] = []  # tensors whose shape changed between samples: not written
        self.bytes = 0
        self.samples = 0
        self.seen = 0
        self.stopped = False
        self.made: list[Path] = []  # directories start() created: an aborted dump takes them back
        self.disk_cap: int | None = None  # without max_bytes: the bytes the disk can take and keep DISK_RESERVE free
        self.stage: Path | None = None  # the new snapshot is written under stage/new until commit()

    def start(self, tensors: list[str]) -> None:
        """Create ``DIR`` and the stage for ``tensors`` (graph order: the order kept under a cap)."""
        if self.max_bytes is not None and self.max_bytes < 0:
            raise InputError(f"--max-bytes must be >= 0, got {self.max_bytes}")
        self.names = safe_names(tensors)
        self.order = list(tensors)
        try:
            missing = [d for d in (self.root, *self.root.parents) if not d.exists()]
            for d in reversed(missing):
                d.mkdir()
                self.made.append(d)
            recover(self.root)
            self.stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=self.root))
            for sub in ("fp32", "quant"):
                (self.stage / "new" / sub).mkdir(parents=True)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot create the snapshot directory '{self.root}': {e.strerror or e}") from None
        for d in (self.root / "fp32", self.root / "quant"):
            if d.is_dir():
                _sweep_orphans(d)
        if self.max_bytes is None:
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(self.root)
                self.disk_cap = max(0, usage.free - max(DISK_RESERVE, usage.total // 20))

    def add_sample(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Append one sample: ``{tensor: (fp32 array, quant array)}``."""
        self.seen += 1
        if self.stopped:
            return
        cap = self.max_bytes if self.max_bytes is not None else self.disk_cap
        if self.kept is None:
            self.kept, total = [], 0
            for t in self.order:
                if t not in arrays:
                    continue
                need = arrays[t][0].nbytes + arrays[t][1].nbytes
                if cap is not None and total + need > cap:
                    break
                self.kept.append(t)
                total += need
            if not self.kept:
                self.stopped = True
                return
        else:
            self._drop_varying(arrays)
            need = sum(arrays[t][0].nbytes + arrays[t][1].nbytes for t in self.kept)
            if cap is not None and self.bytes + need > cap:
                self.stopped = True
                return
        assert self.stage is not None
        try:
            for t in self.kept:
                a, b = arrays[t]
                if t not in self.files:
                    stem = self.names[t]
                    self.files[t] = (
                        _NpyAppender(self.stage / "new" / "fp32" / f"{stem}.npy", a.dtype, a.shape),
                        _NpyAppender(self.stage / "new" / "quant" / f"{stem}.npy", b.dtype, b.shape),
                    )
                fa, fb = self.files[t]
                fa.append(a)
                fb.append(b)
                self.bytes += a.nbytes + b.nbytes
        except OSError as e:
            raise OutputError(f"cannot write the snapshot under '{self.root}': {e.strerror or e}") from None
        self.samples += 1

    def _drop_varying(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Stop writing a tensor this sample lacks or gives another shape (its length depends on the data, or it was not
        compared): one `.npy` per tensor holds samples of one shape. Its files go; the manifest says why."""
        assert self.kept is not None
        for t in [t for t in self.kept if t not in arrays or (t in self.files and (arrays[t][0].shape != self.files[t][0].shape
                                                                               or arrays[t][1].shape != self.files[t][1].shape))]:
            self.kept.remove(t)
            self.varying.append(t)
            for f in self.files.pop(t, ()):
                self.bytes -= f.count * int(np.prod(f.shape)) * f.dtype.itemsize
                f.abort()

    def finish(self, result: AnalysisResult) -> None:
        """Close the staged arrays and record their files and any cap message in ``result``; ``DIR`` is not touched
        (:meth:`commit` does it)."""
        try:
            for fa, fb in self.files.values():
                fa.finish()
                fb.finish()
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write the snapshot under '{self.root}': {e.strerror or e}") from None
        for layer in result.layers:
            if layer.tensor in self.files:
                stem = self.names[layer.tensor]
                layer.fp32_file = f"fp32/{stem}.npy"
                layer.quant_file = f"quant/{stem}.npy"
        result.dumped_samples = self.samples
        kept = len(self.files)
        total = len(result.layers)
        varying = (f"; {len(self.varying)} tensor(s) not written, their shape changing from sample to sample: "
                   + ", ".join(repr(t) for t in self.varying[:5]) + (" ..." if len(self.varying) > 5 else "")) if self.varying else ""
        if kept + len(self.varying) >= total and self.samples >= self.seen:
            result.dump_message = f"snapshot: {varying.removeprefix('; ')}" if varying else None
        else:
            left = [layer.tensor for layer in result.layers if layer.tensor not in self.files and layer.tensor not in self.varying]
            why = (f"snapshot capped at {self.max_bytes} bytes (--max-bytes)" if self.max_bytes is not None else
                   f"snapshot stopped to keep free space on the disk holding '{self.root}' (pass --max-bytes to choose the cap)")
            msg = (
                f"{why}: arrays written for "
                f"{kept} of {total} tensors and {self.samples} of {self.seen} samples "
                f"({self.bytes} bytes)"
            )
            if left:
                msg += f"; not written: {', '.join(repr(t) for t in left[:5])}" + (" ..." if len(left) > 5 else "")
            msg += varying + "; the metrics cover every tensor and sample"
            result.dump_message = msg

    def commit(self, result: AnalysisResult, reports: Callable[[Path], object] | None = None) -> None:
        """Write the manifest of ``result`` and, by ``reports(directory)``, the reports beside the staged arrays, then
        swap the whole snapshot in for the older one, whose arrays go even where this one does not write them again (a
        script reading fp32/*.npy would take them for this run's); other files stay."""
        assert self.stage is not None
        new = self.stage / "new"
        try:
            write_snapshot(result, new)
            if reports is not None:
                reports(new)
            staged = sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file() and p.name != MANIFEST)
            for d in (self.root / "fp32", self.root / "quant"):
                if not d.is_dir():
                    d.mkdir()
                    self.made.append(d)
            swap_files(self.root, self.stage, [*staged, MANIFEST], sorted(_snapshot_files(self.root)))
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write the snapshot under '{self.root}': {e.strerror or e}") from None
        stage, self.stage, self.made = self.stage, None, []
        shutil.rmtree(stage, ignore_errors=True)  # the older snapshot's files; a stage left here is cleared by recover()

    def abort(self) -> None:
        """Remove the stage of an interrupted dump, and the directories it created (when left empty): ``DIR`` is as before."""
        for fa, fb in self.files.values():
            fa.abort()
            fb.abort()
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        for d in reversed(self.made):
            with contextlib.suppress(OSError):
                d.rmdir()


def write_snapshot(result: AnalysisResult, directory: str | os.PathLike[str]) -> Path:
    """Write ``DIR/manifest.json`` for ``result`` (atomically); returns its path."""
    path = Path(directory) / MANIFEST
    text = json.dumps(result.to_dict(), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    write_atomic(path, text, parents=True)
    return path


def _snapshot_files(root: Path) -> set[str]:
    """The array files the snapshot in `root` lists, relative to it (none without a readable manifest), inside `root` only."""
    try:
        older = load_snapshot(root)
    except InputError:
        return set()
    inside = root.resolve()
    files = {root / f for layer in older.layers for f in (layer.fp32_file, layer.quant_file) if isinstance(f, str) and f}
    return {str(f.relative_to(root)) for f in files if f.resolve().parent.parent == inside and f.suffix == ".npy"}


def load_snapshot(directory: str | os.PathLike[str]) -> AnalysisResult:
    """Read a snapshot's manifest back into an :class:`AnalysisResult` (no model is run)."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise InputError(
            f"'{d}' is not a snapshot: '{path}' does not exist; create one with "
            "`hybridq analyze FLOAT QUANT --dataset D --dump DIR`"
        )
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read snapshot manifest '{path}': {e}") from None
    if not isinstance(data, dict) or data.get("format") != "hybridq-snapshot":
        raise InputError(f"'{path}' is not a hybridq snapshot manifest (no \"format\": \"hybridq-snapshot\")")
    if data.get("version") != 1:
        raise InputError(
            f"snapshot manifest '{path}' has version {data.get('version')!r}; this hybridq reads version 1"
        )
    try:
        return AnalysisResult.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"snapshot manifest '{path}' is damaged: bad or missing field {e}") from None


def load_arrays(directory: str | os.PathLike[str], tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """The dumped ``(fp32, quant)`` arrays of ``tensor``, samples on axis 0."""
    d = Path(directory)
    result = load_snapshot(d)
    for layer in result.layers:
        if layer.tensor == tensor:
            if layer.fp32_file is None or layer.quant_file is None:
                raise InputError(f"tensor {tensor!r} was not dumped in snapshot '{d}' ({result.dump_message})")
            return np.load(d / layer.fp32_file), np.load(d / layer.quant_file)
    raise InputError(
        f"snapshot '{d}' has no tensor {tensor!r}.{did_you_mean(tensor, [x.tensor for x in result.layers])}"
    )



def layer_keys(model: onnx.ModelProto) -> dict[tuple[str, str, str], tuple[int, ...] | None]:
    """(node name, op type, output) of every node of ``model``, with the output's static shape where inference gives one."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        shapes[vi.name] = tuple(d.dim_value for d in dims) if dims is not None and all(d.HasField("dim_value") for d in dims) else None
    return {(n.name, n.op_type, o): shapes.get(o) for n in model.graph.node for o in n.output}


def _reshaped_from(model: onnx.ModelProto) -> dict[str, set[tuple[str, str]]]:
    """Each tensor a reshape writes (matching.RESHAPES), with the (name, op) of the nodes whose outputs reach it through
    reshapes only: analyze lists a layer that ONNX Runtime wrapped in reshapes (MatMul + Add on a 3-D input -> Reshape,
    Gemm, Reshape) at the tensor after them."""
    from .analysis.matching import RESHAPES

    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, set[tuple[str, str]]] = {}
    for n in model.graph.node:
        if n.op_type not in RESHAPES or not n.input:
            continue
        found, cur, seen = set(), producer.get(n.input[0]), set()
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            found.add((cur.name, cur.op_type))
            cur = producer.get(cur.input[0]) if cur.op_type in RESHAPES and cur.input else None
        out.setdefault(n.output[0], set()).update(found)
    return out


def layers_for(directory: str | os.PathLike[str], model: onnx.ModelProto, cfg: str | os.PathLike[str]) -> tuple[dict[str, float], str | None]:
    """A snapshot's single-error cosines by layer, checked against the layers of the cfg's ``model``.

    A layer matches when a node of that name and op type writes its tensor, of its shape where the model's is
    static. A snapshot of another model would rank layers that are not there: none matching is an input
    error; more than half not matching returns a warning beside the cosines (a dump of an earlier model).
    """
    snap = load_snapshot(directory)
    keys = layer_keys(model)
    reshaped = _reshaped_from(model)
    single = {le.layer: le.single.cosine for le in snap.layers if le.single is not None}
    unknown = [le.layer for le in snap.layers if not (
        keys.get((le.layer, le.op_type, le.tensor), "absent") in (None, tuple(le.shape))
        or (le.layer, le.op_type) in reshaped.get(le.tensor, ()))]
    dumped = len(snap.layers)
    if dumped and len(unknown) == dumped:
        raise InputError(
            f"snapshot '{directory}' was dumped from another model: none of its {dumped} layers (e.g. '{unknown[0]}') "
            f"is a layer of the model of '{cfg}' (same name, op, output tensor and shape). Dump a snapshot of this cfg's "
            "model (hybridq analyze FLOAT QUANT --dataset D --dump DIR) or leave SNAP out, and the proposal measures the layers itself."
        )
    if 2 * len(unknown) > dumped:
        return single, (f"snapshot '{directory}': {len(unknown)} of its {dumped} layers (e.g. '{unknown[0]}') do not match the "
                        f"model of '{cfg}'; it may be a dump of an earlier model. The proposal ranks the layers by it all the same.")
    return single, None
