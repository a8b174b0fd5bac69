"""RKNN-Toolkit2 accuracy_analysis folders (layout of ../shared/rknn/*.snapshot_layout.txt), built here, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridq.errors import InputError
from hybridq.dumps import compare_rknn_dump, file_stem, first_divergence, read_name_map, read_rknn_dump

NAMES = ["x", "x_int8", "batch_norm_0.tmp_2", "GlobalAveragePool@0_2conv0", "p2o.Add.19", "save_infer_model/scale_0.tmp_1"]
CORRUPT = "p2o.Add.19"


def _write_tree(root: Path, tree: str, arrays: dict[str, np.ndarray]) -> None:
    (root / tree / "npy").mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(root / tree / "npy" / f"{file_stem(name)}.npy", arr.astype(np.float32))
        np.savetxt(root / tree / f"{file_stem(name)}.txt", arr.reshape(-1), fmt="%f")


def _write_map(root: Path, names: list[str]) -> None:
    rows = ["layer_name".ljust(44) + "file_name", "-" * 88] + [name.ljust(44) + f"{file_stem(name)}.txt" for name in names]
    (root / "map_name_to_file.txt").write_text("\n".join(rows) + "\n")


def _dump(root: Path, runtime: bool = True) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    golden = {n: rng.normal(size=(1, 4, 6, 6)).astype(np.float32) for n in NAMES}
    step = 0.05  # the simulator: golden on an int8-like grid
    sim = {n: np.round(g / step) * step for n, g in golden.items()}
    trees = {"golden": golden, "simulator": sim}
    if runtime:
        rt = {n: s.copy() for n, s in sim.items()}
        rt[CORRUPT] = rt[CORRUPT] * -1.0 + 0.3  # one layer the device computes wrongly
        trees["runtime"] = rt
    for tree, arrays in trees.items():
        _write_tree(root, tree, arrays)
    _write_map(root, NAMES)
    (root / "error_analysis.txt").write_text("table\n")
    return trees


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_names_with_slash_and_dot_round_trip_through_the_map(tmp_path):
    _dump(tmp_path)
    assert read_name_map(tmp_path / "map_name_to_file.txt") == {n: file_stem(n) for n in NAMES}
    assert file_stem("save_infer_model/scale_0.tmp_1") == "save_infer_model_scale_0_tmp_1"
    d = read_rknn_dump(tmp_path)
    assert list(d.tensors) == NAMES and d.has_runtime and not d.missing
    t = d.tensors["save_infer_model/scale_0.tmp_1"]
    assert t.golden == tmp_path / "golden" / "npy" / "save_infer_model_scale_0_tmp_1.npy"
    assert t.load("golden").shape == (1, 4, 6, 6)


def test_corrupted_runtime_layer_is_flagged_only_in_runtime_columns(tmp_path):
    trees = _dump(tmp_path)
    layers = {le.name: le for le in compare_rknn_dump(tmp_path)}
    g, s, r = trees["golden"], trees["simulator"], trees["runtime"]
    for name, le in layers.items():
        assert le.simulator.cosine == pytest.approx(_cos(g[name], s[name]), abs=1e-6)
        assert le.runtime.cosine == pytest.approx(_cos(g[name], r[name]), abs=1e-6)
        assert le.runtime_vs_simulator.cosine == pytest.approx(_cos(s[name], r[name]), abs=1e-6)
        assert le.simulator.cosine > 0.99  # the simulator is fine everywhere
        assert le.runtime.max_abs == pytest.approx(float(np.abs(g[name] - r[name]).max()), rel=1e-6)
        if name == CORRUPT:
            assert le.runtime.cosine < 0 and le.runtime_vs_simulator.cosine < 0
        else:
            assert le.runtime_vs_simulator.cosine == pytest.approx(1.0) and le.runtime_vs_simulator.max_abs == 0.0
    assert first_divergence(list(layers.values())).name == CORRUPT


def test_without_runtime_the_runtime_columns_are_none(tmp_path):
    _dump(tmp_path, runtime=False)
    layers = compare_rknn_dump(tmp_path)
    assert all(le.runtime is None and le.runtime_vs_simulator is None and le.simulator is not None for le in layers)
    assert first_divergence(layers) is None


def test_text_files_alone_are_read(tmp_path):
    trees = _dump(tmp_path)
    for p in tmp_path.glob("*/npy/*.npy"):
        p.unlink()
    le = {x.name: x for x in compare_rknn_dump(tmp_path)}["batch_norm_0.tmp_2"]
    # %f keeps 6 decimals: the cosine of the text values is that of the arrays to ~1e-6
    assert le.simulator.cosine == pytest.approx(_cos(trees["golden"]["batch_norm_0.tmp_2"], trees["simulator"]["batch_norm_0.tmp_2"]), abs=1e-5)
    assert le.shape == (144,)


def test_missing_files_are_listed_not_dropped(tmp_path):
    _dump(tmp_path)
    (tmp_path / "golden" / "npy" / "x_int8.npy").unlink()
    (tmp_path / "golden" / "x_int8.txt").unlink()
    d = read_rknn_dump(tmp_path)
    assert d.missing == ["x_int8"] and "x_int8" not in d.tensors


def test_not_an_rknn_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no golden/ folder"):
        read_rknn_dump(tmp_path)
    _dump(tmp_path)
    (tmp_path / "map_name_to_file.txt").write_text("layer_name  file_name\n-----\nlonely\n")
    with pytest.raises(InputError, match=r"map_name_to_file.txt:3"):
        read_rknn_dump(tmp_path)


def test_without_the_map_tensors_are_named_by_their_files(tmp_path):
    _dump(tmp_path)
    (tmp_path / "map_name_to_file.txt").unlink()
    d = read_rknn_dump(tmp_path)
    assert sorted(d.tensors) == sorted(file_stem(n) for n in NAMES)
    assert d.notes and "missing" in d.notes[0]


def test_analyze_from_an_rknn_folder_renders_hybridqs_report(tmp_path, capsys):
    """`hybridq analyze --from RKNN_DIR --dump OUT`: RKNN's dumps as hybridq's table and report files, figures as numpy says."""
    from hybridq.cli import main

    trees = _dump(tmp_path / "rknn")
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--from", str(tmp_path / "rknn"), "--dump", str(tmp_path / "report"), "--json"])
    assert exc.value.code == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    tensors = doc["tensors"]
    assert list(tensors) == NAMES
    for name in NAMES:
        assert tensors[name]["entire"]["cosine"] == pytest.approx(_cos(trees["golden"][name], trees["simulator"][name]), abs=1e-9)
    assert any(f"first tensor where it departs from the simulator: {CORRUPT}" in n for n in doc["notes"])
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"error_analysis.txt", "error_analysis.csv", "error_analysis.png", "report.html"}
    # below a threshold, the propose command it suggests analyses anew: propose cannot read an RKNN folder (it named
    # the folder, which propose refused)
    with pytest.raises(SystemExit):
        main(["analyze", "--from", str(tmp_path / "rknn"), "--json", "--target-snr", "90"])
    command = json.loads(capsys.readouterr().out)["verdict"]["command"]
    assert command.startswith("hybridq propose --cfg") and str(tmp_path / "rknn") not in command
