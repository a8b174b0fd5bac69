"""The editable `<name>.quantization.cfg`: YAML with comments, RKNN-Toolkit2 keys, round-tripped by ruamel.yaml.

Reading never executes anything from the file (ruamel's round-trip loader builds
only plain maps, lists and scalars). Every problem is a ConfigError naming the
file, the line and the key.
"""

from __future__ import annotations

import copy
import io
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver

from . import _cfg_errors
from .errors import ConfigError, did_you_mean
from .plan import LAYER_PRECISIONS, WEIGHT_ONLY_ALIASES
from .qparams import normalize_dtype
from .settings import Settings, check_value

ENTRY_KEYS = ("qtype", "qmethod", "dtype", "algorithm", "min", "max", "ori_min", "ori_max", "scale", "zero_point", "equalize", "bias_correction")
FIX_KEYS = ("equalize", "bias_correction")
"""Entry keys written by the proposal's fixes: channel equalization scales, bias shifts (step2 applies them)."""
LIST_KEYS = ("min", "max", "ori_min", "ori_max", "scale", "zero_point", "equalize", "bias_correction")
TOP_KEYS = ("hybridq", "settings", "custom_quantize_layers", "quantize_parameters")
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32: a smaller scale is 0 or subnormal in the model

HEADER = """\
hybridq quantization config for '{model}'.
Edit, then build the deployable model with:
  hybridq step2 {stem}.model {stem}.data {stem}.quantization.cfg -o {stem}.q.onnx

custom_quantize_layers: node or tensor name -> float32 | float16 | int16 | int8 | uint8 | int4.
  int4: MatMul/Gemm weights only, 4-bit blocks (settings int4_block_size, int4_rounding), as MatMulNBits.
  Names of the original model or of the temp model ({stem}.model, open it in Netron) both work.
quantize_parameters: one entry per quantized tensor (activations and weights).
  min/max: the range used; edit them to clip a range (scale and zero_point are recomputed).
  ori_min/ori_max: the range observed in calibration (for reference).
  dtype: uint8 | int8 | int16; qtype: asym | sym; qmethod: layer | channel (weights);
  algorithm: minmax | percentile | kl | mse (recomputed from stored statistics, no re-calibration;
    histograms are stored for every tensor listed here; for the other inputs and outputs of
    quantizable layers, which a layer moved to int8 may add, min/max of the first 8 samples).
  Delete an entry to fall back to the step1 statistics.
"""


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def short_float(x: float) -> float:
    """The shortest decimal that round-trips the value's float32 (what YAML shows the user). Its `repr`, not its `str`:
    `str` follows numpy's print options, and a caller's ``legacy="1.13"`` keeps 6 digits (0.1234567 -> 0.123457)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if math.isfinite(x) else float(x)


# ruamel's round-trip emitter and loader cost ~0.1 ms per scalar; a cfg lists ~100k
# per-channel numbers for a mid-size model. Flow lists of plain numbers are therefore
# swapped for placeholder scalars around every ruamel call and parsed with str.split.
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_LIST = re.compile(rf"\[[ \t]*{_NUM}(?:[ \t]*,[ \t]*{_NUM})*[ \t]*\]")
_PLACEHOLDER = re.compile(r"__hqlist(\d+)__")


def _shrink(text: str) -> tuple[str, list[str]]:
    """Replace every one-line flow list of plain numbers by a placeholder scalar; returns the lists' texts."""
    lists: list[str] = []

    def keep(m: re.Match) -> str:
        lists.append(m.group(0))
        return f"__hqlist{len(lists) - 1}__"

    return _NUM_LIST.sub(keep, text), lists


def _expand(text: str, lists: list[str]) -> str:
    """Put the lists back where `_shrink` (or `_number_list`) left placeholders."""
    return _PLACEHOLDER.sub(lambda m: lists[int(m.group(1))], text)


def _user_column(small_line: str, col: int, lists: list[str]) -> int:
    """The column in the user's line of column `col` of its `_shrink`ed form (a column inside a placeholder: the list's start)."""
    shift = 0
    for m in _PLACEHOLDER.finditer(small_line):
        if col < m.start():
            break
        if col < m.end():
            return m.start() + shift
        shift += len(lists[int(m.group(1))]) - len(m.group(0))
    return col + shift


