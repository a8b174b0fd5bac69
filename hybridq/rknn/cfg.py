"""RKNN-Toolkit2 step1 cfgs <-> hybridq cfgs: float layers and min/max ranges, names mapped both ways.

RKNN's `<name>.quantization.cfg` (from `hybrid_quantization_step1`) has two sections:
`custom_quantize_layers` ({post-fusion tensor name: float16}) and `quantize_parameters`
({activation tensor name: qtype, qmethod, dtype, min, max, scale, zero_point, ori_min, ori_max}).
hybridq's cfg has the same sections, keyed by temp-model node names (layers) and tensor names.

Names are mapped through the temp model (`<name>.model`: producers and consumers of every
tensor) and the step1 metadata in `<name>.data` (`original_nodes`, `fused`):

- RKNN layer -> hybridq node: the producer of that tensor in the temp model; else a temp-model
  node of that name; else, for a tensor of the original model that preparation fused away, the
  node its producer was fused into.
- RKNN tensor -> hybridq tensor: the same name, when hybridq's cfg has an entry for it.
- hybridq node -> RKNN layer: the node's output tensor when RKNN's cfg names it; else the first
  tensor RKNN's cfg names down the node's single-consumer chain (RKNN fuses e.g. hybridq's
  Add/Clip/Mul/Div into one HardSwish whose output it names).
- hybridq tensor -> RKNN tensor: the same name, when RKNN's cfg has an entry for it.
- A layer output whose Relu/Clip hybridq fuses into the layer (Conv -> `batch_norm_1.tmp_2` ->
  Relu -> `relu_0.tmp_0`) is one quantizer, the activation's output, in both tools: a range goes
  between the Conv output's RKNN entry and the activation output's hybridq entry, and one hybridq
  layer entry (the Relu, which sets the Conv too) goes back as one RKNN name.

A name with no counterpart (RKNN's own tensors such as `x_int8` or `GlobalAveragePool@0_2conv0`,
tensors hybridq does not quantize, weights) is returned in `unmapped` with the reason, never dropped.
Files are edited as text (`._edit`): every line neither tool changes is kept byte for byte.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .._fs import check_not_input, copy_atomic, output_target, write_atomic
from ..artifacts import backup_if_edited, read_step1
from ..build import resolve_layer_names
from ..plan import GraphView, absorbed_output
from ..config import load_cfg, update_custom_layers, update_entries
from .._onnx import GraphIndex
from ..errors import ConfigError, InputError
from ..qparams import normalize_dtype
from ..recorded import step1_siblings
from ._edit import edit_rknn_cfg
from .reading import RknnCfg, _range, read_rknn_cfg

RKNN_LAYER_PRECISIONS = ("float16",)
"""What RKNN-Toolkit2 2.5 accepts in custom_quantize_layers (it refuses float32, see SPEC section 3)."""
_FORWARD_DEPTH = 8


@dataclass
class Unmapped:
    """A name of one cfg with no counterpart in the other, and why."""

    name: str
    section: str
    reason: str


@dataclass
class Mapped:
    """A name of one cfg carried to the other: its section, the name it maps to, and how when that is not the same name."""

    name: str
    section: str
    to: str
    how: str = ""


@dataclass
class _Carried:
    """What was carried between the two cfgs: layers, ranges, the names mapped and not, notes, and the file written."""

    layers: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backup: Path | None = None
    written: bool = False


@dataclass
class RknnImportResult(_Carried):
    """What `import_rknn_cfg` wrote into the hybridq cfg `cfg`."""

    cfg: Path = Path()


@dataclass
class RknnExportResult(_Carried):
    """What `export_rknn_cfg` wrote into the RKNN cfg `output`; RKNN's float layers hybridq does not set, kept or removed."""

    output: Path = Path()
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the hybridq side


