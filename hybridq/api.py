"""The Python API: every CLI command as a function returning a typed result, printing nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .artifacts import check_order, read_step1, save_model_atomic, write_step1
from .calibration import calibrate
from .config import Cfg, load_cfg, render_cfg
from .dataset import Dataset, Preprocess, input_specs, load_dataset
from .errors import ConfigError, HybridqError, InputError, did_you_mean
from .graph import has_subgraphs, is_large, load_model, model_bytes, prepare
from .plan import QuantPlan, candidate_tensors, make_plan
from .proposal import Evaluator, ProposalResult, Score, Target, as_cfg
from .proposal import propose as search_proposal
from .qdq import RewriteResult, apply_plan
from .resolve import activation_entry, resolve, weight_entry
from .settings import Settings

Progress = Callable[[int], None]


@dataclass
class Step1Result:
    """Paths of the three artifacts and what step1 did."""

    model: Path
    data: Path
    cfg: Path
    backup: Path | None
    samples: int
    quantized_tensors: int
    layers: dict[str, int]
    fused: dict[str, str]
    float_subgraph_nodes: list[str]
    proposal: Any = None
    notes: list[str] = field(default_factory=list)


@dataclass
class LayerResolution:
    """What one custom_quantize_layers entry resolved to."""

    entry: str
    node: str
    requested: str
    effective: str
    how: str


@dataclass
class Step2Result:
    """The deployable model and what step2 built."""

    output: Path
    layers: dict[str, int]
    resolved: list[LayerResolution]
    size_fp32: int
    size_quant: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rewrite: RewriteResult | None = field(default=None, repr=False)


def open_dataset(model: onnx.ModelProto, dataset: str | Path, preprocess: Preprocess | None) -> Dataset:
    """The dataset for this model's inputs."""
    return load_dataset(dataset, input_specs(model), preprocess)


def _describe(ds: Dataset, batch_size: int) -> Callable[[int], str]:
    entries = ds.entries()

    def describe(b: int) -> str:
        first = entries[min(b * batch_size, len(entries) - 1)]
        where = f"line {first[0]} of '{ds.source}'" if first[0] else f"'{first[1][0]}'"
        return f"sample {b * batch_size + 1} ({where})"

    return describe


