"""From statistics and cfg entries to final parameters: what step1 writes and how step2 honours edits.

An edit is any value that differs from what step1 wrote (kept in the .data
metadata). Edited min/max win; else an edited scale/zero_point is honoured;
else an edited dtype, qtype or algorithm recomputes the range from the stored
statistics. No model is run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import Cfg, CfgEntry, short_float
from .errors import ConfigError
from .observers import HistogramObserver
from .observers import compute_range as _compute_range
from .plan import QuantPlan, TensorPlan, WeightPlan
from .qparams import NUMPY, QParams, compute_qparams, levels, qrange, range_of, weight_qparams
from .settings import Settings


def compute_range(obs: HistogramObserver, algorithm: str, n_levels: int, percentile: float, tensor: str = "") -> tuple[float, float]:
    """The observer's range by an algorithm; a tensor observed without histogram names itself in a ConfigError."""
    try:
        return _compute_range(obs, algorithm, n_levels, percentile)
    except KeyError as exc:
        raise ConfigError(
            f"Tensor '{tensor}': {exc.args[0]}. It was not quantized by default in step1, so only its range was recorded."
        ) from None


def _floats(values) -> list[float]:
    return [short_float(float(v)) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def activation_entry(tp: TensorPlan, obs: HistogramObserver, settings: Settings, algorithm: str | None = None) -> tuple[dict[str, Any], QParams]:
    """The cfg entry and parameters step1 computes for an activation tensor."""
    algo = algorithm or settings.algorithm
    lo, hi = compute_range(obs, algo, levels(tp.dtype), settings.percentile, tp.tensor)
    qp = compute_qparams(lo, hi, tp.dtype, tp.symmetric)
    entry = {
        "qtype": "sym" if tp.symmetric else "asym",
        "qmethod": "layer",
        "dtype": tp.dtype,
        "algorithm": algo,
        "min": _floats([lo]),
        "max": _floats([hi]),
        "ori_min": _floats([obs.min]),
        "ori_max": _floats([obs.max]),
        "scale": _floats(qp.scale),
        "zero_point": [int(z) for z in qp.zero_point],
    }
    return entry, qp


def listed_qparams(entry: dict[str, Any]) -> QParams | None:
    """The parameters an activation entry lists, as step2 reads an unedited one (None without scale or zero_point)."""
    if entry.get("scale") is None or entry.get("zero_point") is None:
        return None
    dtype = entry["dtype"]
    return QParams(dtype, np.array(entry["scale"], dtype=np.float32), np.array([int(z) for z in entry["zero_point"]]).astype(NUMPY[dtype]))


def weight_entry(wp: WeightPlan, w: np.ndarray) -> tuple[dict[str, Any], QParams]:
    """The cfg entry and parameters of a weight (symmetric, minmax, per channel or per tensor)."""
    qp, lo, hi = weight_qparams(w, wp.dtype, wp.axis)
    entry = {
        "qtype": "sym",
        "qmethod": "channel" if wp.axis is not None else "layer",
        "dtype": wp.dtype,
        "algorithm": "minmax",
        "min": _floats(lo),
        "max": _floats(hi),
        "ori_min": _floats(lo),
        "ori_max": _floats(hi),
        "scale": _floats(qp.scale),
        "zero_point": [int(z) for z in qp.zero_point],
    }
    return entry, qp


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, list) and isinstance(b, list):
        with np.errstate(over="ignore"):
            return len(a) == len(b) and all(np.float32(x) == np.float32(y) for x, y in zip(a, b))
    return a == b


@dataclass
class Resolution:
    """Final parameters plus what step2 tells the user about the cfg entries."""

    activations: dict[str, QParams] = field(default_factory=dict)
    weights: dict[str, QParams] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    edited: set[str] = field(default_factory=set)  # activations whose min/max or scale/zero_point the cfg edits


def _check_zero_points(name: str, where: str, zps: list, dtype: str, symmetric: bool) -> np.ndarray:
    qmin, qmax = qrange(dtype, False)
    out = []
    for z in zps:
        if float(z) != int(float(z)) or not qmin <= int(float(z)) <= qmax:
            raise ConfigError(f"{where}: zero_point {z!r} of '{name}' is outside {dtype} [{qmin}, {qmax}] or not an integer; fix or delete it.")
        out.append(int(float(z)))
    return np.array(out)


