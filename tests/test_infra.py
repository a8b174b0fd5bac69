"""The private infrastructure modules: atomic files, ONNX Runtime sessions, graph index, opset, qdq map."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridq import _fs
from hybridq.errors import OutputError


# --------------------------------------------------------------------------- _fs


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(_fs.TEMP_PREFIX))


def test_write_atomic_writes_text_and_bytes(tmp_path: Path) -> None:
    _fs.write_atomic(tmp_path / "a.txt", "héllo")
    _fs.write_atomic(tmp_path / "sub" / "b.bin", b"\x00\x01", parents=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_write_atomic_fsyncs_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    _fs.write_atomic(tmp_path / "a.txt", "x")
    assert calls == ["fsync", "replace"]


def test_write_atomic_error_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old", encoding="utf-8")

    def full(a: object, b: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="a.txt"):
        _fs.write_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert _leftovers(tmp_path) == []


def test_write_atomic_interrupt_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fs.write_atomic(tmp_path / "a.txt", "new")
    assert list(tmp_path.iterdir()) == []


def test_copy_atomic_and_publish_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    _fs.copy_atomic(src, tmp_path / "out" / "dst.bin", parents=True)
    assert (tmp_path / "out" / "dst.bin").read_bytes() == b"abc"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    _fs.publish(src, tmp_path / "moved.bin")
    assert synced and not src.exists() and (tmp_path / "moved.bin").read_bytes() == b"abc"


def test_publish_all_restores_every_target_when_one_move_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    with _fs.staging(tmp_path) as stage:
        (stage / "a").write_text("new a")
        (stage / "b").write_text("new b")
        real = os.replace

        def fail_on_b(x: object, y: object) -> None:
            if Path(str(y)) == b:
                raise OSError(28, "No space left on device")
            real(x, y)

        monkeypatch.setattr(os, "replace", fail_on_b)
        with pytest.raises(OSError):
            _fs.publish_all([(stage / "a", a), (stage / "b", b)], stage)
        monkeypatch.setattr(os, "replace", real)
    assert a.read_text() == "old a" and not b.exists()
    assert _leftovers(tmp_path) == []
