"""Workspaces: `hybridq init` copies workspace_template/, and step1 reads the workspace's `hybridq.yaml`.

Which `hybridq.yaml` step1 uses (`find_config`): the one given with `--config` (`config=` in Python);
otherwise the first `hybridq.yaml` found in the `--out` directory, then beside the model, then beside
the dataset list (or in the dataset directory). Options given on the command line (or as mappings in
Python) win over the file. The file holds `settings:` keys (dtype, algorithm, ...) and the image
preprocessing keys mean, std, color, layout, resize (and preprocess, a hook), and `fixed_inputs:`
(input name -> value, made constants so control flow on them folds; see hybridq.fold).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._fs import write_atomic as write_text_atomic
from ._onnx import external_data_paths, read_onnx
from .dataset import Preprocess
from .errors import ConfigError, InputError, did_you_mean
from .settings import Settings

CONFIG_NAME = "hybridq.yaml"
PREPROCESS_KEYS = ("mean", "std", "color", "layout", "resize", "preprocess")
FIXED_INPUTS_KEY = "fixed_inputs"
RUN_KEYS = ("samples", "batch_size", "seed")  # how step1 reads the dataset: --samples, --batch-size, --seed
TEMPLATE_FILES = ("README.md", "dataset.txt", "hybridq.yaml")
_MODEL_FILES = re.compile(r"\bmodel(\.onnx|\.model|\.data|\.quantization\.cfg|\.q\.onnx)\b")  # the template's file names


def template_dir() -> Path:
    """workspace_template/: beside the package in a source checkout, inside it when installed from a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "workspace_template", here / "workspace_template"):
        if all((candidate / f).is_file() for f in TEMPLATE_FILES):
            return candidate
    raise InputError(
        "The workspace template is missing from this hybridq installation (looked beside and inside the package). "
        "Reinstall hybridq (pip install --force-reinstall hybridq)."
    )


def find_config(out: str | Path | None, model: str | Path, dataset: str | Path | None) -> Path | None:
    """The workspace config step1 uses when none is given: `hybridq.yaml` in `out`, beside `model`, or beside `dataset`."""
    places: list[Path] = []
    if out is not None:
        places.append(Path(out))
    places.append(Path(model).parent)
    if dataset is not None:
        d = Path(dataset)
        places.append(d if d.is_dir() else d.parent)
    seen: set[Path] = set()
    for place in places:
        candidate = (place / CONFIG_NAME).absolute()
        if candidate in seen:
            continue
        seen.add(candidate)
        if candidate.is_file():
            return place / CONFIG_NAME
    return None


def load_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a workspace YAML file, loaded safely; unknown keys are refused with a 'did you mean'."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Workspace config '{path}' does not exist; `hybridq init DIR` writes one as DIR/{CONFIG_NAME}.")
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: YAML syntax error: {exc.problem}. Fix the line and re-run.") from None
    except (YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Workspace config '{path}' cannot be read as YAML ({exc}). Fix it, or copy it again from `hybridq init`.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Workspace config '{path}' must be a mapping of setting: value (e.g. `algorithm: mse`).")
    known = [f.name for f in fields(Settings)] + list(PREPROCESS_KEYS) + [FIXED_INPUTS_KEY, *RUN_KEYS]
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}.{did_you_mean(str(key), known)} Valid keys: {', '.join(known)}.")
    return dict(data)


@dataclass
class WorkspaceOptions:
    """Settings and preprocessing for step1: the workspace file's values with the given ones on top."""

    settings: Settings
    preprocess: Preprocess
    config: Path | None
    fixed_inputs: dict[str, Any] = field(default_factory=dict)
    run: dict[str, int] = field(default_factory=dict)  # the file's samples, batch_size, seed (checked)


