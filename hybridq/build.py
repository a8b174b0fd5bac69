"""The one way from statistics + settings + edits to a QDQ model: fix -> plan -> resolve -> apply.

step2, the proposal and the RKNN facade all call `build` with data: the settings
and an `Edits` (layer precisions, per-tensor cfg values, channel equalization,
bias corrections). `edits_from_cfg` turns a parsed cfg into that data, resolving
layer names of the original or the temp model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from . import bias_correction, equalize, infinite, recurrent, targets
from ._onnx import GraphIndex
from .config import Cfg, CfgEntry, short_float
from .errors import ConfigError, did_you_mean
from .int4 import apply_int4
from .observers import HistogramObserver
from .placement import CostTable
from .plan import ABSORBED_ACTIVATIONS, GraphView, QuantPlan, absorbed_output, make_plan
from .qdq import QdqMap, RewriteResult, apply_plan
from .resolve import Resolution, activation_entry, listed_qparams, resolve, weight_entry
from .settings import Settings


@dataclass
class Edits:
    """What a cfg (or a proposal candidate) asks beyond the settings, as data keyed by temp-model names."""

    layers: dict[str, str] = field(default_factory=dict)
    entries: dict[str, CfgEntry] = field(default_factory=dict)
    equalize: dict[str, list[float]] = field(default_factory=dict)
    bias_correction: dict[str, list[float]] = field(default_factory=dict)

    def with_entries(self, values: dict[str, dict[str, Any]], model: onnx.ModelProto) -> Edits:
        """A copy whose entries for these tensors are replaced by `values` (line 0: not from a file), fixes included."""
        out = Edits(dict(self.layers), dict(self.entries), dict(self.equalize), dict(self.bias_correction))
        for t, v in values.items():
            out.take(CfgEntry(t, 0, dict(v)), model, "proposal")
        return out

    def take(self, entry: CfgEntry, model: onnx.ModelProto, where: str) -> None:
        """Set one entry, and the channel fixes it carries (equalize on its tensor, bias_correction on its weight's layer)."""
        t, v = entry.name, entry.values
        old = self.entries.get(t)
        if old is not None and "bias_correction" in old.values and "bias_correction" not in v:
            self.bias_correction.pop(weight_reader(model, t) or "", None)  # the new entry drops the correction
        self.entries[t] = entry
        self.equalize.pop(t, None)
        if "equalize" in v:
            self.equalize[t] = [float(x) for x in v["equalize"]]
        node = weight_reader(model, t) if "bias_correction" in v else None
        if "bias_correction" in v and node is None:
            raise ConfigError(f"{where}:{entry.line}: bias_correction is given on '{t}', which is not a layer's weight; remove it.")
        if node is not None:
            self.bias_correction[node] = [float(x) for x in v["bias_correction"]]


@dataclass
class LayerResolution:
    """What one custom_quantize_layers entry resolved to."""

    entry: str
    node: str
    requested: str
    effective: str
    how: str


@dataclass
class Built:
    """A QDQ model and how it was made."""

    rewrite: RewriteResult
    plan: QuantPlan
    resolution: Resolution
    fixed: onnx.ModelProto = field(repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        return self.rewrite.model


def initializer_arrays(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """The named initializers as arrays."""
    wanted = set(names)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def written_entries(
    plan: QuantPlan, model: onnx.ModelProto, observers: dict[str, HistogramObserver], settings: Settings,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The quantize_parameters step1 writes for a plan (activations from statistics, weights from the weights), and the
    scale/zero_point each member of a shared group has alone (the entries list the group's; step2 unites its own groups).

    A tensor whose readers saturate is ranged within that interval (targets.floored); its ori_min/ori_max stay the observed range.
    """
    entries: dict[str, dict[str, Any]] = {}
    within = targets.floored(observers, plan.floors)
    for t, tp in plan.tensors.items():
        entries[t], _ = activation_entry(tp, within[t], settings)
        if within[t] is not observers[t]:
            entries[t]["ori_min"], entries[t]["ori_max"] = [short_float(observers[t].min)], [short_float(observers[t].max)]
    own = _list_shared(plan, entries, within)
    arrays = initializer_arrays(model, plan.weights)
    for w, wp in plan.weights.items():
        entries[w], _ = weight_entry(wp, arrays[w])
    return entries, own


def _list_shared(plan: QuantPlan, entries: dict[str, dict[str, Any]], observers: dict[str, HistogramObserver]) -> dict[str, dict[str, Any]]:
    """Give every member of a shared group the parameters step2 builds it with (targets.shared_params of the listed ones):
    the lender's min/max, or the range the group's union maps onto; each member's ori_min/ori_max stay its own.
    Returns each member's own scale/zero_point, which step2 reads for an unedited member (its groups may differ)."""
    listed = {t: qp for t in plan.tensors if (qp := listed_qparams(entries[t])) is not None}
    shared = targets.shared_params(plan.shared, listed, targets.degenerate(listed, observers))
    own = {t: {k: entries[t][k] for k in ("scale", "zero_point")} for group in plan.shared for t in group if t in listed}
    for group in plan.shared:
        for t in (m for m in group if m in listed):
            qp = shared[t]
            lender = next((m for m in group if listed.get(m) is qp), None)
            lo, hi = (entries[lender]["min"], entries[lender]["max"]) if lender else ([short_float(r)] for r in targets.represented(qp))
            entries[t].update(min=list(lo), max=list(hi), scale=[short_float(float(s)) for s in np.ravel(qp.scale)],
                              zero_point=[int(z) for z in np.ravel(qp.zero_point)])
    return own


def resolve_layer_names(
    custom: dict[str, str], lines: dict[str, int], where: str, model: onnx.ModelProto, meta: dict[str, Any],
) -> tuple[dict[str, str], list[LayerResolution]]:
    """Map each custom_quantize_layers key (node or output tensor, original or temp model) to a temp-model node."""
    index = GraphIndex(model.graph)
    nodes = index.by_name
    producer = {t: index.nodes[k].name for t, k in index.producer.items()}
    original = meta.get("original_nodes", {})
    fused = meta.get("fused", {})
    renamed = meta.get("renamed", {})
    inputs = {i.name for i in model.graph.input}
    out: dict[str, str] = {}
    resolved: list[LayerResolution] = []
    view = functools.cache(lambda: GraphView(model))
    for key, prec in custom.items():
        line = lines.get(key, 0)
        if key in nodes:
            node, how = key, "node name"
        elif key in producer:
            node, how = producer[key], "output tensor"
        elif (now := _renamed(key, renamed, nodes, f"{where}:{line}")) is not None:
            node, how = now, f"original node renamed to '{now}'"
        elif key in fused and fused[key]:
            node, how = fused[key], f"original node fused into '{fused[key]}'"
        elif key in original and any(o in producer for o in original[key]):
            node = next(producer[o] for o in original[key] if o in producer)
            how = f"original node, now '{node}'"
        elif (now := _now_producing(key, original, nodes, fused)) is not None:
            node, how = now
        elif key in fused or key in original:  # gone from the temp model: folded into a constant, or an Identity dropped
            raise ConfigError(f"{where}:{line}: custom_quantize_layers entry '{key}' is a node of the original model that step1's "
                              "graph optimization removed (folded into a constant, as step1's summary lists, or a no-op it "
                              "dropped), so the temp model has no layer there to set; remove the entry.")
        elif key in inputs:
            raise ConfigError(f"{where}:{line}: '{key}' is a model input, not a layer; name the first layer that reads it instead.")
        elif any(i.name == key for i in model.graph.initializer):
            readers = [n.name for n in index.consumer_nodes(key)]
            layer = f"the layer that reads it ({', '.join(readers)})" if readers else "a layer instead"
            raise ConfigError(f"{where}:{line}: custom_quantize_layers entry '{key}' is a weight (an initializer of the model), "
                              f"not a layer; name {layer}.")
        else:
            candidates = list(nodes) + list(producer)
            raise ConfigError(
                f"{where}:{line}: custom_quantize_layers entry '{key}' is neither a node nor a tensor of the model."
                f"{did_you_mean(key, candidates)} Names of the original model and of the temp model both work."
            )
        for n, via in [(node, how), *_absorbing(node, index, view)]:
            if n in out and out[n] != prec:
                raise ConfigError(f"{where}:{line}: '{key}' resolves to node '{n}', which another entry already sets to {out[n]}; keep one.")
            out[n] = prec
            resolved.append(LayerResolution(key, n, prec, "", via))
    return out, resolved


def _renamed(key: str, renamed: dict[str, Any], nodes: Mapping[str, Any], where: str) -> str | None:
    """The temp-model name of an original node step1 renamed (None: not renamed); a name several nodes shared is refused."""
    names = [n for n in ([renamed[key]] if isinstance(renamed.get(key), str) else renamed.get(key, [])) if n in nodes]
    if len(names) > 1:
        raise ConfigError(f"{where}: '{key}' named {len(names)} nodes of the original model, which the temp model calls "
                          f"{', '.join(repr(n) for n in names)}; name the one you mean (or its output tensor).")
    return names[0] if names else None


def _now_producing(tensor: str, original: dict[str, list[str]], nodes: Mapping[str, Any], fused: dict[str, str]) -> tuple[str, str] | None:
    """The temp-model node that an original output tensor's producer became (a Conv's output that a BatchNorm fold renamed)."""
    was = next((n for n, outs in original.items() if tensor in outs), None)
    now = was if was in nodes else fused.get(was or "") or None
    if not now:
        return None
    return now, f"output tensor of the original node '{was}'" + (f", now '{now}'" if now != was else " (its output tensor was renamed)")


def _absorbing(node: str, index: GraphIndex, view: Callable[[], GraphView]) -> list[tuple[str, str]]:
    """The layer a Relu/Clip `node` is fused into (its output is that layer's quantized output), as one more resolution:
    RKNN users, and the cfg's own comments, name a Conv+Relu layer by the Relu's output tensor."""
    act = index.by_name[node]
    if act.op_type not in ABSORBED_ACTIVATIONS or not act.input:
        return []
    k = index.producer.get(act.input[0])
    prev = index.nodes[k] if k is not None else None
    if prev is None or prev.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return []
    if absorbed_output(prev, view()) != act.output[0]:
        return []
    return [(prev.name, f"layer whose {act.op_type} '{node}' is fused into it (one layer: both take the precision)")]


def weight_reader(model: onnx.ModelProto, weight: str) -> str | None:
    """The Conv/Gemm/MatMul whose weight input is the initializer `weight` (where a bias correction on its entry applies)."""
    if not any(i.name == weight for i in model.graph.initializer):
        return None
    return next((n.name for n in model.graph.node
                 if n.op_type in bias_correction.CORRECTABLE and len(n.input) > 1 and n.input[1] == weight), None)


def edits_from(layers: dict[str, str], entries: dict[str, CfgEntry], model: onnx.ModelProto, where: str) -> Edits:
    """Edits from resolved layer precisions and cfg entries, with the channel fixes the entries carry."""
    edits = Edits(dict(layers))
    for e in entries.values():
        edits.take(e, model, where)
    return edits


def edits_from_cfg(cfg: Cfg, model: onnx.ModelProto, meta: dict[str, Any]) -> tuple[Edits, list[LayerResolution]]:
    """The cfg as build data: resolved layer precisions, entries, and the channel fixes its entries carry."""
    layers, resolved = resolve_layer_names(cfg.custom, cfg.custom_lines, str(cfg.path), model, meta)
    return edits_from(layers, cfg.entries, model, str(cfg.path)), resolved


def _equalize_sites(model: onnx.ModelProto, scales: dict[str, list[float]], where: str) -> list[tuple[equalize.Site, list[float]]]:
    """Each equalization site once: the views of one tensor (ONNX Runtime's reshapes before each Gemm) carry the same
    scales, applied once; different scales on them are refused."""
    sites: dict[str, tuple[equalize.Site, list[float]]] = {}
    g = GraphView(model)
    for tensor, s in scales.items():
        site = equalize.find_site(model, tensor, g)
        if isinstance(site, str):
            raise ConfigError(f"{where}: 'equalize' on '{tensor}' cannot be applied: {site}. Remove the key from its entry.")
        first = sites.setdefault(site.producer, (site, s))
        if first[1] != s:
            raise ConfigError(f"{where}: 'equalize' on '{tensor}' and on '{first[0].tensor}' differ, but both rescale the "
                              f"output of '{site.producer}' (one is a view of the other): give them the same list, or remove both.")
    return list(sites.values())


def record_equalized(model: onnx.ModelProto, temp: onnx.ModelProto, sites: list[tuple[equalize.Site, list[float]]]) -> None:
    """Note in ``model``'s QDQ map every tensor an equalization divides, with its scales: analyze multiplies them back
    before comparing with fp32, and divides the fp32 tensors a layer alone reads (its weights carry the scales)."""
    g = GraphView(temp)
    qmap = QdqMap.from_model(model) or QdqMap()
    for site, scales in sites:
        qmap.equalized.update({t: (axis, [float(x) for x in scales]) for t, axis in site.carriers(g).items()})
    qmap.write_to(model)


def apply_fixes(model: onnx.ModelProto, edits: Edits, where: str = "cfg",
                sites: list[tuple[equalize.Site, list[float]]] | None = None) -> onnx.ModelProto:
    """The temp model with equalization scales and bias corrections applied (one copy when there are any); ``sites``:
    the equalization sites of ``edits`` when the caller found them already."""
    # A layer that runs in float computes its fp32 output: a correction of its int8 error would add one.
    shifts = {k: np.asarray(v) for k, v in edits.bias_correction.items() if edits.layers.get(k) not in ("float16", "float32")}
    if not edits.equalize and not shifts:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for site, scales in sites if sites is not None else _equalize_sites(model, edits.equalize, where):
        try:
            equalize.apply_in_place(work, site, np.asarray(scales))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}; fix or remove the 'equalize' key of '{site.tensor}'.") from None
    if shifts:
        try:
            bias_correction.apply_in_place(work, shifts)
        except ValueError as exc:
            raise ConfigError(f"{where}: bias_correction cannot be applied: {exc}. Remove the key from that weight's entry.") from None
    return work


def measured_costs(meta: dict[str, Any], settings: Settings) -> CostTable | None:
    """step1's measured cost table, when it measured one and the settings still place by measured cost."""
    return CostTable.from_dict(meta["cost"]) if meta.get("cost") and settings.cost_model == "measured" else None


def plan_for(
    model: onnx.ModelProto, settings: Settings, edits: Edits, written: dict[str, dict[str, Any]], costs: CostTable | None = None,
) -> QuantPlan:
    """The plan for these edits: layer precisions and per-tensor dtype/qmethod edits (only keys that differ from step1's)."""
    tensor_dtype = {t: e.values["dtype"] for t, e in edits.entries.items() if "dtype" in e.values and e.values["dtype"] != written.get(t, {}).get("dtype")}
    weight_method = {t: e.values["qmethod"] for t, e in edits.entries.items()
                     if "qmethod" in e.values and e.values["qmethod"] != written.get(t, {}).get("qmethod")}
    return make_plan(model, settings, edits.layers, tensor_dtype, weight_method, targets.get(settings.target).placement, costs)


def build(
    temp: onnx.ModelProto, observers: dict[str, HistogramObserver], meta: dict[str, Any], settings: Settings, edits: Edits,
    where: str = "cfg",
) -> Built:
    """Fix, plan, resolve parameters and rewrite: the one path from step1's state to a QDQ model."""
    sites = _equalize_sites(temp, edits.equalize, where) if edits.equalize else []
    fixed = apply_fixes(temp, edits, where, sites)
    written = meta.get("written_entries", {})
    plan = plan_for(fixed, settings, edits, written, measured_costs(meta, settings))
    for layer, why in infinite.touching(plan, observers).items():
        raise ConfigError(f"{where}: layer '{layer}' cannot be quantized ({why.removeprefix('float: ')}); "
                          "keep it float32 in custom_quantize_layers, as step1 wrote it.")
    written_settings = Settings(**meta.get("written_settings", {}))
    arrays = initializer_arrays(fixed, plan.weights)
    observers = targets.floored(observers, plan.floors)
    res = resolve(plan, edits.entries, written, observers, arrays, settings, written_settings, where, meta.get("shared_own", {}))
    edited = frozenset(res.edited)
    before, res.activations = res.activations, targets.shared_params(plan.shared, res.activations, targets.degenerate(res.activations, observers), edited)
    listed = {t: qp for group in plan.shared for t in group if (qp := listed_qparams(written.get(t, {}))) is not None}
    notes, warnings = targets.shared_edit_messages(plan.shared, before, res.activations, edited, where, listed)
    res.notes += notes
    res.warnings += warnings
    rewrite = apply_plan(fixed, plan, res.activations, res.weights)
    if sites:
        record_equalized(rewrite.model, temp, sites)
    recurrent.apply_in_place(rewrite.model, {n: lp.precision for n, lp in plan.layers.items()}, settings.qmethod == "channel")
    apply_int4(rewrite.model, fixed, plan, observers, settings, where)
    return Built(rewrite, plan, res, fixed)


def set_effective(built: Built, resolved: list[LayerResolution], settings: Settings, where: str, lines: Mapping[str, int]) -> None:
    """Each custom_quantize_layers entry's effective precision; a ConfigError for an integer request on a layer with no
    quantized form."""
    for r in resolved:
        lp = built.rewrite.layers.get(r.node)
        r.effective = (settings.dtype if lp["precision"] == "default" else lp["precision"]) if lp else "float32"
        if r.requested in ("uint8", "int8", "int16") and lp is None:
            op = next(n.op_type for n in built.fixed.graph.node if n.name == r.node)
            raise ConfigError(f"{where}:{lines.get(r.entry, 0)}: custom_quantize_layers['{r.entry}'] = {r.requested} has no effect: "
                              f"'{r.node}' ({op}) has no quantized form. Remove the entry.")


def moot_float_entries(built: Built, resolved: list[LayerResolution], edits: Edits, settings: Settings, meta: dict[str, Any],
                       where: str, lines: Mapping[str, int]) -> list[str]:
    """A warning per float32 entry that changes nothing: the plan without the float32 entries is the same around each of
    its nodes (a Mul inside a GELU chain, a Relu on a float stem)."""
    by_entry: dict[str, list[str]] = {}
    for r in resolved:
        if r.requested == "float32":
            by_entry.setdefault(r.entry, []).append(r.node)
    if not by_entry:
        return []
    floats = {n for names in by_entry.values() for n in names}
    rest = Edits({k: v for k, v in edits.layers.items() if k not in floats}, edits.entries, edits.equalize, edits.bias_correction)
    base = plan_for(built.fixed, settings, rest, meta.get("written_entries", {}), measured_costs(meta, settings))
    nodes = {n.name: n for n in built.fixed.graph.node}
    fused = targets.get(settings.target).placement.fused_patterns
    inner = fused(GraphView(built.fixed)) if fused else set()  # inside a chain computed as one op (a GELU's Mul)

    def around(plan: QuantPlan, name: str) -> tuple[bool, frozenset[str], frozenset[str]]:
        lp, io = plan.layers.get(name), set(nodes[name].input) | set(nodes[name].output)
        float_here = lp is None or lp.precision == "float32" or set(nodes[name].output) <= inner
        return float_here, frozenset(t for t in plan.tensors if t in io), frozenset(w for w in plan.weights if w in io)

    def unchanged(name: str) -> bool:
        return name in nodes and around(base, name) == around(built.plan, name)

    return [f"{where}:{lines.get(e, 0)}: custom_quantize_layers['{e}'] = float32 has no effect: "
            f"{', '.join(f'{n!r} ({nodes[n].op_type})' for n in names)} run(s) in float32 without it, with the same quantized "
            "tensors around; remove the entry, or list the layer that writes or reads the quantized tensor you meant."
            for e, names in by_entry.items() if all(unchanged(n) for n in names)]