def _parse_numbers(text: str) -> list[int | float]:
    """Parse '[1, 2.5, -3e-4]' (already known to hold only plain numbers)."""
    out: list[int | float] = []
    for tok in text.strip()[1:-1].split(","):
        tok = tok.strip()
        out.append(int(tok) if tok.lstrip("+-").isdigit() else float(tok))
    return out


def _restore(node: Any, lists: list[str]) -> Any:
    """Turn placeholders in a loaded document back into Python lists (in place for mappings and sequences)."""
    if isinstance(node, str):
        m = _PLACEHOLDER.fullmatch(node)
        return _parse_numbers(lists[int(m.group(1))]) if m else node
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _restore(node[k], lists)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            node[i] = _restore(v, lists)
    return node


def _number_list(values, lists: list[str]) -> str:
    """A placeholder for a flow list written by us (numbers as Python prints them)."""
    values = list(values)
    if all(type(v) is float for v in values):  # the usual case, ~3x faster: repr(v) is repr(float(v))
        text = ", ".join(map(repr, values))
    else:
        text = ", ".join(str(int(v)) if isinstance(v, int) else repr(float(v)) for v in values)
    lists.append("[" + text + "]")
    return f"__hqlist{len(lists) - 1}__"


def _flow(values) -> CommentedSeq:
    seq = CommentedSeq(values)
    seq.fa.set_flow_style()
    return seq


def render_cfg(
    header: dict[str, Any],
    settings: Settings,
    custom: dict[str, str],
    custom_comments: dict[str, str],
    entries: dict[str, dict[str, Any]],
    entry_comments: dict[str, str],
    stem: str,
) -> str:
    """YAML text of a new cfg, with comments a person can edit from."""
    doc = CommentedMap()
    doc["hybridq"] = CommentedMap(header)
    sdict = CommentedMap(settings.to_dict())
    sdict["quantize_ops"] = _flow(settings.quantize_ops)
    doc["settings"] = sdict
    cq = CommentedMap(custom)
    for k, c in custom_comments.items():
        cq.yaml_add_eol_comment(c, k)
    doc["custom_quantize_layers"] = cq
    lists: list[str] = []
    block = _entries_block(entries, entry_comments, lists)
    doc["quantize_parameters"] = _BLOCK if block is not None else _entries_map(entries, entry_comments, lists)
    doc.yaml_set_start_comment(HEADER.format(model=header.get("model", stem), stem=stem))
    doc.yaml_set_comment_before_after_key("settings", before="Global settings: apply to every entry below that you did not edit.")
    doc.yaml_set_comment_before_after_key(
        "custom_quantize_layers", before="Layers to run in another precision (empty: every layer at its default)."
    )
    doc.yaml_set_comment_before_after_key("quantize_parameters", before="Per-tensor quantization parameters (RKNN-Toolkit2 keys).")
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    text = buf.getvalue()
    if block is not None:
        tail = f"quantize_parameters: {_BLOCK}\n"  # the document's last key
        text = text[: -len(tail)] + "quantize_parameters:\n" + block
    return _expand(text, lists)


def _entries_map(entries: dict[str, dict[str, Any]], entry_comments: dict[str, str], lists: list[str]) -> CommentedMap:
    """The quantize_parameters mapping for ruamel to write (lists as placeholders)."""
    qp = CommentedMap()
    for name, entry in entries.items():
        e = CommentedMap()
        for k in ENTRY_KEYS:
            if k in entry:
                e[k] = _number_list(entry[k], lists) if k in LIST_KEYS else entry[k]
        qp[name] = e
        if name in entry_comments:
            qp.yaml_set_comment_before_after_key(name, before=entry_comments[name], indent=2)
    return qp


# The quantize_parameters block is most of a cfg (~0.1 ms per scalar through ruamel): when every name, word
# and comment in it is one ruamel writes as is, the block is written here, in ruamel's layout, and put in place
# of this placeholder. tests/test_config_text.py checks the text against ruamel's.
_BLOCK = "__hqblock__"
_WORD = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./-]*(?::+[A-Za-z0-9_./-]+)*")
_RESOLVER = VersionedResolver()
_COMMENT = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]*")


