"""What a cfg whose text does not load did wrong, in words: bad bytes, duplicate keys, indentation slips, open quotes, empty documents.

Each function returns a ConfigError message (one paragraph: file, line, what to do); `config.load_cfg` raises it.
Line numbers are those of the user's text: the placeholders `config._shrink` puts in place of number lists
keep every line where it was (a list it replaces sits on one line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .errors import ConfigError

_EMPTY_FLOW = re.compile(r"^(?P<key>[^#]*?):[ \t]*(?P<empty>\{[ \t]*\}|\[[ \t]*\])[ \t]*(?:#.*)?$")


def decode(path: Path, data: bytes) -> str:
    """The cfg's text (newlines as `Path.read_text` gives them), or a ConfigError naming the line and column of the
    first byte that is not UTF-8."""
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        col = len(data[start:exc.start].decode("utf-8", "replace")) + 1
        raise ConfigError(
            f"{path}:{line}:{col}: byte 0x{data[exc.start]:02x} is not UTF-8 text (a character saved in another encoding, "
            "such as Latin-1); save the file as UTF-8 in your editor, or retype that character."
        ) from None


def syntax_message(
    path: Path, text: str, small: str, exc: MarkedYAMLError, top_keys: tuple[str, ...], column: Callable[[str, int], int],
) -> str:
    """The message for a cfg ruamel could not load: `text` is the user's, `small` what ruamel read (`config._shrink`);
    `column(small_line, col)` turns a 0-based column of `small` into one of `text`."""
    lines, small_lines = text.split("\n"), small.split("\n")

    def where(mark: Any) -> str:
        col = column(small_lines[mark.line], mark.column) if mark.line < len(small_lines) else mark.column
        return f"{path}:{mark.line + 1}:{col + 1}"

    if isinstance(exc, DuplicateKeyError) and (dup := _duplicate(small, exc.problem_mark.line if exc.problem_mark else -1)):
        key, place, first, second = dup
        return f"{path}:{second}: '{key}' appears twice {place} (lines {first} and {second}); keep one."
    if exc.context and "quoted scalar" in exc.context and exc.context_mark is not None:
        mark = exc.context_mark
        col = column(small_lines[mark.line], mark.column) if mark.line < len(small_lines) else 0
        quote = lines[mark.line][col:col + 1] if mark.line < len(lines) else '"'
        end = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        return (f"{where(mark)}: the quoted string that starts here with {quote} is never closed (YAML {exc.problem}{end}); "
                f"add the closing {quote} on this line, or remove the opening one.")
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{path}: YAML syntax error: {exc.problem or exc.context}. Fix the line (indentation, a missing ':' or quote)."
    hint = None
    if "found '<block mapping start>'" in str(exc.problem):
        hint = _indent_hint(lines, mark.line, top_keys)
    elif "mapping values are not allowed" in str(exc.problem):
        hint = _deeper_hint(lines, mark.line)
    return f"{where(mark)}: YAML syntax error: {exc.problem or exc.context}. " + (hint or "Fix the line (indentation, a missing ':' or quote).")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _previous(lines: list[str], i: int) -> int | None:
    """The 0-based index of the last line before `i` that holds more than blanks or a comment."""
    return next((j for j in range(i - 1, -1, -1) if lines[j].strip() and not lines[j].lstrip().startswith("#")), None)


def _deeper_hint(lines: list[str], i: int) -> str | None:
    """Why line `i` holds a ':' YAML refuses: it is indented under a line that already has a value, or has two."""
    if i >= len(lines):
        return None
    j = _previous(lines, i)
    if j is not None and _indent(lines[i]) > _indent(lines[j]) and re.match(r"^[^#:]+:[ \t]+[^#\s]", lines[j].strip()):
        return f"The line is indented deeper than line {j + 1}, which already has a value; indent it like that line."
    if lines[i].split("#", 1)[0].count(": ") > 1:
        return "A value holds a second ': '; remove it, or quote the value."
    return None


def _indent_hint(lines: list[str], i: int, top_keys: tuple[str, ...]) -> str | None:
    """Why line `i` (0-based) starts a mapping where none may start: after `key: {}`, or a top-level key indented."""
    if i >= len(lines):
        return None
    indent = _indent(lines[i])
    spaces = f"{indent} space" + ("s" if indent != 1 else "")
    key = lines[i].strip().split(":", 1)[0].strip()
    if key in top_keys and indent:
        return f"The top-level key '{key}:' is indented by {spaces}; top-level keys start at column 1: remove the indentation."
    j = _previous(lines, i)
    m = _EMPTY_FLOW.match(lines[j].strip()) if j is not None else None
    if m and j is not None and indent > _indent(lines[j]):
        head, empty = m.group("key").strip(), m.group("empty").replace(" ", "")
        return (f"'{head}: {empty}' says the section is empty, so the indented lines below it cannot belong to it; "
                f"remove the '{empty}' after '{head}:' when you add entries below it.")
    return (f"The line is indented by {spaces}, which matches none of the blocks above it; "
            "indent it like the lines around it (2 spaces per level, as step1 writes).")


def _duplicate(small: str, line: int) -> tuple[str, str, int, int] | None:
    """(key, where, first line, second line) of the duplicate key on 0-based `line` (else the first duplicate found)."""
    root = YAML(typ="rt").compose(small)
    found: list[tuple[str, str, int, int]] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, SequenceNode):
            for item in node.value:
                walk(item, path)
        if not isinstance(node, MappingNode):
            return
        seen: dict[str, int] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, ScalarNode) else None
            if name is not None and name in seen:
                found.append((name, _place(path), seen[name] + 1, k.start_mark.line + 1))
            elif name is not None:
                seen[name] = k.start_mark.line
            walk(v, [*path, str(name)])

    walk(root, [])
    return next((d for d in found if d[3] == line + 1), found[0] if found else None)


def _place(path: list[str]) -> str:
    """Where a mapping sits, in words: the top level, a section, a tensor's entry."""
    if not path:
        return "at the top level of the cfg"
    if len(path) == 2 and path[0] == "quantize_parameters":
        return f"in the entry of '{path[1]}'"
    return "in " + ": ".join(path)


def not_a_mapping(path: Path, doc: Any, top_keys: tuple[str, ...]) -> str:
    """The message for a cfg that loaded but is not a mapping: empty, comments only, a list, one value."""
    if doc is None:
        what = "the cfg is empty (nothing but blank lines or comments)"
    elif isinstance(doc, list):
        what = "the cfg is a YAML list (lines starting with '- '), not a mapping"
    else:
        what = f"the cfg is a single value ({str(doc)[:40]!r}), not a mapping"
    baks = sorted(path.parent.glob(f"{path.name}.*.bak"), key=lambda b: b.stat().st_mtime)
    fix = (f"restore it from '{baks[-1]}' (the copy step1 kept of an edited cfg) or re-run step1 to write a fresh one"
           if baks else "restore your copy of it, or re-run step1 to write a fresh one")
    return f"{path}: {what}; it must hold the keys step1 writes ({', '.join(top_keys)}): {fix}."