def resolve(
    plan: QuantPlan,
    entries: dict[str, CfgEntry],
    written: dict[str, dict[str, Any]],
    observers: dict[str, HistogramObserver],
    weights: dict[str, np.ndarray],
    settings: Settings,
    written_settings: Settings,
    cfg_name: str,
    own: dict[str, dict[str, Any]] | None = None,
) -> Resolution:
    """Parameters for every tensor of the plan, honouring the cfg's edits; an unedited member of a group step1 listed with
    its group's parameters takes its `own` (the build unites the groups of this plan, which a float layer may have split)."""
    res = Resolution()
    changed_settings = {k for k, v in settings.to_dict().items() if v != written_settings.to_dict().get(k)}

    for t, tp in plan.tensors.items():
        e = entries.get(t)
        obs = observers.get(t)
        if obs is None or obs.count == 0:
            raise ConfigError(f"Tensor '{t}' has no calibration statistics (it was not computed for any sample); keep its layer in float in custom_quantize_layers.")
        if e is None:
            if t in written:
                res.notes.append(f"'{t}': no entry in the cfg; fell back to the step1 statistics")
            _, res.activations[t] = activation_entry(tp, obs, settings)
            continue
        where = f"{cfg_name}:{e.line}"
        w = written.get(t, {})
        v = e.values
        edited = {k for k in v if not _same(v[k], w.get(k))}
        algo = v.get("algorithm", w.get("algorithm", settings.algorithm))
        if "algorithm" not in edited and "algorithm" in changed_settings:
            algo = settings.algorithm  # a global edit applies to every entry not edited on its own
        dtype = tp.dtype if tp.dtype != w.get("dtype", tp.dtype) else v.get("dtype", tp.dtype)
        if "dtype" not in edited and "dtype" in changed_settings and tp.dtype == w.get("dtype"):
            dtype = settings.dtype
        sym = (v.get("qtype", "sym" if tp.symmetric else "asym") == "sym")
        if "qtype" not in edited and "qtype" in changed_settings:
            sym = settings.qtype == "sym"
        algorithm_range = functools.partial(compute_range, obs, v.get("algorithm", algo), levels(dtype), settings.percentile, t)
        _check_entry(res, where, t, v, edited, dtype, algorithm_range)
        if {"min", "max", "scale", "zero_point"} & edited:
            res.edited.add(t)
        # SPEC 3: an edited scale/zero_point is honoured, min/max edited beside it or not (a warning when they disagree)
        zp_edit = bool({"scale", "zero_point"} & edited) and dtype == w.get("dtype") and not ({"algorithm", "qtype"} & edited)
        if {"scale", "zero_point"} & edited and dtype != w.get("dtype", dtype) and not _scale_edit_warned(v, edited, w.get("dtype", dtype)):
            res.warnings.append(f"{where}: '{t}' scale/zero_point edit has no effect: {_dtype_source(plan, tp, dtype, w)}, so '{t}' "
                                f"is quantized to {dtype} with parameters from its range; edit min/max to set the range instead.")
        if {"min", "max"} & edited and not zp_edit:
            lo, hi = _edited_range(res, where, t, v.get("min", w.get("min")), v.get("max", w.get("max")), obs)
            qp = compute_qparams(lo, hi, dtype, sym)
            if sym and not ("algorithm" in edited and _is_range_of(v, algorithm_range)):  # a range fix's algorithm range
                res.warnings += _symmetric_bounds(f"{where}: '{t}' is quantized symmetrically (qtype sym)", lo, hi, w, edited, activation=True)
        elif zp_edit:
            qp = _scale_edit(res, where, t, v, w, dtype, sym)
        elif edited & {"dtype", "qtype", "algorithm"} or changed_settings & {"dtype", "qtype", "algorithm", "percentile"} or dtype != w.get("dtype"):
            lo, hi = compute_range(obs, algo, levels(dtype), settings.percentile, t)
            qp = compute_qparams(lo, hi, dtype, sym)
        elif v.get("scale", w.get("scale")) is None or v.get("zero_point", w.get("zero_point")) is None:
            # Nothing edited, but scale or zero_point deleted from the entry: back to the statistics.
            lo, hi = compute_range(obs, algo, levels(dtype), settings.percentile, t)
            qp = compute_qparams(lo, hi, dtype, sym)
        else:
            listed = {**w, **v, **(own or {}).get(t, {})}
            scale = np.array(listed["scale"], dtype=np.float32)
            zp = _check_zero_points(t, where, listed["zero_point"], dtype, sym)
            qp = QParams(dtype, scale, zp.astype(NUMPY[dtype]))
        res.activations[t] = qp

    _resolve_weights(plan, entries, written, weights, cfg_name, res)
    res.warnings += [f"{cfg_name}:{e.line}: the edit of '{t}' has no effect: no quantized layer reads or writes it (its layers run "
                     "float, by custom_quantize_layers or a policy)." for t, e in entries.items() if t not in plan.tensors
                     and t not in plan.weights and any(not _same(val, written.get(t, {}).get(k)) for k, val in e.values.items())]
    return res


