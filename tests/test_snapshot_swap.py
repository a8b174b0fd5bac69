"""Dumping into a folder that holds a snapshot replaces it as one unit: interrupted, failed or crashed, the older one stays whole."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hybridq import _fs, snapshot
from hybridq.api import analyze_samples, load_snapshot
from hybridq.errors import OutputError
from hybridq.snapshot import load_arrays
from tests.test_analysis import float_model, quant_model, samples


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (temporary ones included), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def older(tmp_path: Path) -> Path:
    """A finished snapshot of 3 samples, with a file of the user's beside its arrays."""
    snap = tmp_path / "snap"
    analyze_samples(float_model(), quant_model(True), samples(3), dump=snap)
    (snap / "fp32" / "my_notes.txt").write_text("mine")
    return snap


def _assert_whole(snap: Path, before: dict[str, bytes]) -> None:
    """`snap` is byte for byte the snapshot it was, and loads with every array it lists."""
    assert _files(snap) == before
    back = load_snapshot(snap)
    for layer in back.layers:
        a, b = load_arrays(snap, layer.tensor)
        assert a.shape[0] == 3 and b.shape == a.shape


def _interrupt_appender(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the second array file is put in place (the long, fsynced part of a dump of GBs)."""
    real, calls = snapshot._NpyAppender.finish, []

    def finish(self: snapshot._NpyAppender) -> None:
        calls.append(self.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(snapshot._NpyAppender, "finish", finish)


def _interrupt_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the reports are written, after the manifest."""
    import hybridq.report as report

    def render_html(*args: object, **kwargs: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_html", render_html)


@pytest.mark.parametrize("interrupt", [_interrupt_appender, _interrupt_reports], ids=["arrays", "reports"])
def test_an_interrupted_redump_leaves_the_older_snapshot_whole(older: Path, monkeypatch: pytest.MonkeyPatch, interrupt) -> None:
    before = _files(older)
    interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        analyze_samples(float_model(), quant_model(True), samples(4, seed=1), dump=older)
    _assert_whole(older, before)


def test_a_finished_redump_replaces_the_whole_snapshot_and_keeps_other_files(older: Path) -> None:
    result = analyze_samples(float_model(), quant_model(True), samples(4, seed=1), dump=older)
    assert load_snapshot(older).to_dict() == result.to_dict()
    listed = {f for layer in result.layers for f in (layer.fp32_file, layer.quant_file) if f}
    assert {str(p.relative_to(older)) for p in older.rglob("*.npy")} == listed
    for layer in result.layers:
        a, b = load_arrays(older, layer.tensor)
        assert a.shape[0] == b.shape[0] == 4
    assert (older / "fp32" / "my_notes.txt").read_text() == "mine"
    assert not [p for p in older.rglob(".*")]  # no stage left behind


def _failing_move_in(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """`os.replace` into the snapshot folder (not into a stage) fails once, when `after` such moves were made."""
    real, moves = os.replace, []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if _fs.TEMP_PREFIX not in str(dst):
            moves.append(dst)
            if len(moves) == after + 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(_fs.os, "replace", replace)


def test_a_swap_that_fails_half_way_puts_the_older_snapshot_back(older: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _files(older)
    _failing_move_in(monkeypatch, after=2)
    with pytest.raises(OutputError, match="cannot write the snapshot"):
        analyze_samples(float_model(), quant_model(True), samples(4, seed=1), dump=older)
    _assert_whole(older, before)


def _dead_pid() -> int:
    """A process id no process has here."""
    for pid in range(4_194_303, 4_000_000, -7):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            continue
    pytest.skip("no free process id found")


def test_a_crash_half_way_through_the_swap_is_rolled_back_by_the_next_dump(older: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dump killed between two renames (SIGKILL, power loss) leaves its stage and journal; the next dump there restores
    the older snapshot before it starts."""
    before = _files(older)
    with monkeypatch.context() as m:  # the crash: no roll-back, no clean-up
        _failing_move_in(m, after=2)
        m.setattr(_fs, "roll_back", lambda root, stage: None)
        m.setattr(shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(OutputError):
            analyze_samples(float_model(), quant_model(True), samples(4, seed=1), dump=older)
    [stage] = older.glob(f"{snapshot.STAGE_PREFIX}*")
    stage.rename(older / f"{snapshot.STAGE_PREFIX}{_dead_pid()}-crashed")  # its process is gone
    assert not (older / "manifest.json").exists()
    dump = snapshot.ArrayDump(older)
    dump.start(["c1"])
    dump.abort()
    _assert_whole(older, before)


def test_a_crash_after_the_swap_leaves_the_new_snapshot_and_the_next_dump_clears_the_stage(older: Path) -> None:
    result = analyze_samples(float_model(), quant_model(True), samples(4, seed=1), dump=older)
    after = _files(older)
    stage = older / f"{snapshot.STAGE_PREFIX}{_dead_pid()}-crashed"
    (stage / "old" / "fp32").mkdir(parents=True)
    (stage / "new").mkdir()
    (stage / "old" / "fp32" / "c1.npy").write_bytes(b"old")
    (stage / _fs.JOURNAL).write_text('{"in": ["manifest.json"], "out": ["manifest.json", "fp32/c1.npy"]}')
    dump = snapshot.ArrayDump(older)
    dump.start(["c1"])
    dump.abort()
    assert _files(older) == after and load_snapshot(older).to_dict() == result.to_dict()
    assert np.load(older / "fp32" / "c1.npy").shape[0] == 4
