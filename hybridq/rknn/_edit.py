"""Editing an RKNN-Toolkit2 step1 cfg as text: custom_quantize_layers lines added and removed, ranges replaced.

Every line not changed is kept byte for byte; scale and zero point are written as RKNN computes them.
"""

from __future__ import annotations

import io
import math
from typing import Any

from ruamel.yaml import YAML

from .reading import RknnCfg


def _yaml_float(v: float) -> str:
    """A float as PyYAML writes it (a dot always present, so YAML 1.1 loaders read a float)."""
    s = repr(float(v))
    return s.replace("e", ".0e") if "e" in s and "." not in s else s


def _yaml_key(name: str) -> str:
    """A mapping key, quoted where YAML needs it."""
    y = YAML(typ="safe", pure=True)
    y.default_flow_style = False
    buf = io.StringIO()
    y.dump({name: 0}, buf)
    return buf.getvalue().rsplit(":", 1)[0]


def _rknn_qparams(entry: dict[str, Any], lo: float, hi: float) -> tuple[list[float], list[int]] | None:
    """Scale and zero point RKNN computes for a range (intN; None for float dtypes).

    asym: scale = (hi - lo) / (2^N - 1), zero_point = qmin - round(lo / scale); sym: scale = max(|lo|, |hi|) / qmax,
    zero_point 0 (checked against every int8/int16/int32 entry of the PP-OCR det and cls cfgs).
    """
    dtype = str(entry.get("dtype", ""))
    if not dtype.startswith("int") or not dtype[3:].isdigit():
        return None
    bits = int(dtype[3:])
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if entry.get("qtype") == "sym":
        amax = max(abs(lo), abs(hi))
        return ([amax / qmax] if amax > 0 else [1.0]), [0]
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0:
        return [1.0], [qmin]
    return [scale], [int(min(qmax, max(qmin, qmin - round(lo / scale))))]


def _block(indent: str, key: str, values: list[Any]) -> list[str]:
    items = [str(int(v)) if isinstance(v, int) else _yaml_float(v) for v in values]
    return [f"{indent}{key}:"] + [f"{indent}-   {v}" for v in items] if items else [f"{indent}{key}: []"]


def _replace_key(lines: list[str], entry: Any, key: str, values: list[Any]) -> None:
    """Replace the lines of `key: [list]` in an entry (block or flow form) by a block list of `values`."""
    start = entry.lc.key(key)[0]
    seq = entry[key]
    end = max((seq.lc.item(i)[0] for i in range(len(seq))), default=start) if len(seq) and not seq.fa.flow_style() else start
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    lines[start : end + 1] = _block(indent, key, values)