def _entries_block(entries: dict[str, dict[str, Any]], entry_comments: dict[str, str], lists: list[str]) -> str | None:
    """The quantize_parameters block as ruamel writes it (lists as placeholders), or None to leave it to ruamel."""
    if not entries:
        return None
    plain: dict[str, bool] = {}
    out: list[str] = []
    for name, entry in entries.items():
        comment = entry_comments.get(name)
        if comment is not None:
            if not comment or _COMMENT.fullmatch(comment) is None or comment != comment.strip():
                return None
            out.append(f"  # {comment}\n")
        if not _plain(name, plain) or not any(k in entry for k in ENTRY_KEYS):
            return None
        out.append(f"  {name}:\n")
        for k in ENTRY_KEYS:
            if k not in entry:
                continue
            v = entry[k]
            if k in LIST_KEYS:
                v = _number_list(v, lists)
            elif not _plain(v, plain):
                return None
            out.append(f"    {k}: {v}\n")
    return "".join(out)


def _plain(value: Any, seen: dict[str, bool]) -> bool:
    """Does ruamel write `value` as this very text, unquoted, as a key or a value of a block mapping?

    Conservative: a short word of letters, digits and `_./-:` that YAML does not read as another type (null, bool, number).
    """
    if not isinstance(value, str):
        return False
    if value not in seen:
        tag = _RESOLVER.resolve(ScalarNode, value, (True, False))
        seen[value] = len(value) < 128 and _WORD.fullmatch(value) is not None and str(tag) == "tag:yaml.org,2002:str"
    return seen[value]


@dataclass
class CfgEntry:
    """One quantize_parameters entry as the user left it, with its line for error messages."""

    name: str
    line: int
    values: dict[str, Any]


@dataclass
class Cfg:
    """A parsed, validated cfg: settings, layer precisions, per-tensor entries, and the round-trip document."""

    path: Path
    header: dict[str, Any]
    settings: Settings
    custom: dict[str, str]
    custom_lines: dict[str, int]
    entries: dict[str, CfgEntry]
    doc: Any = field(repr=False, default=None)
    settings_given: frozenset[str] = frozenset()  # the keys the cfg's settings block holds (the rest are defaults)

    def setting_line(self, key: str) -> int:
        """The line of a key of the cfg's settings block (0 when it has none)."""
        block = self.doc.get("settings") if isinstance(self.doc, dict) else None
        return _line(block, key) if isinstance(block, dict) else 0

    def with_recorded(self, written: dict[str, Any]) -> "Cfg":
        """This cfg with the settings it does not hold taken from step1's record (`written_settings`), not from the
        defaults: a cfg cut down to custom_quantize_layers still builds for the target step1 ran for."""
        if not written or set(self.settings_given) >= set(written):
            return self
        given = self.settings.to_dict()
        merged = {**written, **{k: given[k] for k in self.settings_given if k in given}}
        return replace(self, settings=Settings.from_dict(merged, f"{self.path} (settings from step1's record)"))


def _line(node: Any, key: Any) -> int:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:
        return 0


def _name(mapping: Any, key: Any, small: str, where: str, section: str, value: str) -> str:
    """A layer or tensor name as written: YAML 1.2 reads an unquoted true/false (any case), null or ~ as a boolean or
    null, not as the name (yes/no/on/off stay names), so such a key is refused with the quoting that keeps it a name."""
    if key is not None and not isinstance(key, bool):
        return str(key)
    line, col = mapping.lc.key(key)
    lines = small.split("\n")
    raw = (re.match(r"[^\s:,{}]*", lines[line][col:]).group(0) if line < len(lines) else "") or ("~" if key is None else str(key).lower())
    what = "null (no name)" if key is None else f"the boolean {str(key).lower()}"
    raise ConfigError(f"{where}: the {section} entry {raw} is read by YAML as {what}, not as a name; quote the name "
                      f"('{raw}':{value}) if a layer or tensor is called that.")


def _as_list(v: Any, where: str, key: str, name: str) -> list[float]:
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ConfigError(f"{where}: {key} of '{name}' must be a number or a list of numbers, got {x!r}.")
        try:
            finite = math.isfinite(float(x))
        except OverflowError:
            finite = False
        if not finite:
            raise ConfigError(f"{where}: {key} of '{name}' holds {x!r}; use finite numbers.")
        if abs(float(x)) > FLOAT32_MAX:
            raise ConfigError(f"{where}: {key} of '{name}' holds {x!r}, outside the float32 range (+-3.4e38); use a smaller number.")
        out.append(float(x) if key != "zero_point" else x)
    if not out:
        raise ConfigError(f"{where}: {key} of '{name}' is an empty list; give one value per tensor or one per channel.")
    return out


