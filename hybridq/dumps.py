"""Tensors dumped by a device or another tool, read as data: RKNN-Toolkit2's accuracy_analysis folder and hybridq's snapshot layout.

The folder RKNN's `accuracy_analysis(output_dir=DIR)` writes (see ../shared/rknn/*.snapshot_layout.txt):

    DIR/map_name_to_file.txt     fixed-width table: tensor name -> file name (`NAME.txt`)
    DIR/golden/NAME.txt          fp32 values, one `%f` per line (flattened NCHW)
    DIR/golden/npy/NAME.npy      the same tensor as float32 NCHW
    DIR/simulator/...            the quantized model on RKNN's simulator (dequantised), same layout
    DIR/runtime/...              the model on a board (only with `target=`), same layout

File names are tensor names with `/` and `.` replaced by `_`; the table maps them back, so names
are looked up there, never recovered from file names. Nothing here knows hybridq's analysis:
`read_rknn_dump` returns where each tensor is, `compare_rknn_dump` the metrics of each pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import METRIC_NAMES, Metrics, sample_metrics

MAP_FILE = "map_name_to_file.txt"
TREES = ("golden", "simulator", "runtime")
"""The sub-folders RKNN writes: fp32 reference, simulator, and (with a board) the device."""


def file_stem(name: str) -> str:
    """The file stem RKNN uses for a tensor name: `/` and `.` replaced by `_` (`batch_norm_0.tmp_2` -> `batch_norm_0_tmp_2`)."""
    return name.replace("/", "_").replace(".", "_")


def read_name_map(path: str | Path) -> dict[str, str]:
    """`map_name_to_file.txt` as {tensor name: file stem}, in the table's order.

    The table has a header row (`layer_name  file_name`), a row of dashes, then one row per
    tensor; the file name is the last field of a row, the tensor name everything before it.
    A row with one field is an InputError naming the file and line.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"'{p}' does not exist. Pass the folder RKNN's accuracy_analysis(output_dir=...) wrote; it holds {MAP_FILE}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"'{p}' cannot be read: {exc}.") from None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        text = line.strip()
        if not text or set(text) <= {"-", " "} or text.split()[:2] == ["layer_name", "file_name"]:
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise InputError(f"{p}:{i}: expected 'tensor_name  file_name.txt', got {text!r}. Restore the file RKNN wrote.")
        name, fname = parts[0].strip(), parts[1]
        out[name] = fname[:-4] if fname.endswith(".txt") else fname
    return out


@dataclass
class RknnTensor:
    """One tensor of an RKNN dump: its name, file stem and the file of each tree (None where absent)."""

    name: str
    stem: str
    golden: Path | None = None
    simulator: Path | None = None
    runtime: Path | None = None

    def path(self, tree: str) -> Path | None:
        """The file of `tree` ('golden', 'simulator' or 'runtime')."""
        return getattr(self, tree)

    def load(self, tree: str) -> np.ndarray | None:
        """The tensor of `tree` as float32 (NCHW from `.npy`, flat from `.txt`), None where absent."""
        path = self.path(tree)
        return None if path is None else load_array(path)


@dataclass
class RknnDump:
    """What an RKNN accuracy_analysis folder holds, in the order of its name table."""

    root: Path
    tensors: dict[str, RknnTensor]
    has_runtime: bool
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_array(path: str | Path) -> np.ndarray:
    """A dumped tensor as float32: `.npy` as stored, `.txt` (one value per line) flat."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.float32, ndmin=1)
    except (OSError, ValueError) as exc:
        raise InputError(f"'{p}' is not a readable tensor dump ({exc}). Re-run RKNN's accuracy_analysis or delete the file.") from None
    return np.asarray(arr, dtype=np.float32)


def _find(root: Path, tree: str, stem: str) -> Path | None:
    for cand in (root / tree / "npy" / f"{stem}.npy", root / tree / f"{stem}.txt"):
        if cand.is_file():
            return cand
    return None


def read_rknn_dump(directory: str | Path) -> RknnDump:
    """Index an RKNN accuracy_analysis folder: per tensor name, the files of golden, simulator and runtime.

    Names come from `map_name_to_file.txt`; without it, from the file stems of `golden/npy/`
    (said in `notes`: `/` and `.` cannot be told from `_` then). `.npy` is preferred over `.txt`.
    Tensors of the table with no golden file are listed in `missing` and left out.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"'{root}' is not a directory. Pass the folder RKNN's accuracy_analysis(output_dir=...) wrote (golden/, simulator/, {MAP_FILE}).")
    if not (root / "golden").is_dir():
        raise InputError(f"'{root}' has no golden/ folder: it is not an RKNN accuracy_analysis output. Pass the output_dir given to accuracy_analysis().")
    notes: list[str] = []
    if (root / MAP_FILE).is_file():
        names = read_name_map(root / MAP_FILE)
    else:
        stems = sorted({p.stem for p in (root / "golden" / "npy").glob("*.npy")} | {p.stem for p in (root / "golden").glob("*.txt")})
        names = {s: s for s in stems}
        notes.append(f"{root / MAP_FILE} is missing: tensors are named by their file names ('/' and '.' shown as '_').")
    has_runtime = (root / "runtime").is_dir()
    tensors: dict[str, RknnTensor] = {}
    missing: list[str] = []
    for name, stem in names.items():
        t = RknnTensor(name, stem, *(_find(root, tree, stem) for tree in TREES))
        if t.golden is None:
            missing.append(name)
            continue
        tensors[name] = t
    return RknnDump(root, tensors, has_runtime, missing, notes)