@dataclass
class _Hybridq:
    """A hybridq cfg with its step1 artifacts and the name index of its temp model."""

    cfg: Path
    data: Path
    text: str
    parsed: Any
    meta: dict[str, Any]
    model: onnx.ModelProto
    index: GraphIndex
    original_producer: dict[str, str]

    def producer(self, tensor: str) -> str | None:
        """The temp-model node writing `tensor`."""
        node = self.index.producer_node(tensor)
        return node.name if node is not None else None

    @functools.cached_property
    def view(self) -> GraphView:
        """The temp model as the planner sees it (which Relu/Clip a layer absorbs)."""
        return GraphView(self.model)

    def fused_output(self, tensor: str) -> str | None:
        """The tensor hybridq quantizes for `tensor`, a layer output whose sole Relu/Clip is fused into the layer (one quantizer)."""
        node = self.index.producer_node(tensor)
        if node is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.output[0] != tensor:
            return None
        out = absorbed_output(node, self.view)
        return out if out != tensor and out in self.parsed.entries else None

    def outputs(self, node: str) -> list[str]:
        """The tensors a temp-model node writes (none for an unknown name)."""
        n = self.index.by_name.get(node)
        return [o for o in n.output if o] if n is not None else []


def _open_hybridq(cfg: str | Path, artifacts: Path | None = None) -> _Hybridq:
    p = Path(cfg)
    home = p.parent if artifacts is None else Path(artifacts)
    if not p.is_file():
        what = "is not a regular file" if p.exists() else "does not exist"
        raise InputError(f"cfg '{p}' {what}; pass the <name>.quantization.cfg hybridq step1 wrote.")
    siblings = step1_siblings(p)
    if siblings is None:
        raise InputError(f"'{p}' is not a hybridq step1 cfg (no `hybridq:` header); pass the <name>.quantization.cfg hybridq step1 wrote.")
    parsed = load_cfg(p)
    bundle = read_step1(home / siblings[0].name, home / siblings[1].name, parsed.header.get("model_sha256"), p)
    original_producer = {t: node for node, outs in bundle.meta.get("original_nodes", {}).items() for t in outs}
    return _Hybridq(p, bundle.data_path, p.read_text(encoding="utf-8"), parsed, bundle.meta, bundle.model, GraphIndex(bundle.model.graph),
                    original_producer)


def _rknn_layer_to_node(h: _Hybridq, name: str) -> tuple[str | None, str]:
    """The temp-model node an RKNN custom_quantize_layers name stands for, and how it was found (or why not)."""
    if h.producer(name) is not None:
        return h.producer(name), "output tensor"
    if name in h.index.by_name:
        return name, "node name"
    inputs = {i.name for i in h.model.graph.input}
    if name in inputs:
        return None, "a model input, not a layer"
    node = h.original_producer.get(name)
    if node is not None:
        if node in h.index.by_name:  # original_nodes is keyed by the names step1 gave (renamed ones included)
            return node, f"tensor of original node '{node}'"
        fused = h.meta.get("fused", {}).get(node)
        if fused:
            return fused, f"tensor of original node '{node}', fused into '{fused}'"
        return None, f"tensor of original node '{node}', removed when hybridq prepared the model"
    return None, "no tensor or node of that name in the ONNX model (a tensor RKNN inserts, e.g. its int8 conversion of an input or output)"


def _rknn_tensor_reason(h: _Hybridq, name: str) -> str:
    """Why an RKNN quantize_parameters tensor has no hybridq entry."""
    if h.producer(name) is not None or name in {i.name for i in h.model.graph.input}:
        return "tensor of the model that hybridq does not quantize with these settings (no quantize_parameters entry)"
    if name in h.original_producer:
        return f"tensor of the original model that hybridq's preparation fused away (node '{h.original_producer[name]}')"
    return "no tensor of that name in the ONNX model (a tensor RKNN inserts)"


def _hybridq_edited_ranges(h: _Hybridq) -> dict[str, tuple[list[float], list[float]]]:
    """hybridq entries whose min/max differ from what step1 wrote (user edits or proposal clips)."""
    written = h.meta.get("written_entries", {})
    out = {}
    for t, e in h.parsed.entries.items():
        v, w = e.values, written.get(t, {})
        if "min" in v and "max" in v and (v["min"] != w.get("min") or v["max"] != w.get("max")):
            out[t] = (list(v["min"]), list(v["max"]))
    return out


# --------------------------------------------------------------------------- import


