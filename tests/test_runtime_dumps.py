"""analyze --runtime DIR: tensors a device dumped, compared per layer with fp32 and the exact simulation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from hybridq import api
from hybridq.analysis.runtime import device_runtime
from hybridq.api import analyze_samples
from hybridq.cli import main
from hybridq.dumps import file_stem
from hybridq.kernels import u8s8_saturates
from tests import models
from tests.conftest import cosine
from tests.test_kernels import K, _saturating_pair

CORRUPT_SCALE = 3.0


def _snapshot(tmp_path: Path) -> tuple[Path, dict]:
    """step1 + step2 of the residual CNN, then a snapshot of 4 samples: fp32/ and quant/ arrays with a manifest."""
    onnx.save(models.residual_cnn(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 4)
    r = api.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws")
    api.step2(r.model, r.data, r.cfg, tmp_path / "q.onnx")
    api.analyze(tmp_path / "m.onnx", tmp_path / "q.onnx", listing, dump=tmp_path / "snap")
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    return listing, manifest


def _planted(tmp_path: Path, manifest: dict) -> tuple[Path, str]:
    """The snapshot copied as a 'device' folder whose quant arrays are the device's, one middle layer corrupted."""
    dev = tmp_path / "device"
    shutil.copytree(tmp_path / "snap", dev)
    dumped = [t for t, v in manifest["tensors"].items() if v.get("quant")]
    victim = dumped[len(dumped) // 2]
    path = dev / manifest["tensors"][victim]["quant"]
    arr = np.load(path)
    arr[:, :, 0] *= CORRUPT_SCALE  # the device gets one channel (or row) wrong
    np.save(path, arr)
    return dev, victim


def test_a_planted_corrupted_layer_is_flagged_in_the_runtime_column_and_only_there(tmp_path):
    listing, manifest = _snapshot(tmp_path)
    dev, victim = _planted(tmp_path, manifest)
    result = api.analyze(tmp_path / "m.onnx", tmp_path / "q.onnx", listing, runtime=str(dev), dump=tmp_path / "snap2")
    rows = {r.tensor: r for r in result.runtime}
    assert set(rows) == {t for t, v in manifest["tensors"].items() if v.get("quant")}
    # independent: numpy cosine per sample between the snapshot's arrays and the device's, then the mean
    sim = np.load(tmp_path / "snap" / manifest["tensors"][victim]["quant"])
    ref = np.load(tmp_path / "snap" / manifest["tensors"][victim]["fp32"])
    got = np.load(dev / manifest["tensors"][victim]["quant"])
    assert rows[victim].vs_simulator.cosine == pytest.approx(np.mean([cosine(s, g) for s, g in zip(sim, got)]), abs=1e-6)
    assert rows[victim].vs_fp32.cosine == pytest.approx(np.mean([cosine(r, g) for r, g in zip(ref, got)]), abs=1e-6)
    assert rows[victim].vs_simulator.cosine < 0.99
    for name, row in rows.items():
        if name != victim:
            assert row.vs_simulator.max_abs == 0.0 and row.vs_simulator.cosine == pytest.approx(1.0, abs=1e-9), name
    # the simulation's own columns are untouched by the runtime
    layers = {le.tensor: le for le in result.layers}
    assert layers[victim].entire.cosine > 0.99
    # reports: the text marks only that row, the html leads with it, the csv carries the column
    txt = (tmp_path / "snap2" / "error_analysis.txt").read_text().splitlines()
    marked = [ln for ln in txt if ln.endswith("<<")]
    assert len(marked) == 1 and marked[0].startswith(victim)
    html = (tmp_path / "snap2" / "report.html").read_text()
    assert f"the first in graph order is {victim}" in html
    csv = (tmp_path / "snap2" / "error_analysis.csv").read_text().splitlines()
    assert csv[0].endswith("runtime_vs_simulator_snr_db")


def test_the_runtime_column_reads_an_rknn_folder_of_board_tensors(tmp_path, capsys):
    listing, manifest = _snapshot(tmp_path)
    rk = tmp_path / "rknn"
    names = [t for t, v in manifest["tensors"].items() if v.get("quant")][:5]
    victim = names[2]
    for tree in ("golden", "simulator", "runtime"):
        (rk / tree / "npy").mkdir(parents=True)
    for name in names:
        v = manifest["tensors"][name]
        fp, q = np.load(tmp_path / "snap" / v["fp32"])[:1], np.load(tmp_path / "snap" / v["quant"])[:1]
        board = q * (-1.0 if name == victim else 1.0)
        for tree, arr in (("golden", fp), ("simulator", q), ("runtime", board)):
            np.save(rk / tree / "npy" / f"{file_stem(name)}.npy", arr)
    (rk / "map_name_to_file.txt").write_text("layer_name  file_name\n----\n" + "".join(f"{n}  {file_stem(n)}.txt\n" for n in names))
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", str(rk), "--json"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["tensor"]: r for r in doc["runtime"]}
    assert list(rows) == names  # graph order
    assert rows[victim]["vs_simulator"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert all(rows[n]["vs_simulator"]["cosine"] == pytest.approx(1.0, abs=1e-6) for n in names if n != victim)
    assert any("1 sample(s)" in n for n in doc["notes"])  # RKNN dumps one input: compared with the dataset's first
    # the same folder rendered by itself (--from) carries the board's column too
    again = api.load_snapshot(rk)
    assert {r.tensor: round(r.vs_simulator.cosine, 6) for r in again.runtime}[victim] == -1.0
    assert any("does not say which tensors are the model's outputs" in n and names[-1] in n for n in again.notes)


@pytest.mark.parametrize("per", ["layer", "output"])
def test_this_cpus_default_kernels_part_from_the_simulation_only_where_they_saturate(tmp_path, per):
    fm, qm, _ = _saturating_pair()
    x = {"x": np.full((1, K), 4.0, np.float32)}
    if per == "layer":  # this CPU's kernels dumped per layer by analyze --host-int8, then read as a device folder
        analyze_samples(fm, qm, [x], dump=tmp_path / "host", host_int8=True)
        result = analyze_samples(fm, qm, [x], sink=device_runtime(str(tmp_path / "host")))
    else:
        from hybridq.analysis.runtime import compare_runtime

        rows, _ = compare_runtime(fm, qm, [x], "cpu")
    (row,) = [r for r in (result.runtime if per == "layer" else rows) if r.tensor == "y"]
    if u8s8_saturates():
        assert row.vs_simulator.max_abs > 10
    else:
        assert row.vs_simulator.max_abs == 0.0


def test_a_runtime_folder_that_is_not_one_is_a_clear_error(tmp_path, capsys):
    listing, _ = _snapshot(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "rk" / "golden").mkdir(parents=True)
    for folder, words in ((tmp_path / "nope", "no such directory"), (tmp_path / "empty", "holds no device tensors"),
                          (tmp_path / "rk", "without runtime/")):
        with pytest.raises(SystemExit) as exc:
            main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", str(folder)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in " ".join(err.split()) and "Traceback" not in err
    # an RKNN folder of another model's tensors: refused (it gave exit 0, no runtime column and a note)
    other = tmp_path / "other"
    for tree in ("golden", "simulator", "runtime"):
        (other / tree / "npy").mkdir(parents=True)
        for i in range(3):
            np.save(other / tree / "npy" / f"backbone_conv{i}_Conv_output_0.npy", np.ones((1, 8, 4, 4), np.float32))
    (other / "map_name_to_file.txt").write_text("layer_name  file_name\n----\n" + "".join(
        f"/backbone/conv{i}/Conv_output_0  backbone_conv{i}_Conv_output_0.txt\n" for i in range(3)))
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", str(other)])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "None of the 3 tensors dumped" in err and "/backbone/conv0/Conv_output_0" in err


def test_a_single_dumped_tensor_that_departs_is_counted(tmp_path, capsys):
    """One runtime tensor (a single-output model, `--runtime` per output): its departure is still counted and named."""
    listing, manifest = _snapshot(tmp_path)
    name = [t for t, v in manifest["tensors"].items() if v.get("quant")][-1]
    rk = tmp_path / "rknn"
    v = manifest["tensors"][name]
    fp, q = np.load(tmp_path / "snap" / v["fp32"])[:1], np.load(tmp_path / "snap" / v["quant"])[:1]
    for tree, arr in (("golden", fp), ("simulator", q), ("runtime", -q)):
        (rk / tree / "npy").mkdir(parents=True)
        np.save(rk / tree / "npy" / f"{file_stem(name)}.npy", arr)
    (rk / "map_name_to_file.txt").write_text(f"layer_name  file_name\n----\n{name}  {file_stem(name)}.txt\n")
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "-d", str(listing), "--runtime", str(rk)])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "1 of 1 tensor(s) depart from the simulation" in out and name in out