@dataclass
class RknnLayerMetrics:
    """Errors of one dumped tensor: golden vs simulator, golden vs runtime, simulator vs runtime (None where a tree lacks it)."""

    name: str
    shape: tuple[int, ...]
    simulator: Metrics | None
    runtime: Metrics | None
    runtime_vs_simulator: Metrics | None


def _metrics(ref: np.ndarray | None, test: np.ndarray | None, name: str, what: str) -> Metrics | None:
    if ref is None or test is None:
        return None
    if ref.size != test.size:
        raise InputError(f"Tensor '{name}': {what} hold {ref.size} and {test.size} values; the dumps come from different models or inputs.")
    values = sample_metrics(ref, test)
    return Metrics(*values, per_sample={k: [v] for k, v in zip(METRIC_NAMES, values)})


def compare_rknn_dump(dump: RknnDump | str | Path) -> list[RknnLayerMetrics]:
    """Per tensor (table order), the metrics of golden vs simulator, golden vs runtime and simulator vs runtime.

    Each pair uses `hybridq.metrics` (cosine, euclid, snr_db, max_abs) on the flattened tensors
    (RKNN's accuracy_analysis runs one input, so each Metrics holds one sample). A tree without
    the tensor gives None for its pairs; a size mismatch is an InputError naming the tensor.
    """
    d = dump if isinstance(dump, RknnDump) else read_rknn_dump(dump)
    out = []
    for name, t in d.tensors.items():
        golden, sim, rt = t.load("golden"), t.load("simulator"), t.load("runtime")
        out.append(RknnLayerMetrics(
            name, tuple(golden.shape),
            _metrics(golden, sim, name, "golden and simulator"),
            _metrics(golden, rt, name, "golden and runtime"),
            _metrics(sim, rt, name, "simulator and runtime"),
        ))
    return out


def first_divergence(layers: list[RknnLayerMetrics], cos_threshold: float = 0.99) -> RknnLayerMetrics | None:
    """The first tensor (table order, which is RKNN's execution order) where runtime and simulator part:
    simulator-vs-runtime cosine below `cos_threshold`. None when they agree everywhere (or no runtime)."""
    for le in layers:
        if le.runtime_vs_simulator is not None and not le.runtime_vs_simulator.cosine >= cos_threshold:
            return le
    return None


@dataclass
class DeviceDump:
    """Tensors a device (or another runtime) computed, read from a folder: per tensor name, its file.

    ``layout`` is ``"hybridq"`` (a snapshot: ``manifest.json`` and ``quant/<stem>.npy`` with the
    samples stacked on axis 0; the quant arrays are the device's) or ``"rknn"`` (the ``runtime/``
    tree of an RKNN accuracy_analysis folder: one sample).
    """

    root: Path
    layout: str
    files: dict[str, Path]
    notes: list[str] = field(default_factory=list)

    def sample(self, name: str, index: int) -> np.ndarray | None:
        """Sample `index` of tensor `name` as float32, or None when the dump does not hold that sample."""
        path = self.files[name]
        if self.layout == "rknn":
            return load_array(path) if index == 0 else None
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"'{path}' is not a readable tensor dump ({exc}). Re-write the folder or delete the file.") from None
        return np.asarray(arr[index], dtype=np.float32) if index < arr.shape[0] else None


def _snapshot_files(root: Path) -> dict[str, Path]:
    """{tensor: quant file} of a hybridq snapshot's manifest (tensors without a dumped quant file left out)."""
    import json

    path = root / "manifest.json"
    try:
        tensors = json.loads(path.read_text(encoding="utf-8"))["tensors"]
        quant = {str(name): t.get("quant") for name, t in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"'{path}' is not a hybridq snapshot manifest ({exc!r}). Write the folder with `hybridq analyze ... --dump DIR`.") from None
    return {name: root / q for name, q in quant.items() if q and (root / q).is_file()}


def read_device_dump(directory: str | Path) -> DeviceDump:
    """Index a folder of device tensors: a hybridq snapshot (its quant arrays) or an RKNN folder's runtime/ tree.

    A folder that is neither, or an RKNN folder without runtime/ (RKNN writes it only with a board
    attached, `accuracy_analysis(target=...)`), is an InputError saying what to pass.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"--runtime '{root}': no such directory. Pass a runtime name or a folder of device tensors "
                         "(a hybridq snapshot, or RKNN's accuracy_analysis output_dir with a runtime/ folder).")
    if (root / "manifest.json").is_file():
        files = _snapshot_files(root)
        if not files:
            raise InputError(f"'{root}' is a hybridq snapshot without arrays (written with --max-bytes 0?); re-write it with arrays.")
        return DeviceDump(root, "hybridq", files)
    if (root / "golden").is_dir() or (root / MAP_FILE).is_file():
        d = read_rknn_dump(root)
        if not d.has_runtime:
            raise InputError(f"'{root}' is an RKNN accuracy_analysis folder without runtime/: RKNN writes the board's tensors only "
                             "with accuracy_analysis(target='rk3588', ...) and a connected board. Pass a folder that has them.")
        files = {name: t.runtime for name, t in d.tensors.items() if t.runtime is not None}
        return DeviceDump(root, "rknn", files, list(d.notes))
    raise InputError(f"'{root}' holds no device tensors: it has neither manifest.json (a hybridq snapshot) nor golden/ and "
                     f"{MAP_FILE} (RKNN's accuracy_analysis output). Pass one of those folders.")