def _import_layers(r: RknnCfg, h: _Hybridq, res: RknnImportResult) -> tuple[dict[str, str], dict[str, str]]:
    """RKNN's custom_quantize_layers as hybridq layer precisions (temp-model nodes) and their comments."""
    existing, _ = resolve_layer_names(h.parsed.custom, h.parsed.custom_lines, str(h.cfg), h.model, h.meta)
    layers: dict[str, str] = {}
    comments: dict[str, str] = {}
    for name, prec in r.data["custom_quantize_layers"].items():
        name = str(name)
        p = normalize_dtype(prec) if prec is not None else None
        if p not in ("float16", "float32", "int16", "int8", "uint8"):
            res.unmapped.append(Unmapped(name, "custom_quantize_layers", f"precision {prec!r} is not one hybridq runs"))
            continue
        node, how = _rknn_layer_to_node(h, name)
        if node is None:
            res.unmapped.append(Unmapped(name, "custom_quantize_layers", how))
            continue
        res.mapped.append(Mapped(name, "custom_quantize_layers", node, "" if how == "output tensor" else how))
        if node in existing or node in layers:
            have = existing.get(node, layers.get(node))
            if have != p:
                res.notes.append(f"'{name}' ({p}) maps to node '{node}', which the hybridq cfg already sets to {have}; kept {have}.")
            continue
        layers[node] = p
        comments[node] = f"from RKNN '{name}'" if name != node else "from RKNN"
    res.layers = layers
    return layers, comments


def _same_range(a: Any, b: Any) -> bool:
    """Two RKNN entries with the same min and max."""
    return isinstance(a, dict) and isinstance(b, dict) and a.get("min") == b.get("min") and a.get("max") == b.get("max")


def _rknn_edited(h: _Hybridq, qp: dict, name: str, base: dict | None, all_ranges: bool) -> bool:
    """Whether RKNN's range of `name` counts as edited: against the baseline, else its ori_min/ori_max.

    A layer output whose Relu/Clip is fused into the layer is compared with the fused tensor's entry instead:
    RKNN gives both one range (the Relu's), so only a difference is an edit.
    """
    entry = qp[name]
    if base is not None:
        return not _same_range(base.get(name), entry)
    if all_ranges:
        return True
    fused = h.fused_output(name) if name not in h.parsed.entries else None
    if fused is not None and fused in qp:
        return not _same_range(qp[fused], entry)
    return not (entry.get("ori_min") == entry.get("min") and entry.get("ori_max") == entry.get("max"))


def _range_target(h: _Hybridq, name: str, changed: dict[str, tuple[list[float], list[float]]]) -> tuple[str | None, str]:
    """The hybridq entry an edited RKNN range goes to, and how when it is another tensor (or why there is none)."""
    if name in h.parsed.entries:
        return name, ""
    fused = h.fused_output(name)
    if fused is None:
        return None, _rknn_tensor_reason(h, name)
    if fused in changed and changed[fused] != changed[name]:
        return None, (f"hybridq quantizes it as '{fused}' (its activation fused into the layer: one quantizer), whose own range "
                      f"RKNN's cfg edits too, differently; '{fused}''s edit is the one carried")
    return fused, f"hybridq quantizes it as '{fused}' (its activation fused into the layer: one quantizer, which RKNN gives the same range)"


def _import_ranges(r: RknnCfg, h: _Hybridq, res: RknnImportResult, base: dict | None, all_ranges: bool) -> dict[str, dict[str, Any]]:
    """RKNN's edited int8/int16 ranges as min/max edits of the matching hybridq entries (a fused layer output's: of its activation's)."""
    edited_here = set(_hybridq_edited_ranges(h))
    qp = {str(k): v for k, v in r.data["quantize_parameters"].items()}
    changed: dict[str, tuple[list[float], list[float]]] = {}
    for name, entry in qp.items():
        rng = _range(r, name, entry)
        if rng is not None and str(entry.get("dtype", "")) in ("int8", "uint8", "int16") and _rknn_edited(h, qp, name, base, all_ranges):
            changed[name] = rng
    edits: dict[str, dict[str, Any]] = {}
    for name, (lo, hi) in changed.items():
        target, how = _range_target(h, name, changed)
        if target is None:
            res.unmapped.append(Unmapped(name, "quantize_parameters", how))
            continue
        values = h.parsed.entries[target].values
        if len(values.get("min", [])) != len(lo):
            res.unmapped.append(Unmapped(name, "quantize_parameters", f"RKNN gives {len(lo)} value(s), hybridq's entry has {len(values.get('min', []))}"))
            continue
        res.mapped.append(Mapped(name, "quantize_parameters", target, how))
        if how:
            res.notes.append(f"'{name}': {how}; its range [{lo[0]}, {hi[0]}] is carried to '{target}'.")
        if target in edited_here:
            res.notes.append(f"'{target}': the hybridq cfg has its own min/max edit; kept it.")
        elif values.get("min") != lo or values.get("max") != hi:
            edits[target] = {"min": lo, "max": hi}
            res.ranges[target] = (lo[0], hi[0])
    return edits


