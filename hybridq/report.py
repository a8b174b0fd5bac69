"""Renders an :class:`~hybridq.analysis.AnalysisResult`; computes no metric.

Files written by :func:`write_reports` (each atomically):

* ``error_analysis.txt``: RKNN-Toolkit2's layout (``[OpType] name``, entire
  cos | euc, single cos | euc) plus SNR and max abs error; column widths are
  computed from the content, so columns never run together;
* ``error_analysis.csv``: one row per tensor, full precision, for scripts;
* ``error_analysis.png``: entire vs single cosine and SNR along the graph,
  worst layers marked;
* ``report.html``: self-contained (the chart inlined as base64 PNG, a table
  sortable by clicking a column header).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ._fs import write_atomic
from .analysis import AnalysisResult
from .metrics import METRIC_NAMES, Metrics

if TYPE_CHECKING:
    from rich.table import Table

TXT, CSV, PNG, HTML = "error_analysis.txt", "error_analysis.csv", "error_analysis.png", "report.html"
COS_THRESHOLD = 0.99
"""Default cosine below which a layer is highlighted."""
SNR_THRESHOLD = 20.0
"""Default SNR (dB) below which a layer is highlighted."""
_SHORT = {"cosine": "cos", "euclid": "euc", "snr_db": "snr", "max_abs": "max_abs"}
_GAP = "    "


def fmt(name: str, v: float | None) -> str:
    """One metric as text: cosine with 6 decimals, SNR with 2, distances with 6 significant digits."""
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if name == "cosine":
        return f"{v:.6f}"
    if name == "snr_db":
        return f"{v:.2f}"
    return f"{v:.6g}"


def _get(m: Metrics | None, name: str) -> float | None:
    return None if m is None else float(getattr(m, name))


def _flagged(m: Metrics | None, cos_threshold: float, snr_threshold: float) -> bool:
    if m is None:
        return False
    return not (m.cosine >= cos_threshold) or not (m.snr_db >= snr_threshold)


# --------------------------------------------------------------------------- text


def render_txt(result: AnalysisResult) -> str:
    """The ``error_analysis.txt`` text."""
    names = list(METRIC_NAMES)
    rows = []
    for layer in result.layers:
        cells = [fmt(n, _get(layer.entire, n)) for n in names] + [fmt(n, _get(layer.single, n)) for n in names]
        rows.append((layer.label, cells))
    heads = [_SHORT[n] for n in names] * 2
    widths = [max([len(h)] + [len(r[1][i]) for r in rows]) for i, h in enumerate(heads)]
    lw = max([len("layer_name")] + [len(r[0]) for r in rows])

    def group(cells: list[str], ws: list[int]) -> str:
        return " | ".join(c.rjust(int(w)) for c, w in zip(cells, ws))

    def line(label: str, cells: list[str]) -> str:
        return (
            label.ljust(lw) + _GAP + group(cells[:4], widths[:4]) + _GAP + group(cells[4:], widths[4:])
        ).rstrip()

    gw = [len(group(heads[:4], widths[:4])), len(group(heads[4:], widths[4:]))]
    out = [
        f"# hybridq error analysis: {result.n_samples} sample(s); every figure is the mean over samples.",
        "# entire: fp32 model vs quantized model at this tensor; errors accumulate layer by layer.",
        "# single: this layer quantized alone, fed the fp32 model's tensors; shows which layer adds error.",
        "# cos: cosine similarity, euc: Euclidean distance, snr: SNR in dB, max_abs: max absolute error;",
        "# '-': layer not quantized or not isolated.",
    ]
    out += [f"# note: {n}" for n in result.notes]
    if result.dump_message:
        out.append(f"# note: {result.dump_message}")
    out.append("")
    out.append(("layer_name".ljust(lw) + _GAP + "entire".ljust(gw[0]) + _GAP + "single").rstrip())
    out.append(line("", heads))
    out.append("-" * len(line("", heads)))
    out += [line(label, cells) for label, cells in rows]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- csv

CSV_COLUMNS: tuple[str, ...] = (
    "index",
    "tensor",
    "layer",
    "op_type",
    "precision",
    "shape",
    "dtype",
    "quant_tensor",
    *(f"entire_{n}" for n in METRIC_NAMES),
    *(f"single_{n}" for n in METRIC_NAMES),
    "fp32_file",
    "quant_file",
)
"""Header of ``error_analysis.csv``; empty cells mean "not available"."""


def _csv_num(v: float | None) -> str:
    if v is None:
        return ""
    return repr(float(v)) if math.isfinite(v) else fmt("", v)


def render_csv(result: AnalysisResult) -> str:
    """The ``error_analysis.csv`` text (``float`` parses every number back exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, layer in enumerate(result.layers):
        w.writerow(
            [
                i,
                layer.tensor,
                layer.layer,
                layer.op_type,
                layer.precision or "",
                "x".join(str(d) for d in layer.shape),
                layer.dtype,
                layer.quant_tensor,
                *(_csv_num(_get(layer.entire, n)) for n in METRIC_NAMES),
                *(_csv_num(_get(layer.single, n)) for n in METRIC_NAMES),
                layer.fp32_file or "",
                layer.quant_file or "",
            ]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- chart


def _plain(s: str, n: int = 28) -> str:
    """A label matplotlib shows as is: no mathtext, cut to ``n`` characters."""
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("$", r"\$")


def render_png(result: AnalysisResult, n_marked: int = 5) -> bytes:
    """Per-layer entire vs single cosine (top) and SNR (bottom) along the graph, worst layers marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = result.layers
    n = len(layers)
    xs = list(range(n))
    width = max(8.0, min(0.22 * n + 3, 40.0))
    fig = Figure(figsize=(width, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_c, ax_s = fig.subplots(2, 1, sharex=True)

    def series(kind: str, name: str) -> list[float]:
        return [
            math.nan if (m := getattr(layer, kind)) is None else float(getattr(m, name)) for layer in layers
        ]

    finite = [v for k in ("entire", "single") for v in series(k, "snr_db") if math.isfinite(v)]
    top = (max(finite) if finite else 0.0) + 10.0
    bottom = (min(finite) if finite else 0.0) - 10.0

    def clip(vs: list[float]) -> list[float]:
        return [top if v == math.inf else bottom if v == -math.inf else v for v in vs]

    for ax, name, values in (
        (ax_c, "cosine", (series("entire", "cosine"), series("single", "cosine"))),
        (ax_s, "snr_db", (clip(series("entire", "snr_db")), clip(series("single", "snr_db")))),
    ):
        ax.plot(xs, values[0], "-o", ms=3, lw=1.2, color="#1f77b4", label="entire (accumulated)")
        ax.plot(xs, values[1], "-s", ms=3, lw=1.0, color="#ff7f0e", label="single (layer alone)")
        ax.grid(True, alpha=0.3)
    ax_c.set_ylabel("cosine similarity")
    ax_s.set_ylabel("SNR (dB)" + (f", inf drawn at {top:.0f}" if any(
        math.isinf(v) for k in ("entire", "single") for v in series(k, "snr_db")) else ""))
    ax_c.axhline(COS_THRESHOLD, color="grey", ls=":", lw=0.8)
    ax_s.axhline(SNR_THRESHOLD, color="grey", ls=":", lw=0.8)
    index = {id(layer): i for i, layer in enumerate(layers)}
    worst = [w for w in result.worst(n_marked) if w.single is not None or w.entire.cosine < 1.0]
    for w in worst:
        i = index[id(w)]
        m = w.single if w.single is not None else w.entire
        cy = m.cosine
        sy = clip([m.snr_db])[0]
        ax_c.plot([i], [cy], "o", ms=10, mfc="none", mec="red", mew=1.5)
        ax_s.plot([i], [sy], "o", ms=10, mfc="none", mec="red", mew=1.5)
        ax_c.annotate(_plain(w.layer), (i, cy), xytext=(4, -12), textcoords="offset points", fontsize=7, color="red")
    ax_c.set_title(
        f"hybridq per-layer error ({result.n_samples} sample(s)); red circles: worst layers", fontsize=10
    )
    ax_c.legend(loc="lower left", fontsize=8)
    if n <= 60:
        ax_s.set_xticks(xs)
        ax_s.set_xticklabels([_plain(layer.label, 32) for layer in layers], rotation=90, fontsize=6)
        fig.subplots_adjust(left=0.08, right=0.98, top=0.94, bottom=0.3, hspace=0.08)
    else:
        ax_s.set_xlabel("layer index (graph order)")
        fig.subplots_adjust(left=0.08, right=0.98, top=0.94, bottom=0.08, hspace=0.08)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # cosmetic only: a layer name with a glyph the font lacks
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- html

_JS = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], dir = th.dataset.dir = th.dataset.dir === "1" ? "-1" : "1";
  const key = r => r.cells[i].dataset.v, num = v => v === "" ? NaN : parseFloat(v);
  [...body.rows].sort((a, b) => {
    const x = num(key(a)), y = num(key(b));
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y) || key(a).localeCompare(key(b)) * dir;
    return ((x > y) - (x < y)) * dir;
  }).forEach(r => body.appendChild(r));
}));
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}td.n{text-align:right;font-family:monospace}
td.bad{background:#fdd;color:#900;font-weight:bold}td.warn{background:#ffefc4}
img{max-width:100%}.verdict{font-size:1.1em;font-weight:bold}
"""


def _js_num(v: float | None) -> str:
    if v is None:
        return ""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def render_html(
    result: AnalysisResult,
    png: bytes | None = None,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
) -> str:
    """The self-contained ``report.html`` (pass ``png`` to reuse a rendered chart)."""
    png = render_png(result) if png is None else png
    e = html.escape
    cols = ["#", "layer", "op", "tensor", "precision"] + [
        f"{kind} {_SHORT[n]}" for kind in ("entire", "single") for n in ("cosine", "snr_db", "euclid", "max_abs")
    ]
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = []
    for i, layer in enumerate(result.layers):
        cells = [
            f'<td class="n" data-v="{i}">{i}</td>',
            f'<td data-v="{e(layer.layer)}">{e(layer.layer)}</td>',
            f'<td data-v="{e(layer.op_type)}">{e(layer.op_type)}</td>',
            f'<td data-v="{e(layer.tensor)}">{e(layer.tensor)}</td>',
            f'<td data-v="{e(layer.precision or "")}">{e(layer.precision or "")}</td>',
        ]
        for kind, m in (("entire", layer.entire), ("single", layer.single)):
            for n in ("cosine", "snr_db", "euclid", "max_abs"):
                v = _get(m, n)
                cls = "n"
                if v is not None and (
                    (n == "cosine" and not v >= cos_threshold) or (n == "snr_db" and not v >= snr_threshold)
                ):
                    cls += " bad" if kind == "single" else " warn"
                cells.append(f'<td class="{cls}" data-v="{_js_num(v)}">{e(fmt(n, v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = [*result.notes, *([result.dump_message] if result.dump_message else [])]
    notes_html = "".join(f"<li>{e(n)}</li>" for n in notes)
    img = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hybridq error analysis</title>
<style>{_CSS}</style></head><body>
<h1>hybridq error analysis</h1>
<p class="verdict">{e(verdict(result, cos_threshold, snr_threshold))}</p>
<p>{result.n_samples} sample(s), {len(result.layers)} tensors. <b>entire</b>: fp32 vs quantized model, errors
accumulated; <b>single</b>: the layer quantized alone on fp32 inputs (shows which layer adds error).
Red: single below cosine {cos_threshold} or SNR {snr_threshold} dB; yellow: entire below.
Click a column header to sort.</p>
{f"<ul>{notes_html}</ul>" if notes_html else ""}
<img alt="per-layer error chart" src="data:image/png;base64,{img}">
<table class="sortable"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""


# --------------------------------------------------------------------------- terminal


def verdict(
    result: AnalysisResult, cos_threshold: float = COS_THRESHOLD, snr_threshold: float = SNR_THRESHOLD
) -> str:
    """One line: do the outputs keep ``cos_threshold``, and which layers add the most error."""
    outs = result.output_layers() or result.layers[-1:]
    if not outs:
        return "no tensor was compared"
    worst_out = min(outs, key=lambda layer: (not math.isnan(layer.entire.cosine), layer.entire.cosine))
    ok = all(layer.entire.cosine >= cos_threshold for layer in outs)
    adders = [
        layer for layer in result.worst() if _flagged(layer.single, cos_threshold, snr_threshold)
    ]
    where = (
        f"output {worst_out.tensor!r} cos {fmt('cosine', worst_out.entire.cosine)}, "
        f"SNR {fmt('snr_db', worst_out.entire.snr_db)} dB over {result.n_samples} sample(s)"
    )
    if adders:
        names = ", ".join(
            f"{a.label} (single cos {fmt('cosine', a.single.cosine)})" for a in adders[:3] if a.single
        )
        tail = f"; {len(adders)} layer(s) add error, worst: {names}"
    else:
        tail = "; no single layer is below the thresholds"
    if ok:
        return f"OK: every output keeps cosine >= {cos_threshold} (worst {where}){tail}"
    return f"CHECK: {where} is below {cos_threshold}{tail}"


def rich_table(
    result: AnalysisResult,
    top: int = 20,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
) -> Table:
    """The ``top`` worst layers (see :meth:`AnalysisResult.worst`), flagged cells highlighted."""
    from rich.table import Table

    index = {id(layer): i for i, layer in enumerate(result.layers)}
    shown = result.worst(top)
    t = Table(
        title=f"worst {len(shown)} of {len(result.layers)} layers ({result.n_samples} sample(s))",
        caption="single: layer quantized alone on fp32 inputs; entire: errors accumulated",
    )
    t.add_column("#", justify="right")
    t.add_column("layer")
    t.add_column("prec")
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
            layer.precision or "",
            cell(layer.single, "cosine", "bold red"),
            cell(layer.single, "snr_db", "bold red"),
            cell(layer.entire, "cosine", "yellow"),
            cell(layer.entire, "snr_db", "yellow"),
            fmt("euclid", layer.entire.euclid),
            fmt("max_abs", layer.entire.max_abs),
            style="on grey15" if _flagged(layer.single, cos_threshold, snr_threshold) else None,
        )
    return t


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# --------------------------------------------------------------------------- files


def write_reports(result: AnalysisResult, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the txt, csv, png and html reports into ``directory``; returns their paths."""
    d = Path(directory)
    png = render_png(result)
    files = [
        (d / TXT, render_txt(result).encode("utf-8")),
        (d / CSV, render_csv(result).encode("utf-8")),
        (d / PNG, png),
        (d / HTML, render_html(result, png).encode("utf-8")),
    ]
    for path, data in files:
        write_atomic(path, data, parents=True)
    return [p for p, _ in files]


__all__ = [
    "CSV_COLUMNS",
    "fmt",
    "render_csv",
    "render_html",
    "render_png",
    "render_txt",
    "rich_table",
    "verdict",
    "write_reports",
]
