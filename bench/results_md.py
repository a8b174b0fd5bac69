"""bench/RESULTS.md is shared: run.py writes the main tables, other benches own a marked section each."""

from __future__ import annotations

import os
import re
from pathlib import Path

_SECTION = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)


def cpu() -> str:
    """The CPU's model name, and whether ONNX Runtime's default int8 kernels are exact on it (VNNI) or saturate."""
    from hybridq.kernels import u8s8_saturates

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    if "avx512_vnni" in flags:
        return name + " (AVX512-VNNI)"
    if u8s8_saturates():
        return name + " (AVX2, no VNNI: ORT's default U8S8 kernels saturate int16 pair sums)"
    return name


def markers(name: str) -> tuple[str, str]:
    """The begin/end comments around the section `name`."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the section `name` (text includes its markers), or append it; the rest of the file is kept."""
    begin, end = markers(name)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + text.rstrip("\n") + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    _write_atomic(path, new)


def write_main(path: Path, text: str) -> None:
    """Write run.py's tables, keeping the marked sections the other benches wrote."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = [m.group(0) for m in _SECTION.finditer(old)]
    _write_atomic(path, "\n\n".join([text.rstrip("\n"), *kept]) + "\n")