def import_rknn_cfg(
    rknn_cfg: str | Path,
    cfg: str | Path,
    *,
    baseline: str | Path | None = None,
    all_ranges: bool = False,
    artifacts: str | Path | None = None,
) -> RknnImportResult:
    """Write an RKNN step1 cfg's float layers and edited ranges into a hybridq cfg of the same ONNX model.

    Layers of RKNN's custom_quantize_layers go into hybridq's custom_quantize_layers under the
    temp-model node name, commented with the RKNN name; an entry the hybridq cfg already has for
    that node is kept. A range counts as edited when its min/max differ from `baseline` (the cfg
    as RKNN wrote it, before your edits) or, without a baseline, from its ori_min/ori_max (RKNN
    itself narrows some ranges, e.g. inputs of HardSwish to -3: those come along then);
    `all_ranges` takes every int8/int16 range. Edited ranges go into the matching hybridq
    entries' min/max (step2 recomputes scale and zero point), except where the hybridq entry was
    itself edited. The cfg is rewritten atomically, every other line and comment kept, and an
    edited cfg is first backed up (as `hybridq propose` does). `artifacts` is the folder of the
    cfg's `.model` and `.data` when they are not beside it.
    """
    r = read_rknn_cfg(rknn_cfg)
    h = _open_hybridq(cfg, None if artifacts is None else Path(artifacts))
    res = RknnImportResult(cfg=h.cfg)
    layers, comments = _import_layers(r, h, res)
    halves = [n for n, p in layers.items() if p == "float16"]
    if halves and h.parsed.settings.target == "cpu":
        res.notes.append(f"{len(halves)} layer(s) imported as float16 into a cfg for target cpu: ONNX Runtime's CPU provider has few "
                         "float16 kernels and casts around the others, slower than float32. For a CPU deployment set them to "
                         "float32; to simulate the NPU RKNN wrote the cfg for, run step1 with --target npu.")
    base = read_rknn_cfg(baseline).data["quantize_parameters"] if baseline is not None else None
    edits = _import_ranges(r, h, res, base, all_ranges)
    names = [str(n) for n in r.data["quantize_parameters"]]
    if names and not any(n in h.parsed.entries for n in names):
        raise InputError(f"No tensor of '{rknn_cfg}' ({len(names)}, e.g. '{names[0]}') is one of '{h.cfg}': is it the RKNN "
                         "cfg of the same ONNX model? Nothing was written.")
    text = update_custom_layers(h.text, layers, comments)
    text = update_entries(text, edits, {t: "from RKNN" for t in edits})
    if text != h.text:
        res.backup = backup_if_edited(h.cfg, h.data, text)
        write_atomic(h.cfg, text)
        res.written = True
    return res


def hybridq_cfg_for(model_input: str | Path, given: Path, out: Path) -> tuple[Path, RknnImportResult | None]:
    """The cfg to build `model_input` from: `given` when it is hybridq's; when RKNN-Toolkit2 wrote it, a copy in `out`
    of the hybridq cfg beside `model_input` with RKNN's float layers and edited ranges imported (the original untouched)."""
    try:
        data = YAML(typ="safe").load(given.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError):  # step2 reports what is wrong with it, naming the line
        return given, None
    if not isinstance(data, dict) or "hybridq" in data or "quantize_parameters" not in data:
        return given, None  # hybridq's own cfg
    ours = Path(model_input).with_name(Path(model_input).name.removesuffix(".model") + ".quantization.cfg")
    if ours.is_file() and ours.resolve() == given.resolve():
        raise InputError(f"'{given}' is a cfg RKNN-Toolkit2 wrote, under the name of hybridq's own cfg beside {Path(model_input).name}, "
                         "which it replaced (both tools write <name>.quantization.cfg). Run hybridq's step1 again (into another "
                         "folder, or after saving RKNN's cfg under another name); RKNN's float layers and ranges are then carried over.")
    if not ours.is_file():
        raise InputError(f"'{given}' is a cfg RKNN-Toolkit2 wrote; hybridq builds from its own cfg ({ours}), which is missing. "
                         "Run hybridq's step1 there first; RKNN's float layers and ranges are then carried over.")
    copy_atomic(ours, out / ours.name)
    return out / ours.name, import_rknn_cfg(given, out / ours.name, artifacts=ours.parent)