def validate_entry(name: str, raw: Any, where: str) -> dict[str, Any]:
    """Check one quantize_parameters entry; returns normalised values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the entry for tensor '{name}' must be a mapping of {', '.join(ENTRY_KEYS)}.")
    out: dict[str, Any] = {}
    for key, v in raw.items():
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} in the entry of '{name}'.{did_you_mean(str(key), ENTRY_KEYS)} Valid keys: {', '.join(ENTRY_KEYS)}.")
        if key in LIST_KEYS:
            out[key] = _as_list(v, where, key, name)
        elif key == "dtype":
            out[key] = check_value(key, v, where, name, hint=" (or move the layer to custom_quantize_layers for float)")
        else:
            out[key] = check_value(key, v, where, name)
    if "min" in out and "max" in out:
        if len(out["min"]) != len(out["max"]):
            raise ConfigError(f"{where}: '{name}' has {len(out['min'])} min values but {len(out['max'])} max values.")
        for i, (lo, hi) in enumerate(zip(out["min"], out["max"])):
            if lo > hi:
                channel = f" (channel {i})" if len(out["min"]) > 1 else ""
                raise ConfigError(f"{where}: '{name}' has min {lo} > max {hi}{channel}; make min <= max.")
    if "scale" in out and any(s <= 0 for s in out["scale"]):
        raise ConfigError(f"{where}: '{name}' has a scale <= 0; scales must be positive.")
    if "scale" in out and (tiny := next((s for s in out["scale"] if abs(np.float32(s)) < FLOAT32_TINY), None)) is not None:
        stored = "0" if np.float32(tiny) == 0 else f"the subnormal {float(np.float32(tiny)):.6g}"
        raise ConfigError(f"{where}: '{name}' has a scale {tiny!r}, which the model's float32 scale stores as {stored}; "
                          f"scales must be at least {FLOAT32_TINY:.8g} (the smallest normal float32): use a larger scale, "
                          "or delete scale and zero_point to recompute them from min/max.")
    return out


def load_cfg(path: str | Path) -> Cfg:
    """Parse and validate a cfg file (structure and values; names are checked against the model by step2)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"Config file '{p}' does not exist. step1 writes it as <name>.quantization.cfg.")
    if not p.is_file():  # a directory, FIFO or device: reading a FIFO would wait for a writer forever
        raise ConfigError(f"Config file '{p}' is not a regular file; give the path of the <name>.quantization.cfg step1 wrote.")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config file '{p}' cannot be read: {exc}.") from exc
    text = _cfg_errors.decode(p, data)
    small, lists = _shrink(text)
    try:
        doc = _restore(_yaml().load(small), lists)
    except MarkedYAMLError as exc:
        raise ConfigError(_cfg_errors.syntax_message(p, text, small, exc, TOP_KEYS, lambda s, c: _user_column(s, c, lists))) from None
    except YAMLError as exc:
        raise ConfigError(f"{p}: YAML error: {exc}.") from None
    if not isinstance(doc, dict):
        raise ConfigError(_cfg_errors.not_a_mapping(p, doc, TOP_KEYS))
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{p}:{_line(doc, key)}: unknown top-level key {key!r}.{did_you_mean(str(key), TOP_KEYS)} Valid keys: {', '.join(TOP_KEYS)}.")
    settings_raw = doc.get("settings") or {}
    if not isinstance(settings_raw, dict):
        raise ConfigError(f"{p}:{_line(doc, 'settings')}: settings must be a mapping.")
    for key, value in settings_raw.items():  # each key alone first: an error names the key's own line
        Settings.from_dict({key: value}, f"{p}:{_line(settings_raw, key) or _line(doc, 'settings')}")
    settings = Settings.from_dict(dict(settings_raw), f"{p}:{_line(doc, 'settings')}")
    custom_raw = doc.get("custom_quantize_layers") or {}
    if not isinstance(custom_raw, dict):
        raise ConfigError(f"{p}:{_line(doc, 'custom_quantize_layers')}: custom_quantize_layers must be a mapping of layer name -> precision, e.g. `conv1: float16`.")
    custom, custom_lines = {}, {}
    for key, v in custom_raw.items():
        line = _line(custom_raw, key)
        name = _name(custom_raw, key, small, f"{p}:{line}", "custom_quantize_layers", f" {v}")
        dt = (WEIGHT_ONLY_ALIASES.get(str(v).strip().lower()) or normalize_dtype(v)) if v is not None else None
        if dt not in LAYER_PRECISIONS:
            raise ConfigError(f"{p}:{line}: custom_quantize_layers['{name}'] = {v!r} is not a valid precision; use one of {', '.join(LAYER_PRECISIONS)}.")
        custom[name] = dt
        custom_lines[name] = line
    params_raw = doc.get("quantize_parameters") or {}
    if not isinstance(params_raw, dict):
        raise ConfigError(f"{p}:{_line(doc, 'quantize_parameters')}: quantize_parameters must be a mapping of tensor name -> parameters.")
    entries = {}
    for key, raw in params_raw.items():
        line = _line(params_raw, key)
        name = _name(params_raw, key, small, f"{p}:{line}", "quantize_parameters", "")
        entries[name] = CfgEntry(name, line, validate_entry(name, raw, f"{p}:{line}"))
    header_raw = doc.get("hybridq") or {}
    if not isinstance(header_raw, dict):
        raise ConfigError(f"{p}:{_line(doc, 'hybridq')}: the hybridq header must be the mapping step1 wrote (model, model_sha256, ...); restore it from a fresh step1 cfg.")
    header = dict(header_raw)
    return Cfg(p, header, settings, custom, custom_lines, entries, doc, frozenset(str(k) for k in settings_raw))


