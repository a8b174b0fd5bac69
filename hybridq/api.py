"""The Python API: every CLI command as a function returning a typed result, printing nothing."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import onnx

from . import default_model, fold, infinite, recurrent
from ._cfg_checks import check_cfg
from ._fs import check_not_input, check_output_dir, check_output_file, output_target
from .artifacts import check_order, check_step1_outputs, edited_cfg_entries, fp32_source_at, read_step1, save_model_atomic, why_edits_do_not_apply, write_step1
from .build import (Built, LayerResolution, build, edits_from, edits_from_cfg, moot_float_entries, resolve_layer_names, set_effective,
                    written_entries)
from .calibration_job import calibrate_dataset
from .int4 import hessian_inputs
from .costmodel import for_step1 as step1_costs
from .config import Cfg, CfgEntry, load_cfg, render_cfg
from .dataset import Dataset, Preprocess, input_specs, load_dataset
from .errors import ConfigError, HybridqError, InputError
from .execution import Execution, held
from ._onnx import is_large, model_bytes
from .graph import has_subgraphs, initializer_inputs_note, load_model, prepare
from .plan import QuantPlan, candidate_tensors, make_plan
from .proposal import DEFAULT_FLOAT_BUDGET, Evaluator, ProposalResult, Score, Target
from .proposal import propose as climb
from .qdq import RewriteResult
from .recorded import InputStats, PreprocessArg, cfg_siblings, check_header, choose_preprocess, model_props, range_warnings, read_record, source_note, step1_record, step1_siblings, fixed_inputs_of
from .resolve import RANGE_SETTINGS, user_edits
from .settings import Settings
from .targets import check_target_change, get as get_target

if TYPE_CHECKING:
    from .analysis import AnalysisOptions, AnalysisResult, SampleSink

Progress = Callable[[int], None]


@dataclass
class Step1Result:
    """Paths of the three artifacts and what step1 did."""

    model: Path
    data: Path
    cfg: Path
    backup: Path | None
    samples: int  # calibrated: the rows of the dataset entries where they hold batches (see dataset_entries)
    quantized_tensors: int
    layers: dict[str, int]
    fused: dict[str, str]
    renamed: dict[str, list[str]]
    float_subgraph_nodes: list[str]
    proposal: Any = None
    config: Path | None = None  # the workspace hybridq.yaml that was read, if any
    notes: list[str] = field(default_factory=list)
    control_flow: dict[str, Any] = field(default_factory=dict)  # fold.FoldReport: fixed inputs, Ifs folded, nodes kept and why
    warnings: list[str] = field(default_factory=list)  # the default int8 model far from fp32 (default_model.far_from_fp32)
    kept_float: str | None = None  # the speed check's note when it kept every default layer float: int8 was not applied
    dataset_entries: int | None = None  # the dataset entries (lines) holding `samples`, when they hold batches; else None


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
    """The dataset for this model's inputs (a list line may also give every input the model had before --fix-input)."""
    return load_dataset(dataset, input_specs(model), preprocess, fold.input_order(model))


def _entry_comments(plan: QuantPlan) -> dict[str, str]:
    comments = {}
    for t, tp in plan.tensors.items():
        comments[t] = f"output of {tp.producer}" if tp.layer_output else f"input of {', '.join(tp.readers[:3])}" + (" ..." if len(tp.readers) > 3 else "")
    for group in plan.shared:
        for t in group:
            others = [o for o in group if o != t]
            comments[t] += (f"; shares one grid with {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} (a Concat, MaxPool, "
                            "Resize or data-movement op keeps one scale): the group's parameters, which step2 uses (an edit moves them all)")
    for w, wp in plan.weights.items():
        comments[w] = f"weight of {wp.node}"
    return comments


