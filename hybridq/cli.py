"""The `hybridq` command: parse, call the API, render, map errors to exit codes."""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import _console as console
from ._cli_options import (
    MeanOpt, StdOpt, ColorOpt, LayoutOpt, ResizeOpt, ForceOpt, HookOpt, TargetCosOpt, TargetSnrOpt,
    MaxLayersOpt, NoMeasureOpt, MaxSlowOpt, MaxFracOpt, EvalOpt, MaxDropOpt, FallbackOpt, MaxSizeOpt,
    PropSamplesOpt, FixInputOpt, WorkersOpt, RayOpt,
)
from ._cli_proposal import proposal_report
from ._console import JsonOpt, QuietOpt, State, emit, progress, table, warn
from .errors import ExitCode, HybridqError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Hybrid post-training quantization of ONNX models (RKNN-Toolkit2 style): step1 -> edit cfg -> step2 -> analyze.",
)
def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.out.print(f"hybridq {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Options before the command."""


USER_PATH_ERRORS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR}
"""Errors of a path as given (too long, a symlink loop, a file where a directory is wanted): the user's to fix, exit 2."""


def _given_preprocess(mean, std, color, layout, resize, hook) -> dict[str, Any]:
    """Only the preprocessing options given on the command line (the API fills the rest from the record or the workspace)."""
    from .dataset import parse_floats

    given = {
        "mean": parse_floats(mean, "--mean") if mean else None,
        "std": parse_floats(std, "--std") if std else None,
        "color": color, "layout": layout, "resize": resize, "hook": hook,
    }
    return {k: v for k, v in given.items() if v is not None}


def _execution(workers: int, ray: str | None):
    """The execution back end the flags ask for (None: the command's default)."""
    from .execution import Execution

    if workers == 0 and ray is None:
        return None
    chosen = Execution(workers, ray)
    chosen.validate()
    return chosen


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Workspace directory to create.")],
    model: Annotated[Optional[Path], typer.Option(help="Copy this ONNX model into the workspace.")] = None,
) -> None:
    """Create a workspace from the template.

    The workspace holds a commented config (hybridq.yaml, read by step1), dataset.txt and a README of the loop.
    """
    from .workspace import init as make_workspace

    if directory.exists() and not directory.is_dir():
        raise InputError(f"'{directory}' is a file, not a directory; choose a new directory for the workspace.")
    make_workspace(directory, model)
    emit({"workspace": str(directory)}, [], [f"Workspace ready in {directory}: edit dataset.txt, then run the commands in {directory}/README.md."])


def _step1_lines(res) -> list[str]:
    """What step1 wrote and what to do next, for the terminal."""
    lines = [f"Workspace config: {res.config} (command-line options win)."] if res.config else []
    lines += [
        f"Calibrated on {res.samples} samples" + (f" in {res.dataset_entries} batched dataset entries" if res.dataset_entries else "")
        + f"; {res.quantized_tensors} tensors in the cfg.",
        f"  temp model: {res.model}",
        f"  data:       {res.data}",
        f"  cfg:        {res.cfg}",
    ]
    lines += [f"note: {n}" for n in res.notes]
    if res.backup:
        lines.append(f"The previous cfg had edits: kept as {res.backup}.")
    if res.renamed:
        shown = [f"{k} -> {', '.join(v)}" for k, v in res.renamed.items()]
        lines.append(f"{len(res.renamed)} node name(s) were shared by several nodes, renamed in the temp model: " + "; ".join(shown[:8]) + (" ..." if len(shown) > 8 else ""))
    if res.fused:
        lines.append(f"{len(res.fused)} nodes were fused or folded in the temp model: " + ", ".join(f"{k} -> {v or '(folded)'}" for k, v in list(res.fused.items())[:8]) + (" ..." if len(res.fused) > 8 else ""))
    lines += _control_flow_lines(res)
    lines.append(f"Next: edit {res.cfg.name} if needed, then run `hybridq step2 {res.model} {res.data} {res.cfg} -o {res.model.with_suffix('.q.onnx')}`.")
    return lines


