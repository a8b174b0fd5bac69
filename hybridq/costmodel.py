"""The `target: cpu` cost model: each quantizable layer timed on this CPU in fp32 and in int8, cached.

step1 builds two small models holding every candidate layer side by side, each on its own input
with the layer's real shapes: one fp32, one with the int8 form planned and rewritten exactly as
step2 would (Q on the input, the fused int8 kernel, DQ on the output). ONNX Runtime's profiler
times each node (1 thread); the layer's fp32 kernel, its int8 kernel and the Q and DQ it adds
at a float boundary go into a :class:`~hybridq.placement.CostTable`, with the whole fp32 model's
latency. The table is cached in the workspace, keyed by CPU, ONNX Runtime version, threads, the
model's structure and the input shapes; any change of key measures again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ._fs import write_atomic
from ._runtime import session
from .build import initializer_arrays
from .cost import concrete_shapes
from .graph import tensor_shapes
from .placement import CostTable
from .plan import ABSORBED_ACTIVATIONS, QUANTIZABLE, GraphView, absorbed_output, make_plan
from .qdq import apply_plan
from .qparams import compute_qparams
from .resolve import weight_entry
from .settings import Settings

FORMAT = 3
"""Bumped when what is measured changes: an older cache is measured again."""
THREADS = 1
"""Layers are timed on one thread: the per-core cost, which ranks int8 against fp32 at any thread count."""
RUNS = 7
"""Most profiled runs of each small model (the least time per node is kept: the run other work on the machine disturbed least)."""
BUDGET_S = 0.25
"""Time to spend on each timed model beyond its first run: fewer runs (3 at least) for large models."""
_TAG = re.compile(r"^hqc(\d+)(?:_|$)")


def cpu_id() -> str:
    """This CPU's model name and a digest of its feature flags (what int8 kernels ONNX Runtime can use)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.strip()
    except OSError:
        pass
    return f"{name} [flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}]" + (" avx512_vnni" if "avx512_vnni" in flags.split() else "")


def cache_key(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, object]:
    """What the measured costs depend on: CPU, ONNX Runtime, threads, the graph's structure and weight shapes, the input shapes."""
    import onnxruntime as ort

    h = hashlib.sha256()
    for n in model.graph.node:
        h.update(repr((n.op_type, n.name, list(n.input), list(n.output))).encode())
        for a in n.attribute:
            h.update(a.SerializeToString())
    for i in model.graph.initializer:
        h.update(repr((i.name, list(i.dims), i.data_type)).encode())
    return {
        "format": FORMAT, "cpu": cpu_id(), "onnxruntime": ort.__version__, "threads": THREADS, "model": h.hexdigest(),
        "shapes": {k: list(np.shape(v)) for k, v in sorted(sample.items())},
    }


def candidates(model: onnx.ModelProto, settings: Settings) -> list[str]:
    """Layers that run int8 by default when no placement policy keeps them float (what the cost model times)."""
    everything = dataclasses.replace(settings, float_stem=False, float_depthwise=False, float_pooled=False, cost_model="macs")
    plan = make_plan(model, everything)
    return [n for n, lp in plan.layers.items() if lp.precision == "default"]


@dataclasses.dataclass
class _Bench:
    """The side-by-side model: tag -> layer name, its input names (tag -> original), and the fp32 graph."""

    model: onnx.ModelProto
    layers: dict[int, str]
    inputs: dict[str, str]
    outputs: dict[int, str]
    feeds: dict[str, np.ndarray]