def step1(
    model: str | Path,
    dataset: str | Path,
    *,
    out: str | Path | None = None,
    settings: Settings | Mapping[str, Any] | None = None,
    preprocess: PreprocessArg = None,
    config: str | Path | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    on_progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    proposal: "ProposalOptions | None" = None,
    fixed_inputs: Mapping[str, Any] | None = None,
    execution: Execution | None = None,
) -> Step1Result:
    """Prepare the temp model, calibrate on the dataset, and write `<name>.model`, `<name>.data`, `<name>.quantization.cfg`.

    `config` is a workspace `hybridq.yaml` (see hybridq.workspace; `workspace.find_config` finds the one the CLI
    would use). A full Settings / Preprocess replaces the file's values; a mapping overrides them key by key.
    The preprocessing used and the range of every float input are recorded in the cfg header and the `.data`
    meta, and step2 copies them into the deployable model. With `proposal`, the worst layers are first chosen
    for float (verified on the built model) and written into the cfg. `execution` runs the calibration (and the
    proposal's analyses) on local workers or Ray (hybridq.execution); the artifacts are the same bytes either way.
    """
    from .workspace import merge

    chosen = merge(config, settings, preprocess, fixed_inputs, {"samples": samples, "batch_size": batch_size, "seed": seed})
    settings, preprocess = chosen.settings, chosen.preprocess
    samples, batch_size, seed = (chosen.run.get(k) for k in ("samples", "batch_size", "seed"))
    settings.validate("settings")
    model_path = Path(model)
    original = load_model(model_path)
    check_step1_outputs(Path(out) if out else model_path.parent, model_path.stem, model_path, dataset)
    temp, report = prepare(original, chosen.fixed_inputs)
    ds = open_dataset(temp, dataset, preprocess)
    ds, batch_size = ds.drawn(samples, seed) if seed is not None else ds, batch_size or 1
    n = min(len(ds), samples) if samples else len(ds)
    if on_start:
        on_start(n)
    placement, out_dir, stem, input_stats = get_target(settings.target).placement, Path(out) if out else model_path.parent, model_path.stem, InputStats()
    costs, cost_notes = step1_costs(temp, next(ds.samples(limit=1), None), settings, out_dir, stem) if placement.cpu_policy else (None, [])
    plan, observers, inf_floats, inf_why = _calibrated_plan(temp, ds, n, settings, placement, costs, batch_size, input_stats, execution, on_progress)
    # recorded only when it did something: image inputs or a hook (.npy/.npz calibration data: nothing to record)
    recorded_pre = ds.preprocess.to_dict() if ds.image_inputs or ds.preprocess.hook else None
    entries, own = written_entries(plan, temp, observers, settings)
    header, meta = step1_record(model_path, dataset, n, recorded_pre, entries, settings, report, input_stats, costs, seed if ds.selection else None, own, ds.inputs)
    comments, prop, evaluator = _entry_comments(plan), None, None
    custom, custom_comments = recurrent.cfg_layers({k: (lp.op, lp.precision, lp.reason) for k, lp in plan.layers.items()})
    custom, custom_comments = {**custom, **inf_floats}, {**custom_comments, **inf_why}
    floats, why, bias_comments, note, far = default_model.decide(temp, observers, meta, settings, entries, custom, plan, placement, ds, n)
    if note:
        cost_notes.append(note + (" The proposal was not run: no layer is quantized." if floats and proposal else ""))
    custom, custom_comments, proposal = {**custom, **floats}, {**custom_comments, **why}, None if floats else proposal
    old_entries = edited_cfg_entries(out_dir, stem) if proposal is not None else None
    later, proposal = (proposal, None) if old_entries is not None else (None, proposal)  # SPEC 6: the user's edits are kept
    comments.update({t: f"{comments[t]}; {c}" for t, c in bias_comments.items()})
    cfg_entries = entries = meta["written_entries"]
    if proposal is not None:
        prop, evaluator = run_proposal(temp, observers, meta, settings, entries, inf_floats, list(ds.samples(limit=min(n, 2 * proposal.samples))), proposal)
        custom, custom_comments = {**custom, **prop.layers}, {**custom_comments, **prop.comments}
        cfg_entries = {t: prop.entries.get(t, e) for t, e in entries.items()}
        comments.update({t: f"{comments.get(t, '')}; {c}" for t, c in prop.entry_comments.items()})

    def cfg_text(model_sha: str) -> str:
        header["model_sha256"] = model_sha
        return render_cfg(header, settings, custom, custom_comments, cfg_entries, comments, stem)

    paths = write_step1(out_dir, stem, temp, observers, meta, cfg_text)
    if prop is not None:
        prop.measured, _, prop.built_layers = verify_proposal(paths["model"], paths["data"], paths["cfg"], evaluator)
    prop = _propose_over_edits(paths, old_entries, header, meta, dataset, later, cost_notes, ds.selection) if later is not None else prop
    layers = prop.built_layers if later is not None and prop is not None and prop.built_layers else _layer_counts(temp, settings, plan, custom, costs)
    return Step1Result(
        model=paths["model"], data=paths["data"], cfg=paths["cfg"], backup=paths.get("backup"), samples=header["samples"],
        dataset_entries=header.get("dataset_entries"), quantized_tensors=len(entries), layers=layers, fused=report.fused, renamed=report.renamed,
        float_subgraph_nodes=has_subgraphs(temp), proposal=prop, config=chosen.config, notes=initializer_inputs_note(report.initializer_inputs, original.ir_version) + ds.notes() + cost_notes + plan.notes,
        control_flow=report.control_flow.to_dict(), warnings=[far] if far and prop is None else [], kept_float=note if floats else None,
    )


