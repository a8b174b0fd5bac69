"""`hybridq rknn-cfg import|export`: carry float layers and ranges between RKNN-Toolkit2's step1 cfg and hybridq's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ._console import JsonOpt, QuietOpt, State, emit, table

rknn_cfg_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None,
    help="Carry float layers and min/max ranges between RKNN-Toolkit2's step1 cfg and hybridq's.",
)


def _unmapped_lines(unmapped) -> tuple[list[Table], dict[str, Any]]:
    rows = [[u.section, u.name, u.reason] for u in unmapped]
    tables = [table(f"{len(rows)} name(s) with no counterpart (not carried over)", ["section", "name", "why"], rows)] if rows else []
    return tables, {"unmapped": [vars(u) for u in unmapped]}


def _kind(m: Any) -> str:
    """The table kind of a carried name: layer or range."""
    return "layer" if m.section == "custom_quantize_layers" else "range"


def _imported_value(m: Any, res: Any) -> str:
    """What an imported name set: a layer's precision, a range's [min, max] (else that the hybridq cfg already had it)."""
    if _kind(m) == "layer":
        return res.layers.get(m.to, "already set")
    return f"[{res.ranges[m.to][0]}, {res.ranges[m.to][1]}]" if m.to in res.ranges else "unchanged"


@rknn_cfg_app.command("import", short_help="RKNN cfg -> hybridq cfg (float layers, edited min/max).")
def rknn_cfg_import(
    rknn_cfg: Annotated[Path, typer.Argument(help="The <name>.quantization.cfg RKNN's hybrid_quantization_step1 wrote (edited or with proposal).")],
    cfg: Annotated[Path, typer.Option("--cfg", help="The hybridq <name>.quantization.cfg of the same ONNX model, updated in place.")],
    baseline: Annotated[Optional[Path], typer.Option(help="RKNN's cfg before your edits: only ranges that differ from it are imported.")] = None,
    all_ranges: Annotated[bool, typer.Option("--all-ranges", help="Import every int8/int16 min/max of RKNN's cfg, edited or not.")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Read an RKNN step1 cfg's float layers and edited min/max into a hybridq cfg.

    Layers go into custom_quantize_layers under the temp-model node name; ranges into the matching
    quantize_parameters entries. Names with no counterpart are listed, never dropped silently.
    """
    from .rknn.cfg import import_rknn_cfg

    State.quiet, State.json = quiet, as_json
    res = import_rknn_cfg(rknn_cfg, cfg, baseline=baseline, all_ranges=all_ranges)
    tables, data = _unmapped_lines(res.unmapped)
    rows = [[_kind(m), m.name, m.to, _imported_value(m, res)] for m in res.mapped]
    if rows:
        tables.insert(0, table("carried over", ["kind", "RKNN name", "hybridq name", "value"], rows))
    lines = [f"note: {n}" for n in res.notes]
    if res.written:
        lines.append(f"Wrote {len(res.layers)} layer(s) and {len(res.ranges)} range(s) into {res.cfg}" + (f" (previous version kept as {res.backup})." if res.backup else "."))
    else:
        lines.append(f"Nothing to change: {res.cfg} was left as it was.")
    data.update(cfg=res.cfg, layers=res.layers, ranges=res.ranges, mapped=[vars(m) for m in res.mapped], notes=res.notes,
                written=res.written, backup=res.backup)
    emit(data, tables, lines)


@rknn_cfg_app.command("export", short_help="hybridq cfg -> RKNN step1 cfg (float layers, clips).")
def rknn_cfg_export(
    cfg: Annotated[Path, typer.Argument(help="The hybridq <name>.quantization.cfg (after propose or your edits).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The RKNN cfg to write (for RKNN's hybrid_quantization_step2).")],
    template: Annotated[Optional[Path], typer.Option(help="The cfg RKNN's hybrid_quantization_step1 wrote for the same ONNX model (default: -o, updated in place).")] = None,
    replace_layers: Annotated[bool, typer.Option("--replace-layers", help="Remove RKNN's custom_quantize_layers entries hybridq does not set.")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write hybridq's float layers and clipped ranges into an RKNN step1 cfg.

    Every RKNN key and value hybridq does not change is kept; names with no RKNN counterpart are listed.
    """
    from .rknn.cfg import export_rknn_cfg

    State.quiet, State.json = quiet, as_json
    res = export_rknn_cfg(cfg, output, template=template, replace_layers=replace_layers)
    tables, data = _unmapped_lines(res.unmapped)
    rows = [[_kind(m), m.name, m.to] for m in res.mapped]
    if rows:
        tables.insert(0, table("carried over", ["kind", "hybridq name", "RKNN name"], rows))
    lines = [f"note: {n}" for n in res.notes]
    if res.kept:
        lines.append(f"note: kept {len(res.kept)} float16 layer(s) of RKNN's cfg that hybridq does not set (--replace-layers removes them): {', '.join(res.kept)}.")
    if res.removed:
        lines.append(f"note: removed {len(res.removed)} layer(s) of RKNN's cfg that hybridq does not set: {', '.join(res.removed)}.")
    lines.append(f"Wrote {res.output}" + (f" (previous version kept as {res.backup})." if res.backup else ".") if res.written else f"Nothing to change: {res.output} was left as it was.")
    data.update(output=res.output, layers=res.layers, ranges=res.ranges, mapped=[vars(m) for m in res.mapped], kept=res.kept, removed=res.removed,
                notes=res.notes, written=res.written, backup=res.backup)
    emit(data, tables, lines)
