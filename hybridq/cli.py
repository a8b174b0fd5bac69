"""The `hybridq` command: parse, call the API, render, map errors to exit codes."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import ExitCode, HybridqError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Hybrid post-training quantization of ONNX models (RKNN-Toolkit2 style): step1 -> edit cfg -> step2 -> analyze.",
)
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"hybridq {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Options before the command."""


class State:
    """Flags that apply to every command."""

    quiet = False
    json = False


class Advance:
    """Moves a progress bar on by `n` when called (nothing when no bar is shown); `start(total)` sets its length."""

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None) -> None:
        self._bar, self._task = bar, task

    def __call__(self, n: int = 1) -> None:
        if self._bar is None or self._task is None:
            return
        self._bar.advance(self._task, n)
        t = self._bar.tasks[self._task]
        if t.elapsed:
            self._bar.update(self._task, rate=f"{t.completed / t.elapsed:.1f} samples/s")

    def start(self, total: int) -> None:
        """Give the bar its length once the API knows it (the `on_start(n)` callbacks)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=total)


@contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Advance]:
    """A rich progress bar on stderr (silent when quiet or not a terminal); yields an `Advance`."""
    if State.quiet or State.json or not err.is_terminal:
        yield Advance()
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as bar:
        yield Advance(bar, bar.add_task(label, total=total, rate=""))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, box=None if not out.is_terminal else None, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(x) for x in r))
    return table


def _emit(data: dict[str, Any], tables: list[Table], lines: list[str]) -> None:
    if State.json:
        out.print_json(json.dumps(data, default=str))
        return
    if State.quiet:
        return
    for t in tables:
        out.print(t)
    for line in lines:  # soft_wrap: a long line (a command to copy) is never broken by inserted newlines
        out.print(line, highlight=False, markup=False, soft_wrap=True)


def _preprocess(mean, std, color, layout, resize, hook):
    from .dataset import Preprocess, parse_floats

    return Preprocess(
        mean=parse_floats(mean, "--mean") if mean else None,
        std=parse_floats(std, "--std") if std else None,
        color=color, layout=layout, resize=resize, hook=hook,
    )


MeanOpt = Annotated[Optional[str], typer.Option(help="Per-channel mean in 0-255 pixel units, e.g. 123.675,116.28,103.53 (RKNN mean_values).")]
StdOpt = Annotated[Optional[str], typer.Option(help="Per-channel std in 0-255 pixel units, e.g. 58.395,57.12,57.375.")]
ColorOpt = Annotated[str, typer.Option(help="Channel order fed to the model: rgb or bgr.")]
LayoutOpt = Annotated[Optional[str], typer.Option(help="nchw or nhwc; inferred from the model when omitted.")]
ResizeOpt = Annotated[str, typer.Option(help="none (size mismatch is an error), stretch or letterbox.")]
HookOpt = Annotated[Optional[str], typer.Option("--preprocess", help="module.py:function(path, spec) -> array, replacing image loading.")]
TargetCosOpt = Annotated[Optional[float], typer.Option(help="Proposal target: cosine on every output (default 0.99).")]
TargetSnrOpt = Annotated[Optional[float], typer.Option(help="Proposal target: SNR in dB on every output (instead of or with cosine).")]
MaxLayersOpt = Annotated[Optional[int], typer.Option(help="Proposal budget: at most K float layers.")]
MaxFracOpt = Annotated[Optional[float], typer.Option(help="Proposal budget: at most this fraction of Conv/MatMul/Gemm compute in float.")]
EvalOpt = Annotated[Optional[str], typer.Option("--eval", help="module.py:function(model_path) -> score (higher is better) for the proposal target.")]
MaxDropOpt = Annotated[float, typer.Option(help="With --eval: largest allowed drop of the score below fp32.")]
FallbackOpt = Annotated[str, typer.Option(help="Precision of proposed layers: float32 (fastest on CPU) or float16 (NPUs).")]
PropSamplesOpt = Annotated[int, typer.Option(help="Samples the proposal measures candidates on.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Workspace directory to create.")],
    model: Annotated[Optional[Path], typer.Option(help="Copy this ONNX model into the workspace.")] = None,
) -> None:
    """Create a workspace from the template.

    The workspace holds a commented config (hybridq.yaml), dataset.txt and a README of the three-step loop.
    """
    template = Path(__file__).resolve().parent.parent / "workspace_template"
    if not template.is_dir():
        template = Path(__file__).resolve().parent / "workspace_template"
    if directory.exists() and not directory.is_dir():
        raise InputError(f"'{directory}' is a file, not a directory; choose a new directory for the workspace.")
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"'{directory}' exists and is not empty; choose a new directory for the workspace.")
    shutil.copytree(template, directory, dirs_exist_ok=True)
    if model is not None:
        if not model.is_file():
            raise InputError(f"Model '{model}' does not exist; give the path of an .onnx file.")
        shutil.copy2(model, directory / model.name)
    _emit({"workspace": str(directory)}, [], [f"Workspace ready in {directory}: edit dataset.txt, then run the commands in {directory}/README.md."])


@app.command()
def step1(
    model: Annotated[Path, typer.Argument(help="fp32 ONNX model.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset.txt (RKNN convention), a directory or a glob.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where the three artifacts go (default: beside the model).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Workspace settings file (hybridq.yaml); command-line options win.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Activation dtype: uint8 (default), int8 or int16.")] = None,
    weight_dtype: Annotated[Optional[str], typer.Option(help="Weight dtype: int8 (default) or int16.")] = None,
    qmethod: Annotated[Optional[str], typer.Option(help="Weights per channel (default) or per layer: channel or layer.")] = None,
    qtype: Annotated[Optional[str], typer.Option(help="Activations asym (default) or sym.")] = None,
    algorithm: Annotated[Optional[str], typer.Option(help="Range algorithm: minmax (default), percentile, kl or mse.")] = None,
    percentile: Annotated[Optional[float], typer.Option(help="Percentile for --algorithm percentile (default 99.99).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Use at most N samples.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batch (models with a dynamic batch dim).")] = 1,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = "rgb",
    layout: LayoutOpt = None,
    resize: ResizeOpt = "none",
    preprocess_hook: HookOpt = None,
    proposal: Annotated[bool, typer.Option(help="Analyse first and pre-fill custom_quantize_layers with the layers that lose most.")] = False,
    target_cosine: TargetCosOpt = None,
    target_snr: TargetSnrOpt = None,
    max_float_layers: MaxLayersOpt = None,
    max_float_fraction: MaxFracOpt = None,
    eval_fn: EvalOpt = None,
    max_drop: MaxDropOpt = 0.01,
    fallback: FallbackOpt = "float32",
    proposal_samples: PropSamplesOpt = 16,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Calibrate a model and write the three step1 artifacts.

    Writes <name>.model, <name>.data and the editable <name>.quantization.cfg.
    """
    from . import api
    from .settings import Settings

    State.quiet, State.json = quiet, as_json
    if samples is not None and samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}.")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}.")
    values = _workspace_config(config) if config is not None else {}
    given = {"dtype": dtype, "weight_dtype": weight_dtype, "qmethod": qmethod, "qtype": qtype, "algorithm": algorithm, "percentile": percentile}
    values.update({k: v for k, v in given.items() if v is not None})
    pre_keys = {"mean": mean, "std": std, "color": color if color != "rgb" else None, "layout": layout, "resize": resize if resize != "none" else None}
    pre_values = {k: values.pop(k) for k in list(values) if k in pre_keys}
    pre_values.update({k: v for k, v in pre_keys.items() if v is not None})
    settings = Settings.from_dict(values, str(config) if config else "command line")
    pre = _preprocess(
        _joined(pre_values.get("mean")), _joined(pre_values.get("std")), pre_values.get("color", "rgb"),
        pre_values.get("layout"), pre_values.get("resize", "none"), preprocess_hook,
    )
    with progress("calibrating") as advance:
        res = api.step1(
            model, dataset, out=out_dir, settings=settings, preprocess=pre, samples=samples, batch_size=batch_size,
            on_progress=advance, on_start=advance.start,
            proposal=_proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback, proposal_samples) if proposal else None,
        )
    lines = [
        f"Calibrated on {res.samples} samples; {res.quantized_tensors} tensors in the cfg.",
        f"  temp model: {res.model}",
        f"  data:       {res.data}",
        f"  cfg:        {res.cfg}",
    ]
    lines += [f"note: {n}" for n in res.notes]
    if res.backup:
        lines.append(f"The previous cfg had edits: kept as {res.backup}.")
    if res.fused:
        lines.append(f"{len(res.fused)} nodes were fused or folded in the temp model: " + ", ".join(f"{k} -> {v or '(folded)'}" for k, v in list(res.fused.items())[:8]) + (" ..." if len(res.fused) > 8 else ""))
    if res.float_subgraph_nodes:
        lines.append(f"Control-flow nodes stay float (their subgraphs are not quantized): {', '.join(res.float_subgraph_nodes)}.")
    lines.append(f"Next: edit {res.cfg.name} if needed, then run `hybridq step2 {res.model} {res.data} {res.cfg} -o {res.model.with_suffix('.q.onnx')}`.")
    data = {"model": res.model, "data": res.data, "cfg": res.cfg, "backup": res.backup, "samples": res.samples, "layers": res.layers, "fused": res.fused, "notes": res.notes}
    tables = [_table("layers", ["precision", "count"], [[k, v] for k, v in sorted(res.layers.items())])]
    if res.proposal is not None:
        ptables, plines, pdata = _proposal_report(res.proposal)
        tables += ptables
        lines = plines + lines
        data["proposal"] = pdata
    _emit(data, tables, lines)


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
    tables = [_table("layers per precision", ["precision", "layers"], rows)]
    if res.resolved:
        tables.append(_table("custom_quantize_layers", ["entry", "node", "requested", "effective", "resolved as"],
                             [[r.entry, r.node, r.requested, r.effective, r.how] for r in res.resolved]))
    lines = [f"Wrote {res.output}: {res.size_fp32 / 1e6:.2f} MB fp32 -> {res.size_quant / 1e6:.2f} MB."]
    lines += [f"note: {n}" for n in res.notes]
    for w in res.warnings:
        err.print(f"warning: {w}", highlight=False, markup=False, soft_wrap=True)
    data = {
        "output": res.output, "layers": res.layers, "size_fp32": res.size_fp32, "size_quant": res.size_quant,
        "resolved": [vars(r) for r in res.resolved], "notes": res.notes, "warnings": res.warnings,
    }
    _emit(data, tables, lines)