def _edit_ranges(lines: list[str], r: RknnCfg, ranges: dict[str, tuple[float, float]]) -> None:
    """Replace min/max (widened to include 0), scale and zero_point of entries, bottom up so line numbers stay valid."""
    qp = r.doc["quantize_parameters"]
    jobs: list[tuple[int, Any, str, list[Any]]] = []
    for name, (lo, hi) in ranges.items():
        entry = qp[name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        new: dict[str, list[Any]] = {"min": [lo], "max": [hi]}
        q = _rknn_qparams(r.data["quantize_parameters"][name], lo, hi)
        if q is not None:
            new["scale"], new["zero_point"] = q
        jobs += [(entry.lc.key(key)[0], entry, key, values) for key, values in new.items() if key in entry]
    for _, entry, key, values in sorted(jobs, key=lambda j: -j[0]):
        _replace_key(lines, entry, key, values)


def _edit_layers(lines: list[str], r: RknnCfg, add: dict[str, str], remove: list[str]) -> None:
    """Remove and add custom_quantize_layers lines (4-space indent, as RKNN writes them); the header's comment stays."""
    new_lines = [f"    {_yaml_key(n)}: {p}" for n, p in add.items()]
    if "custom_quantize_layers" not in r.doc:
        if new_lines:
            lines[0:0] = ["custom_quantize_layers:", *new_lines]
        return
    cq = r.doc.get("custom_quantize_layers") or {}
    header = r.doc.lc.key("custom_quantize_layers")[0]
    block = len(cq) > 0 and not cq.fa.flow_style()
    removed_lines = sorted((cq.lc.key(n)[0] for n in remove), reverse=True)
    for line in removed_lines:
        del lines[line]
    head = lines[header]
    comment = head[head.index("#"):] if "#" in head else ""
    if new_lines:
        if block:  # after the last entry left, so comments after the section stay where they are
            last = max((cq.lc.key(n)[0] for n in cq if n not in remove), default=header)
            last -= sum(1 for line in removed_lines if line < last)
        else:  # `custom_quantize_layers: {}` becomes a block header; its comment stays where it was
            lines[header] = head.replace(": {}", ":   ", 1) if comment else "custom_quantize_layers:"
            last = header
        lines[last + 1 : last + 1] = new_lines
    elif block and len(cq) == len(remove):
        lines[header] = "custom_quantize_layers: {}" + (f"  {comment}" if comment else "")


def edit_rknn_cfg(
    r: RknnCfg, layers_add: dict[str, str], layers_remove: list[str], ranges: dict[str, tuple[float, float]],
) -> str:
    """RKNN cfg text with custom_quantize_layers entries added (or re-set) and removed, and ranges replaced.

    A range (lo, hi) is widened to include 0 and written as RKNN does (min, max, and the scale and
    zero point of the entry's dtype); every other line is kept byte for byte. The result is checked
    with a plain YAML loader to be the cfg with exactly these changes (RuntimeError otherwise).
    """
    current = r.data["custom_quantize_layers"]
    for name in layers_remove:
        if name not in current:
            raise ValueError(f"'{name}' is not in custom_quantize_layers of '{r.path}'")
    for name in layers_add:
        if name in current and name not in layers_remove:
            raise ValueError(f"'{name}' is already in custom_quantize_layers of '{r.path}'; remove it first to re-set it")
    for name in ranges:
        if name not in r.data["quantize_parameters"]:
            raise ValueError(f"'{name}' is not in quantize_parameters of '{r.path}'")
    if not (layers_add or layers_remove or ranges):
        return r.text
    lines = r.text.split("\n")
    in_file = "custom_quantize_layers" in r.doc
    if in_file and r.doc.lc.key("custom_quantize_layers")[0] > r.doc.lc.key("quantize_parameters")[0]:
        _edit_layers(lines, r, layers_add, layers_remove)  # the lower section first: line numbers above stay valid
        _edit_ranges(lines, r, ranges)
    else:
        _edit_ranges(lines, r, ranges)
        _edit_layers(lines, r, layers_add, layers_remove)
    text = "\n".join(lines)
    _check_written(r, text, layers_add, layers_remove, ranges)
    return text


def _check_written(r: RknnCfg, text: str, add: dict[str, str], remove: list[str], ranges: dict[str, tuple[float, float]]) -> None:
    """The edited text, read by a plain YAML loader, must be the template with exactly these changes."""
    new = YAML(typ="safe").load(text)
    expect = {str(k): v for k, v in r.data["custom_quantize_layers"].items() if str(k) not in remove}
    expect.update(add)
    got = {str(k): v for k, v in (new.get("custom_quantize_layers") or {}).items()}
    qp = new.get("quantize_parameters") or {}
    same = all(qp.get(k) == v for k, v in r.data["quantize_parameters"].items() if k not in ranges) and len(qp) == len(r.data["quantize_parameters"])
    moved = all(
        math.isclose(qp[t]["min"][0], min(lo, 0.0)) and math.isclose(qp[t]["max"][0], max(hi, 0.0)) for t, (lo, hi) in ranges.items()
    )
    if got != expect or not same or not moved or set(new) | {"custom_quantize_layers"} != set(r.data) | {"custom_quantize_layers"}:
        raise RuntimeError(f"editing '{r.path}' as text did not give the intended cfg; nothing was written")