def _custom_map(text: str) -> dict[str, Any] | None:
    """custom_quantize_layers of cfg text as a plain dict (None when the cfg has no such mapping)."""
    small, lists = _shrink(text)
    doc = _yaml().load(small)
    cq = doc.get("custom_quantize_layers") if isinstance(doc, dict) else None
    if cq is None and isinstance(doc, dict) and "custom_quantize_layers" in doc:
        return {}
    return {str(k): v for k, v in cq.items()} if isinstance(cq, dict) else None


def _entry_line(name: str, precision: str, comment: str | None) -> str:
    """One `name: precision  # comment` line, the name quoted by YAML's rules where it must be."""
    buf = io.StringIO()
    _yaml().dump({name: precision}, buf)
    return buf.getvalue().rstrip("\n") + (f"  # {comment}" if comment else "")


_CUSTOM_HEADER = re.compile(r"^custom_quantize_layers:[ \t]*(?P<empty>\{[ \t]*\})?[ \t]*(?P<comment>#[^\n]*)?$", re.M)


def _insert_custom_lines(text: str, lines: list[str]) -> str | None:
    """Text with entry lines (unindented) added to a block (or `{}`) custom_quantize_layers section, every other line as it was.

    New lines go right after the section's last indented line, so comments that follow the
    section (and belong to the next one) stay where they are. None when the section has another form.
    """
    m = _CUSTOM_HEADER.search(text)
    if m is None:
        return None
    head = text[: m.start()]
    header = m.group(0)
    if m.group("empty"):  # `{}` becomes a block header; its comment stays on the line
        header = "custom_quantize_layers:" + (f"  {m.group('comment')}" if m.group("comment") else "")
    first, *rest = text[m.end():].split("\n")  # `first` is what followed the header on its line: nothing
    body_end = 0
    indent = 2
    found_indent = False
    for i, line in enumerate(rest):
        if line.strip() == "":
            continue
        if not line[0].isspace():
            break
        if not found_indent and not line.lstrip().startswith("#"):
            indent, found_indent = len(line) - len(line.lstrip()), True
        body_end = i + 1
    if m.group("empty") and body_end:
        return None
    new_rest = rest[:body_end] + [" " * indent + ln for ln in lines] + rest[body_end:]
    return head + header + first + "\n" + "\n".join(new_rest)


