"""Reading RKNN-Toolkit2's step1 cfg (`<name>.quantization.cfg`): its text, data, line numbers and min/max ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ..errors import ConfigError


@dataclass
class RknnCfg:
    """An RKNN step1 cfg: its text, plain data (safe loader) and the round-trip document (for line numbers)."""

    path: Path
    text: str
    data: dict[str, Any]
    doc: Any

    def line(self, section: str, name: str | None = None) -> int:
        """1-based line of a section key, or of an entry in it (0 when unknown)."""
        try:
            node = self.doc if name is None else self.doc[section]
            return int(node.lc.key(section if name is None else name)[0]) + 1
        except Exception:
            return 0


def read_rknn_cfg(path: str | Path) -> RknnCfg:
    """Parse an RKNN-Toolkit2 step1 cfg; a YAML or structure error is a ConfigError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"RKNN cfg '{p}' does not exist. RKNN's hybrid_quantization_step1 writes it as <name>.quantization.cfg.")
    try:
        text = p.read_text(encoding="utf-8")
        data = YAML(typ="safe").load(text)
        rt = YAML(typ="rt")
        doc = rt.load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"RKNN cfg '{p}' cannot be read: {exc}.") from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context}. Fix the line or take the cfg RKNN wrote.") from None
    except YAMLError as exc:
        raise ConfigError(f"{p}: YAML error: {exc}.") from None
    if not isinstance(data, dict) or "quantize_parameters" not in data:
        raise ConfigError(f"'{p}' is not an RKNN step1 cfg: it has no quantize_parameters mapping. Pass the <name>.quantization.cfg RKNN's hybrid_quantization_step1 wrote.")
    if "hybridq" in data:
        raise ConfigError(f"'{p}' is a hybridq cfg (it has a hybridq: header), not RKNN's. Pass the cfg RKNN's hybrid_quantization_step1 wrote.")
    for section in ("custom_quantize_layers", "quantize_parameters"):
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"{p}:{RknnCfg(p, text, data, doc).line(section)}: {section} must be a mapping.")
    return RknnCfg(p, text, data, doc)


def _range(cfg: RknnCfg, name: str, entry: Any) -> tuple[list[float], list[float]] | None:
    """An RKNN entry's min/max as float lists; None when it has none; ConfigError when invalid."""
    where = f"{cfg.path}:{cfg.line('quantize_parameters', name)}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: the entry of '{name}' must be a mapping (qtype, dtype, min, max, ...).")
    if "min" not in entry or "max" not in entry:
        return None
    out = []
    for key in ("min", "max"):
        v = entry[key]
        vals = v if isinstance(v, list) else [v]
        if not vals or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in vals):
            raise ConfigError(f"{where}: {key} of '{name}' must be a list of finite numbers, got {v!r}.")
        out.append([float(x) for x in vals])
    lo, hi = out
    if len(lo) != len(hi) or any(a > b for a, b in zip(lo, hi)):
        raise ConfigError(f"{where}: '{name}' has min {lo} and max {hi}; give as many of each, with min <= max (RKNN ignores such a range silently).")
    return lo, hi