def _bench_model(model: onnx.ModelProto, names: list[str], shapes: dict[str, tuple]) -> _Bench:
    """Every layer in `names` with fully known input shapes, each on its own graph input, its output through an Identity."""
    g = GraphView(model)
    rng = np.random.default_rng(0)
    nodes, inputs, outputs, used_inits = [], [], [], set()
    bench = _Bench(onnx.ModelProto(), {}, {}, {}, {})
    for i, name in enumerate(names):
        node = g.by_name[name]
        slots = QUANTIZABLE[node.op_type](node, g)
        acts = {node.input[k] for k in slots.activations} if slots else set()
        if not slots or not all(all(isinstance(d, int) and d > 0 for d in shapes.get(t, (0,))) for t in acts):
            continue
        tag, copy = f"hqc{i}", onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = tag
        for k, t in enumerate(node.input):
            if t in acts:
                copy.input[k] = f"{tag}_x{k}"
                bench.inputs[copy.input[k]] = t
                inputs.append(helper.make_tensor_value_info(copy.input[k], onnx.TensorProto.FLOAT, list(shapes[t])))
                bench.feeds[copy.input[k]] = rng.standard_normal(shapes[t]).astype(np.float32)
            elif t:
                used_inits.add(t)
        del copy.output[1:]
        copy.output[0] = f"{tag}_y"
        nodes.append(copy)
        last, out = copy.output[0], absorbed_output(node, g)
        if out != node.output[0]:
            act = onnx.NodeProto()
            act.CopyFrom(g.producer_node(out))
            act.name, act.input[0], act.output[0] = f"{tag}_act", last, f"{tag}_a"
            used_inits.update(t for t in act.input[1:] if t)
            nodes.append(act)
            last = act.output[0]
        nodes.append(helper.make_node("Identity", [last], [f"{tag}_o"], name=f"{tag}_id"))
        outputs.append(helper.make_tensor_value_info(f"{tag}_o", onnx.TensorProto.FLOAT, None))
        bench.layers[i], bench.outputs[i] = name, out
    inits = [t for t in model.graph.initializer if t.name in used_inits]
    graph = helper.make_graph(nodes, "hybridq_cost", inputs, outputs, inits)
    mini = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    bench.model = onnx.shape_inference.infer_shapes(mini)
    return bench


def _int8_model(model: onnx.ModelProto, settings: Settings, costs: CostTable | None = None) -> onnx.ModelProto:
    """`model` with every candidate layer int8 (or those `costs` places int8), rewritten as step2 does.

    Activation ranges are made up (speed does not depend on them) but shaped like real ones: a Relu or
    Clip output starts at 0, so that ONNX Runtime folds the activation into the Q as it does after calibration.
    """
    everything = dataclasses.replace(settings, float_stem=False, float_depthwise=False, float_pooled=False, cost_model="macs")
    plan = make_plan(model, everything, costs=costs)
    g = GraphView(model)
    acts = {}
    for t, tp in plan.tensors.items():
        prod = g.producer_node(t)
        lo = 0.0 if prod is not None and prod.op_type in ABSORBED_ACTIVATIONS else -4.0
        acts[t] = compute_qparams(lo, 6.0 if lo == 0.0 else 4.0, tp.dtype, tp.symmetric)
    arrays = initializer_arrays(model, plan.weights)
    weights = {w: weight_entry(wp, arrays[w])[1] for w, wp in plan.weights.items()}
    return apply_plan(model, plan, acts, weights).model


def _profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[str, float]]:
    """Node name -> (op type as run, least kernel time in ms) over RUNS profiled runs, one thread."""
    with tempfile.TemporaryDirectory(prefix="hybridq-cost-") as tmp:
        sess = session(model, threads=THREADS, profile_prefix=os.path.join(tmp, "profile"))
        t0 = time.perf_counter()
        sess.run(None, feeds)
        for _ in range(_runs(time.perf_counter() - t0, 2, RUNS - 1)):
            sess.run(None, feeds)
        with open(sess.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    times: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            times.setdefault(node, (e.get("args", {}).get("op_name", ""), []))[1].append(e["dur"] / 1000.0)
    return {k: (op, min(v)) for k, (op, v) in times.items()}


def _models_ms(models: list[onnx.ModelProto], sample: dict[str, np.ndarray]) -> list[float]:
    """Least CPU time (ms) of a run of each whole model on the sample, one thread, runs interleaved.

    With one intra-op thread ONNX Runtime computes in the calling thread, so this thread's CPU time is the
    run's cost, which other work on a shared machine does not inflate as it does wall time.
    """
    sessions = [session(m, threads=THREADS) for m in models]
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, sample)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(_runs(time.perf_counter() - t0, 5, 50)):
        for s, held in zip(sessions, times):
            t0 = time.thread_time()
            s.run(None, sample)
            held.append(time.thread_time() - t0)
    return [min(t) * 1000.0 for t in times]


def _runs(first_s: float, least: int, most: int) -> int:
    """How many more runs fit in BUDGET_S after a first run that took `first_s`."""
    return int(min(most, max(least, BUDGET_S / max(first_s, 1e-6))))