def merge(
    config: str | Path | None,
    settings: Settings | Mapping[str, Any] | None = None,
    preprocess: Preprocess | Mapping[str, Any] | None = None,
    fixed_inputs: Mapping[str, Any] | None = None,
    run_options: Mapping[str, int | None] | None = None,
) -> WorkspaceOptions:
    """Combine a workspace file with given options; a full Settings or Preprocess replaces the file's values, a mapping overrides key by key."""
    values = load_config(config) if config is not None else {}
    where = str(config) if config is not None else "the given settings"
    fixed = values.pop(FIXED_INPUTS_KEY, None) or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}: {FIXED_INPUTS_KEY} must be a mapping of input name -> value, e.g. `{FIXED_INPUTS_KEY}: {{sample_rate: 16000}}`.")
    fixed.update(dict(fixed_inputs or {}))
    run = {k: _count(k, values.pop(k), where) for k in RUN_KEYS if k in values}
    run.update({k: _count(k, v, "the given options") for k, v in dict(run_options or {}).items() if v is not None})
    pre_values = {k: values.pop(k) for k in list(values) if k in PREPROCESS_KEYS}
    if "preprocess" in pre_values:
        pre_values["hook"] = pre_values.pop("preprocess")
    # the file's values the options leave are checked alone first, so an invalid option is not blamed on the file
    given = "the given options" + (f" (on top of {config})" if config is not None else "")
    if isinstance(settings, Settings):
        chosen = settings
    else:
        overrides = {k: v for k, v in dict(settings or {}).items() if v is not None}
        if config is not None and overrides:
            Settings.from_dict({k: v for k, v in values.items() if k not in overrides}, where)
        values.update(overrides)
        chosen = Settings.from_dict(values, given if overrides else where)
    if isinstance(preprocess, Preprocess):
        pre = preprocess
    else:
        pre_overrides = {k: v for k, v in dict(preprocess or {}).items() if v is not None}
        if config is not None and pre_overrides:
            Preprocess.from_dict({k: v for k, v in pre_values.items() if k not in pre_overrides}, where)
        pre_values.update(pre_overrides)
        pre = Preprocess.from_dict(pre_values, given if pre_overrides else where)
    return WorkspaceOptions(chosen, pre, Path(config) if config is not None else None, fixed, run)


def _count(key: str, value: Any, where: str) -> int:
    """A run key's value: an integer, at least 1 (seed: at least 0)."""
    least = 0 if key == "seed" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}: {key} must be a whole number >= {least}, not {value!r}.")
    return value


def _outside(data: Path, home: Path) -> bool:
    """Is an external data file not a plain relative path under the model's directory (absolute, or through '..')?"""
    try:
        rel = data.relative_to(home)
    except ValueError:
        return True
    return ".." in rel.parts or not data.resolve().is_relative_to(home.resolve())


def init(directory: str | Path, model: str | Path | None = None) -> Path:
    """Create a workspace: the template's files, the model copied in, and the README/config naming that model."""
    directory = Path(directory)
    template = template_dir()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"'{directory}' is a file, not a directory; choose a new directory for the workspace.")
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"'{directory}' exists and is not empty; choose a new directory for the workspace.")
    model_path = Path(model) if model is not None else None
    if model_path is not None and not model_path.is_file():
        raise InputError(f"Model '{model_path}' does not exist; give the path of an .onnx file.")
    data_files = external_data_paths(read_onnx(model_path, load_external_data=False), model_path.parent) if model_path else []
    if model_path is not None:
        missing = [p for p in data_files if not p.is_file()]
        outside = [p for p in data_files if _outside(p, model_path.parent)]
        if outside:
            raise InputError(f"Model '{model_path}' keeps its weights at '{outside[0]}': an absolute location, or one through "
                             "'..' (ONNX loaders refuse both); save the model with its data file(s) beside it, by relative names.")
        if missing:
            raise InputError(f"Model '{model_path}' keeps its weights in external data file(s) that are missing: "
                             f"{', '.join(repr(str(p)) for p in missing)}. Put them beside the model, then run init again.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in TEMPLATE_FILES:
            text = (template / name).read_text(encoding="utf-8")
            if model_path is not None and name == "README.md":
                text = _MODEL_FILES.sub(lambda m: model_path.stem + m.group(1), text)
            write_text_atomic(directory / name, text)
        if model_path is not None:
            shutil.copy2(model_path, directory / model_path.name)
            for data in data_files:  # its weights, where the model says they are
                (directory / data.relative_to(model_path.parent)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(data, directory / data.relative_to(model_path.parent))
    except OSError as exc:
        raise InputError(f"Cannot create the workspace in '{directory}': {exc.strerror or exc}. Choose a writable location.") from None
    return directory
