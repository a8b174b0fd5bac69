"""The terminal side of the CLI: stdout/stderr consoles, global flags, progress bars, tables, and --json output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


class State:
    """Flags that apply to every command."""

    quiet = False
    json = False


class Advance:
    """Moves a progress bar on by `n` when called (nothing when no bar is shown); `start(total)` sets its length."""

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None) -> None:
        self._bar, self._task = bar, task

    def __call__(self, n: int = 1) -> None:
        if self._bar is None or self._task is None:
            return
        self._bar.advance(self._task, n)
        t = self._bar.tasks[self._task]
        if t.elapsed:
            self._bar.update(self._task, rate=f"{t.completed / t.elapsed:.1f} samples/s")

    def start(self, total: int) -> None:
        """Give the bar its length once the API knows it (the `on_start(n)` callbacks)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=total)


@contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Advance]:
    """A rich progress bar on stderr (silent when quiet or not a terminal); yields an `Advance`."""
    if State.quiet or State.json or not err.is_terminal:
        yield Advance()
        return
    # imported here: 10 ms that a run without a terminal (scripts, CI, benches) does not pay
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as bar:
        yield Advance(bar, bar.add_task(label, total=total, rate=""))


def warn(warnings: list[str]) -> None:
    """Each warning on stderr, unless --quiet (nothing but errors)."""
    if State.quiet:
        return
    for w in warnings:
        err.print(f"warning: {w}", highlight=False, markup=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A plain rich table of strings."""
    table = Table(title=title, box=None if not out.is_terminal else None, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(x) for x in r))
    return table


def emit(data: dict[str, Any], tables: list[Table], lines: list[str]) -> None:
    """Print a command's result: strict JSON with --json, else its tables and lines (nothing with --quiet)."""
    if State.json:  # strict JSON: non-finite numbers as null, listed under "nonfinite" (see metrics.to_strict_json)
        from .metrics import to_strict_json

        plain = json.loads(json.dumps(data, default=str))
        out.print(json.dumps(to_strict_json(plain), allow_nan=False, ensure_ascii=False), highlight=False, markup=False, soft_wrap=True)
        return
    if State.quiet:
        return
    for t in tables:
        out.print(t)
    for line in lines:  # soft_wrap: a long line (a command to copy) is never broken by inserted newlines
        out.print(line, highlight=False, markup=False, soft_wrap=True)



QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
