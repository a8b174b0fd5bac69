"""Atomic file output: every file hybridq writes appears whole or not at all.

A file is written to a temporary name in its target's directory (same file
system), flushed and ``fsync``ed, given the permissions a plain ``open``
would, then renamed over the target with ``os.replace``. Temporary names
start with ``.hybridq-`` and are removed on any error, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import InputError, OutputError

TEMP_PREFIX = ".hybridq-"
"""Start of every temporary file or directory name hybridq creates beside its outputs."""


def _default_mode() -> int:
    """The mode ``open(..., "w")`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
          stat.S_ISCHR: "a device node", stat.S_ISBLK: "a device node"}


def output_target(path: str | os.PathLike[str], what: str = "output", hint: str = "Remove it or choose another output path.") -> Path:
    """Where writing `path` lands: the file a symlink resolves to (so the link stays a link), else `path` itself.

    Raises :class:`~hybridq.errors.InputError` naming `path` when that is an existing directory, FIFO, socket or device.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    try:
        mode = os.stat(target).st_mode
    except OSError:  # missing (created by the write), or unreadable (the write reports it)
        return target
    kind = next((name for test, name in _KINDS.items() if test(mode)), None)
    if kind is None:
        return target
    shown = f"'{path}'" + (f" (a symlink to '{target}')" if target != path else "")
    raise InputError(f"The {what} {shown} is {kind}, not a regular file, and hybridq will not replace it with one. {hint}")


def check_not_input(output: str | os.PathLike[str], inputs: Mapping[str, Path], what: str) -> None:
    """Refuse an output that is one of `inputs` ({role: path}) by any spelling or symlink: writing it would destroy that input."""
    for role, src in inputs.items():
        with contextlib.suppress(OSError):  # either one missing: not the same file
            if os.path.samefile(output, src):
                raise InputError(f"The {what} '{output}' is the same file as {role} '{src}': writing it would destroy that input. "
                                 "Choose another output path; nothing was written.")


def publish(src: Path, dst: Path) -> None:
    """Move a finished file into place atomically: fsync, usual mode, ``os.replace`` (through a symlink onto its target).

    A target on another file system (a symlink's) gets a copy made atomically beside it."""
    _fsync(src)
    os.chmod(src, _default_mode())
    target = output_target(dst)
    try:
        os.replace(src, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_atomic(src, target)
        os.unlink(src)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, parents: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; ``parents`` creates missing directories.

    Raises :class:`~hybridq.errors.OutputError` naming ``path`` when it cannot
    be written; no temporary file is left behind.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _atomic(path, lambda f: f.write(raw), parents)


def copy_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, parents: bool = False) -> None:
    """Copy the file ``src`` to ``dst`` atomically (as :func:`write_atomic`)."""

    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    _atomic(Path(dst), copy, parents)


def _atomic(path: Path, fill: Callable[[BinaryIO], object], parents: bool) -> None:
    path = output_target(path)
    tmp: str | None = None
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent or ".")
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(
                f"Cannot write '{path}': {exc.strerror or exc}. Check the directory exists, is writable and has space."
            ) from exc
        raise


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside the outputs, removed afterwards whatever happens."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir))
    except OSError as exc:
        blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError(f"Cannot write into '{out_dir}': '{blocker}' is a file, not a directory. Choose another output location.") from exc
        raise OutputError(f"Cannot write into '{out_dir}': {exc.strerror or exc}. Choose a writable output directory with free space.") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one to the previous handler.

    Used around the renames that publish several files, so Ctrl-C cannot land between two of them.
    Only the main thread can set handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def publish_all(moves: list[tuple[Path, Path]], keep: Path) -> None:
    """Move finished files into place as one unit: if any move fails, every target gets its previous content back.

    Each existing target is first hard-linked (or copied) into `keep`, a staging directory on the same filesystem.
    """
    moves = [(src, output_target(dst)) for src, dst in moves]  # a refused target stops it before anything moves
    saved: list[tuple[Path, Path | None]] = []
    with signals_held():
        try:
            for i, (_, dst) in enumerate(moves):
                old = None
                if dst.is_file():
                    old = keep / f"previous-{i}-{dst.name}"
                    try:
                        os.link(dst, old)
                    except OSError:
                        shutil.copy2(dst, old)
                saved.append((dst, old))
            for src, dst in moves:
                publish(src, dst)
        except BaseException:
            for dst, old in reversed(saved):
                with contextlib.suppress(OSError):
                    if old is None:
                        os.unlink(dst)
                    elif os.stat(old).st_dev == os.stat(dst.parent).st_dev:
                        os.replace(old, dst)
                    else:  # a symlink's target on another file system: the saved copy cannot be renamed there
                        copy_atomic(old, dst)
            raise


JOURNAL = "swap.json"
"""In a stage of :func:`swap_files`: the files it moves in and out, so a swap a crash cut short can be undone."""


def swap_files(root: Path, stage: Path, moving_in: list[str], removing: list[str]) -> None:
    """Replace files under `root` as one unit: `removing` and the files `moving_in` replaces go to `stage/old`, then
    `moving_in` (paths relative to `root`, staged under `stage/new`) arrive.

    The last of `moving_in` is the commit mark (a manifest): it leaves first and arrives last. SIGINT and SIGTERM are
    held for the renames; an error puts every file back; a crash between two renames leaves `stage/swap.json`, by
    which :func:`roll_back` puts them back.
    """
    mark = moving_in[-1]
    out = [r for r in dict.fromkeys([mark, *removing, *moving_in]) if os.path.lexists(root / r)]
    write_atomic(stage / JOURNAL, json.dumps({"in": moving_in, "out": out}))
    made: list[Path] = []
    with signals_held():
        try:
            for rel in out:
                if not os.path.lexists(root / rel):  # gone with another spelling of it (a case-insensitive disk)
                    continue
                (stage / "old" / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(root / rel, stage / "old" / rel)
            for rel in moving_in:
                for d in reversed((root / rel).parents):
                    if d not in made and not d.is_dir():
                        d.mkdir()
                        made.append(d)
                os.replace(stage / "new" / rel, root / rel)
        except BaseException:
            roll_back(root, stage)
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise


def roll_back(root: Path, stage: Path) -> None:
    """Undo a :func:`swap_files` cut short, by its journal: the files moved in leave, the files moved out come back.

    A swap that committed (its mark arrived), or one never started, is left as it is; so is a stage without a journal."""
    try:
        plan = json.loads((stage / JOURNAL).read_text())
        moving_in, out = list(plan["in"]), list(plan["out"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    mark = moving_in[-1] if moving_in else None
    if mark is None or not (stage / "new" / mark).exists() or os.path.lexists(root / mark):
        return
    for rel in moving_in:
        if not (stage / "new" / rel).exists():
            with contextlib.suppress(OSError):
                os.unlink(root / rel)
    for rel in out:
        with contextlib.suppress(OSError):
            os.replace(stage / "old" / rel, root / rel)


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (a dump on a shared disk from another host looks dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def process_tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory named `prefix<pid>-...`; those of dead processes (a worker killed mid-run, which removes
    nothing) are removed first."""
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def check_output_dir(path: Path, what: str) -> None:
    """Refuse, before any work, an output directory that is a file, lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise InputError(f"The {what} '{path}' is a file, not a directory; give a directory (it is created if missing).")
    _check_writable(path, (path, *path.parents), what)


def check_output_file(path: Path, what: str, example: str) -> None:
    """Refuse, before any work, an output file that is a directory, lies under a file, or cannot be written."""
    if path.is_dir():
        raise InputError(f"The {what} '{path}' is a directory; give a file name, such as '{path / example}'.")
    output_target(path, what)
    _check_writable(path, path.parents, what)


def _check_writable(path: Path, ancestors, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this process can write into."""
    existing = next(p for p in ancestors if p.exists())
    if not existing.is_dir():
        raise InputError(f"The {what} '{path}' cannot be written: '{existing}' is a file, not a directory. Choose another location.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"The {what} '{path}' cannot be written: '{existing}' is not writable. Choose a directory you can write to.")
    try:  # access() passes for root on read-only and virtual file systems (/proc): create an entry and take it back
        os.rmdir(tempfile.mkdtemp(prefix=".hybridq-probe-", dir=existing))
    except OSError as exc:
        raise InputError(f"The {what} '{path}' cannot be written: nothing can be created in '{existing}' "
                         f"({exc.strerror or exc}). Choose a directory you can write to.") from None
