"""Another runtime beside the simulation: what it computes at the model outputs, against fp32 and against hybridq.

RKNN-Toolkit2's accuracy analysis with a board attached adds a `runtime_error` column; this is that
column for runtimes hybridq can drive itself. A runtime is an entry of the explicit RUNTIMES table:
`cpu` is ONNX Runtime's CPU provider with this CPU's default int8 kernels (on x86 without VNNI they
add pairs of products in a saturating int16: the deployment's figures, where the simulation is
exact); `openvino` is ONNX Runtime's OpenVINO provider, when installed. Per output: a runtime run as
a black box exposes no intermediate tensors without changing what it fuses. Per layer: tensors a
device dumped into a folder (`--runtime DIR`, read by hybridq.dumps), compared while the analysis
runs by :class:`DeviceSink`, with the fp32 and simulated arrays the analysis already computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from .. import _runtime
from ..dumps import DeviceDump, compare_rknn_dump, first_divergence, read_device_dump, read_rknn_dump
from ..errors import InputError
from ..metrics import Accumulator
from .measuring import differing, finite_part, nonfinite_note
from .results import AnalysisResult, LayerError, RuntimeRow


@dataclass(frozen=True)
class Runtime:
    """How to open a session of one runtime, and what to call it in tables."""

    label: str
    open: Callable[[onnx.ModelProto], Any]


def _cpu(model: onnx.ModelProto) -> Any:
    return _runtime.session(model, exact_int8=False, optimization="all")


def _openvino(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        raise InputError("--runtime openvino needs ONNX Runtime's OpenVINO provider, which is not installed here; "
                         "`pip install onnxruntime-openvino` (in place of onnxruntime) provides it.")
    return _runtime.session(model, exact_int8=False, optimization="all", provider="OpenVINOExecutionProvider")


RUNTIMES: dict[str, Runtime] = {
    "cpu": Runtime("ONNX Runtime CPU, this CPU's default int8 kernels", _cpu),
    "openvino": Runtime("ONNX Runtime OpenVINO provider", _openvino),
}


def runtime_for(spec: str) -> Runtime:
    """The RUNTIMES entry named `spec`; an unknown name is an InputError listing the valid ones."""
    if spec not in RUNTIMES:
        raise InputError(f"--runtime {spec!r} is not a runtime hybridq can run; use one of: {', '.join(RUNTIMES)} "
                         "or a folder of device tensors (a hybridq snapshot, or RKNN's accuracy_analysis folder with runtime/).")
    return RUNTIMES[spec]


def compare_runtime(fp32: onnx.ModelProto, quant: onnx.ModelProto, samples: Iterable[dict[str, np.ndarray]], spec: str
                    ) -> tuple[list[RuntimeRow], list[str]]:
    """Per model output: the runtime against fp32 and against hybridq's exact simulation, pooled over the samples; and
    notes. As analyze's own output table does: an integer or bool output (an ArgMax, a mask) is compared value for value,
    in a note, not by cosine; non-finite values (an attention mask's -inf) are left out of the figures and counted."""
    runtime = runtime_for(spec)
    device = runtime.open(quant)
    simulator = _runtime.session(quant, exact_int8=True, optimization="all")
    reference = _runtime.session(fp32, optimization="all")
    names = [o.name for o in device.get_outputs()]
    vs_fp32 = {n: Accumulator() for n in names}
    vs_sim = {n: Accumulator() for n in names}
    exact: dict[str, list[int]] = {}  # integer output -> [differ from fp32, differ from the simulation, values]
    nonfinite: dict[str, list[int]] = {}
    for feeds in samples:
        ref = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
        sim = simulator.run(names, feeds)
        for name, got, sim_value in zip(names, device.run(names, feeds), sim):
            if not np.issubdtype(got.dtype, np.floating):
                counts = exact.setdefault(name, [0, 0, 0])
                counts[0] += differing(ref[name], got) if name in ref else 0
                counts[1] += differing(sim_value, got)
                counts[2] += int(got.size)
                continue
            for acc, base in ((vs_fp32[name], ref.get(name)), (vs_sim[name], sim_value)):
                if base is None:
                    continue
                if not (np.isfinite(base).all() and np.isfinite(got).all()):
                    (pair,), (agree, differ) = finite_part(base, [got])
                    if acc is vs_fp32[name]:
                        seen = nonfinite.setdefault(name, [0, 0, 0])
                        seen[0], seen[1], seen[2] = seen[0] + agree, seen[1] + differ, seen[2] + 1
                    base, got_part = pair
                    acc.add(base, got_part)
                else:
                    acc.add(base, got)
    rows = [RuntimeRow(n, runtime.label, vs_fp32[n].result(), vs_sim[n].result()) for n in names if n not in exact]
    notes = [f"runtime column: output '{n}' is integer, compared value for value: {a} of {total} value(s) differ from fp32's, "
             f"{b} from the simulation's" for n, (a, b, total) in exact.items()]
    return rows, notes + ([nonfinite_note(nonfinite)] if nonfinite else [])


def is_device_folder(spec: str) -> bool:
    """Does `spec` name a folder of device tensors rather than a runtime of the RUNTIMES table?"""
    from pathlib import Path

    return spec not in RUNTIMES and (Path(spec).is_dir() or "/" in spec or "\\" in spec)


class DeviceSink:
    """A SampleSink that compares each dumped device tensor with the analysis' fp32 and simulated arrays, per layer.

    Sample i of the dump is compared with sample i of the analysis (RKNN's folders hold one sample:
    the first line of the dataset must be the input the board ran). Tensors the dump lacks have no
    row; dumped tensors the analysis does not measure, and size mismatches, are listed in notes.
    """

    def __init__(self, device: DeviceDump, label: str) -> None:
        self.device, self.label = device, label
        self.names: list[str] = []
        self.unmatched: list[str] = []
        self.index = 0
        self.acc: dict[str, tuple[Accumulator, Accumulator]] = {}
        self.mismatched: dict[str, str] = {}

    def start(self, tensors: list[str]) -> None:
        """Keep the measured tensors the device dumped, in graph order."""
        self.names = [t for t in tensors if t in self.device.files]
        self.unmatched = [t for t in self.device.files if t not in set(tensors)]
        if self.unmatched and not self.names:  # tensors of another model: a runtime column of nothing, said in a note only
            shown = ", ".join(repr(t) for t in self.unmatched[:3]) + (" ..." if len(self.unmatched) > 3 else "")
            raise InputError(f"None of the {len(self.unmatched)} tensors dumped in the --runtime folder ({shown}) is a tensor "
                             f"this analysis compares (e.g. {', '.join(repr(t) for t in tensors[:3])}): is the folder from "
                             "this model? Dump the device tensors of the model you analyse, named as in its graph.")
        self.acc = {t: (Accumulator(), Accumulator()) for t in self.names}

    def add_sample(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Compare this sample's device tensors with fp32 and with the simulation."""
        for t in self.names:
            if t in self.mismatched or t not in arrays:
                continue
            got = self.device.sample(t, self.index)
            if got is None:
                continue
            ref, sim = arrays[t]
            if got.size != ref.size:
                self.mismatched[t] = f"{t}: device {got.shape}, model {tuple(ref.shape)}"
                continue
            got = got.reshape(ref.shape)
            self.acc[t][0].add(ref, got)
            self.acc[t][1].add(sim, got)
        self.index += 1

    def finish(self, result: AnalysisResult) -> None:
        """Record one runtime row per compared layer, and notes on what could not be compared."""
        rows = [RuntimeRow(t, self.label, a.result(), b.result()) for t, (a, b) in self.acc.items() if t not in self.mismatched]
        result.runtime = [r for r in rows if r.vs_fp32.per_sample["cosine"]]  # tensors with at least one compared sample
        notes = list(self.device.notes)
        if self.unmatched:
            notes.append(f"{len(self.unmatched)} dumped tensor(s) match no compared tensor of the model: "
                         + ", ".join(self.unmatched[:6]) + (" ..." if len(self.unmatched) > 6 else ""))
        if self.mismatched:
            notes.append("dumped tensor(s) of another size, not compared: " + "; ".join(list(self.mismatched.values())[:4]))
        if result.runtime:
            n = max(len(r.vs_fp32.per_sample["cosine"]) for r in result.runtime)
            notes.append(f"runtime column: {self.label}, {len(result.runtime)} layer(s) over {n} sample(s) "
                         "(sample i of the dump against sample i of the dataset).")
        result.notes.extend(notes)

    def abort(self) -> None:
        """Nothing was written."""


def device_runtime(path: str) -> DeviceSink:
    """The sink that compares the device tensors of folder `path` (hybridq.dumps.read_device_dump)."""
    dump = read_device_dump(path)
    return DeviceSink(dump, f"device tensors in {dump.root} ({dump.layout} layout)")


def runtime_column(runtime: str | None, fm: onnx.ModelProto, qm: onnx.ModelProto,
                   samples: Callable[[], Iterable[dict[str, np.ndarray]]]) -> tuple[DeviceSink | None, Callable[[AnalysisResult], None] | None]:
    """What `--runtime` adds to an analysis: a sink comparing a device folder per layer, or a step that compares a
    named runtime per output once the analysis ran. An unknown name fails here, before the analysis runs."""
    if runtime is None:
        return None, None
    if is_device_folder(runtime):
        return device_runtime(runtime), None
    runtime_for(runtime)

    def then(result: AnalysisResult) -> None:
        result.runtime, notes = compare_runtime(fm, qm, samples(), runtime)
        result.notes.extend(notes)
    return None, then


def rknn_folder_result(root: Path) -> AnalysisResult:
    """RKNN's dumps as an analysis result (one sample, entire error = golden vs simulator)."""
    dump = read_rknn_dump(root)
    rows = compare_rknn_dump(dump)
    layers = [LayerError(tensor=m.name, layer=m.name, op_type="", shape=tuple(m.shape), dtype="float32",
                         entire=m.simulator, single=None) for m in rows if m.simulator is not None]
    notes = [f"RKNN-Toolkit2 accuracy_analysis folder {root}: golden vs simulator, one sample."] + list(dump.notes)
    if dump.missing:
        notes.append(f"{len(dump.missing)} tensor(s) listed without a golden file: {', '.join(dump.missing[:6])}")
    if dump.has_runtime:
        first = first_divergence(rows)
        notes.append(f"runtime/ (the board): first tensor where it departs from the simulator: {first.name}"
                     if first is not None else "runtime/ (the board) agrees with the simulator on every tensor")
    runtime = [RuntimeRow(m.name, f"RKNN board tensors ({root / 'runtime'})", m.runtime, m.runtime_vs_simulator)
               for m in rows if m.runtime is not None and m.runtime_vs_simulator is not None]
    if layers:  # the folder lists tensors, not which of them the model outputs
        notes.append(f"RKNN's folder does not say which tensors are the model's outputs: the verdict judges the last one in "
                     f"graph order, {layers[-1].tensor}; read the table for the others (a model with several outputs).")
    return AnalysisResult(layers, [layers[-1].tensor] if layers else [], 1, notes, runtime=runtime)
