"""The verdict of an analysis: OK or CHECK against the thresholds, why, and the next step (plain data)."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from ..metrics import SNR_DEFAULT, Metrics, output_ok
from ..recorded import OTHER_SOURCE
from .results import AnalysisResult, LayerError, OutputMatch

COS_THRESHOLD = 0.99
"""Default cosine below which an output, an output slice or a layer's single error fails the verdict."""
SNR_THRESHOLD = SNR_DEFAULT
"""Default SNR (dB) below which an output slice or a layer's single error fails the verdict."""


def _below(m: Metrics | None, cos_threshold: float, snr_threshold: float) -> bool:
    """Is ``m`` below either threshold (NaN counts as below)?"""
    return m is not None and (not m.cosine >= cos_threshold or not m.snr_db >= snr_threshold)


@dataclass
class Verdict:
    """OK or CHECK for an analysis, why, and what to do next (plain data; the report renders it).

    ``ok`` is true when every float model output passes :func:`~hybridq.metrics.output_ok`:
    whole-tensor cosine >= ``cos_threshold``, and SNR >= ``snr_threshold`` of its
    worst slice along the channel axis (every slice also at cosine >=
    ``cos_threshold``), or of the whole tensor where it is not sliced; every integer or bool output equals fp32's
    value for value on every sample (``exact_outputs``, the most differing first); and no output is left uncompared
    (``not_compared``: tensor and why). ``outputs`` lists every float output, worst first;
    ``layers`` the layers whose single error is below a threshold (the ones
    that add error), worst first, at most five. ``next_step`` says what to do
    in one sentence; ``cfg_entry`` is the cfg line to try and ``command`` the
    ``hybridq propose`` command line (None when the verdict is OK).
    """

    ok: bool
    cos_threshold: float
    snr_threshold: float
    n_samples: int
    outputs: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    next_step: str
    cfg_entry: str | None = None
    command: str | None = None
    exact_outputs: list[dict[str, Any]] = field(default_factory=list)
    not_compared: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats may be non-finite: write it through :func:`~hybridq.metrics.to_strict_json`)."""
        return {
            "ok": self.ok,
            "status": "OK" if self.ok else "CHECK",
            "thresholds": {"cosine": self.cos_threshold, "snr_db": self.snr_threshold},
            "n_samples": self.n_samples,
            "worst_outputs": self.outputs,
            "exact_outputs": self.exact_outputs,
            "not_compared": self.not_compared,
            "worst_layers": self.layers,
            "next_step": self.next_step,
            "cfg_entry": self.cfg_entry,
            "command": self.command,
        }


def _output_entry(layer: LayerError, cos_threshold: float, snr_threshold: float) -> dict[str, Any]:
    """One output as the verdict judges it: the whole tensor with the samples pooled, as the proposal's target does
    (the means of per-sample figures where a manifest predates them), and its worst slice."""
    e = layer.entire
    sl = layer.slices
    cos, snr = layer.pooled if layer.pooled is not None else (e.cosine, e.snr_db)
    entry: dict[str, Any] = {
        "tensor": layer.tensor,
        "label": layer.label,
        "cosine": cos,
        "snr_db": snr,
        "pooled": layer.pooled is not None,
        "worst_slice": None,
    }
    if sl is not None:
        w = sl.worst
        entry["worst_slice"] = {
            "axis": sl.axis,
            "index": w,
            "slices": len(sl.cosine),
            "cosine": sl.cosine[w],
            "snr_db": sl.snr_db[w],
            "min_cosine": sl.min_cosine,
        }
    per = (e.per_sample or {}).get("cosine") or []
    if len(per) > 1:  # the figures are pooled over the samples: the worst sample beside them, so none hides
        entry["worst_sample"] = _worst_sample(e.per_sample, "cosine")
        # the verdict judges the SNR too, and the sample lowest in cosine need not be lowest in SNR
        entry["worst_sample_by_snr"] = _worst_sample(e.per_sample, "snr_db")
    if layer.nonfinite is not None:  # left out of the figures: equal infinities agree, the rest differ
        entry["non_finite"] = {"equal": layer.nonfinite[0], "differ": layer.nonfinite[1]}
    entry["ok"] = output_ok(cos, snr, sl, cos_threshold, snr_threshold) and not (layer.nonfinite or (0, 0))[1]
    return entry


def _worst_sample(per: dict[str, list[float]], measure: str) -> dict[str, Any]:
    """The sample lowest on `measure` (NaN lowest), with its cosine and SNR; named by its place in the run when some
    samples were left out of the comparison."""
    values = per[measure]
    worst = min(range(len(values)), key=lambda i: (not math.isnan(values[i]), values[i]))
    index = int(per["sample"][worst]) if "sample" in per else worst
    return {"index": index, "cosine": per["cosine"][worst], "snr_db": per["snr_db"][worst]}


def _output_rank(entry: dict[str, Any]) -> tuple[bool, float, float]:
    """Failing outputs first, then the lowest SNR: its worst slice's, or the whole tensor's where that is lower or the
    output has no slices (a 2-D logits output is as bad as its SNR, not ranked after every sliced one)."""
    def num(v: float) -> float:
        return -math.inf if math.isnan(v) else v

    ws = entry["worst_slice"]
    snr = min(num(ws["snr_db"]), num(entry["snr_db"])) if ws else num(entry["snr_db"])
    return (entry["ok"], snr, num(entry["cosine"]))


def _exact_entry(x: OutputMatch) -> dict[str, Any]:
    """An integer or bool output as the verdict judges it: it passes only when every value equals fp32's."""
    return {**x.to_dict(), "ok": x.differ == 0}