def _propose_over_edits(
    paths: dict[str, Path], old_entries: dict[str, Any], header: dict[str, Any], meta: dict[str, Any], dataset: str | Path,
    options: "ProposalOptions", notes: list[str], selection: tuple[int, ...],
) -> ProposalResult | None:
    """step1 --proposal over a cfg the user edited: put their cfg (step1 kept it as `.bak`) back in place of the fresh
    one when it still applies, and run `propose` on it, which keeps their entries and comments; else propose on the fresh cfg."""
    from ._fs import write_atomic

    bak = paths["backup"]
    try:
        why = why_edits_do_not_apply(load_cfg(bak).header, old_entries, header, meta)
    except ConfigError as exc:
        why = f"it does not load ({exc})"
    if why is None:
        write_atomic(paths["cfg"], bak.read_bytes())
        notes.append(f"The proposal started from your edited cfg ({bak.name}) and was written into it.")
    else:
        notes.append(f"The proposal started from the default quantization, not from your edited cfg ({bak.name}): {why}. "
                     "Copy your edits into the new cfg and run hybridq propose on it.")
    try:
        prop, again = propose(paths["cfg"], dataset, options=options, selection=selection)
    except HybridqError as exc:  # the artifacts are written: a proposal that cannot run on them is a note, not a failed step1
        notes.append(f"The proposal did not run on {paths['cfg'].name}: {exc}")
        return None
    if again is not None and again.read_bytes() == bak.read_bytes():
        again.unlink()  # the same bytes as step1's backup
    return prop


def _calibrated_plan(
    temp: onnx.ModelProto, ds: Dataset, n: int, settings: Settings, placement: Any, costs: Any, batch_size: int,
    input_stats: InputStats, execution: Execution | None, on_progress: Progress | None,
) -> tuple[QuantPlan, dict[str, Any], dict[str, str], dict[str, str]]:
    """The plan, the observers, and the layers kept float32 (with comments) as they would quantize +-Inf (hybridq.infinite)."""
    plan = make_plan(temp, settings, placement=placement, costs=costs)
    hessians = hessian_inputs(temp) if settings.int4_rounding == "gptq" else []
    observers = calibrate_dataset(
        temp, ds, batch_size=batch_size, count=n, tensors=candidate_tensors(temp, placement), histograms=set(plan.tensors) | set(hessians),
        input_stats=input_stats, execution=execution, on_batch=on_progress, hessians=hessians,
    )
    plan, floats, why = infinite.keep_float(
        plan, observers, lambda layers: make_plan(temp, settings, layer_precision=layers, placement=placement, costs=costs))
    return plan, observers, floats, why