@app.command()
def step1(
    model: Annotated[Path, typer.Argument(help="fp32 ONNX model.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset.txt (RKNN convention), a directory or a glob.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where the three artifacts go (default: beside the model).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Workspace settings file (default: hybridq.yaml in --out, beside the model, "
                                                   "or beside the dataset, if there is one); command-line options win.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Activation dtype: uint8 (default), int8 or int16.")] = None,
    weight_dtype: Annotated[Optional[str], typer.Option(help="Weight dtype: int8 (default) or int16.")] = None,
    qmethod: Annotated[Optional[str], typer.Option(help="Weights per channel (default) or per layer: channel or layer.")] = None,
    qtype: Annotated[Optional[str], typer.Option(help="Activations asym (default) or sym.")] = None,
    algorithm: Annotated[Optional[str], typer.Option(help="Range algorithm: minmax (default), percentile, kl or mse.")] = None,
    percentile: Annotated[Optional[float], typer.Option(help="Percentile for --algorithm percentile (default 99.99).")] = None,
    int4_rounding: Annotated[Optional[str], typer.Option(help="Rounding of int4 layers: rtn (default) or gptq (step1 then records X^T X of each MatMul/Gemm input).")] = None,
    target: Annotated[Optional[str], typer.Option(help="Where the model runs: cpu (default; ONNX Runtime's CPU kernels) or npu (every operator in int8).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Use at most N samples.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per batch (models with a dynamic batch dim; default 1).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="With --samples N: draw the N samples at random with this seed (default: the first N listed).")] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = None,
    layout: LayoutOpt = None,
    resize: ResizeOpt = None,
    preprocess_hook: HookOpt = None,
    proposal: Annotated[bool, typer.Option(help="Analyse first and pre-fill custom_quantize_layers with the layers that lose most.")] = False,
    target_cosine: TargetCosOpt = None,
    target_snr: TargetSnrOpt = None,
    max_float_layers: MaxLayersOpt = None,
    max_float_fraction: MaxFracOpt = None,
    max_slowdown: MaxSlowOpt = None,
    eval_fn: EvalOpt = None,
    max_drop: MaxDropOpt = None,
    fallback: FallbackOpt = None,
    proposal_samples: PropSamplesOpt = 16,
    max_size_mb: MaxSizeOpt = None,
    fix_input: FixInputOpt = None,
    workers: WorkersOpt = 0,
    ray: RayOpt = None,
    measure: NoMeasureOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Calibrate a model and write the three step1 artifacts.

    Writes <name>.model, <name>.data and the editable <name>.quantization.cfg.
    """
    from . import api
    from .execution import held
    from .workspace import find_config

    State.quiet, State.json = quiet, as_json
    _check_counts(samples, batch_size)
    if not proposal:
        _proposal_only({"--target-cosine": target_cosine, "--target-snr": target_snr, "--max-float-layers": max_float_layers,
                        "--max-float-fraction": max_float_fraction, "--max-slowdown": max_slowdown, "--eval": eval_fn, "--max-drop": max_drop,
                        "--fallback": fallback, "--max-size-mb": max_size_mb, "--proposal-samples": None if proposal_samples == 16 else proposal_samples})
    if config is None:
        config = find_config(out_dir, model, dataset)
    given = dict(dtype=dtype, weight_dtype=weight_dtype, qmethod=qmethod, qtype=qtype, algorithm=algorithm, percentile=percentile, target=target,
                 int4_rounding=int4_rounding, cost_model=None if measure is None else ("measured" if measure else "macs"))
    pre = _given_preprocess(mean, std, color, layout, resize, preprocess_hook)
    execution = _execution(workers, ray)
    with progress("calibrating") as advance, held(execution):  # --ray local: one Ray instance for calibration and proposal
        res = api.step1(
            model, dataset, out=out_dir, settings=given, preprocess=pre, config=config, samples=samples, batch_size=batch_size, seed=seed,
            on_progress=advance, on_start=advance.start, fixed_inputs=_fixed_inputs(fix_input), execution=execution,
            proposal=_proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback,
                                       proposal_samples, max_size_mb, execution, max_slowdown) if proposal else None,
        )
    lines = _step1_lines(res)
    warn(res.warnings)
    data = {"model": res.model, "data": res.data, "cfg": res.cfg, "backup": res.backup, "samples": res.samples, "dataset_entries": res.dataset_entries, "layers": res.layers, "fused": res.fused, "renamed": res.renamed,
            "config": res.config, "notes": res.notes, "warnings": res.warnings, "control_flow": res.control_flow}
    tables = [table("layers", ["precision", "count"], [[k, v] for k, v in sorted(res.layers.items())])]
    if res.proposal is not None:
        ptables, plines, pdata = proposal_report(res.proposal)
        tables += ptables
        lines = plines + lines
        data["proposal"] = pdata
    emit(data, tables, lines)


def _check_counts(samples: int | None, batch_size: int | None) -> None:
    """--samples and --batch-size are at least 1."""
    if samples is not None and samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}.")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}.")


def _fixed_inputs(items: list[str] | None) -> dict[str, object]:
    """--fix-input NAME=VALUE options as a mapping."""
    from .fold import parse_fix_input

    return dict(parse_fix_input(f) for f in items or [])


def _control_flow_lines(res) -> list[str]:
    """Summary lines of step1's control flow: the Ifs folded, the nodes that stay float and why."""
    cf, lines = res.control_flow, []
    if cf.get("folded"):
        fixed = ", ".join(f"{k}={v}" for k, v in cf["fixed_inputs"].items()) or "none"
        lines.append(f"Control flow folded (fixed inputs {fixed}): " + ", ".join(f"{k} -> {v}" for k, v in cf["folded"].items()) + ".")
    if res.float_subgraph_nodes:
        lines.append(f"Control-flow nodes stay float (their subgraphs are not quantized): {', '.join(res.float_subgraph_nodes)}.")
        lines += [f"  {why}." for why in cf.get("kept", {}).values()]
    return lines


@app.command()
def step2(
    model: Annotated[Path, typer.Argument(help="<name>.model from step1.")],
    data: Annotated[Path, typer.Argument(help="<name>.data from step1.")],
    cfg: Annotated[Path, typer.Argument(help="<name>.quantization.cfg, edited or not.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The deployable QDQ ONNX model to write.")],
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build the deployable QDQ model from the step1 artifacts.

    Merges temp model + data + cfg into one QDQ ONNX model.
    """
    from . import api

    State.quiet, State.json = quiet, as_json
    res = api.step2(model, data, cfg, output)
    rows = [[k, v] for k, v in sorted(res.layers.items())]
    tables = [table("layers per precision", ["precision", "layers"], rows)]
    if res.resolved:
        tables.append(table("custom_quantize_layers", ["entry", "node", "requested", "effective", "resolved as"],
                             [[r.entry, r.node, r.requested, r.effective, r.how] for r in res.resolved]))
    lines = [f"Wrote {res.output}: {res.size_fp32 / 1e6:.2f} MB fp32 -> {res.size_quant / 1e6:.2f} MB."]
    lines += [f"note: {n}" for n in res.notes]
    warn(res.warnings)
    data = {
        "output": res.output, "layers": res.layers, "size_fp32": res.size_fp32, "size_quant": res.size_quant,
        "resolved": [vars(r) for r in res.resolved], "notes": res.notes, "warnings": res.warnings,
    }
    emit(data, tables, lines)


def _cfg_beside(quant_model: Path | None, float_model: Path | None = None) -> str | None:
    """The cfg a quantized model was built from, when analyze was given it or it lies beside the model; else the one
    cfg beside either model or in a folder under it that the step2 model records as its step1 run's (recorded_cfg)."""
    if quant_model is None:
        return None
    from .recorded import recorded_cfg, step1_siblings

    if quant_model.is_file() and step1_siblings(quant_model) is not None:
        return str(quant_model)
    found = sorted(quant_model.parent.glob("*.quantization.cfg"))
    stem = quant_model.name.split(".")[0]
    named = [c for c in found if c.name.split(".")[0] == stem]
    if len(named or found) == 1:
        return str((named or found)[0])
    recorded = recorded_cfg(quant_model, [quant_model.parent] + ([float_model.parent] if float_model is not None else []))
    return str(recorded) if recorded is not None else None


def _fallback_of(cfg: str | None) -> str:
    """The precision analyze's next step suggests for a layer: the fallback of the target the cfg was written for
    (float16 on npu), float32 without a readable cfg."""
    from .config import load_cfg
    from .targets import get as get_target

    try:
        return get_target(load_cfg(Path(cfg)).settings.target).fallback if cfg is not None else "float32"
    except HybridqError:  # an unreadable cfg is reported where it is used, not here
        return "float32"


@app.command()
def analyze(
    float_model: Annotated[Optional[Path], typer.Argument(help="fp32 ONNX model.")] = None,
    quant_model: Annotated[Optional[Path], typer.Argument(help="Quantized QDQ model, or a step1 <name>.quantization.cfg.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Samples to compare on (same format as step1).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Use at most N samples.")] = None,
    dump: Annotated[Optional[Path], typer.Option(help="Write a snapshot here: fp32/ and quant/ tensors, manifest, reports.")] = None,
    max_bytes: Annotated[Optional[int], typer.Option(help="Cap the arrays written by --dump (bytes).")] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="Re-render a snapshot, or RKNN-Toolkit2's accuracy_analysis folder, without running a model (with --dump DIR: its reports into DIR).")] = None,
    top: Annotated[int, typer.Option(min=0, help="Rows in the table of worst layers.")] = 20,
    target_cosine: Annotated[float, typer.Option(help="Verdict threshold: cosine of every output and of its worst slice (OK/CHECK); layers whose single error is below it are listed, not judged.")] = 0.99,
    target_snr: Annotated[float, typer.Option(help="Verdict threshold (dB): SNR of every output's worst slice (OK/CHECK); layers whose single error is below it are listed, not judged.")] = 20.0,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 3 when the analysis ran but the verdict is CHECK (for CI); without it CHECK exits 0.")] = False,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Add the runtime column, against fp32 and the exact simulation: "
                                                   "cpu (this CPU's default int8 kernels) or openvino, per output; or a folder of "
                                                   "device tensors (a hybridq snapshot, RKNN's accuracy_analysis folder), per layer.")] = None,
    host_int8: Annotated[bool, typer.Option("--host-int8", help="Measure with this CPU's default ONNX Runtime int8 kernels "
                                            "(they saturate on x86 without VNNI) instead of exact int8 products.")] = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = None,
    layout: LayoutOpt = None,
    resize: ResizeOpt = None,
    preprocess_hook: HookOpt = None,
    force_preprocess: ForceOpt = False,
    workers: WorkersOpt = 0,
    ray: RayOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare a quantized model with the fp32 model, layer by layer.

    Per-layer error of QUANT_MODEL against FLOAT_MODEL: entire (accumulated) and single (isolated), with a snapshot.
    The verdict, OK or CHECK with the next step, follows the tables, where a terminal shows it last. --json prints strict
    JSON (non-finite numbers are null, listed by JSON Pointer under "nonfinite"), the verdict first, under "verdict". Exit codes: 0 ran (OK or
    CHECK), 3 CHECK with --strict, 2 bad input, 1 failure. The preprocessing comes from QUANT_MODEL (step1
    recorded it in the cfg, step2 in the model); no options needed.
    """
    from . import api
    from .analysis import judge
    from .report import write_reports

    State.quiet, State.json = quiet, as_json
    _check_thresholds(target_cosine, target_snr)
    if from_dir is not None:
        ignored = [name for name, given in (("FLOAT_MODEL", float_model), ("QUANT_MODEL", quant_model), ("--samples", samples is not None),
                                            ("--max-bytes", max_bytes), ("--runtime", runtime), ("--host-int8", host_int8),
                                            ("--mean/--std/--layout/--preprocess-hook", (mean, std, layout, preprocess_hook) != (None,) * 4),
                                            ("--color", color is not None), ("--resize", resize is not None), ("--force-preprocess", force_preprocess),
                                            ("--workers", workers), ("--ray", ray)) if given]
        if ignored:
            raise InputError(f"--from re-reads the snapshot '{from_dir}' and runs no model, so {', '.join(ignored)} would do nothing: "
                             "leave them out, or drop --from to run a new analysis.")
        if dump is not None:
            api.check_output_dir(Path(dump), "reports directory (--dump)")
        result, snapshot = api.load_snapshot(from_dir), _hybridq_snapshot(from_dir)
    else:
        if float_model is None or quant_model is None or dataset is None:
            raise InputError("analyze needs FLOAT_MODEL QUANT_MODEL --dataset D (or --from SNAPSHOT_DIR to re-read a snapshot).")
        _check_counts(samples, None)  # as step1: leaving --samples out is "all", 0 is a mistake
        pre = _given_preprocess(mean, std, color, layout, resize, preprocess_hook) or None
        with progress("analyzing") as advance:
            result = api.analyze(float_model, quant_model, dataset, preprocess=pre, force_preprocess=force_preprocess, samples=samples,
                                 dump=dump, max_bytes=max_bytes, on_sample=lambda: advance(1), on_start=advance.start, host_int8=host_int8,
                                 runtime=runtime, execution=_execution(workers, ray))
        warn(getattr(result, "warnings", []))
        snapshot = str(dump) if dump is not None else None
    cfg = _cfg_beside(quant_model, float_model)
    v = judge(result, target_cosine, target_snr, snapshot=snapshot, cfg=cfg, dataset=dataset, fallback=_fallback_of(cfg),
              float_model=None if float_model is None else str(float_model))
    if dump is not None and from_dir is None and (cfg is not None or (target_cosine, target_snr) != (0.99, 20.0)):
        write_reports(result, dump, target_cosine, target_snr, v)  # the snapshot's reports: these thresholds, this cfg
    elif dump is not None and from_dir is not None:  # a snapshot or an RKNN folder rendered as reports elsewhere
        Path(dump).mkdir(parents=True, exist_ok=True)
        write_reports(result, dump, target_cosine, target_snr, v)
    _print_analysis(result, v, dump, from_dir, top, target_cosine, target_snr)
    if strict and not v.ok:
        raise typer.Exit(int(ExitCode.BELOW_THRESHOLD))


def _hybridq_snapshot(folder: Path) -> str | None:
    """`folder` when it is a hybridq snapshot, which propose reads; None for RKNN's accuracy_analysis folder."""
    from .snapshot import MANIFEST

    return str(folder) if (Path(folder) / MANIFEST).is_file() else None


def _check_thresholds(target_cosine: float, target_snr: float) -> None:
    """analyze's verdict thresholds: a cosine in (0, 1], a finite SNR."""
    if not 0.0 < target_cosine <= 1.0:
        raise InputError(f"--target-cosine must be in (0, 1], got {target_cosine}.")
    if not math.isfinite(target_snr):
        raise InputError(f"--target-snr must be a finite number of dB, got {target_snr}; use e.g. 20.")


def _print_analysis(result, v, dump: Path | None, from_dir: Path | None, top: int, target_cosine: float, target_snr: float) -> None:
    """analyze's output: strict JSON (verdict first), or the tables, the verdict line and the notes."""
    from .metrics import to_strict_json
    from .report import verdict
    from .tables import outputs_table, rich_table, runtime_table

    lines = [verdict(result, target_cosine, target_snr, v=v)]
    if v.command:  # a placeholder left in it is said in the verdict's next step; a shell comment keeps the line runnable
        lines.append(f"Command: {v.command}" + ("  # MODEL.quantization.cfg: the cfg step1 wrote, see Next" if " MODEL.quantization.cfg " in v.command else ""))
    lines += [f"note: {n}" for n in getattr(result, "notes", [])]
    if result.runtime:
        from .analysis.results import runtime_departures

        bad = runtime_departures(result.runtime, target_cosine, target_snr)
        first = next((r.tensor for r in result.runtime if r in bad), None)
        lines.append(f"runtime: {len(bad)} of {len(result.runtime)} tensor(s) depart from the simulation"
                     + (f"; the first in graph order is {first}: look there first (later ones inherit its error)." if first else "."))
    if getattr(result, "dump_message", None):
        lines.append(result.dump_message)
    if dump is not None and from_dir is None:
        lines.append(f"Snapshot written to {dump}: error_analysis.txt/.csv/.png, report.html, manifest.json.")
    elif dump is not None:
        lines.append(f"Reports written to {dump}: error_analysis.txt/.csv/.png, report.html.")
    if State.json:
        data = to_strict_json({"verdict": v.to_dict(), **result.to_dict()})
        console.out.print(json.dumps(data, allow_nan=False, ensure_ascii=False), highlight=False, markup=False, soft_wrap=True)
    elif not State.quiet:
        console.out.print(rich_table(result, top=top, cos_threshold=target_cosine, snr_threshold=target_snr))
        console.out.print(outputs_table(v))
        if result.runtime:
            console.out.print(runtime_table(result, target_cosine, target_snr, top))
        for line in lines:
            console.out.print(line, highlight=False, markup=False, soft_wrap=True)


def _proposal_only(given: dict[str, Any]) -> None:
    """A usage error for proposal options given to step1 without --proposal: they would be ignored in silence."""
    named = [k for k, v in given.items() if v is not None]
    if named:
        raise InputError(f"{', '.join(named)} {'sets' if len(named) == 1 else 'set'} the proposal, which step1 runs only with "
                         "--proposal: add --proposal, or leave them out (or run `hybridq propose --cfg ...` later with them).")


def _proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback, samples, max_size_mb=None,
                      execution=None, max_slowdown=None):
    from .api import ProposalOptions
    from .proposal import DEFAULT_FLOAT_BUDGET, Target

    if samples < 1:
        raise InputError(f"--proposal-samples must be at least 1, got {samples}.")
    given = target_cosine is not None or target_snr is not None or eval_fn  # a target given replaces the default pair
    cos, snr = (target_cosine, target_snr) if given else (Target.cosine, Target.snr_db)
    if cos is not None and not 0.0 < cos <= 1.0:
        raise InputError(f"--target-cosine must be in (0, 1], got {cos}; use e.g. 0.99 (as analyze takes it).")
    if max_float_fraction is not None and not 0.0 <= max_float_fraction <= 1.0:
        raise InputError(f"--max-float-fraction {max_float_fraction} is outside [0, 1]; use e.g. 0.05 (5 % of the compute).")
    if max_size_mb is not None and not max_size_mb > 0:
        raise InputError(f"--max-size-mb {max_size_mb} must be a positive size in MB, e.g. 1.5.")
    if max_slowdown is not None and not max_slowdown >= 1.0:
        raise InputError(f"--max-slowdown {max_slowdown} is below 1; use e.g. 1.1 (the float layers may add 10 % to the predicted latency).")
    if max_drop is not None and not eval_fn:
        raise InputError(f"--max-drop {max_drop} bounds the drop of an --eval task score; give --eval module.py:function too, "
                         "or leave --max-drop out.")
    if max_drop is not None and not 0.0 <= max_drop < math.inf:
        raise InputError(f"--max-drop {max_drop} must be a drop of the task score at or above 0, e.g. 0.01.")
    max_drop = 0.01 if max_drop is None else max_drop
    budget = DEFAULT_FLOAT_BUDGET if max_float_fraction is None else max_float_fraction
    return ProposalOptions(Target(cos, snr, eval_fn, max_drop), max_float_layers, budget, fallback, samples, max_size_mb, execution,
                           max_slowdown=max_slowdown)