def judge(
    result: AnalysisResult,
    cos_threshold: float = COS_THRESHOLD,
    snr_threshold: float = SNR_THRESHOLD,
    snapshot: str | None = None,
    cfg: str | None = None,
    dataset: str | None = None,
    fallback: str = "float32",
    float_model: str | None = None,
) -> Verdict:
    """The verdict of ``result`` against the thresholds, with the next step.

    ``snapshot``, ``cfg`` and ``dataset`` are the paths put into the suggested
    ``hybridq propose`` command (without a snapshot, propose analyses anew;
    placeholders ``MODEL.quantization.cfg`` and ``DATASET`` when unknown; the next step then says which cfg to pass,
    named after ``float_model`` when given, as step1 names it). ``fallback`` is the precision the next
    step suggests for a layer (float16 for a cfg written for target npu, whose fallback it is).
    """
    outs = result.output_layers() if result.outputs else result.layers[-1:]  # no output named (a device folder): the last row
    entries = sorted((_output_entry(o, cos_threshold, snr_threshold) for o in outs), key=_output_rank)
    exact = sorted((_exact_entry(x) for x in result.exact_outputs), key=lambda e: -e["share"])
    missing = [{"tensor": t, "reason": why} for t, why in result.uncompared_outputs().items()]
    ok = all(e["ok"] for e in entries) and all(e["ok"] for e in exact) and not missing
    adders = [layer for layer in result.worst() if _below(layer.single, cos_threshold, snr_threshold)]
    layers = [
        {
            "label": a.label,
            "layer": a.layer,
            "tensor": a.tensor,
            "op_type": a.op_type,
            "precision": a.precision,
            "single_cosine": a.single.cosine if a.single else math.nan,
            "single_snr_db": a.single.snr_db if a.single else math.nan,
            "entire_cosine": a.entire.cosine,
            "entire_snr_db": a.entire.snr_db,
        }
        for a in adders[:5]
    ]
    if ok:
        return Verdict(True, cos_threshold, snr_threshold, result.n_samples, entries, layers,
                       "nothing to do: every output meets the thresholds", exact_outputs=exact)
    command = " ".join(
        ["hybridq", "propose", *([shlex.quote(snapshot)] if snapshot else []),
         "--cfg", shlex.quote(cfg) if cfg else "MODEL.quantization.cfg",
         "--dataset", shlex.quote(dataset) if dataset else "DATASET", "--target-cosine", repr(float(cos_threshold)),
         "--target-snr", repr(float(snr_threshold))]  # both: a target given alone replaces the pair
    )
    which = "" if cfg else (f" (for MODEL.quantization.cfg pass the cfg step1 wrote for {float_model}, "
                            f"{Path(float_model).stem}.quantization.cfg in its --out folder" if float_model else
                            " (for MODEL.quantization.cfg pass the cfg step1 wrote for the fp32 model") + ")"
    if missing and all(e["ok"] for e in entries + exact):
        step = (f"output {missing[0]['tensor']} was not compared ({missing[0]['reason']}): check it another way, on your task's "
                "own metric, before trusting the others' figures")
        return Verdict(False, cos_threshold, snr_threshold, result.n_samples, entries, layers, step, None, command, exact, missing)
    step, cfg_entry = _next_step(result, entries, exact, adders, outs, f"`{command}`{which}", cos_threshold, fallback)
    return Verdict(False, cos_threshold, snr_threshold, result.n_samples, entries, layers, step, cfg_entry, command, exact, missing)


def _next_step(
    result: AnalysisResult, entries: list[dict[str, Any]], exact: list[dict[str, Any]], adders: list[LayerError],
    outs: list[LayerError], command: str, cos_threshold: float, fallback: str,
) -> tuple[str, str | None]:
    """The next step of a CHECK verdict and the cfg line it suggests (None: no single line); ``command`` as said, quoted."""
    cfg_entry = None
    if any(OTHER_SOURCE in n for n in result.notes):
        step = ("FLOAT_MODEL is not the file step1 quantized (see the note): run analyze again with the fp32 model "
                "given to step1 before changing the cfg")
    elif adders:
        a = adders[0]
        cfg_entry = f"custom_quantize_layers: {{{a.layer}: {fallback}}}"
        step = (
            f"layer {a.label} adds the most error: in the cfg set `{cfg_entry}` (or int16), "
            f"or clip the range (`min`/`max`) of its input tensors under quantize_parameters; "
            f"or let {command} find the cheapest fix"
        )
    elif all(e["ok"] for e in entries):  # only integer outputs differ: decisions taken on values the quantization moved
        x = exact[0]
        step = (
            f"output {x['label']} differs from fp32 on {x['differ']} of {x['total']} values, although no layer and no float "
            "output is below the thresholds: decisions (argmax, top-k, a threshold) flip where fp32 values are near a tie. "
            "Judge that share on your task's own metric; to shrink it, raise the precision of the layers that compute it "
            "(custom_quantize_layers in the cfg)"
        )
    else:
        worst = entries[0]
        ws = worst["worst_slice"]
        row = next((o for o in outs if o.tensor == worst["tensor"]), None)
        if ws is not None and worst["cosine"] >= cos_threshold and row is not None:
            # the whole tensor passes: a slice is drowned by the range its neighbours set
            prec = row.precision or ""
            if prec.startswith("float32->") or (prec and not prec.startswith(("float32", "float16"))):
                cfg_entry = f"custom_quantize_layers: {{{row.layer}: int16}}"
            step = (
                f"output {row.label} passes as a whole but slice #{ws['index']} on axis {ws['axis']} does not: "
                "its values are small beside the other slices that share one quantization range"
                + (f"; set `{cfg_entry}` in the cfg for a finer step" if cfg_entry else "")
                + f", or run {command}"
            )
        else:
            step = f"no single layer is below the thresholds, so the error builds up over many layers: run {command}"
    return step, cfg_entry
