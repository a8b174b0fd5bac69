"""The terminal's tables of an analysis (rich): the worst layers, the outputs, the runtime column."""

from __future__ import annotations

from rich.markup import escape as _escape
from rich.table import Table

from .analysis.results import AnalysisResult, runtime_departures
from .analysis.verdict import COS_THRESHOLD, SNR_THRESHOLD, Verdict
from .metrics import Metrics
from .report import OUTPUT_COLUMNS, _flagged, _get, _outputs_rows, fmt


def outputs_table(v: Verdict) -> Table:
    """The model outputs, worst first: whole-tensor cosine and SNR beside the worst slice's; then the integer or bool
    outputs, value for value, and any output not compared."""
    t = Table(title="outputs: whole tensor and worst slice along the channel axis"
              + ("; integer and bool outputs value for value" if v.exact_outputs else ""))
    for c in OUTPUT_COLUMNS:
        t.add_column(c, justify="left" if c in ("output", "worst slice", "") else "right")
    for r in _outputs_rows(v):
        r = [_escape(c) for c in r]
        if r[-1] == "CHECK":
            r[-1] = "[bold red]CHECK[/]"
        t.add_row(*r)
    return t


def rich_table(
    result: AnalysisResult,
    top: int = 20,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
) -> Table:
    """The ``top`` worst layers (see :meth:`AnalysisResult.worst`), flagged cells highlighted."""
    index = {id(layer): i for i, layer in enumerate(result.layers)}
    shown = result.worst(top)
    t = Table(
        title=f"worst {len(shown)} of {len(result.layers)} layers ({result.samples_said})",
        caption="single: layer quantized alone on fp32 inputs; entire: errors accumulated; "
        "float32->uint8: a float op whose output is quantized",
    )
    t.add_column("#", justify="right")
    t.add_column(_escape("layer [tensor] precision"))
    t.add_column("op")
    for kind in ("single", "entire"):
        t.add_column(f"{kind} cos", justify="right")
        t.add_column(f"{kind} SNR dB", justify="right")
    t.add_column("entire euc", justify="right")
    t.add_column("entire max_abs", justify="right")

    def cell(m: Metrics | None, name: str, style: str) -> str:
        v = _get(m, name)
        s = fmt(name, v)
        thr = cos_threshold if name == "cosine" else snr_threshold
        if v is not None and not v >= thr:
            return f"[{style}]{s}[/]"
        return s

    for layer in shown:
        t.add_row(
            str(index[id(layer)]),
            _escape(layer.label),
            _escape(layer.op_type + (f" (+ {layer.folded})" if layer.folded else "")),
            cell(layer.single, "cosine", "bold red"),
            cell(layer.single, "snr_db", "bold red"),
            cell(layer.entire, "cosine", "yellow"),
            cell(layer.entire, "snr_db", "yellow"),
            fmt("euclid", layer.entire.euclid),
            fmt("max_abs", layer.entire.max_abs),
            style="on grey15" if _flagged(layer.single, cos_threshold, snr_threshold) else None,
        )
    return t


def runtime_table(result: AnalysisResult, cos_threshold: float = COS_THRESHOLD, snr_threshold: float = SNR_THRESHOLD, top: int = 20) -> Table:
    """The runtime column (RKNN's runtime_error): each tensor as another runtime computed it, against fp32 and the
    simulation; per layer, the ones that depart from the simulation first (red), at most `top` rows."""
    bad = runtime_departures(result.runtime, cos_threshold, snr_threshold)
    ids = {id(r) for r in bad}
    rows = (bad + [r for r in result.runtime if id(r) not in ids])[:top]
    title = f"runtime: {result.runtime[0].runtime}" if result.runtime else "runtime"
    if result.runtime:
        title += f" ({len(bad)} of {len(result.runtime)} tensors depart from the simulation)"
    t = Table(title=title, show_edge=False)
    for c in ("tensor", "vs fp32 cos", "vs fp32 SNR dB", "vs simulator cos", "vs simulator SNR dB", "max abs vs simulator"):
        t.add_column(c, justify="left" if c == "tensor" else "right")
    for r in rows:
        t.add_row(r.tensor, fmt("cosine", r.vs_fp32.cosine), fmt("snr_db", r.vs_fp32.snr_db), fmt("cosine", r.vs_simulator.cosine),
                  fmt("snr_db", r.vs_simulator.snr_db), fmt("max_abs", r.vs_simulator.max_abs),
                  style="bold red" if id(r) in ids else None)
    return t