@app.command()
def analyze(
    float_model: Annotated[Optional[Path], typer.Argument(help="fp32 ONNX model.")] = None,
    quant_model: Annotated[Optional[Path], typer.Argument(help="Quantized QDQ model, or a step1 <name>.quantization.cfg.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Samples to compare on (same format as step1).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Use at most N samples.")] = None,
    dump: Annotated[Optional[Path], typer.Option(help="Write a snapshot here: fp32/ and quant/ tensors, manifest, reports.")] = None,
    max_bytes: Annotated[Optional[int], typer.Option(help="Cap the arrays written by --dump (bytes).")] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="Re-render a snapshot without running a model.")] = None,
    top: Annotated[int, typer.Option(help="Rows in the table of worst layers.")] = 20,
    host_int8: Annotated[bool, typer.Option("--host-int8", help="Measure with this CPU's default ONNX Runtime int8 kernels "
                                            "(they saturate on x86 without VNNI) instead of exact int8 products.")] = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = "rgb",
    layout: LayoutOpt = None,
    resize: ResizeOpt = "none",
    preprocess_hook: HookOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare a quantized model with the fp32 model, layer by layer.

    Per-layer error of QUANT_MODEL against FLOAT_MODEL: entire (accumulated) and single (isolated), with a snapshot.
    """
    from . import api
    from .report import rich_table, verdict

    State.quiet, State.json = quiet, as_json
    if from_dir is not None:
        result = api.load_snapshot(from_dir)
    else:
        if float_model is None or quant_model is None or dataset is None:
            raise InputError("analyze needs FLOAT_MODEL QUANT_MODEL --dataset D (or --from SNAPSHOT_DIR to re-read a snapshot).")
        pre = _preprocess(mean, std, color, layout, resize, preprocess_hook)
        with progress("analyzing") as advance:
            result = api.analyze(float_model, quant_model, dataset, preprocess=pre, samples=samples, dump=dump, max_bytes=max_bytes,
                                 on_sample=lambda: advance(1), on_start=advance.start, host_int8=host_int8)
    lines = [verdict(result)]
    lines += [f"note: {n}" for n in getattr(result, "notes", [])]
    if getattr(result, "dump_message", None):
        lines.append(result.dump_message)
    if dump is not None and from_dir is None:
        lines.append(f"Snapshot written to {dump}: error_analysis.txt/.csv/.png, report.html, manifest.json.")
    _emit(result.to_dict(), [rich_table(result, top=top)], lines)


def _workspace_config(path: Path) -> dict[str, Any]:
    """Settings (and mean/std/color/layout/resize) from a workspace YAML file, loaded safely."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    if not path.is_file():
        raise InputError(f"Workspace config '{path}' does not exist; `hybridq init DIR` writes one as DIR/hybridq.yaml.")
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise InputError(f"{path}:{mark.line + 1 if mark else '?'}: YAML syntax error: {exc.problem}.") from None
    if not isinstance(data, dict):
        raise InputError(f"Workspace config '{path}' must be a mapping of setting: value.")
    return dict(data)


