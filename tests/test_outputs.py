"""Where outputs land (SPEC 7): never onto an input, through a symlink to its target, never onto a special file.

An output that resolves to one of the command's inputs (by any spelling, or a symlink) is refused with exit 2
and the input left as it was; a symlinked output is written through, the link kept; an output that is a FIFO,
a device node or a directory is refused with exit 2, naming it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import onnx
import pytest

import hybridq
from hybridq import _fs
from hybridq.errors import InputError
from tests import models
from tests.conftest import run_cli

USAGE = 2


def _clean(capsys: pytest.CaptureFixture, code: int, *args: object) -> str:
    """Run the CLI; the exit code is `code` and nothing looks like a crash. Returns stdout + stderr."""
    status, out, err = run_cli(capsys, *args)
    text = out + err
    assert status == code, text
    assert "Traceback" not in text and "internal error" not in text, text
    return text


# --------------------------------------------------------------------------- the atomic writers


def test_write_atomic_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target.name)
    _fs.write_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_text() == "new"


def test_publish_all_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    target, link = tmp_path / "elsewhere" / "real.onnx", tmp_path / "out.onnx"
    target.write_text("old")
    link.symlink_to(target)
    with _fs.staging(tmp_path) as stage:
        (stage / "new").write_text("new")
        _fs.publish_all([(stage / "new", link)], stage)
    assert link.is_symlink() and target.read_text() == "new"


def test_write_atomic_refuses_a_fifo_and_leaves_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="pipe"):
        _fs.write_atomic(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_write_atomic_refuses_a_symlink_to_a_fifo(tmp_path: Path) -> None:
    fifo, link = tmp_path / "pipe", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    with pytest.raises(InputError, match="link"):
        _fs.write_atomic(link, "x")
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="creating a device node needs root")
def test_write_atomic_refuses_a_device_node(tmp_path: Path) -> None:
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private node in tmp_path, never the real /dev/null
    with pytest.raises(InputError, match="null"):
        _fs.write_atomic(node, "x")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_write_atomic_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        _fs.write_atomic(tmp_path / "d", "x")


def test_publish_all_refuses_a_fifo_before_moving_anything(tmp_path: Path) -> None:
    fifo = tmp_path / "b"
    os.mkfifo(fifo)
    with _fs.staging(tmp_path) as stage:
        (stage / "a").write_text("new a")
        (stage / "b").write_text("new b")
        with pytest.raises(InputError, match="'.*b'"):
            _fs.publish_all([(stage / "a", tmp_path / "a"), (stage / "b", fifo)], stage)
    assert not (tmp_path / "a").exists() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


# --------------------------------------------------------------------------- step2 -o


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step1 run of the residual CNN, copied by each test."""
    root = tmp_path_factory.mktemp("outputs")
    models.residual_cnn_step1(root)
    return root