# --------------------------------------------------------------------------- export


def _node_to_rknn_layer(h: _Hybridq, node: str, known: set[str]) -> tuple[str | None, str]:
    """The tensor RKNN's cfg names for a temp-model node: its output, else down its single-consumer chain."""
    outs = h.outputs(node)
    for o in outs:
        if o in known:
            return o, "output tensor"
    tensor = outs[0] if len(outs) == 1 else None
    for _ in range(_FORWARD_DEPTH):
        readers = [n.name for n in h.index.consumer_nodes(tensor or "")]
        if len(readers) != 1 or len(h.outputs(readers[0])) != 1:
            break
        tensor = h.outputs(readers[0])[0]
        if tensor in known:
            return tensor, f"RKNN fused it: output of '{readers[0]}' down the chain"
    return None, "none of its output tensors, nor one down its single-consumer chain, is named in RKNN's cfg (RKNN fused or renamed it)"


def _export_layer(h: _Hybridq, label: str, nodes: list[str], prec: str, known: set[str], res: RknnExportResult) -> str | None:
    """The one RKNN layer a hybridq custom_quantize_layers entry becomes (recorded in `res`), or None (reported)."""
    if prec in ("int8", "uint8", "int16"):
        res.unmapped.append(Unmapped(label, "custom_quantize_layers", f"{prec}: RKNN's custom_quantize_layers takes float16 only"))
        return None
    found = [_node_to_rknn_layer(h, node, known) for node in nodes]
    tensor, how = next((f for f in found if f[0] is not None), found[0])
    if tensor is None:
        res.unmapped.append(Unmapped(label, "custom_quantize_layers", how))
        return None
    if prec == "float32":
        res.notes.append(f"'{label}' is float32 in hybridq; written as float16 ('{tensor}'): RKNN refuses float32.")
    res.mapped.append(Mapped(label, "custom_quantize_layers", tensor, "" if how == "output tensor" else how))
    return tensor


def _export_ranges(h: _Hybridq, r: RknnCfg, res: RknnExportResult) -> dict[str, tuple[float, float]]:
    """hybridq's edited activation ranges that RKNN's cfg can hold; the rest (and fixes it has no key for) reported."""
    qp = r.data["quantize_parameters"]
    ranges: dict[str, tuple[float, float]] = {}
    edited = _hybridq_edited_ranges(h)
    for t, e in h.parsed.entries.items():  # fixes RKNN has no key for, whether or not they come with a range edit
        if t not in edited and ("equalize" in e.values or "bias_correction" in e.values):
            what = "a channel equalization" if "equalize" in e.values else "a bias correction"
            res.unmapped.append(Unmapped(t, "quantize_parameters", f"{what}, which RKNN's cfg cannot express (not carried over)"))
    for t, (lo, hi) in edited.items():
        values = h.parsed.entries[t].values
        if "equalize" in values or "bias_correction" in values:
            res.unmapped.append(Unmapped(t, "quantize_parameters", "its range belongs with a channel equalization / bias correction, which RKNN's cfg cannot express"))
        elif t not in qp:
            why = "a weight (RKNN's cfg lists activations only)" if t in {i.name for i in h.model.graph.initializer} else "RKNN's cfg has no entry for this tensor (RKNN fused or renamed it)"
            res.unmapped.append(Unmapped(t, "quantize_parameters", why))
        elif len(lo) != 1:
            res.unmapped.append(Unmapped(t, "quantize_parameters", f"{len(lo)} per-channel values; RKNN's activation entries hold one"))
        else:
            res.mapped.append(Mapped(t, "quantize_parameters", t))
            ranges[t] = (lo[0], hi[0])
            layer_out = _fused_layer_output(h, t)
            if layer_out is not None and layer_out in qp and _same_range(qp[layer_out], qp[t]):
                how = f"the output of the layer '{t}''s activation is fused into: one quantizer, which RKNN's cfg gives one range"
                res.mapped.append(Mapped(t, "quantize_parameters", layer_out, how))
                ranges[layer_out] = (lo[0], hi[0])
    return ranges