@app.command()
def propose(
    snapshot: Annotated[Optional[Path], typer.Argument(help="Snapshot from `analyze --dump` (its single errors rank the layers); omit to analyse now.")] = None,
    cfg: Annotated[Optional[Path], typer.Option(help="The step1 cfg to write the proposal into (its edits and comments are kept).")] = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Samples to measure candidates on.")] = "",
    target_cosine: TargetCosOpt = None,
    target_snr: TargetSnrOpt = None,
    max_float_layers: MaxLayersOpt = None,
    max_float_fraction: MaxFracOpt = None,
    max_slowdown: MaxSlowOpt = None,
    eval_fn: EvalOpt = None,
    max_drop: MaxDropOpt = None,
    fallback: FallbackOpt = None,
    proposal_samples: PropSamplesOpt = 16,
    max_size_mb: MaxSizeOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 3 when the target was not met (the cfg still holds the best "
                                         "candidate found); without it that exits 0.")] = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = None,
    layout: LayoutOpt = None,
    resize: ResizeOpt = None,
    preprocess_hook: HookOpt = None,
    force_preprocess: ForceOpt = False,
    workers: WorkersOpt = 0,
    ray: RayOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the cheapest verified fix for a cfg.

    Climbs a ladder of fixes, cheapest first (range algorithm, outlier clip or equalization, bias correction,
    float layers within the budget), each verified on the model step2 builds. Starts from the cfg as you
    edited it: your custom_quantize_layers, per-tensor edits, settings and comments are kept, and a tensor you
    edited is never changed. A cfg that already meets the target gets only the fixes that cost nothing at run time
    (range algorithm, bias correction) and clearly help; when none does, it is not touched. The preprocessing comes from
    the cfg (step1 recorded it); no options needed. Exit codes: 0 ran (target met or not), 3 not met with
    --strict, 2 bad input, 1 failure.
    """
    from . import api

    State.quiet, State.json = quiet, as_json
    if cfg is None or not dataset:
        raise InputError("propose needs --cfg <name>.quantization.cfg and --dataset D (samples to measure candidates on).")
    pre = _given_preprocess(mean, std, color, layout, resize, preprocess_hook) or None
    opts = _proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback, proposal_samples,
                             max_size_mb, _execution(workers, ray), max_slowdown)
    result, backup = api.propose_cfg(cfg, dataset, snapshot=snapshot, preprocess=pre, options=opts, force_preprocess=force_preprocess)
    tables, lines, data = proposal_report(result)
    if result.written:
        lines.append(f"Wrote the proposal into {cfg}" + (f" (previous version kept as {backup})." if backup else "."))
    else:
        lines.append(f"Nothing changed: {cfg} was left as it was (not rewritten, no backup).")
    data.update(written=result.written, backup=str(backup) if backup else None)
    emit(data, tables, lines)
    if strict and not result.met:
        raise typer.Exit(int(ExitCode.BELOW_THRESHOLD))


from ._cli_rknn import rknn_cfg_app  # noqa: E402  (a sub-command group, defined beside)

app.add_typer(rknn_cfg_app, name="rknn-cfg", help="Carry float layers and ranges from/to an RKNN-Toolkit2 step1 cfg.",
              short_help="Carry float layers and ranges from/to an RKNN step1 cfg.")


def _full_summaries() -> None:
    """Give each command its first docstring line as short help, so `hybridq --help` never cuts it at any width."""
    for info in app.registered_commands:
        info.short_help = info.short_help or (inspect.getdoc(info.callback) or "").partition("\n")[0]


_full_summaries()


class _Signals:
    """Whether Ctrl-C or SIGTERM came during the run: a library failing under it (ONNX Runtime's session set-up
    reports "initialization failed") is then the interrupt, not an error in the user's input."""

    received = False
    signum = int(signal.SIGINT)