def _layer_counts(temp: onnx.ModelProto, settings: Settings, plan: QuantPlan, custom: dict[str, str], costs: Any = None) -> dict[str, int]:
    """Layers per precision as step2 will build and count them: the proposal's float layers applied, `default` as its dtype."""
    if custom:
        names = {n.name for n in temp.graph.node}
        plan = make_plan(temp, settings, layer_precision={k: v for k, v in custom.items() if k in names},
                         placement=get_target(settings.target).placement, costs=costs)
    counts: dict[str, int] = {}
    for precision, n in plan.precision_counts().items():
        key = settings.dtype if precision == "default" else precision
        counts[key] = counts.get(key, 0) + n
    return counts


def step2(
    model: str | Path,
    data: str | Path,
    cfg: str | Path,
    output: str | Path,
) -> Step2Result:
    """Merge temp model + data + cfg into one deployable QDQ ONNX model."""
    check_order(Path(model), Path(data), Path(cfg))
    check_output_file(Path(output), "step2 output (-o)", Path(model).stem + ".q.onnx")
    inputs = {"the temp model": Path(model), "the data file": Path(data), "the cfg": Path(cfg)}
    check_not_input(output, inputs, "step2 output (-o)")
    parsed = load_cfg(cfg)
    bundle = read_step1(model, data, parsed.header.get("model_sha256"), cfg)
    inputs.update(source := fp32_source_at(Path(output), bundle.meta))
    check_not_input(output, source, "step2 output (-o)")  # the three above were checked before they were read
    parsed = parsed.with_recorded(bundle.meta.get("written_settings", {}))
    temp = bundle.model
    built, resolved, checked = _built_as_step2(parsed, bundle)
    rewrite, plan, res = built.rewrite, built.plan, built.resolution
    _record_in_model(rewrite.model, bundle.meta, parsed.header, parsed.path)
    out_path = Path(output)
    try:
        if not is_large(rewrite.model):  # protobuf cannot serialize a model over 2 GB for the in-memory check
            onnx.checker.check_model(rewrite.model, full_check=False)
    except Exception as exc:
        raise HybridqError(f"The quantized model failed the ONNX checker ({str(exc).splitlines()[0]}); this is a hybridq bug, please report it with --debug output.") from exc
    if is_large(rewrite.model):  # its weights go to `<output>.data`
        check_not_input(f"{output_target(out_path)}.data", inputs, "weights file of the step2 output")  # beside a link's target
    save_model_atomic(rewrite.model, out_path)
    size_fp32 = model_bytes(temp)
    return Step2Result(
        output=out_path,
        layers=_count_precisions(rewrite, parsed.settings.dtype),
        resolved=resolved,
        size_fp32=size_fp32,
        size_quant=os.path.getsize(out_path),
        notes=res.notes + rewrite.notes + plan.notes,
        warnings=checked + res.warnings,
        rewrite=rewrite,
    )


def _built_as_step2(parsed: Cfg, bundle: Any) -> tuple[Built, list[LayerResolution], list[str]]:
    """The cfg checked and built as step2 builds it (nothing written): the build, each custom_quantize_layers entry as
    resolved, and the cfg checks' warnings. A ConfigError names what step2 cannot honour."""
    temp = bundle.model
    checked = check_cfg(parsed, bundle.meta, temp, bundle.model_path)
    edits, resolved = edits_from_cfg(parsed, temp, bundle.meta)
    check_target_change(temp, parsed.settings, bundle.meta.get("written_settings", {}), bundle.observers, edits.layers, str(parsed.path))
    built = build(temp, bundle.observers, bundle.meta, parsed.settings, edits, where=str(parsed.path))
    set_effective(built, resolved, parsed.settings, str(parsed.path), parsed.custom_lines)
    checked += moot_float_entries(built, resolved, edits, parsed.settings, bundle.meta, str(parsed.path), parsed.custom_lines)
    return built, resolved, checked


