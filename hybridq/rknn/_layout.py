"""RKNN-Toolkit2's accuracy_analysis folder, written from the snapshot hybridq's analysis dumped into the same folder.

The layout RKNN writes (../shared/rknn/*.snapshot_layout.txt; read back by :func:`hybridq.dumps.read_rknn_dump`):

    DIR/map_name_to_file.txt     fixed-width table: tensor name -> file name (`NAME.txt`)
    DIR/golden/NAME.txt          fp32 values, one `%f` per line (flattened NCHW)
    DIR/golden/npy/NAME.npy      the same tensor as float32, in the model tensor's own shape (NCHW)
    DIR/simulator/...            the quantized model's view of it (dequantised), same layout

NAME is the tensor name with `/` and `.` replaced by `_` (:func:`hybridq.dumps.file_stem`); two tensors that
would share a file get `_2`, `_3` ... in graph order, and the table says which is which.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .._fs import write_atomic
from ..dumps import MAP_FILE, file_stem
from ..snapshot import safe_names

TREES = (("golden", "fp32_file"), ("simulator", "quant_file"))
"""RKNN's folder and the snapshot file (of each analysed tensor) it is written from."""
NAME_WIDTH = 44
"""Column of the file name in map_name_to_file.txt (RKNN's table: `layer_name` padded to 44 characters)."""
TXT_CHUNK = 1 << 20
"""Values formatted at a time for a text file (bounds the memory a large tensor takes)."""
_SPACE = re.compile(r"\s")


def write_rknn_folder(out: Path, result: Any) -> dict[str, str]:
    """Write golden/, simulator/ and map_name_to_file.txt into `out` from the snapshot the analysis `result` dumped there.

    Each tensor with both arrays dumped is written as RKNN does, for the first sample (RKNN analyses one input):
    `npy/NAME.npy` in the tensor's own shape, float32, and `NAME.txt`, every value as `%f` on its own line. The text
    files are RKNN's too, and as large: about 2.3x the `.npy` size, hundreds of MB for a detector, and about 0.3 s
    per million values to write. Earlier golden/ and simulator/ folders and table are replaced; the table is
    written last, atomically. Returns {tensor name: file stem}, in graph order.
    """
    dumped: dict[str, Any] = {}
    for layer in result.layers:
        if all(getattr(layer, f) for _, f in TREES):
            dumped.setdefault(layer.tensor, layer)
    stems = _stems(list(dumped))
    (out / MAP_FILE).unlink(missing_ok=True)
    for tree, _ in TREES:
        if (out / tree).exists():
            shutil.rmtree(out / tree)
        (out / tree / "npy").mkdir(parents=True)
    for name, layer in dumped.items():
        stem = stems[name]
        for tree, field in TREES:
            arr = first_sample(out / getattr(layer, field))
            np.save(out / tree / "npy" / f"{stem}.npy", arr)
            with open(out / tree / f"{stem}.txt", "w", encoding="ascii") as fh:
                write_txt(fh, arr)
    write_atomic(out / MAP_FILE, name_table(stems))
    return stems


def first_sample(path: Path) -> np.ndarray:
    """Sample 0 of a snapshot array (samples stacked on axis 0), as float32 in the tensor's own shape."""
    return np.ascontiguousarray(np.load(path, mmap_mode="r", allow_pickle=False)[0], dtype=np.float32)


def write_txt(fh: TextIO, arr: np.ndarray) -> None:
    """The values of `arr`, flattened, one `%f` per line (what RKNN writes and np.genfromtxt / np.loadtxt read)."""
    flat = arr.reshape(-1)
    for i in range(0, flat.size, TXT_CHUNK):
        fh.write("".join(["%f\n" % v for v in flat[i:i + TXT_CHUNK].tolist()]))


def name_table(stems: dict[str, str]) -> str:
    """map_name_to_file.txt: a header, a row of dashes, then `name` padded to NAME_WIDTH and `stem.txt` per tensor."""
    rows = ["layer_name".ljust(NAME_WIDTH) + "file_name", "-" * 2 * NAME_WIDTH]
    rows += [f"{name:<{NAME_WIDTH - 1}} {stem}.txt" for name, stem in stems.items()]
    return "\n".join(rows) + "\n"


def _stems(names: list[str]) -> dict[str, str]:
    """RKNN's file stem of each name (:func:`hybridq.dumps.file_stem`, whitespace to `_` too: the table's last field
    is the file name), unique and cut to a file name's length as :func:`hybridq.snapshot.safe_names` makes them."""
    return safe_names(names, lambda name: _SPACE.sub("_", file_stem(name)))
