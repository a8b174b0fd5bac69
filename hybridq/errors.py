"""One exception tree for every user-facing failure, and the CLI's exit codes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes: 0 ok, 1 failure, 2 bad input or usage, 3 ran but below thresholds.

    ``BELOW_THRESHOLD`` is returned only when asked (``hybridq analyze --strict``),
    so a CI job can tell "the model is not good enough" from "the run failed".
    """

    OK = 0
    FAILURE = 1
    USAGE = 2
    BELOW_THRESHOLD = 3


class HybridqError(Exception):
    """Base of all errors hybridq raises on purpose; the message is shown to the user as is."""

    exit_code: ExitCode = ExitCode.FAILURE


class InputError(HybridqError):
    """The user gave something we cannot use: a file, a value, an option."""

    exit_code = ExitCode.USAGE


class ModelError(InputError):
    """A model file is missing, corrupt or not a graph we can handle."""


class DatasetError(InputError):
    """A dataset list, or a sample it names, cannot be used."""


class ConfigError(InputError):
    """A quantization cfg or workspace config has a syntax or value error."""


class ArtifactMismatchError(InputError):
    """step1 artifacts from different runs were mixed together."""


class WorkerLost(HybridqError):
    """A worker process or the Ray cluster went away mid-run (exit code 1); nothing was written."""


class OutputError(HybridqError):
    """An output could not be written (permissions, disk full)."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest choices, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