def _record_in_model(model: onnx.ModelProto, meta: dict[str, Any], header: dict[str, Any], header_path: Path) -> None:
    """Write step1's record (preprocessing, calibrated input ranges) into the model's metadata_props (see hybridq.recorded)."""
    check_header(header, meta, header_path)
    pre = meta["preprocess"] if "preprocess" in meta else (dict(header["preprocess"]) if header.get("preprocess") else None)
    source = meta.get("source_sha256")  # (artifacts of a step1 before it was recorded: no record, the same bytes as then)
    props = {**model_props(pre, meta.get("input_ranges"), (source, header.get("model_sha256", "")) if source else ()),
             **fold.record_props(meta)}
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def _count_precisions(rewrite: RewriteResult, dtype: str) -> dict[str, int]:
    """Layers per precision in the built model, `default` counted as the cfg's dtype (as step1 counts them)."""
    counts: dict[str, int] = {}
    for lp in rewrite.layers.values():
        key = dtype if lp["precision"] == "default" else lp["precision"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def analyze(
    float_model: str | Path,
    quant_model: str | Path,
    dataset: str | Path,
    *,
    preprocess: PreprocessArg = None,
    force_preprocess: bool = False,
    samples: int | None = None,
    dump: str | Path | None = None,
    max_bytes: int | None = None,
    on_sample: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    host_int8: bool = False,
    runtime: str | None = None,
    execution: Execution | None = None,
):
    """Run the fp32 and quantized models side by side; entire and single error of every layer.

    `runtime` ("cpu": this CPU's default ONNX Runtime kernels; "openvino") adds, per model output, what that
    runtime computes against fp32 and against the exact simulation (hybridq.analysis.runtime), in `result.runtime`;
    a folder of device tensors (a hybridq snapshot, or RKNN's accuracy_analysis folder with runtime/) adds it per layer.

    `quant_model` may also be a step1 cfg (`<name>.quantization.cfg`): the model it
    describes is built in a temporary directory first, so a cfg can be checked before step2.
    The preprocessing is the one recorded in `quant_model` (cfg, or the step2 model's metadata);
    `preprocess` (a Preprocess, or a mapping of some options) must agree with it unless
    `force_preprocess`; with nothing recorded it is used as given (see hybridq.recorded).
    The result's `warnings` list inputs far outside the calibrated range.
    int8 products are exact unless `host_int8` (this CPU's default ONNX Runtime kernels; see hybridq.kernels).
    `execution` runs the samples on local workers or Ray (hybridq.execution), which read them from the dataset
    themselves; the figures are the same bit for bit.
    """
    from .analysis import AnalysisOptions
    from .analysis.runtime import runtime_column
    from .sources import IndexedSamples

    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InputError(f"samples must be at least 1 (None: all the dataset's samples), got {samples!r}.")
    fm = fold.as_fixed(load_model(float_model), fixed_inputs_of(Path(quant_model)), f"the inputs step1 fixed ({quant_model})")
    if dump is not None:
        check_output_dir(Path(dump), "snapshot directory (--dump)")
    record = read_record(quant_model)
    ds = open_dataset(fm, dataset, choose_preprocess(record, preprocess, force_preprocess))
    n = min(len(ds), samples) if samples else len(ds)
    if on_start:
        on_start(n)
    quant_path = Path(quant_model)
    with tempfile.TemporaryDirectory(prefix="hybridq-analyze-") as tmp:
        built = step2(*siblings, quant_path, Path(tmp) / "q.onnx") if (siblings := cfg_siblings(quant_path)) else None
        quant_path = built.output if built else quant_path
        qm = load_model(quant_path)
        seen = InputStats()
        device, then = runtime_column(runtime, fm, qm, lambda: ds.samples(limit=n))
        options = AnalysisOptions(execution=execution) if execution is not None else None
        result = analyze_samples(fm, qm, IndexedSamples(ds, n, seen), dump=dump, max_bytes=max_bytes, on_sample=on_sample,
                                 host_int8=host_int8, sink=device, then=then, options=options)
    result.warnings = (built.warnings if built else []) + range_warnings(record.input_ranges, seen.to_dict(), record.source)
    other = source_note(float_model, qm) if isinstance(float_model, (str, os.PathLike)) else None
    result.notes = ([other] if other else []) + result.notes + ds.notes()
    if rows := seen.samples_in(ds.inputs, n):  # named as such: the per-sample figures are one per entry
        result.batched_rows = rows
        result.notes.append(f"the {n} dataset entries hold {rows} samples in batches (axis 0): each entry's rows are "
                            "measured together, so the per-sample figures (the worst sample #) are one per entry.")
    return result


def analyze_samples(
    float_model: str | os.PathLike[str] | onnx.ModelProto,
    quant_model: str | os.PathLike[str] | onnx.ModelProto,
    samples: Iterable[dict[str, np.ndarray]],
    *,
    dump: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    on_sample: Callable[[], None] | None = None,
    host_int8: bool = False,
    options: AnalysisOptions | None = None,
    sink: SampleSink | None = None,
    then: Callable[[AnalysisResult], None] | None = None,
) -> AnalysisResult:
    """The analysis of two models over `samples` (hybridq.analysis.analyze); with `dump`, a snapshot too.

    With `dump` (a directory) each sample's fp32 and quant arrays are streamed there while the
    analysis runs (`max_bytes` caps them; see hybridq.snapshot), then the manifest and the reports
    (error_analysis.txt/.csv/.png, report.html), all staged, replace an older snapshot as one unit. Without it nothing is written.
    `sink` also receives every sample's arrays; `then` completes the result before anything is written.
    """
    from .analysis import Tee, analyze as run_analysis, judge

    if dump is None:
        result = run_analysis(float_model, quant_model, samples, sink=sink, on_sample=on_sample, host_int8=host_int8, options=options)
        if then is not None:
            then(result)
        return result
    from .report import write_reports
    from .snapshot import ArrayDump

    arrays = ArrayDump(Path(dump), max_bytes)
    try:  # the snapshot is staged, then swapped in whole: interrupted or failed, an older one in `dump` stays as it was
        result = run_analysis(float_model, quant_model, samples, sink=Tee(arrays, *([sink] if sink is not None else [])),
                              on_sample=on_sample, host_int8=host_int8, options=options)
        if then is not None:
            then(result)
        arrays.commit(result, lambda staged: write_reports(result, staged, v=judge(result, snapshot=str(dump))))
    finally:
        arrays.abort()  # after the commit: nothing left to take back
    return result


def load_snapshot(directory: str | Path):
    """Read a snapshot written by `analyze(..., dump=DIR)`, or RKNN-Toolkit2's accuracy_analysis folder; no model is run.

    For an RKNN folder (golden/, simulator/, runtime/, map_name_to_file.txt) each dumped tensor becomes a row whose
    entire error is golden vs simulator (RKNN dumps one sample and no isolated error); with a runtime/ tree, a
    note names the tensor where the device first departs from the simulator.
    """
    from .snapshot import load_snapshot as read

    root = Path(directory)
    if not (root / "manifest.json").exists():
        if (root / "map_name_to_file.txt").exists() or (root / "golden").is_dir():
            from .analysis.runtime import rknn_folder_result

            return rknn_folder_result(root)
        raise InputError(f"'{directory}' is not a hybridq snapshot (no manifest.json) nor an RKNN-Toolkit2 accuracy_analysis "
                         f"folder (no golden/ or map_name_to_file.txt). Write one with `hybridq analyze ... --dump {directory}`.")
    return read(directory)


@dataclass
class ProposalOptions:
    """How a proposal searches: the target, the budget, the fallback precision and the samples it measures on."""

    target: Target = field(default_factory=Target)
    max_float_layers: int | None = None
    max_float_fraction: float | None = DEFAULT_FLOAT_BUDGET  # float compute the proposal may add
    fallback: str | None = None  # None: the target's (float32 on cpu, float16 on npu)
    samples: int = 16  # scored on these; fixes are fitted on as many more when the dataset has them
    max_size_mb: float | None = None  # model-size budget (1 MB = 10^6 bytes), met first with int4 MatMul/Gemm weights
    execution: Execution | None = None  # where the analyses and candidate scores run (hybridq.execution); None: analyze's own pool, scores here
    max_slowdown: float | None = None  # predicted latency the float layers may add, as a factor (measured cost model)


def run_proposal(
    temp: onnx.ModelProto, observers, meta: dict[str, Any], settings: Settings, entries: dict[str, dict[str, Any]],
    existing: dict[str, str], samples: list[dict[str, np.ndarray]], options: ProposalOptions,
    single: dict[str, float] | None = None, keep: set[str] = frozenset(), baseline_label: str = "the default quantization",
    source: Cfg | None = None,
) -> tuple[ProposalResult, Evaluator]:
    """Climb the ladder of fixes from the cfg as it stands; candidates are built as step2 builds them.

    `entries`, `existing` (custom_quantize_layers as node -> precision) and `settings` are the cfg's own:
    every candidate, the baseline included, is built from them with the proposal's fixes on top. Tensors in
    `keep` (edited by the user) are never changed. `source`, the parsed cfg file, lets a bad entry be
    reported at its line. Candidates are scored on the first `options.samples` samples; fixes (outlier
    ranges, bias shifts) are fitted on the rest when there are any, so a fix is judged on samples it was
    not fitted to.
    """
    if options.fallback not in (None, "float32", "float16", "int16"):
        raise InputError(f"--fallback {options.fallback!r} is not valid; use float32 (fastest on CPU), float16 or int16 (NPUs).")
    if options.fallback == "int16" and settings.target != "npu":
        raise InputError("--fallback int16 is for target npu: ONNX Runtime's CPU provider has no int16 kernels, so an int16 "
                         "layer costs what a float one does there; use float32, or --target npu.")
    target = get_target(settings.target)
    fallback = (options.fallback,) if options.fallback else (*target.rungs, target.fallback)
    scored = samples[: options.samples]
    fit = samples[options.samples:] or scored
    shared = fit is scored
    evaluator = Evaluator(temp, scored, options.target, options.execution)
    lines = {t: e.line for t, e in source.entries.items()} if source is not None else {}
    where = str(source.path) if source is not None else "cfg"
    base = edits_from(existing, {t: CfgEntry(t, lines.get(t, 0), dict(v)) for t, v in entries.items()}, temp, where)

    def analyse(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> dict[str, float]:
        from .analysis import AnalysisOptions, analyze as run_analysis

        analysed = run_analysis(fp32, quant, scored, options=AnalysisOptions(execution=options.execution) if options.execution else None)
        return {le.layer: le.single.cosine for le in analysed.layers if le.single is not None}

    with held(options.execution):  # one Ray instance for the whole search
        result = climb(
            temp, observers, meta, settings, base, fit, evaluator, single=single, protected=set(keep), fallback=fallback,
            max_float_layers=options.max_float_layers, max_float_fraction=options.max_float_fraction,
            started_from=baseline_label, analyse=analyse, where=where, max_size_mb=options.max_size_mb, max_slowdown=options.max_slowdown,
        )
    result.notes, result.target = result.notes + evaluator.notes, options.target.describe()
    if shared and result.entries:
        result.warnings.append(f"only {len(scored)} sample(s): the fixes were fitted on the samples they are scored on; "
                               f"give the dataset more than --proposal-samples {options.samples} samples for a held-out check")
    return result, evaluator


def verify_proposal(model: Path, data: Path, cfg: Path, evaluator: Evaluator) -> tuple[Score, onnx.ModelProto, dict[str, int]]:
    """Build the written cfg with step2 (in a temporary directory) and measure it: the figure a proposal may claim.

    Returns the score, the built model (to see which tensors it quantizes) and its layers per precision.
    """
    with tempfile.TemporaryDirectory(prefix="hybridq-verify-") as tmp:
        res = step2(model, data, cfg, Path(tmp) / "verify.onnx")
        built = onnx.load(str(res.output))
        return evaluator.score(built), built, res.layers


def propose(
    cfg: str | Path,
    dataset: str | Path,
    *,
    snapshot: str | Path | None = None,
    preprocess: PreprocessArg = None,
    options: ProposalOptions | None = None,
    force_preprocess: bool = False,
    selection: tuple[int, ...] = (),
) -> tuple[ProposalResult, Path | None]:
    """Propose float layers (or range clips) for an existing cfg, write them into it, verify.

    The proposal starts from the cfg as the user left it: its custom_quantize_layers, per-tensor
    edits and settings are what the baseline is built from, and they, and every comment, are kept;
    a tensor the user edited is never clipped. When the proposal adds nothing the file is not
    touched (no rewrite, no backup). With `snapshot` (from `analyze --dump`), its single errors
    rank the layers and no analysis is re-run. The preprocessing is the one step1 recorded for the
    cfg; `preprocess` must agree with it unless `force_preprocess` (see `analyze`). The result's
    `warnings` list inputs far outside the calibrated range. Returns the result and the backup of
    the previous cfg (None when none was needed); `result.written` says whether the cfg changed.
    `selection` (Dataset.select) keeps the samples step1 drew with --seed.
    """
    from ._fs import write_atomic as write_text_atomic
    from .artifacts import backup_if_edited
    from .config import update_custom_layers, update_entries
    from .errors import OutputError
    from .proposal import moot_edits
    from .snapshot import layers_for

    options = options or ProposalOptions()
    cfg_path = Path(cfg)
    siblings = step1_siblings(cfg_path)
    if siblings is None and not cfg_path.is_file():
        what = "is not a regular file" if cfg_path.exists() else "does not exist"
        raise InputError(f"cfg '{cfg_path}' {what}; pass the <name>.quantization.cfg step1 wrote.")
    if siblings is None:
        raise InputError(f"'{cfg_path}' is not a step1 cfg (no `hybridq:` header); pass the <name>.quantization.cfg step1 wrote.")
    model_path, data_path = siblings
    parsed = load_cfg(cfg_path)
    before = cfg_path.read_text(encoding="utf-8")
    bundle = read_step1(model_path, data_path, parsed.header.get("model_sha256"), cfg_path)
    parsed = parsed.with_recorded(bundle.meta.get("written_settings", {}))
    existing, _ = resolve_layer_names(parsed.custom, parsed.custom_lines, str(parsed.path), bundle.model, bundle.meta)
    entries = {t: e.values for t, e in parsed.entries.items()}
    edited, what = user_edits(parsed, bundle.meta, existing)
    by_hand = set(edited)
    written_settings = Settings(**bundle.meta.get("written_settings", {}))
    if any(getattr(parsed.settings, k) != getattr(written_settings, k) for k in RANGE_SETTINGS):
        edited |= set(entries)  # a global range edit applies to every entry: the proposal does not override it per tensor
    single, snapshot_warning = None, None
    if snapshot is not None:
        single, snapshot_warning = layers_for(snapshot, bundle.model, cfg_path)
    check_header(parsed.header, bundle.meta, cfg_path)
    record = read_record(cfg_path)
    ds = open_dataset(bundle.model, dataset, choose_preprocess(record, preprocess, force_preprocess)).select(selection)
    samples = list(ds.samples(limit=min(len(ds), 2 * options.samples)))
    seen = InputStats()
    for sample in samples:
        seen.update(sample)
    _built_as_step2(parsed, bundle)  # the cfg as step2 takes it: its errors before the search and any write
    label = "your cfg as edited" if what else "the default quantization"
    result, evaluator = run_proposal(bundle.model, bundle.observers, bundle.meta, parsed.settings, entries, existing, samples, options,
                                     single, keep=edited, baseline_label=label, source=parsed)
    result.edits = what
    text = update_custom_layers(before, result.layers, result.comments)
    text = update_entries(text, result.entries, result.entry_comments)
    backup = None
    if text != before:
        if cfg_path.read_text(encoding="utf-8") != before:
            raise OutputError(f"'{cfg_path}' was changed while the proposal ran; it was left as it is now. Re-run hybridq propose on it.")
        backup = backup_if_edited(cfg_path, data_path, text)
        write_text_atomic(cfg_path, text)
        result.written = True
    result.measured, built, result.built_layers = verify_proposal(model_path, data_path, cfg_path, evaluator)
    result.warnings += moot_edits(by_hand, result.layers, bundle.model, built)
    result.warnings += range_warnings(record.input_ranges, seen.to_dict(), record.source)
    result.warnings += [snapshot_warning] if snapshot_warning else []
    return result, backup


propose_cfg = propose  # the name before `propose` became public