def update_custom_layers(text: str, layers: dict[str, str], comments: dict[str, str]) -> str:
    """Add custom_quantize_layers entries to cfg text, keeping every other edit and comment.

    An entry the cfg already has is never changed (the user's own entry wins); the text is
    otherwise left byte for byte as it was, the new lines added at the end of the section.
    """
    current = _custom_map(text)
    new = {n: p for n, p in layers.items() if current is None or n not in current}
    if not new:
        return text
    inserted = _insert_custom_lines(text, [_entry_line(n, p, comments.get(n)) for n, p in new.items()])
    if inserted is not None and _custom_map(inserted) == {**(current or {}), **new}:
        return inserted
    y = _yaml()
    small, lists = _shrink(text)
    doc = y.load(small)
    cq = doc.get("custom_quantize_layers")
    if not isinstance(cq, CommentedMap):
        cq = CommentedMap()
        doc["custom_quantize_layers"] = cq
    for name, prec in new.items():
        cq[name] = prec
        if name in comments:
            cq.yaml_add_eol_comment(comments[name], name)
    buf = io.StringIO()
    y.dump(doc, buf)
    return _expand(buf.getvalue(), lists)


def _trailing(entry: CommentedMap, last: str | None) -> tuple[list, int] | None:
    """Where ruamel keeps the comment after the entry's last key (its end-of-line comment and the comment lines after
    it): (the comment slots, the index) of that key, or of the last item of its block-style list."""
    if last is None or last not in entry:
        return None
    value = entry[last]
    if isinstance(value, CommentedSeq) and len(value) and value.ca.items.get(len(value) - 1, [None])[0] is not None:
        return value.ca.items[len(value) - 1], 0
    slots = entry.ca.items.get(last)
    return (slots, 2) if slots and len(slots) > 2 and slots[2] is not None else None


def _move_trailing_comments(entry: CommentedMap, last: str | None, where: tuple[list, int] | None) -> None:
    """Keys added after `last` come before the comment lines that followed it (the next entry's "# input of ..."),
    which ruamel keeps on `last` (`where`, found before the edit): those lines move to the new last key, so the next
    entry keeps its comment; they move too when `last` was a fix key the edit deleted."""
    now = next(reversed(entry), None)
    if now is None or now == last or where is None:
        return
    slots, i = where
    token = slots[i]
    eol, _, rest = token.value.partition("\n")
    if not rest:
        return
    if last in entry and eol.strip():
        token.value = eol + "\n"
    elif last in entry:
        slots[i] = None
    slot = entry.ca.items.setdefault(now, [None] * 4)
    if slot[2] is None:
        slot[2] = copy.copy(token)
        slot[2].value = "\n" + rest
    else:
        slot[2].value = slot[2].value.rstrip("\n") + "\n" + rest


def update_entries(text: str, edits: dict[str, dict[str, Any]], comments: dict[str, str]) -> str:
    """Change keys of quantize_parameters entries in cfg text (e.g. a proposed range clip), keeping everything else.

    Only keys whose value differs are rewritten; the comment goes on the first changed key
    that has no comment of its own, so no existing comment is replaced.
    """
    if not edits:
        return text
    y = _yaml()
    text, lists = _shrink(text)
    doc = y.load(text)
    qp = doc.get("quantize_parameters")
    for name, values in edits.items():
        entry = qp.get(name) if isinstance(qp, CommentedMap) else None
        if not isinstance(entry, CommentedMap):
            continue
        old, last = {k: _restore(entry[k], lists) for k in entry}, next(reversed(entry), None)
        where = _trailing(entry, last)
        changed = [k for k in ENTRY_KEYS if k in values and (k not in entry or old[k] != values[k])]
        for k in changed:
            entry[k] = _number_list(values[k], lists) if k in LIST_KEYS else values[k]
        for k in FIX_KEYS:
            if k in entry and k not in values:
                del entry[k]  # a fix the new entry no longer carries
        free = [k for k in changed if not (entry.ca.items.get(k) and len(entry.ca.items[k]) > 2 and entry.ca.items[k][2])]
        if name in comments and free:
            entry.yaml_add_eol_comment(comments[name], "max" if "max" in free else free[0])
        _move_trailing_comments(entry, last, where)
    buf = io.StringIO()
    y.dump(doc, buf)
    return _expand(buf.getvalue(), lists)