def _scale_edit(res: Resolution, where: str, t: str, v: dict[str, Any], w: dict[str, Any], dtype: str, sym: bool) -> QParams:
    """An activation's hand-edited scale/zero_point, checked; min/max beside it that give another range are warned of."""
    if v.get("scale", w.get("scale")) is None or v.get("zero_point", w.get("zero_point")) is None:
        raise ConfigError(f"{where}: '{t}' gives only one of scale and zero_point; give both, or edit min/max instead.")
    scale = np.array(v.get("scale", w.get("scale")), dtype=np.float32)
    zp = _check_zero_points(t, where, v.get("zero_point", w.get("zero_point")), dtype, sym)
    if scale.size != 1 or zp.size != 1:
        raise ConfigError(f"{where}: activation '{t}' takes one scale and one zero_point value.")
    qp = QParams(dtype, scale, zp.astype(NUMPY[dtype]))
    lo, hi = range_of(qp)
    mn, mx = v.get("min", [None])[0], v.get("max", [None])[0]
    if mn is not None and mx is not None and (abs(lo[0] - min(mn, 0.0)) > scale[0] or abs(hi[0] - max(mx, 0.0)) > scale[0]):
        res.warnings.append(
            f"{where}: '{t}' scale/zero_point give the range [{lo[0]:.6g}, {hi[0]:.6g}], which contradicts min/max "
            f"[{mn:.6g}, {mx:.6g}]; the scale/zero_point edit is used."
        )
    return qp


def _scale_edit_warned(v: dict[str, Any], edited: set[str], written_dtype: str) -> bool:
    """Is a scale/zero_point edit that a changed dtype overrides already warned of (an algorithm, qtype or dtype edited beside
    it: `_check_entry`), or harmless (the scale of the min/max edited beside it, which are used)?"""
    return bool({"algorithm", "qtype", "dtype"} & edited) or (bool({"min", "max"} & edited) and _scale_of_range(v, written_dtype))


def _dtype_source(plan: QuantPlan, tp: TensorPlan, dtype: str, w: dict[str, Any]) -> str:
    """What sets an activation's dtype other than step1 wrote: a custom_quantize_layers entry of a layer that writes or reads
    it, else the settings' dtype."""
    for node in (tp.producer, *tp.readers):
        lp = plan.layers.get(node)
        if lp is not None and lp.reason == "cfg" and lp.precision == dtype:
            return f"custom_quantize_layers sets layer '{node}' (which {'writes' if node == tp.producer else 'reads'} '{tp.tensor}') to {dtype}"
    return f"settings dtype is {dtype} (step1 wrote {w.get('dtype')})"


def _symmetric_bounds(subject: str, lo: Any, hi: Any, w: dict[str, Any], edited: set[str], activation: bool) -> list[str]:
    """The warning for an edited min or max that a symmetric range does not use: the range is +-max(|min|, |max|), so a
    bound edited below the other one's magnitude is not used (in the channels where it was edited)."""
    neg = np.abs(np.minimum(np.asarray(lo, dtype=np.float64).reshape(-1), 0.0))
    pos = np.maximum(np.asarray(hi, dtype=np.float64).reshape(-1), 0.0)
    out = []
    for key, other, mine, theirs, raw in (("max", "min", pos, neg, hi), ("min", "max", neg, pos, lo)):
        if key not in edited:
            continue
        before = np.asarray(w.get(key, []), dtype=np.float64).reshape(-1)
        changed = np.asarray(raw, dtype=np.float64).reshape(-1) != before if before.size == mine.size else np.ones(mine.size, bool)
        unused = np.flatnonzero(changed & (mine < theirs))
        if not unused.size:
            continue
        i, n = int(unused[0]), len(unused)
        at = f" in {n} channel{'s' if n > 1 else ''} (channel {i}: " if mine.size > 1 else " ("
        out.append(f"{subject}, with the range +-max(|min|, |max|){' per channel' if mine.size > 1 else ''}: the edited {key} is not "
                   f"used{at}{key} {float(np.ravel(raw)[i]):.6g}, but |{other}| = {theirs[i]:.6g} sets the range +-{theirs[i]:.6g}). "
                   f"To clip a symmetric range, edit both bounds (min -{mine[i]:.6g} and max {mine[i]:.6g})"
                   + (", or set qtype: asym." if activation else "."))
    return out