def _initializer_arrays(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    wanted = set(names)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def written_entries(plan: QuantPlan, model: onnx.ModelProto, observers, settings: Settings) -> dict[str, dict[str, Any]]:
    """The quantize_parameters step1 writes for a plan: activations from statistics, weights from the weights."""
    entries: dict[str, dict[str, Any]] = {}
    for t, tp in plan.tensors.items():
        entries[t], _ = activation_entry(tp, observers[t], settings)
    arrays = _initializer_arrays(model, plan.weights)
    for w, wp in plan.weights.items():
        entries[w], _ = weight_entry(wp, arrays[w])
    return entries


def _entry_comments(plan: QuantPlan) -> dict[str, str]:
    comments = {}
    for t, tp in plan.tensors.items():
        comments[t] = f"output of {tp.producer}" if tp.layer_output else f"input of {', '.join(tp.readers[:3])}" + (" ..." if len(tp.readers) > 3 else "")
    for w, wp in plan.weights.items():
        comments[w] = f"weight of {wp.node}"
    return comments


def check_output_dir(path: Path, what: str) -> None:
    """Refuse, before any work, an output directory that is a file, lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise InputError(f"The {what} '{path}' is a file, not a directory; give a directory (it is created if missing).")
    _check_writable(path, (path, *path.parents), what)


def check_output_file(path: Path, what: str, example: str) -> None:
    """Refuse, before any work, an output file that is a directory, lies under a file, or cannot be written."""
    if path.is_dir():
        raise InputError(f"The {what} '{path}' is a directory; give a file name, such as '{path / example}'.")
    _check_writable(path, path.parents, what)


def _check_writable(path: Path, ancestors, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this process can write into."""
    existing = next(p for p in ancestors if p.exists())
    if not existing.is_dir():
        raise InputError(f"The {what} '{path}' cannot be written: '{existing}' is a file, not a directory. Choose another location.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"The {what} '{path}' cannot be written: '{existing}' is not writable. Choose a directory you can write to.")


def step1(
    model: str | Path,
    dataset: str | Path,
    *,
    out: str | Path | None = None,
    settings: Settings | None = None,
    preprocess: Preprocess | None = None,
    samples: int | None = None,
    batch_size: int = 1,
    on_progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    proposal: "ProposalOptions | None" = None,
) -> Step1Result:
    """Prepare the temp model, calibrate on the dataset, and write `<name>.model`, `<name>.data`, `<name>.quantization.cfg`.

    With `proposal`, the worst layers are first chosen for float (verified on the built model) and written into the cfg.
    """
    settings = settings or Settings()
    settings.validate("settings")
    model_path = Path(model)
    original = load_model(model_path)
    check_output_dir(Path(out) if out else model_path.parent, "step1 output directory (--out)")
    temp, report = prepare(original)
    ds = open_dataset(temp, dataset, preprocess)
    n = min(len(ds), samples) if samples else len(ds)
    if on_start:
        on_start(n)
    plan = make_plan(temp, settings)
    observers = calibrate(
        temp, ds.batches(batch_size, limit=n), tensors=candidate_tensors(temp), histograms=set(plan.tensors),
        describe=_describe(ds, batch_size), on_batch=on_progress,
    )
    entries = written_entries(plan, temp, observers, settings)
    out_dir = Path(out) if out else model_path.parent
    stem = model_path.stem
    header = {
        "version": __version__,
        "model": model_path.name,
        "model_sha256": "",
        "dataset": str(dataset),
        "samples": n,
        "preprocess": _preprocess_dict(preprocess),
    }
    meta = {
        "tool_version": __version__,
        "source_model": str(model_path),
        "written_entries": entries,
        "written_settings": settings.to_dict(),
        "original_nodes": report.original_nodes,
        "renamed": report.renamed,
        "fused": report.fused,
        "dataset": str(dataset),
        "samples": n,
    }
    comments = _entry_comments(plan)
    prop, evaluator = None, None
    custom: dict[str, str] = {}
    custom_comments: dict[str, str] = {}
    cfg_entries = entries
    if proposal is not None:
        prop_samples = list(ds.samples(limit=min(n, proposal.samples)))
        prop, evaluator = run_proposal(temp, observers, meta, settings, entries, {}, prop_samples, proposal)
        custom, custom_comments = prop.layers, prop.comments
        cfg_entries = {t: prop.clips.get(t, e) for t, e in entries.items()}
        comments.update({t: f"{comments.get(t, '')}; {c}" for t, c in prop.clip_comments.items()})

    def cfg_text(model_sha: str) -> str:
        header["model_sha256"] = model_sha
        return render_cfg(header, settings, custom, custom_comments, cfg_entries, comments, stem)

    paths = write_step1(out_dir, stem, temp, observers, meta, cfg_text)
    if prop is not None:
        prop.measured = verify_proposal(paths["model"], paths["data"], paths["cfg"], evaluator)
    return Step1Result(
        model=paths["model"], data=paths["data"], cfg=paths["cfg"], backup=paths.get("backup"), samples=n,
        quantized_tensors=len(entries), layers=_layer_counts(temp, settings, plan, custom), fused=report.fused,
        float_subgraph_nodes=has_subgraphs(temp), proposal=prop, notes=ds.notes(),
    )


def _layer_counts(temp: onnx.ModelProto, settings: Settings, plan: QuantPlan, custom: dict[str, str]) -> dict[str, int]:
    """Layers per precision as step2 will build and count them: the proposal's float layers applied, `default` as its dtype."""
    if custom:
        names = {n.name for n in temp.graph.node}
        plan = make_plan(temp, settings, layer_precision={k: v for k, v in custom.items() if k in names})
    counts: dict[str, int] = {}
    for precision, n in plan.precision_counts().items():
        key = settings.dtype if precision == "default" else precision
        counts[key] = counts.get(key, 0) + n
    return counts


def _preprocess_dict(pre: Preprocess | None) -> dict[str, Any]:
    if pre is None:
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(pre).items() if v is not None}


def resolve_layer_names(cfg: Cfg, model: onnx.ModelProto, meta: dict[str, Any]) -> tuple[dict[str, str], list[LayerResolution]]:
    """Map each custom_quantize_layers key (node or output tensor, original or temp model) to a temp-model node."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    original = meta.get("original_nodes", {})
    fused = meta.get("fused", {})
    renamed = meta.get("renamed", {})
    inputs = {i.name for i in model.graph.input}
    out: dict[str, str] = {}
    resolved: list[LayerResolution] = []
    for key, prec in cfg.custom.items():
        line = cfg.custom_lines.get(key, 0)
        if key in nodes:
            node, how = key, "node name"
        elif key in producer:
            node, how = producer[key], "output tensor"
        elif key in renamed and renamed[key] in nodes:
            node, how = renamed[key], f"original node renamed to '{renamed[key]}'"
        elif key in fused and fused[key]:
            node, how = fused[key], f"original node fused into '{fused[key]}'"
        elif key in original and any(o in producer for o in original[key]):
            node = next(producer[o] for o in original[key] if o in producer)
            how = f"original node, now '{node}'"
        elif key in inputs:
            raise ConfigError(f"{cfg.path}:{line}: '{key}' is a model input, not a layer; name the first layer that reads it instead.")
        else:
            candidates = list(nodes) + list(producer)
            raise ConfigError(
                f"{cfg.path}:{line}: custom_quantize_layers entry '{key}' is neither a node nor a tensor of the model."
                f"{did_you_mean(key, candidates)} Names of the original model and of the temp model both work."
            )
        if node in out and out[node] != prec:
            raise ConfigError(f"{cfg.path}:{line}: '{key}' resolves to node '{node}', which another entry already sets to {out[node]}; keep one.")
        out[node] = prec
        resolved.append(LayerResolution(key, node, prec, "", how))
    return out, resolved


def build_plan(cfg: Cfg, model: onnx.ModelProto, meta: dict[str, Any]) -> tuple[QuantPlan, list[LayerResolution]]:
    """The plan for step2: settings, resolved layer precisions and per-tensor dtype/qmethod edits."""
    layer_precision, resolved = resolve_layer_names(cfg, model, meta)
    written = meta.get("written_entries", {})
    tensor_dtype = {t: e.values["dtype"] for t, e in cfg.entries.items() if "dtype" in e.values and e.values["dtype"] != written.get(t, {}).get("dtype")}
    # Per-entry edits only: an unedited entry follows the settings block (where a global edit lands).
    weight_method = {t: e.values["qmethod"] for t, e in cfg.entries.items()
                     if "qmethod" in e.values and e.values["qmethod"] != written.get(t, {}).get("qmethod")}
    return make_plan(model, cfg.settings, layer_precision, tensor_dtype, weight_method), resolved


def build_quantized(temp: onnx.ModelProto, observers, meta: dict[str, Any], cfg: Cfg):
    """Plan, resolve parameters and rewrite: the one path from (temp model, statistics, cfg) to a QDQ model."""
    plan, resolved = build_plan(cfg, temp, meta)
    written_settings = Settings(**meta.get("written_settings", {}))
    arrays = _initializer_arrays(temp, plan.weights)
    res = resolve(plan, cfg.entries, meta.get("written_entries", {}), observers, arrays, cfg.settings, written_settings, str(cfg.path))
    rewrite = apply_plan(temp, plan, res.activations, res.weights)
    return rewrite, plan, res, resolved


def step2(
    model: str | Path,
    data: str | Path,
    cfg: str | Path,
    output: str | Path,
) -> Step2Result:
    """Merge temp model + data + cfg into one deployable QDQ ONNX model."""
    check_order(Path(model), Path(data), Path(cfg))
    check_output_file(Path(output), "step2 output (-o)", Path(model).stem + ".q.onnx")
    parsed = load_cfg(cfg)
    bundle = read_step1(model, data, parsed.header.get("model_sha256"), cfg)
    temp = bundle.model
    known = set(bundle.meta.get("written_entries", {})) | set(bundle.observers) | {i.name for i in temp.graph.initializer}
    for name, e in parsed.entries.items():
        if name not in known:
            raise ConfigError(f"{parsed.path}:{e.line}: quantize_parameters has unknown tensor '{name}'.{did_you_mean(name, known)} Remove the entry or fix the name.")
    rewrite, plan, res, resolved = build_quantized(temp, bundle.observers, bundle.meta, parsed)
    op_types = {n.name: n.op_type for n in temp.graph.node}
    for r in resolved:
        lp = rewrite.layers.get(r.node)
        r.effective = lp["precision"] if lp else "float32"
        if r.requested in ("uint8", "int8", "int16") and lp is None:
            raise ConfigError(
                f"{parsed.path}:{parsed.custom_lines.get(r.entry, 0)}: custom_quantize_layers['{r.entry}'] = {r.requested} has no effect: "
                f"'{r.node}' ({op_types[r.node]}) has no quantized form. Remove the entry."
            )
    out_path = Path(output)
    try:
        if not is_large(rewrite.model):  # protobuf cannot serialize a model over 2 GB for the in-memory check
            onnx.checker.check_model(rewrite.model, full_check=False)
    except Exception as exc:
        raise HybridqError(f"The quantized model failed the ONNX checker ({str(exc).splitlines()[0]}); this is a hybridq bug, please report it with --debug output.") from exc
    save_model_atomic(rewrite.model, out_path)
    size_fp32 = model_bytes(temp)
    return Step2Result(
        output=out_path,
        layers=_count_precisions(rewrite),
        resolved=resolved,
        size_fp32=size_fp32,
        size_quant=os.path.getsize(out_path),
        notes=res.notes + rewrite.notes + plan.notes,
        warnings=res.warnings,
        rewrite=rewrite,
    )


def _count_precisions(rewrite: RewriteResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lp in rewrite.layers.values():
        counts[lp["precision"]] = counts.get(lp["precision"], 0) + 1
    return counts


def analyze(
    float_model: str | Path,
    quant_model: str | Path,
    dataset: str | Path,
    *,
    preprocess: Preprocess | None = None,
    samples: int | None = None,
    dump: str | Path | None = None,
    max_bytes: int | None = None,
    on_sample: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    host_int8: bool = False,
):
    """Run the fp32 and quantized models side by side; entire and single error of every layer.

    `quant_model` may also be a step1 cfg (`<name>.quantization.cfg`): the model it
    describes is built in a temporary directory first, so a cfg can be checked before step2.
    int8 products are exact unless `host_int8` (this CPU's default ONNX Runtime kernels; see hybridq.kernels).
    """
    import tempfile

    from .analysis import analyze as run_analysis

    fm = load_model(float_model)
    if dump is not None:
        check_output_dir(Path(dump), "snapshot directory (--dump)")
    ds = open_dataset(fm, dataset, preprocess)
    n = min(len(ds), samples) if samples else len(ds)
    if on_start:
        on_start(n)
    quant_path = Path(quant_model)
    with tempfile.TemporaryDirectory(prefix="hybridq-analyze-") as tmp:
        if quant_path.name.endswith(".quantization.cfg"):
            stem = quant_path.name[: -len(".quantization.cfg")]
            built = step2(quant_path.with_name(f"{stem}.model"), quant_path.with_name(f"{stem}.data"), quant_path, Path(tmp) / "q.onnx")
            quant_path = built.output
        qm = load_model(quant_path)
        result = run_analysis(fm, qm, ds.samples(limit=n), dump=dump, max_bytes=max_bytes, on_sample=on_sample, host_int8=host_int8)
    result.notes.extend(ds.notes())
    return result


def load_snapshot(directory: str | Path):
    """Read a snapshot written by `analyze(..., dump=DIR)`; no model is run."""
    from .snapshot import load_snapshot as read

    if not (Path(directory) / "manifest.json").exists():
        raise InputError(f"'{directory}' is not a hybridq snapshot (no manifest.json). Write one with `hybridq analyze ... --dump {directory}`.")
    return read(directory)


@dataclass
class ProposalOptions:
    """How a proposal searches: the target, the budget, the fallback precision and the samples it measures on."""

    target: Target = field(default_factory=Target)
    max_float_layers: int | None = None
    max_float_fraction: float | None = None
    fallback: str = "float32"
    samples: int = 16


def run_proposal(
    temp: onnx.ModelProto, observers, meta: dict[str, Any], settings: Settings, entries: dict[str, dict[str, Any]],
    existing: dict[str, str], samples: list[dict[str, np.ndarray]], options: ProposalOptions,
    single: dict[str, float] | None = None,
) -> tuple[ProposalResult, Evaluator]:
    """Rank layers (analysis, unless `single` errors are given), then search candidates built like step2 builds them."""
    if options.fallback not in ("float32", "float16"):
        raise InputError(f"--fallback {options.fallback!r} is not valid; use float32 (fastest on CPU) or float16 (NPUs).")
    evaluator = Evaluator(temp, samples, options.target)

    def build(layers: dict[str, str], edits: dict[str, dict[str, Any]]) -> onnx.ModelProto:
        return build_quantized(temp, observers, meta, as_cfg(settings, layers, entries, edits))[0].model

    if single is None:
        from .analysis import analyze as run_analysis

        analysed = run_analysis(temp, build(existing, {}), samples)
        single = {le.layer: le.single.cosine for le in analysed.layers if le.single is not None}
    plan = make_plan(temp, settings, existing)
    result = search_proposal(
        build, evaluator, single, plan, temp, observers, entries, settings, fallback=options.fallback,
        max_float_layers=options.max_float_layers, max_float_fraction=options.max_float_fraction, existing=existing,
    )
    return result, evaluator


def verify_proposal(model: Path, data: Path, cfg: Path, evaluator: Evaluator) -> Score:
    """Build the written cfg with step2 (in a temporary directory) and measure it: the figure a proposal may claim."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hybridq-verify-") as tmp:
        built = step2(model, data, cfg, Path(tmp) / "verify.onnx")
        return evaluator.score(onnx.load(str(built.output)))


def propose(
    cfg: str | Path,
    dataset: str | Path,
    *,
    snapshot: str | Path | None = None,
    preprocess: Preprocess | None = None,
    options: ProposalOptions | None = None,
) -> tuple[ProposalResult, Path | None]:
    """Propose float layers for an existing cfg (keeping its edits and comments), write them into it, verify.

    With `snapshot` (from `analyze --dump`), its single errors rank the layers and no analysis is re-run.
    Returns the result and the backup of the previous cfg.
    """
    from .artifacts import backup_if_edited, write_text_atomic
    from .config import update_custom_layers, update_entries

    options = options or ProposalOptions()
    cfg_path = Path(cfg)
    if not cfg_path.name.endswith(".quantization.cfg"):
        raise InputError(f"'{cfg_path}' is not a step1 cfg (<name>.quantization.cfg); pass the cfg written by step1.")
    stem = cfg_path.name[: -len(".quantization.cfg")]
    model_path, data_path = cfg_path.with_name(f"{stem}.model"), cfg_path.with_name(f"{stem}.data")
    parsed = load_cfg(cfg_path)
    bundle = read_step1(model_path, data_path, parsed.header.get("model_sha256"), cfg_path)
    existing, _ = resolve_layer_names(parsed, bundle.model, bundle.meta)
    entries = {t: e.values for t, e in parsed.entries.items()}
    single = None
    if snapshot is not None:
        snap = load_snapshot(snapshot)
        single = {le.layer: le.single.cosine for le in snap.layers if le.single is not None}
    ds = open_dataset(bundle.model, dataset, preprocess)
    samples = list(ds.samples(limit=min(len(ds), options.samples)))
    result, evaluator = run_proposal(bundle.model, bundle.observers, bundle.meta, parsed.settings, entries, existing, samples, options, single)
    text = cfg_path.read_text(encoding="utf-8")
    text = update_custom_layers(text, result.layers, result.comments)
    text = update_entries(text, result.clips, result.clip_comments)
    backup = backup_if_edited(cfg_path, data_path)
    write_text_atomic(cfg_path, text)
    result.measured = verify_proposal(model_path, data_path, cfg_path, evaluator)
    return result, backup


propose_cfg = propose  # the name before `propose` became public