def measure(model: onnx.ModelProto, sample: dict[str, np.ndarray], settings: Settings) -> CostTable:
    """Time every candidate layer of `model` (the temp model) in fp32 and int8 on this CPU, at the sample's shapes."""
    shapes = tensor_shapes(concrete_shapes(model, sample))
    bench = _bench_model(model, candidates(model, settings), shapes)
    table = CostTable(source=f"measured on {cpu_id()}, 1 thread")
    if bench.layers:
        fp32 = _profile(bench.model, bench.feeds)
        int8 = _profile(_int8_model(bench.model, settings), bench.feeds)
        _collect(bench, fp32, int8, table)
        table.model_fp32, table.model_int8 = _models_ms([model, _int8_model(model, settings)], sample)
    else:
        table.model_fp32 = _models_ms([model], sample)[0]
    return table


def _collect(bench: _Bench, fp32: dict[str, tuple[str, float]], int8: dict[str, tuple[str, float]], table: CostTable) -> None:
    """Sum the profiled nodes of each tagged layer into the table: fp32 kernel, int8 kernel, input Q, output DQ."""
    for node, (op, ms) in fp32.items():
        m = _TAG.match(node)
        if m and op != "Identity" and int(m.group(1)) in bench.layers:
            name = bench.layers[int(m.group(1))]
            table.fp32[name] = table.fp32.get(name, 0.0) + ms
    for node, (op, ms) in int8.items():
        m = _TAG.match(node)
        if not m or op == "Identity" or int(m.group(1)) not in bench.layers:
            continue
        i = int(m.group(1))
        name, tag = bench.layers[i], f"hqc{i}"
        source = next((src for inp, src in bench.inputs.items() if node.startswith(inp + "_")), None)
        if op == "QuantizeLinear" and source is not None:
            table.quantize[source] = max(table.quantize.get(source, 0.0), ms)
        elif op == "DequantizeLinear" and (node.startswith(tag + "_a_") or node.startswith(tag + "_y_")):
            table.dequantize[bench.outputs[i]] = ms
        else:
            table.int8[name] = table.int8.get(name, 0.0) + ms
    for name in bench.layers.values():
        table.fp32.setdefault(name, 0.0)
        table.int8.setdefault(name, 0.0)


def load_or_measure(model: onnx.ModelProto, sample: dict[str, np.ndarray], settings: Settings, cache: Path) -> tuple[CostTable, bool]:
    """The cached table when its key matches this CPU, ONNX Runtime, model and shapes; else measure and cache (atomically).

    Returns the table and whether it came from the cache.
    """
    key = cache_key(model, sample)
    try:
        held = json.loads(cache.read_text(encoding="utf-8"))
        if held.get("key") == key:
            return CostTable.from_dict(held["table"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    table = measure(model, sample, settings)
    try:
        write_atomic(cache, json.dumps({"key": key, "table": table.to_dict()}, sort_keys=True, indent=1), parents=True)
    except OSError:
        pass  # a read-only workspace: measured again next time
    return table, False


def cache_path(out_dir: Path, stem: str) -> Path:
    """Where step1 caches the cost table: a hidden file beside its artifacts (the workspace)."""
    return Path(out_dir) / f".{stem}.cost.json"


def for_step1(
    model: onnx.ModelProto, sample: dict[str, np.ndarray] | None, settings: Settings, out_dir: Path, stem: str,
) -> tuple[CostTable | None, list[str]]:
    """step1's cost table (None with ``cost_model: macs``, or when this model cannot be timed) and a note saying where it came from."""
    macs = "no layer was timed on this CPU; depthwise Convs stay float where they are >= 15 % of the compute."
    if settings.cost_model != "measured":
        return None, [f"cost model: MAC counts (cost_model: macs / --no-measure): {macs}"]
    if sample is None:
        return None, [f"cost model: MAC counts (no sample to time the layers on): {macs}"]
    cache = cache_path(out_dir, stem)
    t0 = time.perf_counter()
    try:
        table, reused = load_or_measure(model, sample, settings, cache)
    except Exception as exc:  # timing is an optimisation: a model ONNX Runtime cannot time in pieces is placed by MACs
        why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return None, [f"cost model: MAC counts (timing the layers failed: {why}): {macs}"]
    how = f"reused from {cache}" if reused else f"measured in {time.perf_counter() - t0:.1f} s, cached in {cache}"
    return table, [f"cost model: {len(table.int8)} layers timed in fp32 and int8 ({table.source}; {how})."]