@pytest.fixture
def ws(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(pristine, root, symlinks=True)
    return root


def _artifacts(root: Path) -> list[Path]:
    return [root / "ws" / "cnn.model", root / "ws" / "cnn.data", root / "ws" / "cnn.quantization.cfg"]


@pytest.mark.parametrize("which", ["model", "data", "cfg", "fp32"])
def test_step2_refuses_to_write_onto_an_input(ws: Path, capsys: pytest.CaptureFixture, which: str) -> None:
    arts = _artifacts(ws)
    target = {"model": arts[0], "data": arts[1], "cfg": arts[2], "fp32": ws / "cnn.onnx"}[which]
    before = target.read_bytes()
    text = _clean(capsys, USAGE, "step2", *arts, "-o", target)
    assert str(target) in text and "same file" in text
    assert target.read_bytes() == before


def test_step2_refuses_an_input_by_another_spelling_or_a_symlink(ws: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws / "ws")
    cfg = Path("cnn.quantization.cfg")
    before = cfg.read_bytes()
    Path("link.onnx").symlink_to(cfg)
    for out in ("./cnn.quantization.cfg", "../ws/cnn.quantization.cfg", "link.onnx"):
        text = _clean(capsys, USAGE, "step2", "cnn.model", "cnn.data", cfg, "-o", out)
        assert f"'{Path(out)}'" in text
    assert cfg.read_bytes() == before and Path("link.onnx").is_symlink()


def test_step2_refuses_the_fp32_model_step1_was_given_by_a_relative_path(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    onnx.save(models.residual_cnn(), "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    hybridq.step1(Path("m.onnx"), listing, out=Path("ws"))
    before = Path("m.onnx").read_bytes()
    for out in ("m.onnx", str(tmp_path / "m.onnx")):
        text = _clean(capsys, USAGE, "step2", "ws/m.model", "ws/m.data", "ws/m.quantization.cfg", "-o", out)
        assert out in text and "fp32" in text
    assert Path("m.onnx").read_bytes() == before


def test_step2_writes_through_a_symlinked_output(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "models").mkdir()
    target, link = ws / "models" / "q.onnx", ws / "q.onnx"
    target.write_text("old")
    link.symlink_to(target)
    _clean(capsys, 0, "step2", *_artifacts(ws), "-o", link)
    assert link.is_symlink() and onnx.load(str(target)).graph.node


def test_step2_refuses_a_fifo_output(ws: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = ws / "q.onnx"
    os.mkfifo(fifo)
    text = _clean(capsys, USAGE, "step2", *_artifacts(ws), "-o", fifo)
    assert str(fifo) in text
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_step2_refuses_a_directory_output(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "q.onnx").mkdir()
    text = _clean(capsys, USAGE, "step2", *_artifacts(ws), "-o", ws / "q.onnx")
    assert str(ws / "q.onnx") in text and "directory" in text


# --------------------------------------------------------------------------- step1 --out


def test_step1_names_an_artifact_path_that_is_a_directory(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "w7" / "cnn.data").mkdir(parents=True)
    text = _clean(capsys, USAGE, "step1", ws / "cnn.onnx", "-d", ws / "data" / "dataset.txt", "--out", ws / "w7")
    assert str(ws / "w7" / "cnn.data") in text and "--out" in text
    assert (ws / "w7" / "cnn.data").is_dir()


def test_step1_refuses_a_fifo_in_place_of_the_cfg(ws: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = ws / "ws" / "cnn.quantization.cfg"
    fifo.unlink()
    os.mkfifo(fifo)
    text = _clean(capsys, USAGE, "step1", ws / "cnn.onnx", "-d", ws / "data" / "dataset.txt", "--out", ws / "ws")
    assert str(fifo) in text
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_step1_writes_through_a_symlinked_cfg(ws: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = ws / "ws" / "cnn.quantization.cfg"
    kept = ws / "kept.cfg"
    cfg.rename(kept)
    kept.write_text(kept.read_text().replace("model_sha256:", "model_sha256: stale-"))  # step1 must rewrite it
    cfg.symlink_to(kept)
    _clean(capsys, 0, "step1", ws / "cnn.onnx", "-d", ws / "data" / "dataset.txt", "--out", ws / "ws")
    assert cfg.is_symlink() and "stale-" not in kept.read_text() and "quantize_parameters:" in kept.read_text()


def test_step1_refuses_to_write_over_the_models_external_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cnn.onnx with its weights in cnn.data, step1 into the model's directory: its cnn.data would replace the weights."""
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 2)
    model = models.residual_cnn()
    onnx.save(model, tmp_path / "cnn.onnx", save_as_external_data=True, location="cnn.data", size_threshold=0)
    before = (tmp_path / "cnn.data").read_bytes()
    text = _clean(capsys, USAGE, "step1", tmp_path / "cnn.onnx", "-d", listing)
    assert "external data 'cnn.data'" in text and (tmp_path / "cnn.data").read_bytes() == before
    _clean(capsys, 0, "step1", tmp_path / "cnn.onnx", "-d", listing, "--out", tmp_path / "ws")


def test_a_failed_publish_restores_a_symlinked_target_on_another_file_system(tmp_path: Path, monkeypatch) -> None:
    """The saved copy of a link's target cannot be renamed back across file systems: it is copied back instead."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev or not os.access(other, os.W_OK):
        pytest.skip("needs /dev/shm on another file system than the tmp dir")
    far = Path(tempfile.mkdtemp(dir=other))
    try:
        (far / "real.data").write_text("old data")
        (tmp_path / "m.data").symlink_to(far / "real.data")
        (tmp_path / "m.model").write_text("old model")
        real = _fs.publish

        def second_fails(src: Path, dst: Path) -> None:
            if dst.name == "m.model":
                raise OSError(28, "No space left on device")
            real(src, dst)
        monkeypatch.setattr(_fs, "publish", second_fails)
        with _fs.staging(tmp_path) as stage, pytest.raises(OSError):
            (stage / "d").write_text("new data")
            (stage / "m").write_text("new model")
            _fs.publish_all([(stage / "d", tmp_path / "m.data"), (stage / "m", tmp_path / "m.model")], stage)
        assert (far / "real.data").read_text() == "old data" and (tmp_path / "m.model").read_text() == "old model"
        assert (tmp_path / "m.data").is_symlink()
    finally:
        shutil.rmtree(far, ignore_errors=True)


# --------------------------------------------------------------------------- other commands


def test_analyze_dump_onto_an_input_is_refused(ws: Path, capsys: pytest.CaptureFixture) -> None:
    q = ws / "q.onnx"
    hybridq.step2(*_artifacts(ws), q)
    before = q.read_bytes()
    _clean(capsys, USAGE, "analyze", ws / "cnn.onnx", q, "-d", ws / "data" / "dataset.txt", "--dump", q)
    assert q.read_bytes() == before


def test_rknn_cfg_export_refuses_to_write_onto_the_hybridq_cfg(ws: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _artifacts(ws)[2]
    before = cfg.read_bytes()
    text = _clean(capsys, USAGE, "rknn-cfg", "export", cfg, "-o", cfg)
    assert str(cfg) in text and "same file" in text
    assert cfg.read_bytes() == before


def test_a_fifo_given_as_the_cfg_or_the_model_is_refused_not_read(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """Reading a FIFO waits for a writer forever: propose --cfg, step1's model and dataset list, step2's .data are
    refused, naming the path."""
    fifo = ws / "pipe.cfg"
    os.mkfifo(fifo)
    text = _clean(capsys, USAGE, "propose", "--cfg", fifo, "-d", ws / "data" / "dataset.txt")
    assert str(fifo) in text and "not a regular file" in text
    model = ws / "pipe.onnx"
    os.mkfifo(model)
    text = _clean(capsys, USAGE, "step1", model, "-d", ws / "data" / "dataset.txt", "--out", ws / "p")
    assert str(model) in text and "not a regular file" in text
    data = ws / "pipe.data"
    os.mkfifo(data)
    text = _clean(capsys, USAGE, "step2", ws / "ws" / "cnn.model", data, ws / "ws" / "cnn.quantization.cfg", "-o", ws / "q.onnx")
    assert str(data) in text and "not a file" in text
    listing = ws / "pipe.txt"  # the dataset list: named as what it is, not as missing
    os.mkfifo(listing)
    text = _clean(capsys, USAGE, "step1", ws / "cnn.onnx", "-d", listing, "--out", ws / "p")
    assert str(listing) in text and "not a regular file" in text and "does not exist" not in text