def _check_entry(res: Resolution, where: str, t: str, v: dict[str, Any], edited: set[str], dtype: str,
                 algorithm_range: Callable[[], tuple[Any, Any]]) -> None:
    """Refuse an activation edit nothing can honour; warn of one another edit overrides (never silence)."""
    if "qmethod" in edited and v["qmethod"] == "channel":
        raise ConfigError(f"{where}: activation '{t}' has qmethod channel, but activations are quantized per tensor "
                          "(qmethod applies to weights); set it back to layer.")
    if "dtype" in edited and v["dtype"] != dtype:
        res.warnings.append(f"{where}: '{t}' dtype {v['dtype']} has no effect: a layer that writes or reads it runs {dtype} "
                            "in custom_quantize_layers, which sets the tensors around it.")
    if {"min", "max"} & edited and "algorithm" in edited and not _is_range_of(v, algorithm_range):
        res.warnings.append(f"{where}: '{t}' algorithm {v['algorithm']} has no effect: the min/max edited beside it are used.")
    if {"scale", "zero_point"} & edited and {"algorithm", "qtype", "dtype"} & edited and not _scale_of_range(v, dtype):
        res.warnings.append(f"{where}: '{t}' scale/zero_point edit has no effect: the {'/'.join(sorted({'algorithm', 'qtype', 'dtype'} & edited))} "
                            "edited beside it sets them; edit min/max to set the range, or leave the others as written.")


def _scale_of_range(v: dict[str, Any], dtype: str) -> bool:
    """Are the entry's scale/zero_point those of its own min/max (as the proposal writes them)?"""
    if not {"min", "max", "scale", "zero_point"} <= set(v):
        return False
    qp = compute_qparams(np.array(v["min"][:1]), np.array(v["max"][:1]), dtype, v.get("qtype") == "sym")
    return bool(np.allclose(np.ravel(qp.scale), v["scale"][:1], rtol=1e-5)) and [int(z) for z in np.ravel(qp.zero_point)] == [int(z) for z in v["zero_point"][:1]]


def _is_range_of(v: dict[str, Any], algorithm_range: Callable[[], tuple[Any, Any]]) -> bool:
    """Are the entry's min/max the range its algorithm gives (a proposal's range fix writes both), to the cfg's digits?"""
    if "min" not in v or "max" not in v:
        return False
    lo, hi = algorithm_range()
    return bool(np.allclose([float(np.ravel(lo)[0]), float(np.ravel(hi)[0])], [v["min"][0], v["max"][0]], rtol=1e-5, atol=1e-7))


def _edited_range(res: Resolution, where: str, t: str, lo: list[float] | None, hi: list[float] | None,
                  obs: HistogramObserver) -> tuple[list[float], list[float]]:
    """An activation's hand-edited min/max, checked; a range that misses every observed value is warned of."""
    if lo is None or hi is None:
        raise ConfigError(f"{where}: '{t}' gives only one of min and max; give both.")
    if len(lo) != 1 or len(hi) != 1:
        raise ConfigError(f"{where}: activation '{t}' takes one min and one max value, got {len(lo)} and {len(hi)}.")
    if lo[0] > hi[0]:
        raise ConfigError(f"{where}: '{t}' has min {lo[0]} > max {hi[0]}; make min <= max.")
    if lo[0] == hi[0] == 0:
        raise ConfigError(f"{where}: '{t}' has min = max = 0, an empty range; give max > min, or delete min and max "
                          "to use the step1 statistics.")
    if obs.max > obs.min and (max(hi[0], 0.0) <= obs.min or min(lo[0], 0.0) >= obs.max):
        _no_overlap(res, where, t, min(lo[0], 0.0), max(hi[0], 0.0), obs)
    return lo, hi


def _no_overlap(res: Resolution, where: str, t: str, lo: float, hi: float, obs: HistogramObserver) -> None:
    """Warn of an edited range that shares no interval with the values step1 observed: they all saturate to one end."""
    res.warnings.append(f"{where}: '{t}' min/max give the range [{lo:.6g}, {hi:.6g}] (0 included), which misses the values "
                        f"step1 observed, [{obs.min:.6g}, {obs.max:.6g}]: every value quantizes to one end of it. "
                        "Check the numbers and their sign (ori_min/ori_max hold the observed range).")