def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
    _Signals.received, _Signals.signum = True, int(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn hybridq errors into a one-paragraph message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HYBRIDQ_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        rc = app(args=args, prog_name="hybridq", standalone_mode=False)
    except HybridqError as exc:
        if _Signals.received:
            _interrupted()
        if debug:
            traceback.print_exc()
        console.err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(128 + _Signals.signum)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click's usage errors (vendored by newer typer)
            exc.show()
            sys.exit(int(ExitCode.USAGE))
        if isinstance(exc, OSError) and exc.filename and exc.errno in USER_PATH_ERRORS and not debug:
            console.err.print(f"error: cannot use the path '{exc.filename}': {exc.strerror}. Check the path you gave (a model, "
                              "a dataset or an output directory).", highlight=False, markup=False, soft_wrap=True)
            sys.exit(int(ExitCode.USAGE))
        if _Signals.received:
            _interrupted()
        if debug:
            raise
        console.err.print(f"internal error: {type(exc).__name__}: {exc}. Re-run with --debug for the traceback and report it.", highlight=False, markup=False)
        sys.exit(int(ExitCode.FAILURE))
    if rc == 130:  # typer turns KeyboardInterrupt (and our SIGTERM) into 130 and, outside standalone mode, returns it
        _interrupted()
    sys.exit(rc if isinstance(rc, int) else 0)


def _interrupted() -> None:
    console.err.print(
        "interrupted: the outputs are the earlier ones (or a complete new set if the interrupt came while they were "
        "being put in place); nothing half-written was kept.", highlight=False, markup=False,
    )
    sys.exit(128 + _Signals.signum)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