def _joined(value: Any) -> str | None:
    """A mean/std from YAML (list or text) as the comma text --mean takes."""
    if value is None:
        return None
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback, samples):
    from .api import ProposalOptions
    from .proposal import Target

    if samples < 1:
        raise InputError(f"--proposal-samples must be at least 1, got {samples}.")
    cos = target_cosine if target_cosine is not None else (None if target_snr is not None or eval_fn else 0.99)
    if cos is not None and not -1.0 <= cos <= 1.0:
        raise InputError(f"--target-cosine {cos} is outside [-1, 1]; use e.g. 0.99.")
    return ProposalOptions(Target(cos, target_snr, eval_fn, max_drop), max_float_layers, max_float_fraction, fallback, samples)


def _proposal_report(p) -> tuple[list[Table], list[str], dict[str, Any]]:
    rows = [[i + 1, n, f"{c:.5f}", "float" if n in p.layers else ""] for i, (n, c) in enumerate(p.ranked[:max(10, len(p.layers))])]
    tables = [_table("layers ranked by isolated error", ["rank", "layer", "single cos", "proposed"], rows)]
    lines = [
        f"Proposal: {p.choice}.",
        f"  int8 baseline: {p.baseline.describe()}",
        f"  predicted:     {p.predicted.describe()}",
    ]
    if p.measured is not None:
        lines.append(f"  measured on the model step2 builds from the written cfg: {p.measured.describe()}")
    lines.append(f"  float layers: {len(p.layers)}, float compute {100 * p.float_fraction:.1f} %, {p.evaluations} evaluations, {p.seconds:.1f} s")
    if p.clips:
        names = list(p.clips)
        lines.append(f"  range clips (mse) on {len(names)} tensor(s): {', '.join(names[:6])}" + (" ..." if len(names) > 6 else "") + " (commented in the cfg)")
    if not p.met:
        lines.append("  The target was NOT met; the cfg holds the best candidate found. Loosen the target or raise the budget.")
    data = {
        "layers": p.layers, "clips": list(p.clips), "met": p.met, "choice": p.choice, "evaluations": p.evaluations,
        "baseline": p.baseline.to_dict(), "predicted": p.predicted.to_dict(),
        "measured": p.measured.to_dict() if p.measured else None, "float_fraction": p.float_fraction, "seconds": p.seconds,
    }
    return tables, lines, data


