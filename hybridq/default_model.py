"""What step1 decides on the default int8 model, built as step2 will: the speed check's outcome, and the bias correction.

The bias correction (``bias_correction: true``; off by default): rounding moves each layer's mean output,
and the shifts add up through the model. step1 measures each correctable layer's mean error with the
layers before it corrected (:func:`hybridq.bias_correction.cumulative_shifts`, one segmented pass over
a few calibration samples) and writes it as ``bias_correction:`` on the layer's weight entry, where step2
adds it to the bias. It is not the default because its gain depends on the samples the shifts come from
(held-out output SNR, PP-OCR rec, 8 / 32 / 100 calibration samples: 17.2 -> 19.9 / 16.0 / 21.0 dB; det,
8 / 16: 16.2 -> 16.0 / 17.4 dB; cls, 8: 28.5 -> 30.8 dB), because a range the user or the proposal changes
afterwards leaves a shift stale, and because RKNN-Toolkit2's cfg cannot carry it. The proposal's bias rung
keeps it only where the built model measures better.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import onnx

from . import bias_correction, speedcheck
from .build import Built, build, edits_from
from .calibration import session_for
from .config import CfgEntry, short_float
from .dataset import Dataset
from .metrics import cosine, is_distribution
from .observers import HistogramObserver
from .plan import GraphView, Placement, QuantPlan
from .settings import Settings

SAMPLES = 8
"""Calibration samples the shifts are measured on (as the proposal's bias rung: its BIAS_SAMPLES)."""
FAR_COSINE = 0.9
FAR_FLIPS = 0.2
"""The default int8 model is far from fp32 when an output's cosine on a calibration sample is below FAR_COSINE, or
more than FAR_FLIPS of a distribution output's argmax decisions change: then step1 warns. PP-OCRv3 rec's default
int8 model (BN-folded depthwise weights up to 265 reading one per-tensor uint8 input) decodes every frame as blank,
output cosine 0.61; the PP-OCRv4 models' are at 0.98-0.999 with 3 % of decisions changed at most."""


def corrected(
    built: Built, entries: dict[str, dict[str, Any]], plan: QuantPlan, samples: list[dict[str, np.ndarray]],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """`entries` with each corrected layer's shift on its weight entry, and a cfg comment for each such weight.

    `built` is the model step2 builds from `entries` and custom_quantize_layers; layers it keeps float, and weights
    whose shift is zero, get no key.
    """
    g = GraphView(built.fixed)
    names = bias_correction.correctable_layers((w.node for w in plan.weights.values()), g)
    used = samples[:SAMPLES]
    if not names or not used:
        return entries, {}
    shifts = bias_correction.cumulative_shifts(built.fixed, built.model, names, used, lambda m: session_for(m, basic=False))
    out, comments = dict(entries), {}
    for layer, shift in shifts.items():
        weight = g.by_name[layer].input[1]
        if weight not in out or not np.any(shift):
            continue
        out[weight] = {**out[weight], "bias_correction": [short_float(float(x)) for x in np.asarray(shift, np.float64).reshape(-1)]}
        comments[weight] = (f"bias of {layer} shifted by its mean output error in the int8 model (earlier layers corrected) "
                            f"over {len(used)} calibration samples (largest {np.abs(shift).max():.3g})")
    return out, comments


def decide(
    temp: onnx.ModelProto, observers: dict[str, HistogramObserver], meta: dict[str, Any], settings: Settings,
    entries: dict[str, dict[str, Any]], custom: dict[str, str], plan: QuantPlan, placement: Placement, ds: Dataset, n: int,
) -> tuple[dict[str, str], dict[str, str], dict[str, str], str | None]:
    """What step1 decides on the default int8 model (built once, as step2 builds the cfg, when either needs it): the
    layers the speed check keeps float (with their comments) and the bias correction of the rest, written into
    ``meta["written_entries"]`` as step1's own entries (step2 and propose see no user edit); the bias comments per
    weight, and the speed check's note."""

    @functools.cache
    def default() -> Built:
        edits = edits_from(custom, {t: CfgEntry(t, 0, dict(v)) for t, v in entries.items()}, temp, "cfg")
        return build(temp, observers, meta, settings, edits)

    floats: dict[str, str] = {}
    why: dict[str, str] = {}
    note, checked = None, None
    if settings.speed_check and placement.cpu_policy and speedcheck.default_layers(plan):
        floats, why, note, checked = speedcheck.decide(temp, lambda: default().model, plan, next(ds.samples(limit=1)))
    bias_comments: dict[str, str] = {}
    if settings.bias_correction and not floats:
        meta["written_entries"], bias_comments = corrected(default(), entries, plan, list(ds.samples(limit=min(n, SAMPLES))))
    far = None if floats or not plan.layers else far_from_fp32(temp, default, checked, next(ds.samples(limit=1), None))
    return floats, why, bias_comments, note, far


def far_from_fp32(
    temp: onnx.ModelProto, default: Callable[[], Built], checked: speedcheck.SpeedCheck | None, sample: dict[str, np.ndarray] | None,
) -> str | None:
    """step1's warning when the default int8 model's outputs are far from fp32's on the first calibration sample (see
    FAR_COSINE), else None. The speed check's warm-up outputs are used when it ran; otherwise both models run once."""
    if checked is not None and checked.outputs is not None:
        names, (ref, got) = [o.name for o in temp.graph.output], checked.outputs
    elif sample is not None:
        try:
            runs = [session_for(m, basic=False) for m in (temp, default().model)]
            names = [o.name for o in runs[0].get_outputs()]
            ref, got = (s.run(names, {i.name: sample[i.name] for i in s.get_inputs()}) for s in runs)
        except Exception:  # a check, not a step: a model that cannot run here is left to step2 and analyze
            return None
    else:
        return None
    far = [f for f in (_far(n, r, g) for n, r, g in zip(names, ref, got)) if f]
    if not far:
        return None
    return (f"the default int8 model is far from fp32 on the first calibration sample ({'; '.join(far)}): layers quantized "
            "here lose too much. `hybridq analyze` shows where the error starts; `hybridq step1 --proposal` (or `hybridq "
            "propose --cfg ...`) chooses the layers to keep in float.")


def _far(name: str, ref: np.ndarray, got: np.ndarray) -> str | None:
    """Why one float output is far from fp32's (cosine, argmax decisions of a distribution), or None."""
    if not (isinstance(ref, np.ndarray) and isinstance(got, np.ndarray)) or ref.dtype.kind != "f" or ref.shape != got.shape or not ref.size:
        return None  # integer indices, sequences, or a shape that varies: not judged here
    if not np.isfinite(ref).all():
        return None  # fp32 itself writes +-Inf or NaN here: no figure to hold the int8 model to
    if not np.isfinite(got).all():
        return f"{name}: values not finite"
    cos = cosine(ref, got)
    why = [f"cosine {cos:.3f}"] if cos < FAR_COSINE else []
    if is_distribution(ref, -1):
        want, have = ref.argmax(-1).ravel(), got.argmax(-1).ravel()
        # fp32's most frequent class (CTC's blank, a background) apart: a model that writes it everywhere is found
        rare = want != np.bincount(want).argmax()
        counted = rare if rare.sum() >= 3 else np.ones_like(rare)
        changed = float(np.mean(want[counted] != have[counted]))
        if changed > FAR_FLIPS:
            what = "argmax decisions" if counted is not rare else "argmax decisions outside fp32's most frequent class"
            why.append(f"{100 * changed:.0f} % of its {what} differ")
    return f"{name}: " + ", ".join(why) if why else None
