"""The cfg checked against the step1 artifacts step2 builds it with: names step1 did not write, a cfg without the
`hybridq:` header that binds it to its model, and settings only step1 reads.

`check_cfg` raises a ConfigError (or ArtifactMismatchError) for what cannot be built, and returns the warnings step2
prints for what it builds but cannot honour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .config import Cfg
from .errors import ArtifactMismatchError, ConfigError, did_you_mean

STEP1_ONLY: dict[str, tuple[str, str]] = {
    "speed_check": ("it is used by step1 only (step1 times the default int8 model against fp32 and writes the layers where "
                    "int8 is not faster into custom_quantize_layers)", "the layers its speed check kept float32 are entries of "
                    "custom_quantize_layers: delete those entries to quantize them now"),
    "bias_correction": ("it is used by step1 only (step1 measures each layer's mean output shift and writes it as "
                        "bias_correction on the weight entries)", "delete the bias_correction keys of the weight entries to "
                        "build without the correction now"),
    "cost_model": ("measured places layers by per-layer timings that step1 takes on this CPU with that setting, and this "
                   "step1 run took none", ""),
}
"""Settings step2 cannot honour by itself: what step1 does with each, and what the cfg can do instead (when the new value
turns the step off). cost_model counts only when set to measured without step1's timings: `macs` takes effect in step2."""


def check_cfg(cfg: Cfg, meta: dict[str, Any], model: onnx.ModelProto, model_path: Path) -> list[str]:
    """Refuse entries of tensors the temp model lacks and a header-less cfg from another model; the warnings of a cfg
    without header and of step1-only settings the cfg changed."""
    known = set(meta.get("written_entries", {})) | set(meta.get("stat_tensors", [])) | {i.name for i in model.graph.initializer}
    for name, e in cfg.entries.items():
        if name not in known:
            raise ConfigError(f"{cfg.path}:{e.line}: quantize_parameters has unknown tensor '{name}'.{did_you_mean(name, known)} "
                              "Remove the entry or fix the name.")
    return _without_header(cfg, meta, {i.name for i in model.graph.initializer}, model_path) + _step1_only(cfg, meta)


def _without_header(cfg: Cfg, meta: dict[str, Any], weights: set[str], model_path: Path) -> list[str]:
    """A cfg without `hybridq: model_sha256` cannot be matched to the model by hash: its weight entries' recorded ranges
    (ori_min/ori_max) are matched to this model's weights instead (an error at the first that differs), and step2 says so."""
    if cfg.header.get("model_sha256"):
        return []
    written, compared = meta.get("written_entries", {}), 0
    for name, e in cfg.entries.items():
        for key in ("ori_min", "ori_max") if name in weights else ():
            mine, theirs = e.values.get(key), written.get(name, {}).get(key)
            compared += mine is not None and theirs is not None
            if mine is None or theirs is None or _same_range(mine, theirs):
                continue
            raise ArtifactMismatchError(
                f"{cfg.path}:{e.line}: the cfg has no hybridq: header, and weight '{name}' records {key} {_show(mine)} where the "
                f"weights of '{model_path}' have {_show(theirs)}: the cfg was written for another model. Use the cfg step1 "
                "wrote beside this model (copy your edits into it), or re-run step1."
            )
    what = "no hybridq: header" if not cfg.header else "no model_sha256 in its hybridq: header"
    partly = " (only the ranges its weight entries record were compared with the model's)" if compared else ""
    return [f"{cfg.path}: the cfg has {what}, so step2 cannot check that it was written for '{model_path}'{partly}; restore the "
            "header from the cfg step1 wrote to keep that check."]


def _same_range(a: list[float], b: list[float]) -> bool:
    """Equal as float32, as the cfg writes them (one value per channel)."""
    return len(a) == len(b) and bool(np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)))


def _show(values: list[float]) -> str:
    """A range list, cut short: '[0.5, -0.25, ... (16 values)]'."""
    head = ", ".join(f"{v:.6g}" for v in values[:3])
    return f"[{head}, ... ({len(values)} values)]" if len(values) > 3 else f"[{head}]"


def _step1_only(cfg: Cfg, meta: dict[str, Any]) -> list[str]:
    """Warnings for settings the cfg changed from what step1 ran with that only step1 reads (STEP1_ONLY)."""
    ran = meta.get("written_settings")
    if not ran:
        return []
    now = cfg.settings.to_dict()
    out = []
    for key, (what, instead) in STEP1_ONLY.items():
        if key not in cfg.settings_given or key not in ran or now[key] == ran[key]:
            continue
        if key == "cost_model" and (now[key] != "measured" or meta.get("cost")):
            continue  # macs: step2 places by the MAC rules; measured with step1's timings: step2 uses them
        off = instead if now[key] is False else ""
        out.append(f"{cfg.path}:{cfg.setting_line(key)}: settings {key}: {_yaml(now[key])} has no effect in step2 (step1 ran "
                   f"with {_yaml(ran[key])}): {what}, so the change takes effect when step1 is re-run"
                   + (f"; {off}." if off else "."))
    return out


def _yaml(value: Any) -> str:
    """A setting's value as the cfg writes it (true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