@app.command()
def propose(
    snapshot: Annotated[Optional[Path], typer.Argument(help="Snapshot from `analyze --dump` (its single errors rank the layers); omit to analyse now.")] = None,
    cfg: Annotated[Path, typer.Option(help="The step1 cfg to write the proposal into (its edits and comments are kept).")] = Path(""),
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Samples to measure candidates on.")] = "",
    target_cosine: TargetCosOpt = None,
    target_snr: TargetSnrOpt = None,
    max_float_layers: MaxLayersOpt = None,
    max_float_fraction: MaxFracOpt = None,
    eval_fn: EvalOpt = None,
    max_drop: MaxDropOpt = 0.01,
    fallback: FallbackOpt = "float32",
    proposal_samples: PropSamplesOpt = 16,
    mean: MeanOpt = None,
    std: StdOpt = None,
    color: ColorOpt = "rgb",
    layout: LayoutOpt = None,
    resize: ResizeOpt = "none",
    preprocess_hook: HookOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose float layers or range clips for a cfg, verified.

    Chooses layers to keep in float (or ranges to clip) for a cfg, verified on the model step2 builds.
    """
    from . import api

    State.quiet, State.json = quiet, as_json
    if not str(cfg) or not dataset:
        raise InputError("propose needs --cfg <name>.quantization.cfg and --dataset D (samples to measure candidates on).")
    pre = _preprocess(mean, std, color, layout, resize, preprocess_hook)
    opts = _proposal_options(target_cosine, target_snr, max_float_layers, max_float_fraction, eval_fn, max_drop, fallback, proposal_samples)
    result, backup = api.propose_cfg(cfg, dataset, snapshot=snapshot, preprocess=pre, options=opts)
    tables, lines, data = _proposal_report(result)
    lines.append(f"Wrote the proposal into {cfg}" + (f" (previous version kept as {backup})." if backup else "."))
    _emit(data, tables, lines)


def _full_summaries() -> None:
    """Give each command its first docstring line as short help, so `hybridq --help` never cuts it at any width."""
    for info in app.registered_commands:
        info.short_help = info.short_help or (inspect.getdoc(info.callback) or "").partition("\n")[0]


_full_summaries()


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn hybridq errors into a one-paragraph message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HYBRIDQ_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = app(args=args, prog_name="hybridq", standalone_mode=False)
    except HybridqError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click's usage errors (vendored by newer typer)
            exc.show()
            sys.exit(int(ExitCode.USAGE))
        if debug:
            raise
        err.print(f"internal error: {type(exc).__name__}: {exc}. Re-run with --debug for the traceback and report it.", highlight=False, markup=False)
        sys.exit(int(ExitCode.FAILURE))
    if rc == 130:  # typer turns KeyboardInterrupt (and our SIGTERM) into 130 and, outside standalone mode, returns it
        _interrupted()
    sys.exit(rc if isinstance(rc, int) else 0)


def _interrupted() -> None:
    err.print(
        "interrupted: the outputs are the earlier ones (or a complete new set if the interrupt came while they were "
        "being put in place); nothing half-written was kept.", highlight=False, markup=False,
    )
    sys.exit(130)
