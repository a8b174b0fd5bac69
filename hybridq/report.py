"""Renders an :class:`~hybridq.analysis.AnalysisResult`; computes no metric.

Every view starts with the verdict (:func:`hybridq.analysis.judge`: OK or
CHECK, the worst output as a whole and in its worst slice, the next step) and
names a row the same way: ``node [tensor] precision``
(:attr:`hybridq.analysis.LayerError.label`).

Files written by :func:`write_reports` (each atomically):

* ``error_analysis.txt``: the verdict and outputs as ``#`` lines, then
  RKNN-Toolkit2's layout (``[OpType] name``, entire cos | euc, single cos |
  euc) plus SNR and max abs error; column widths are computed from the
  content, so columns never run together;
* ``error_analysis.csv``: one row per tensor, full precision, for scripts;
* ``error_analysis.png``: entire vs single cosine and SNR along the graph,
  red circles on the layers below a threshold only;
* ``report.html``: self-contained: verdict and next step, the chart (inlined
  as base64 PNG), the outputs, and the layer table worst first (sortable by
  clicking a column header).
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
from typing import TYPE_CHECKING, Any, Callable

from ._fs import write_atomic
from .analysis.results import AnalysisResult, LayerError, runtime_departures
from .analysis.verdict import COS_THRESHOLD, SNR_THRESHOLD, Verdict, judge
from .metrics import METRIC_NAMES, Metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TXT, CSV, PNG, HTML = "error_analysis.txt", "error_analysis.csv", "error_analysis.png", "report.html"
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


def render_txt(
    result: AnalysisResult,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    v: Verdict | None = None,
) -> str:
    """The ``error_analysis.txt`` text: the verdict first, then one row per layer in graph order."""
    v = judge(result, cos_threshold, snr_threshold) if v is None else v
    names = list(METRIC_NAMES)
    rows = []
    for layer in result.layers:
        cells = [fmt(n, _get(layer.entire, n)) for n in names] + [fmt(n, _get(layer.single, n)) for n in names]
        rows.append((f"[{layer.op_type}] {layer.label}", cells))
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
        f"# verdict: {verdict(result, cos_threshold, snr_threshold, v=v)}",
        *([f"# command: {v.command}"] if v.command else []),
        *(
            f"# output {r[0]}: cos {r[1]}, SNR {r[2]} dB; worst slice ({r[3]}): cos {r[4]}, SNR {r[5]} dB; {r[6]}"
            if r[1] != "-" else f"# output {r[0]}: {r[3]}; {r[6]}"
            for r in _outputs_rows(v)
        ),
        f"# hybridq error analysis: {result.samples_said}; every figure is the mean over samples.",
        "# entire: fp32 model vs quantized model at this tensor; errors accumulate layer by layer.",
        "# single: this layer quantized alone, fed the fp32 model's tensors; shows which layer adds error.",
        "# cos: cosine similarity, euc: Euclidean distance, snr: SNR in dB, max_abs: max absolute error;",
        "# '-': layer not quantized or not isolated. Names: node [tensor] precision.",
    ]
    out += [f"# note: {n}" for n in result.notes]
    if result.dump_message:
        out.append(f"# note: {result.dump_message}")
    out.append("")
    out.append(("layer_name".ljust(lw) + _GAP + "entire".ljust(gw[0]) + _GAP + "single").rstrip())
    out.append(line("", heads))
    out.append("-" * len(line("", heads)))
    out += [line(label, cells) for label, cells in rows]
    return "\n".join(out + _runtime_txt(result, cos_threshold, snr_threshold)) + "\n"


def _runtime_txt(result: AnalysisResult, cos_threshold: float, snr_threshold: float) -> list[str]:
    """The runtime column as text: every row, the ones that depart from the simulation marked `<<`."""
    if not result.runtime:
        return []
    bad = {id(r) for r in runtime_departures(result.runtime, cos_threshold, snr_threshold)}
    w = max(len(r.tensor) for r in result.runtime)
    out = ["", f"# runtime: {result.runtime[0].runtime}; '<<': departs from the simulation ({len(bad)} of {len(result.runtime)})",
           "tensor".ljust(w) + "  vs fp32 cos | vs fp32 snr | vs sim cos | vs sim snr | vs sim max_abs"]
    for r in result.runtime:
        cells = [fmt("cosine", r.vs_fp32.cosine).rjust(11), fmt("snr_db", r.vs_fp32.snr_db).rjust(11),
                 fmt("cosine", r.vs_simulator.cosine).rjust(10), fmt("snr_db", r.vs_simulator.snr_db).rjust(10),
                 fmt("max_abs", r.vs_simulator.max_abs).rjust(14)]
        out.append((r.tensor.ljust(w) + "  " + " | ".join(cells) + ("  <<" if id(r) in bad else "")).rstrip())
    return out


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
    "label",
    "slice_axis",
    "worst_slice",
    "worst_slice_cosine",
    "worst_slice_snr_db",
    "fp32_file",
    "quant_file",
    "runtime_vs_fp32_cosine",
    "runtime_vs_simulator_cosine",
    "runtime_vs_simulator_snr_db",
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
    runtime = {r.tensor: r for r in result.runtime}
    for i, layer in enumerate(result.layers):
        rt = runtime.get(layer.tensor)
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
                layer.label,
                *(
                    [sl.axis, sl.worst, _csv_num(sl.cosine[sl.worst]), _csv_num(sl.snr_db[sl.worst])]
                    if (sl := layer.slices) is not None
                    else ["", "", "", ""]
                ),
                layer.fp32_file or "",
                layer.quant_file or "",
                *([_csv_num(rt.vs_fp32.cosine), _csv_num(rt.vs_simulator.cosine), _csv_num(rt.vs_simulator.snr_db)]
                  if rt is not None else ["", "", ""]),
            ]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- chart


def _plain(s: str, n: int = 28) -> str:
    """A label matplotlib shows as is: no mathtext, cut to ``n`` characters."""
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("$", r"\$")


_NAMED_TICKS = 40  # up to this many layers the x axis names every layer; beyond, every k-th index
_MAX_LABELS = 10  # failing layers named on the chart at most (the table lists all)


def render_png(
    result: AnalysisResult, cos_threshold: float = COS_THRESHOLD, snr_threshold: float = SNR_THRESHOLD
) -> bytes:
    """The chart of :func:`chart` as PNG bytes."""
    fig = chart(result, cos_threshold, snr_threshold)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # cosmetic only: a layer name with a glyph the font lacks
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _mark_failing(ax_c: Any, ax_s: Any, failing: list[LayerError], xs: list[int], n: int, clip: Callable[[list[float]], list[float]]) -> None:
    """Circle the layers below a threshold (at graph positions ``xs``) and name as many as fit, in tiers."""
    tiers: list[list[tuple[float, float]]] = [[] for _ in range(4)]  # label spans (pixels) taken per height
    axes_px = 1200.0  # about the plot width at 12.8 inches, 100 dpi
    labelled = 0
    for w, i in zip(failing, xs):
        m = w.single
        assert m is not None
        sy = clip([m.snr_db])[0]
        ax_c.plot([i], [m.cosine], "o", ms=10, mfc="none", mec="red", mew=1.5, gid="below-threshold")
        ax_s.plot([i], [sy], "o", ms=10, mfc="none", mec="red", mew=1.5, gid="below-threshold")
        if labelled >= _MAX_LABELS:
            continue
        text = _plain(w.layer)
        x_px = (i + 0.5) / max(n, 1) * axes_px
        width = 6.5 * len(text) + 16  # DejaVu Sans at 8 points, with a margin
        left = x_px + width > axes_px  # near the right edge: the name goes to the left of its point
        span = (x_px - width, x_px) if left else (x_px, x_px + width)
        tier = next((t for t in range(4) if all(span[1] < a or span[0] > b for a, b in tiers[t])), None)
        if tier is None:
            continue  # no free height here: the table names it
        tiers[tier].append(span)
        labelled += 1
        gap = 6.0 * max(n, 1) / axes_px  # six pixels in data units
        ax_s.annotate(  # one row of names per tier, at fixed heights, so equal spans never overlap
            text, (i, sy), xytext=(i - gap if left else i + gap, 0.42 + 0.1 * tier),
            textcoords=("data", "axes fraction"), ha="right" if left else "left", va="center",
            fontsize=8, color="red", gid="layer-name", arrowprops={"arrowstyle": "-", "color": "red", "lw": 0.5},
        )


def chart(result: AnalysisResult, cos_threshold: float = COS_THRESHOLD, snr_threshold: float = SNR_THRESHOLD) -> Figure:
    """Per-layer entire vs single cosine (top) and SNR (bottom) along the graph.

    Red circles mark only the layers whose single error is below a threshold
    (none when every layer passes); the worst of them are named. Up to 40
    layers the x axis names every layer; beyond that it shows every k-th
    index (the table names them). The figure keeps its size whatever the
    number of layers, and the constrained layout keeps axis labels inside it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = result.layers
    n = len(layers)
    xs = list(range(n))
    named = n <= _NAMED_TICKS
    fig = Figure(figsize=(12.8, 7.2 if named else 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_c, ax_s = fig.subplots(2, 1, sharex=True)

    def series(kind: str, name: str) -> list[float]:
        return [
            math.nan if (m := getattr(layer, kind)) is None else float(getattr(m, name)) for layer in layers
        ]

    snrs = [v for k in ("entire", "single") for v in series(k, "snr_db")]
    finite = [v for v in snrs if math.isfinite(v)]
    top = max([*finite, snr_threshold]) + 10.0
    bottom = min([*finite, snr_threshold]) - 10.0

    def clip(vs: list[float]) -> list[float]:
        return [top if v == math.inf else bottom if v == -math.inf else v for v in vs]

    ms = 3 if n <= 200 else 1.5
    for ax, values in (
        (ax_c, (series("entire", "cosine"), series("single", "cosine"))),
        (ax_s, (clip(series("entire", "snr_db")), clip(series("single", "snr_db")))),
    ):
        ax.plot(xs, values[0], "-o", ms=ms, lw=1.0, color="#1f77b4", label="entire (accumulated)")
        ax.plot(xs, values[1], "s", ms=ms, color="#ff7f0e", label="single (layer alone)")
        ax.grid(True, alpha=0.3)
    ax_c.set_ylabel("cosine similarity")
    inf_note = f" (inf drawn at {top:.0f})" if any(math.isinf(v) for v in snrs) else ""
    ax_s.set_ylabel("SNR dB" + inf_note)
    ax_c.axhline(cos_threshold, color="red", ls=":", lw=0.8, label=f"threshold {cos_threshold:g}")
    ax_s.axhline(snr_threshold, color="red", ls=":", lw=0.8, label=f"threshold {snr_threshold:g} dB")
    index = {id(layer): i for i, layer in enumerate(layers)}
    failing = [w for w in result.worst() if _flagged(w.single, cos_threshold, snr_threshold)]
    _mark_failing(ax_c, ax_s, failing, [index[id(w)] for w in failing], n, clip)
    v = judge(result, cos_threshold, snr_threshold)
    circled = f"red circles: {len(failing)} layer(s) below threshold" if failing else "no layer below threshold"
    ax_c.set_title(
        f"{'OK' if v.ok else 'CHECK'}: per-layer error, {result.samples_said}, {n} tensors; {circled}",
        fontsize=10, color="#060" if v.ok else "#a00",
    )
    ax_c.legend(loc="lower left", fontsize=8)
    if named:
        ax_s.set_xticks(xs)
        ax_s.set_xticklabels([_plain(layer.layer, 28) for layer in layers], rotation=90, fontsize=7)
    else:
        ax_s.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
        ax_s.set_xlabel("layer index in graph order (the table names every layer)")
    ax_s.set_xlim(-0.5, max(n - 0.5, 0.5))
    return fig


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
body{font-family:system-ui,sans-serif;margin:0.8em 1.2em;color:#222}h2{font-size:1.1em;margin:0.8em 0 0.3em}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #ddd}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}td.n{text-align:right;font-family:monospace}
td.bad{background:#fdd;color:#900;font-weight:bold}td.warn{background:#ffefc4}
img{display:block;max-width:100%;max-height:66vh}
.verdict{padding:0.4em 0.8em;margin-bottom:0.5em;border-left:6px solid}.verdict p{margin:0.2em 0}
.verdict.ok{background:#e8f6e8;border-color:#2a2}.verdict.check{background:#fdecec;border-color:#c22}
code{background:#f4f4f4;padding:0 0.2em}
"""


def _js_num(v: float | None) -> str:
    if v is None:
        return ""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def _outputs_rows(v: Verdict) -> list[list[str]]:
    """Rows of the output table: label, whole cos, whole SNR, worst slice (axis, index), its cos and SNR, status."""
    rows = []
    for o in v.outputs:
        ws = o["worst_slice"]
        rows.append([
            o["label"],
            fmt("cosine", o["cosine"]),
            fmt("snr_db", o["snr_db"]),
            f"axis {ws['axis']}, #{ws['index']} of {ws['slices']}" if ws else "-",
            fmt("cosine", ws["cosine"]) if ws else "-",
            fmt("snr_db", ws["snr_db"]) if ws else "-",
            "ok" if o["ok"] else "CHECK",
        ])
    for x in v.exact_outputs:  # integer or bool outputs: value for value
        rows.append([x["label"], "-", "-", _differ(x), "-", "-", "ok" if x["ok"] else "CHECK"])
    rows += [[m["tensor"], "-", "-", f"not compared: {m['reason']}", "-", "-", "CHECK"] for m in v.not_compared]
    return rows


def _differ(x: dict[str, Any], against: str = "") -> str:
    """An integer output's agreement: ``1 of 36 values differ (2.8 %)`` (``against``: words after "differ")."""
    pct = 100.0 * x["differ"] / x["total"] if x["total"] else 0.0
    return f"{x['differ']} of {x['total']} values differ{against} ({f'{pct:.1f}' if pct == 0 or pct >= 0.1 else f'{pct:.2g}'} %)"


OUTPUT_COLUMNS = ("output", "cos", "SNR dB", "worst slice", "slice cos", "slice SNR dB", "")
"""Columns of the per-output table (terminal, html, txt)."""


def render_html(
    result: AnalysisResult,
    png: bytes | None = None,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    v: Verdict | None = None,
) -> str:
    """The self-contained ``report.html``: verdict and next step, outputs, chart, then the layer table
    worst first (click a header to sort; ``#`` restores graph order). Pass ``png`` to reuse a chart."""
    v = judge(result, cos_threshold, snr_threshold) if v is None else v
    png = render_png(result, cos_threshold, snr_threshold) if png is None else png
    e = html.escape
    cols = ["#", "layer [tensor] precision", "op"] + [
        f"{kind} {_SHORT[n]}" for kind in ("single", "entire") for n in ("cosine", "snr_db", "euclid", "max_abs")
    ]
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    index = {id(layer): i for i, layer in enumerate(result.layers)}
    body = []
    for layer in result.worst():
        i = index[id(layer)]
        op = layer.op_type + (f" (+ {layer.folded})" if layer.folded else "")
        cells = [
            f'<td class="n" data-v="{i}">{i}</td>',
            f'<td data-v="{e(layer.label)}">{e(layer.label)}</td>',
            f'<td data-v="{e(op)}">{e(op)}</td>',
        ]
        for kind, m in (("single", layer.single), ("entire", layer.entire)):
            for n in ("cosine", "snr_db", "euclid", "max_abs"):
                val = _get(m, n)
                cls = "n"
                if val is not None and (
                    (n == "cosine" and not val >= cos_threshold) or (n == "snr_db" and not val >= snr_threshold)
                ):
                    cls += " bad" if kind == "single" else " warn"
                cells.append(f'<td class="{cls}" data-v="{_js_num(val)}">{e(fmt(n, val))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    out_head = "".join(f"<th>{e(c)}</th>" for c in OUTPUT_COLUMNS)
    out_body = "".join(
        "<tr>" + "".join(f'<td class="{"bad" if r[-1] == "CHECK" and j == len(r) - 1 else "n" if j else ""}">{e(c)}</td>'
                         for j, c in enumerate(r)) + "</tr>"
        for r in _outputs_rows(v)
    )
    notes = [*result.notes, *([result.dump_message] if result.dump_message else [])]
    notes_html = "".join(f"<li>{e(n)}</li>" for n in notes)
    img = base64.b64encode(png).decode("ascii")
    status = "OK" if v.ok else "CHECK"
    cmd = f'<p>Command: <code>{e(v.command)}</code></p>' if v.command else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hybridq error analysis: {status}</title>
<style>{_CSS}</style></head><body>
<div class="verdict {status.lower()}"><p><b>{e(verdict(result, cos_threshold, snr_threshold, v=v, brief=True))}</b></p>
{f"<p>Next: {e(v.next_step)}.</p>" if not v.ok else ""}{cmd}</div>
<img alt="per-layer error chart" src="data:image/png;base64,{img}">
<h2>Outputs</h2>
<table><thead><tr>{out_head}</tr></thead><tbody>{out_body}</tbody></table>
<p>{result.samples_said}, {len(result.layers)} tensors. Thresholds: cosine {cos_threshold:g}, SNR
{snr_threshold:g} dB (an output must keep the cosine as a whole, and the cosine and SNR in its worst slice along the
channel axis, each slice measured against its own energy, its errors pooled over the samples; whole-tensor figures
are means of the per-sample ones; an integer or bool output must equal fp32's value for value). <b>single</b>: the layer quantized alone on fp32 inputs
(shows which layer adds error); <b>entire</b>: fp32 vs quantized model, errors accumulated. Names: node [tensor]
precision; <code>float32-&gt;uint8</code> is a float op whose output is quantized (its single error is that
quantization). Red: single below a threshold; yellow: entire below.</p>
{f"<ul>{notes_html}</ul>" if notes_html else ""}
{_runtime_html(result, cos_threshold, snr_threshold)}
<h2>Layers, worst first</h2>
<p>Click a column header to sort; <b>#</b> is graph order.</p>
<table class="sortable"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""


def _runtime_html(result: AnalysisResult, cos_threshold: float, snr_threshold: float) -> str:
    """The runtime column: the rows that depart from the simulation first (red), then the rest in graph order."""
    if not result.runtime:
        return ""
    e = html.escape
    bad = runtime_departures(result.runtime, cos_threshold, snr_threshold)
    ids = {id(r) for r in bad}
    rows = []
    for r in bad + [r for r in result.runtime if id(r) not in ids]:
        cls = "n bad" if id(r) in ids else "n"
        cells = [fmt("cosine", r.vs_fp32.cosine), fmt("snr_db", r.vs_fp32.snr_db), fmt("cosine", r.vs_simulator.cosine),
                 fmt("snr_db", r.vs_simulator.snr_db), fmt("max_abs", r.vs_simulator.max_abs)]
        rows.append(f"<tr><td>{e(r.tensor)}</td>" + "".join(f'<td class="{cls}">{e(c)}</td>' for c in cells) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in ("tensor", "vs fp32 cos", "vs fp32 SNR dB", "vs simulator cos", "vs simulator SNR dB", "max abs vs simulator"))
    lead = (f"{len(bad)} of {len(result.runtime)} tensor(s) depart from the simulation (red, worst first); "
            f"the first in graph order is {e(next(r.tensor for r in result.runtime if id(r) in ids))}." if bad
            else f"The runtime agrees with the simulation on all {len(result.runtime)} tensor(s).")
    return (f"<h2>Runtime: {e(result.runtime[0].runtime)}</h2><p>{lead}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


# --------------------------------------------------------------------------- terminal


def verdict(
    result: AnalysisResult,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    v: Verdict | None = None,
    brief: bool = False,
) -> str:
    """The verdict as one paragraph: OK or CHECK, the worst output (whole and worst slice), what to do next
    (left out when ``brief``)."""
    v = judge(result, cos_threshold, snr_threshold) if v is None else v
    if not (v.outputs or v.exact_outputs or v.not_compared):
        return "no tensor was compared"
    thr = f"cosine >= {cos_threshold:g} and SNR >= {snr_threshold:g} dB (of the worst slice where an output is sliced)"
    where = _worst_output(v.outputs[0]) if v.outputs else ""
    n = f"over {result.samples_said}"
    if v.ok:
        tail = (
            f"{len(v.layers)} layer(s) below the thresholds on their own, which the outputs absorb (listed, not judged), worst: "
            + ", ".join(f"{x['label']} (single cos {fmt('cosine', x['single_cosine'])})" for x in v.layers[:3])
            if v.layers
            else "no layer is below the thresholds"
        )
        if not v.exact_outputs:
            return f"OK: every output keeps {thr} {n} (worst {where}); {tail}."
        same = "every integer or bool output equals fp32's on every value (" + ", ".join(
            f"{x['label']}: {x['total']} values" for x in v.exact_outputs) + ")"
        floats = f"every float output keeps {thr} and " if v.outputs else ""
        return f"OK: {floats}{same} {n}" + (f" (worst {where})" if where else "") + f"; {tail}."
    bad = [x for x in v.outputs if not x["ok"]]
    parts = [f"{len(bad)} output(s) below {thr} {n} (worst {where})"] if bad else []
    parts += [f"output {x['label']}: {_differ(x, ' from fp32')}, pooled {n}" for x in v.exact_outputs if not x["ok"]]
    parts += [f"output {m['tensor']} not compared: {m['reason']}" for m in v.not_compared]
    head = "CHECK: " + "; ".join(parts) + "."
    if any(not x["ok"] for x in v.exact_outputs):
        head += " An integer or bool output passes only when every value equals fp32's."
    if v.outputs and not bad:
        head += f" The float outputs keep {thr} (worst {where})."
    return head if brief else f"{head} Next: {v.next_step}."


def _worst_output(o: dict[str, Any]) -> str:
    """The worst float output in words: whole tensor, worst sample, worst slice."""
    ws = o["worst_slice"]
    where = f"output {o['label']}: cos {fmt('cosine', o['cosine'])}, SNR {fmt('snr_db', o['snr_db'])} dB"
    if o.get("worst_sample"):
        s, by_snr = o["worst_sample"], o.get("worst_sample_by_snr") or o["worst_sample"]
        how = "pooled over the samples" if o.get("pooled") else "means of the samples"
        a, b = (f"#{x['index']}: cos {fmt('cosine', x['cosine'])}, SNR {fmt('snr_db', x['snr_db'])} dB" for x in (s, by_snr))
        where += f", {how}; " + (f"worst sample {a}" if by_snr["index"] == s["index"] else f"worst sample by cosine {a}, by SNR {b}")
    if (nf := o.get("non_finite")) and nf["differ"]:
        where += f"; {nf['differ']} non-finite value(s) differ from fp32's, left out of these figures"
    if ws:
        where += (
            f"; worst slice #{ws['index']} of {ws['slices']} on axis {ws['axis']}, pooled over the samples: "
            f"cos {fmt('cosine', ws['cosine'])}, SNR {fmt('snr_db', ws['snr_db'])} dB"
        )
    return where


# --------------------------------------------------------------------------- files


def write_reports(
    result: AnalysisResult,
    directory: str | os.PathLike[str],
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    v: Verdict | None = None,
) -> list[Path]:
    """Write the txt, csv, png and html reports into ``directory``; returns their paths.

    ``v`` is the verdict to show (default: :func:`~hybridq.analysis.judge` of ``result``
    with the thresholds and this directory as the snapshot).
    """
    d = Path(directory)
    v = judge(result, cos_threshold, snr_threshold, snapshot=str(d)) if v is None else v
    png = render_png(result, cos_threshold, snr_threshold)
    files = [
        (d / TXT, render_txt(result, cos_threshold, snr_threshold, v).encode("utf-8")),
        (d / CSV, render_csv(result).encode("utf-8")),
        (d / PNG, png),
        (d / HTML, render_html(result, png, cos_threshold, snr_threshold, v).encode("utf-8")),
    ]
    for path, data in files:
        write_atomic(path, data, parents=True)
    return [p for p, _ in files]


__all__ = [
    "CSV_COLUMNS",
    "OUTPUT_COLUMNS",
    "chart",
    "fmt",
    "render_csv",
    "render_html",
    "render_png",
    "render_txt",
    "verdict",
    "write_reports",
]