def _resolve_weights(
    plan: QuantPlan, entries: dict[str, CfgEntry], written: dict[str, dict[str, Any]], weights: dict[str, np.ndarray],
    cfg_name: str, res: Resolution,
) -> None:
    """Weight parameters into ``res.weights``: recomputed from the weights unless the cfg edits min/max or scale."""
    for wname, wp in plan.weights.items():
        arr = weights[wname]
        e = entries.get(wname)
        fresh = weight_qparams(arr, wp.dtype, wp.axis)[0]
        if e is None:
            if wname in written:
                res.notes.append(f"'{wname}': no entry in the cfg; recomputed from the weights")
            res.weights[wname] = fresh
            continue
        where = f"{cfg_name}:{e.line}"
        v, w = e.values, written.get(wname, {})
        edited = {k for k in v if not _same(v[k], w.get(k))}
        if v.get("algorithm", "minmax") != "minmax":
            raise ConfigError(f"{where}: weight '{wname}' uses algorithm minmax only; clip a weight range by editing its min/max instead.")
        if "dtype" in edited and v["dtype"] != wp.dtype:
            raise ConfigError(f"{where}: weight '{wname}' has dtype {v['dtype']}, but a weight's dtype is not set per entry: weights "
                              f"take settings weight_dtype ({wp.dtype} here), or int16 with their layer ({wp.node}: int16 in "
                              f"custom_quantize_layers); set it back to {w.get('dtype', wp.dtype)}.")
        if "qtype" in edited and v["qtype"] != "sym":
            raise ConfigError(f"{where}: weight '{wname}' has qtype {v['qtype']}, but weights are quantized symmetrically "
                              "(zero_point 0); set it back to sym.")
        if "zero_point" in edited and np.any(_check_zero_points(wname, where, v["zero_point"], wp.dtype, True) != 0):
            raise ConfigError(
                f"{where}: weight '{wname}' has zero_point {v['zero_point']}, but weights are quantized symmetrically with zero_point 0; "
                "set it back to 0 (or delete the entry) and clip the weight range by editing min/max."
            )
        if {"min", "max"} & edited:
            if v.get("min", w.get("min")) is None or v.get("max", w.get("max")) is None:
                raise ConfigError(f"{where}: weight '{wname}' gives only one of min and max; give both.")
            lo, hi = np.array(v.get("min", w.get("min"))), np.array(v.get("max", w.get("max")))
            n = arr.shape[wp.axis] if wp.axis is not None else 1
            if lo.size != n or hi.size != n:
                raise ConfigError(f"{where}: weight '{wname}' needs {n} min/max values ({'one per channel' if n > 1 else 'per tensor'}), got {lo.size}/{hi.size}.")
            if np.any(lo > hi):
                i = int(np.argmax(lo > hi))
                raise ConfigError(f"{where}: weight '{wname}' has min {lo.reshape(-1)[i]} > max {hi.reshape(-1)[i]} (channel {i}); make min <= max.")
            res.weights[wname] = compute_qparams(lo, hi, wp.dtype, True, wp.axis)
            res.warnings += _symmetric_bounds(f"{where}: weight '{wname}' is quantized symmetrically", lo, hi, w, edited, activation=False)
        elif {"scale"} & edited:
            scale = np.array(v["scale"], dtype=np.float32)
            if scale.size != fresh.scale.size:
                raise ConfigError(f"{where}: weight '{wname}' needs {fresh.scale.size} scale values, got {scale.size}.")
            res.weights[wname] = QParams(wp.dtype, scale, fresh.zero_point, wp.axis)
        else:
            res.weights[wname] = fresh


RANGE_SETTINGS = ("dtype", "qtype", "algorithm", "percentile")
"""Settings that change every unedited activation range: when the user edits one, no range is clipped."""


def user_edits(parsed: Cfg, meta: dict[str, Any], existing: dict[str, str]) -> tuple[set[str], list[str]]:
    """Tensors whose cfg entry differs from what step1 wrote (any key, or deleted), and a description of every edit."""
    written = meta.get("written_entries", {})
    edited = set()
    for t, w in written.items():
        e = parsed.entries.get(t)
        if e is None or set(e.values) != set(w) or not all(_same(e.values[k], w[k]) for k in w):
            edited.add(t)
    edited |= set(parsed.entries) - set(written)
    what = [f"{len(edited)} tensor entr{'y' if len(edited) == 1 else 'ies'}"] if edited else []
    if existing:
        what.append(f"{len(existing)} custom_quantize_layers entr{'y' if len(existing) == 1 else 'ies'}")
    written_settings = Settings(**meta.get("written_settings", {}))
    changed = [k for k, v in parsed.settings.to_dict().items() if v != written_settings.to_dict().get(k)]
    if changed:
        what.append("settings " + ", ".join(changed))
    return edited, what
