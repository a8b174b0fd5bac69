"""Apply a quantization plan with its parameters: the QDQ rewrite of the temp model.

Returns a new model and the name map (original tensor -> tensor holding its
quantized view, node -> effective precision), which is also stored in the
model's metadata under `hybridq.qdq_map` so analysis never parses names.
Generated names are a deterministic function of the source names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._onnx import QDQ_MAP_KEY, convert_opset, main_opset, read_names
from ._runtime import float_layers_between_qdq
from .errors import ConfigError, ModelError
from .graph import Namer, name_nodes
from .plan import GraphView, QuantPlan
from .qparams import QParams, quantize

INT32_LIMIT = 2**31 - 1
FLOAT32_INPUTS = {"Resize": (2,), "Upsample": (1,)}
"""Inputs that stay float32 in a float16 layer: their type is tensor(float) whatever the data's (Resize's scales)."""


@dataclass
class QdqMap:
    """What step2 stores in the model for analysis: original tensor -> its quantized view, layer -> op and precision.

    ``layers`` values are ``{"op": ..., "precision": ...}``; readers accept
    other entries (maps written by other versions) and skip what is not an
    object.
    """

    tensors: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, str]] = field(default_factory=dict)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> interval beyond which its readers saturate
    float_between_qdq: bool = False  # a float layer between Q/DQ stays float (an accelerator's fallback), not ORT's int8
    equalized: dict[str, tuple[int, list[float]]] = field(default_factory=dict)
    """tensor -> (channel axis from the end, scales): its channel c is fp32's divided by scales[c] (channel equalization)."""

    def to_json(self) -> str:
        """The metadata value: sorted keys, so the same map gives the same bytes (no `bounds` key when there is none)."""
        doc: dict[str, Any] = {"tensors": self.tensors, "layers": self.layers}
        if self.bounds:  # JSON has no infinity: an open side is null
            doc["bounds"] = {t: [v if math.isfinite(v) else None for v in b] for t, b in self.bounds.items()}
        if self.float_between_qdq:
            doc["float_between_qdq"] = True
        if self.equalized:
            doc["equalized"] = {t: {"axis": a, "scales": list(v)} for t, (a, v) in self.equalized.items()}
        return json.dumps(doc, sort_keys=True)

    def write_to(self, model: onnx.ModelProto) -> None:
        """Store the map in ``model``'s metadata (in place), replacing an older one."""
        props = [p for p in model.metadata_props if p.key != QDQ_MAP_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        model.metadata_props.add(key=QDQ_MAP_KEY, value=self.to_json())

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> QdqMap | None:
        """The map stored in ``model``, or None (a QDQ model made elsewhere); ModelError when it is malformed."""
        for p in model.metadata_props:
            if p.key != QDQ_MAP_KEY:
                continue
            try:
                m = json.loads(p.value)
            except json.JSONDecodeError as e:
                raise ModelError(
                    f"the quantized model's metadata '{QDQ_MAP_KEY}' is not valid JSON ({e}); "
                    "rebuild the model with `hybridq step2`"
                ) from None
            if not isinstance(m, dict) or not isinstance(m.get("tensors", {}), dict):
                raise ModelError(
                    f"the quantized model's metadata '{QDQ_MAP_KEY}' must be an object with a "
                    "'tensors' object; rebuild the model with `hybridq step2`"
                )
            layers, bounds = m.get("layers", {}), m.get("bounds", {})
            return cls(dict(m.get("tensors", {})), dict(layers) if isinstance(layers, dict) else {}, _bounds(bounds),
                       m.get("float_between_qdq") is True, _equalized(m.get("equalized")))
        return None


def _equalized(doc: Any) -> dict[str, tuple[int, list[float]]]:
    """`equalized` as written by :meth:`QdqMap.to_json`; entries of another shape are skipped."""
    out: dict[str, tuple[int, list[float]]] = {}
    for t, e in (doc.items() if isinstance(doc, dict) else ()):
        axis, scales = (e.get("axis"), e.get("scales")) if isinstance(e, dict) else (None, None)
        if isinstance(axis, int) and axis < 0 and isinstance(scales, list) and scales and all(isinstance(v, (int, float)) and v > 0 for v in scales):
            out[str(t)] = (axis, [float(v) for v in scales])
    return out


def _bounds(doc: Any) -> dict[str, tuple[float, float]]:
    """`bounds` as written by :meth:`QdqMap.to_json` (null: an open side); entries of another shape are skipped."""
    if not isinstance(doc, dict):
        return {}
    out = {}
    for t, b in doc.items():
        if isinstance(b, list) and len(b) == 2 and all(v is None or isinstance(v, (int, float)) for v in b):
            out[str(t)] = (-math.inf if b[0] is None else float(b[0]), math.inf if b[1] is None else float(b[1]))
    return out


@dataclass
class RewriteResult:
    """The quantized model and what the rewrite did."""

    model: onnx.ModelProto
    tensor_map: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _qparam_inits(names: tuple[str, str], qp: QParams) -> tuple[TensorProto, TensorProto]:
    """Scale (float32) and zero point (the integer dtype) initializers named `names`; scalars for per-tensor."""
    shape = (qp.scale.size,) if qp.axis is not None else ()
    scale = numpy_helper.from_array(qp.scale.astype(np.float32).reshape(shape), names[0])
    zp = numpy_helper.from_array(qp.zero_point.reshape(shape), names[1])
    return scale, zp


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a graph and its subgraphs use: new names must avoid all of them."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                names |= _names_in(sub)
    return names


def _needs_16bit(plan: QuantPlan) -> bool:
    return any(t.dtype in ("int16", "uint16") for t in plan.tensors.values()) or any(w.dtype == "int16" for w in plan.weights.values())


def _prepare_opset(model: onnx.ModelProto, sixteen: bool) -> tuple[onnx.ModelProto, str]:
    """16-bit Q/DQ need opset 21; upgrade when possible, else use ONNX Runtime's com.microsoft Q/DQ."""
    if not sixteen or main_opset(model) >= 21:
        return model, ""
    try:
        upgraded = convert_opset(model, 21)
        name_nodes(upgraded)  # the converter's new nodes (ReduceMean's axes as a Constant) come unnamed; "" means "at the top" here
        onnx.checker.check_model(upgraded)
        return upgraded, ""
    except Exception:
        if not any(i.domain == "com.microsoft" for i in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return model, "com.microsoft"


def apply_plan(
    model: onnx.ModelProto,
    plan: QuantPlan,
    act_params: dict[str, QParams],
    weight_params: dict[str, QParams],
) -> RewriteResult:
    """Rewrite a copy of `model`: Q/DQ on planned tensors, quantized weights and biases, fp16 layers wrapped in Casts."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work, ms_domain = _prepare_opset(work, _needs_16bit(plan))
    r = _Rewrite(work, plan, ms_domain)
    r.layers()
    r.activations(act_params)
    weight_params = r.bias_fitting(act_params, weight_params)
    r.weights(weight_params)
    r.biases(act_params, weight_params)
    fp16_nodes = r.float16_layers()
    r.assemble(fp16_nodes)
    result = r.result
    layers = {k: {"op": v["op"], "precision": v["precision"]} for k, v in result.layers.items()}
    QdqMap(result.tensor_map, layers, {t: b for t, b in plan.floors.items() if t in result.tensor_map}, plan.float_reads_quantized).write_to(work)
    if not plan.float_reads_quantized:
        for name in float_layers_between_qdq(work):
            result.notes.append(f"layer '{name}' is float between a DequantizeLinear and a QuantizeLinear: ONNX Runtime's CPU "
                                "provider quantizes its weights when it loads the model (WeightBiasQuantization) and runs it "
                                "int8, and analyze measures it so")
    result.model = work
    return result


class _Rewrite:
    """The pieces of one QDQ rewrite, collected section by section, then assembled once into ``work``.

    ``after[node]`` / ``before[node]`` are nodes inserted after / before a node (``""``: at the top),
    ``rewire[node][tensor]`` the tensor that node reads instead, ``new_inits`` and ``dropped_inits``
    the initializers added and removed.
    """

    def __init__(self, work: onnx.ModelProto, plan: QuantPlan, ms_domain: str) -> None:
        self.work, self.plan, self.ms_domain = work, plan, ms_domain
        self.g = GraphView(work)
        self.result = RewriteResult(work)
        self.new_inits: list[TensorProto] = []
        self.dropped_inits: set[str] = set()
        self.after: dict[str, list[onnx.NodeProto]] = {}
        self.before: dict[str, list[onnx.NodeProto]] = {}
        self.rewire: dict[str, dict[str, str]] = {}
        self.fresh = Namer(_names_in(work.graph))  # an input `x` beside a tensor `x_scale`: its scale is `x_scale#2`

    def fresh_all(self, base: str, *suffixes: str) -> tuple[str, ...]:
        """Fresh names for `base` + each suffix."""
        return tuple(self.fresh(f"{base}{s}") for s in suffixes)

    def qdq_domain(self, dtype: str) -> str:
        return self.ms_domain if dtype in ("int16", "uint16") else ""

    def layers(self) -> None:
        """Each planned layer's effective precision, in the result."""
        plan, g = self.plan, self.g
        for name, lp in plan.layers.items():
            node = g.by_name[name]
            eff = lp.precision
            if eff in ("default", "uint8", "int8", "int16"):
                # a layer fused behind its producer (npu: Conv -> Relu) has no quantized input: its output's dtype says
                dts = [plan.tensors[t].dtype for t in node.input if t in plan.tensors] or [
                    plan.tensors[t].dtype for t in node.output if t in plan.tensors]
                eff = "int16" if "int16" in dts or lp.precision == "int16" else (dts[0] if dts else lp.precision)
            self.result.layers[name] = {"op": lp.op, "precision": eff, "requested": lp.precision, "reason": lp.reason}

    def activations(self, act_params: dict[str, QParams]) -> None:
        """Activations: Q -> DQ right after the producer, readers rewired."""
        g, after, rewire = self.g, self.after, self.rewire
        for t, tp in self.plan.tensors.items():
            qp = act_params[t]
            s_name, zp_name, q_name, dq_name = self.fresh_all(t, "_scale", "_zero_point", "_quantized", "_dequantized")
            scale, zp = _qparam_inits((s_name, zp_name), qp)
            self.new_inits += [scale, zp]
            dom = self.qdq_domain(qp.dtype)
            q = helper.make_node("QuantizeLinear", [t, scale.name, zp.name], [q_name], name=f"{t}_QuantizeLinear", domain=dom)
            dq = helper.make_node("DequantizeLinear", [q.output[0], scale.name, zp.name], [dq_name], name=f"{t}_DequantizeLinear", domain=dom)
            prod = g.producer_node(t)
            after.setdefault(prod.name if prod is not None else "", []).extend([q, dq])
            for reader in tp.readers:
                rewire.setdefault(reader, {})[t] = dq.output[0]
            self.result.tensor_map[t] = dq.output[0]

    def weights(self, weight_params: dict[str, QParams]) -> None:
        """Weights: stored quantized, read through a DQ."""
        g = self.g
        for w, wp in self.plan.weights.items():
            qp = weight_params[w]
            arr = g.init_array(w)
            q_arr = quantize(arr, qp)
            q_name, s_name, zp_name, dq_name = self.fresh_all(w, "_quantized", "_scale", "_zero_point", "_dequantized")
            self.new_inits.append(numpy_helper.from_array(q_arr, q_name))
            scale, zp = _qparam_inits((s_name, zp_name), qp)
            self.new_inits += [scale, zp]
            attrs = {"axis": qp.axis} if qp.axis is not None else {}
            dq = helper.make_node("DequantizeLinear", [q_name, scale.name, zp.name], [dq_name], name=f"{w}_DequantizeLinear", domain=self.qdq_domain(qp.dtype), **attrs)
            self.after.setdefault("", []).append(dq)
            self.rewire.setdefault(wp.node, {})[w] = dq.output[0]
            if all(c.name == wp.node for c in g.consumer_nodes(w)):
                self.dropped_inits.add(w)

    def bias_fitting(self, act_params: dict[str, QParams], weight_params: dict[str, QParams]) -> dict[str, QParams]:
        """Weight scales raised where a layer's int32 bias (scale s_x * s_w) would overflow: a channel whose weights are
        near zero beside a bias of ordinary size. Kept float instead, such a bias is quantized by ONNX Runtime itself
        (its WeightBiasQuantization fuses the layer), saturated, unlike the model analysis measures (PP-OCR rec after
        bias correction: probabilities 0.012 apart). Those channels' weights round to fewer levels, or to zero."""
        out = dict(weight_params)
        for b, bp in self.plan.biases.items():
            if bp.activation not in act_params or bp.weight not in out:
                continue
            qp_w = out[bp.weight]
            s_x = float(np.asarray(act_params[bp.activation].scale, np.float64).reshape(-1)[0])
            bias = np.abs(self.g.init_array(b).astype(np.float64).reshape(-1))
            scale = np.asarray(qp_w.scale, np.float64).reshape(-1)
            if not s_x > 0 or (scale.size != 1 and scale.size != bias.size):
                continue  # biases() keeps such a bias float and says so
            need = bias / (s_x * INT32_LIMIT) * (1 + 1e-3)
            fitted = np.maximum(scale, need.max() if scale.size == 1 else need)
            if np.any(fitted > scale):
                out[bp.weight] = QParams(qp_w.dtype, fitted.astype(np.float32).reshape(np.shape(qp_w.scale)), qp_w.zero_point, qp_w.axis)
                self.result.notes.append(f"weight '{bp.weight}' of '{bp.node}': scale raised on {int(np.sum(fitted > scale))} "
                                         "channel(s) whose weights are near zero, so its bias fits int32")
        return out

    def biases(self, act_params: dict[str, QParams], weight_params: dict[str, QParams]) -> None:
        """Biases: int32 with scale = s_input * s_weight, when it fits."""
        g = self.g
        for b, bp in self.plan.biases.items():
            if bp.activation not in act_params or bp.weight not in weight_params:
                continue
            s_x, qp_w = act_params[bp.activation], weight_params[bp.weight]
            arr = g.init_array(b).reshape(-1).astype(np.float64)
            scale = (s_x.scale.astype(np.float64).reshape(()) * qp_w.scale.astype(np.float64)).reshape(-1)
            if scale.size == 1:
                scale = np.full(arr.shape, scale[0])
            if np.any(scale <= 0) or np.any(np.abs(np.rint(arr / scale)) > INT32_LIMIT):
                self.result.notes.append(f"bias '{b}' of '{bp.node}' would overflow int32; kept float")
                continue
            q_arr = np.rint(arr / scale).astype(np.int32).reshape(g.inits[b].dims)
            q_name, s_name, zp_name, dq_name = self.fresh_all(b, "_quantized", "_scale", "_zero_point", "_dequantized")
            self.new_inits.append(numpy_helper.from_array(q_arr, q_name))
            self.new_inits.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
            self.new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int32), zp_name))
            dq = helper.make_node("DequantizeLinear", [q_name, s_name, zp_name], [dq_name], name=f"{b}_DequantizeLinear", axis=0)
            self.after.setdefault("", []).append(dq)
            self.rewire.setdefault(bp.node, {})[b] = dq.output[0]
            if all(c.name == bp.node for c in g.consumer_nodes(b)):
                self.dropped_inits.add(b)

    def float16_layers(self) -> set[str]:
        """Float16 layers: Cast in, fp16 weights, Cast out. Returns their names."""
        g, rewire = self.g, self.rewire
        fp16_nodes = {n for n, lp in self.plan.layers.items() if lp.precision == "float16"}
        halves: dict[str, str] = {}  # one fp16 copy of a weight, however many float16 layers read it
        for name in fp16_nodes:
            node = g.by_name[name]
            _require_types(g, node)
            casts_in, casts_out = [], []
            for i, t in enumerate(node.input):
                src = rewire.get(name, {}).get(t, t)
                if i in FLOAT32_INPUTS.get(node.op_type, ()):
                    continue
                if t in g.inits and g.types.get(t) == TensorProto.FLOAT:
                    if t not in halves:
                        halves[t] = self.fresh(f"{t}_fp16")
                        self.new_inits.append(numpy_helper.from_array(g.init_array(t).astype(np.float16), halves[t]))
                    rewire.setdefault(name, {})[t] = halves[t]
                    if all(c.name == name for c in g.consumer_nodes(t)):
                        self.dropped_inits.add(t)
                elif g.is_float_activation(t):
                    out = self.fresh(f"{name}_input{i}_fp16")
                    casts_in.append(helper.make_node("Cast", [src], [out], name=f"{name}_Cast_input{i}", to=TensorProto.FLOAT16))
                    rewire.setdefault(name, {})[t] = out
            for j, o in enumerate(node.output):
                if g.types.get(o) == TensorProto.FLOAT:
                    half_out = self.fresh(f"{o}_fp16")
                    casts_out.append(helper.make_node("Cast", [half_out], [o], name=f"{name}_Cast_output{j}", to=TensorProto.FLOAT))
                    node.output[j] = half_out
            self.before[name] = casts_in
            self.after.setdefault(name, [])[:0] = casts_out
        return fp16_nodes

    def assemble(self, fp16_nodes: set[str]) -> None:
        """Insert the new nodes, rewire the readers, swap the initializers, drop stale value_info."""
        work, g = self.work, self.g
        nodes: list[onnx.NodeProto] = list(self.after.get("", []))
        for node in work.graph.node:
            nodes.extend(self.before.get(node.name, []))
            for i, t in enumerate(node.input):
                new = self.rewire.get(node.name, {}).get(t)
                if new:
                    node.input[i] = new
            nodes.append(node)
            nodes.extend(self.after.get(node.name, []))
        del work.graph.node[:]
        work.graph.node.extend(nodes)
        read = read_names(work.graph)  # a replaced initializer that a graph output, an If/Loop body or a node still reads stays
        keep = [i for i in work.graph.initializer if i.name not in self.dropped_inits or i.name in read]
        del work.graph.initializer[:]
        work.graph.initializer.extend(keep + self.new_inits)
        # value_info of fp16-renamed outputs would now lie; drop stale entries.
        stale = {o for n in fp16_nodes for o in g.by_name[n].output}
        vi = [v for v in work.graph.value_info if v.name not in stale]
        del work.graph.value_info[:]
        work.graph.value_info.extend(vi)


def _require_types(g: GraphView, node: onnx.NodeProto) -> None:
    """A ConfigError when a tensor of float16 layer ``node`` (an input that is not float32 by definition, an output) has
    no known element type: its Casts could not be placed, and the fp16 weights alone make a model ONNX Runtime refuses."""
    keep = FLOAT32_INPUTS.get(node.op_type, ())
    unknown = [t for i, t in enumerate(node.input) if t and i not in keep and t not in g.types] + [o for o in node.output if o and o not in g.types]
    if unknown:
        raise ConfigError(
            f"custom_quantize_layers sets '{node.name}' ({node.op_type}) to float16, but the element type of "
            f"{', '.join(repr(t) for t in unknown)} is unknown to ONNX shape inference and to ONNX Runtime, so its Casts "
            f"cannot be placed. Set '{node.name}' to float32 instead, or run step1 again if its artifacts are older than this hybridq."
        )
