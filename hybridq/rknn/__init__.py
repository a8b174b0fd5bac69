"""`from hybridq.rknn import RKNN`: RKNN-Toolkit2's Python API on top of hybridq, for ONNX models.

Scripts written for `from rknn.api import RKNN` (Rockchip's step1.py / step2.py /
accuracy_analysis examples) run with only the import line changed. Every method
keeps RKNN-Toolkit2 2.x's argument names and defaults, returns 0 on success and -1
on failure (`inference` returns the outputs, or None), and prints RKNN-style log
lines: `E <method>: <message>` and `W <method>: <message>` on stderr always,
`I <method>: <message>` only with `RKNN(verbose=True)`. The messages are hybridq's
own (the ones its CLI prints), so a failure names the file, line, layer or value.

Nothing here quantizes: each call maps its arguments onto `hybridq.step1`,
`hybridq.step2` and `hybridq.analyze` (hybridq/api.py) and runs the result in
ONNX Runtime. What maps to what, and what differs, is in docs/coming-from-rknn.md.

The package: :mod:`._facade` holds the `RKNN` class (one method per RKNN method,
each calling hybridq's API), :mod:`._translate` the tables that map RKNN's
names and values onto hybridq's, :mod:`._hybrid` the `custom_hybrid` pairs
resolved on the temp model before step1 writes anything, :mod:`._report` the
log lines said of step1's and step2's results, :mod:`._layout` the folder
accuracy_analysis writes in RKNN's layout.
"""

from __future__ import annotations

from ._facade import RKNN
from ._translate import NPU_ONLY_OPTIONS, QUANTIZED_ALGORITHMS, QUANTIZED_DTYPES, UNSUPPORTED_DTYPES, UNSUPPORTED_METHODS

__all__ = ["NPU_ONLY_OPTIONS", "QUANTIZED_ALGORITHMS", "QUANTIZED_DTYPES", "RKNN", "UNSUPPORTED_DTYPES", "UNSUPPORTED_METHODS"]