def _fused_layer_output(h: _Hybridq, tensor: str) -> str | None:
    """The layer output whose Relu/Clip writes `tensor` and is fused into that layer (hybridq quantizes `tensor` for both)."""
    act = h.index.producer_node(tensor)
    if act is None or not act.input:
        return None
    return act.input[0] if h.fused_output(act.input[0]) == tensor else None


def export_rknn_cfg(
    cfg: str | Path,
    output: str | Path,
    *,
    template: str | Path | None = None,
    replace_layers: bool = False,
) -> RknnExportResult:
    """Write a hybridq cfg's decisions (float layers, edited or clipped min/max) into an RKNN step1 cfg.

    `template` is the cfg RKNN's hybrid_quantization_step1 wrote for the same ONNX model
    (default: `output` itself, updated in place). Every RKNN key and value hybridq does not change
    is kept as it was, byte for byte. Float layers are written as float16 (RKNN refuses float32;
    said in `notes`); int8/int16 layer entries have no RKNN counterpart. A range goes into the RKNN
    entry of the same tensor, widened to include 0, with the scale and zero point RKNN would compute
    for its dtype. Entries of the template's custom_quantize_layers that hybridq does not set are
    kept (listed in `kept`) or, with `replace_layers`, removed (`removed`). Names that do not map
    are in `unmapped`. The output is written atomically; an existing, different output is backed up.
    """
    out = Path(output)
    output_target(out, "RKNN cfg output (-o)")
    check_not_input(out, {"the hybridq cfg": Path(cfg)}, "RKNN cfg output (-o)")
    src = Path(template) if template is not None else out
    if template is None and not out.is_file():
        raise InputError(f"'{out}' does not exist and no --template was given. hybridq writes into the cfg RKNN's hybrid_quantization_step1 "
                         "wrote for the same ONNX model: pass it as --template (or as -o to update it in place).")
    r = read_rknn_cfg(src)
    h = _open_hybridq(cfg)
    res = RknnExportResult(output=out)
    names = [str(n) for n in r.data["quantize_parameters"]]
    if names and not any(n in h.parsed.entries for n in names):  # as import refuses: the decisions would all be lost
        raise InputError(f"No tensor of '{src}' ({len(names)}, e.g. '{names[0]}') is one of '{h.cfg}': is it the RKNN "
                         "cfg of the same ONNX model? Nothing was written.")
    known = {str(k) for k in r.data["quantize_parameters"]} | {str(k) for k in r.data["custom_quantize_layers"]}
    current = {str(k): v for k, v in r.data["custom_quantize_layers"].items()}
    layers, resolutions = resolve_layer_names(h.parsed.custom, h.parsed.custom_lines, str(h.cfg), h.model, h.meta)
    nodes_of: dict[str, list[str]] = {}
    for lr in resolutions:  # an entry's own node first, then the layer its Relu/Clip is fused into (one RKNN layer)
        nodes_of.setdefault(lr.entry, []).append(lr.node)
    wanted: dict[str, str] = {}
    for label, nodes in nodes_of.items():
        tensor = _export_layer(h, label, nodes, layers[nodes[0]], known, res)
        if tensor is not None:
            wanted[tensor] = RKNN_LAYER_PRECISIONS[0]
    add = {t: p for t, p in wanted.items() if t not in current}
    changed_prec = [t for t, p in wanted.items() if t in current and str(current[t]) != p]
    others = [t for t in current if t not in wanted]
    res.removed, res.kept = (others, []) if replace_layers else ([], others)
    remove = res.removed + changed_prec
    add.update({t: wanted[t] for t in changed_prec})
    res.layers = dict(wanted)
    ranges = _export_ranges(h, r, res)
    res.ranges = {t: (min(lo, 0.0), max(hi, 0.0)) for t, (lo, hi) in ranges.items()}
    text = edit_rknn_cfg(r, add, remove, ranges)
    if text != r.text or src != out:
        res.backup = backup_if_edited(out, out.with_suffix(".data"), text)  # no hybridq hash there: any differing output is kept
        write_atomic(out, text)
        res.written = True
    return res
