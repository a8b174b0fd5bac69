"""The reliability matrix (issue 7): every user mistake, through the real CLI, gets a clean error naming the culprit.

Each case runs `hybridq.cli.main` in process (the real exit-code mapping) and checks
the exit code (2 bad input, 1 failure), that no traceback or "internal error" shows,
and that the message names the file and line, the layer or tensor, or the bad value.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from ruamel.yaml import YAML

import hybridq
from tests import models
from tests.conftest import run_cli

USAGE, FAILURE = 2, 1


def hq(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run `hybridq ARGS` through cli.main; returns (exit code, stdout + stderr)."""
    code, out, err = run_cli(capsys, *args)
    return code, out + err


def assert_clean(result: tuple[int, str], code: int, *culprits: str) -> str:
    """The exit code is `code`, nothing looks like a crash, and every culprit is named."""
    status, output = result
    assert status == code, output
    assert "Traceback" not in output and "internal error" not in output, output
    for c in culprits:
        assert c in output, f"{c!r} is not in the message: {output}"
    return output


def no_staging_left(directory: Path) -> list[str]:
    """Temp files and dirs hybridq writes while staging outputs (none may remain)."""
    return sorted(str(p) for p in Path(directory).rglob(".hybridq-*")) + sorted(
        str(p) for p in Path(directory).rglob(".*.onnx.*")
    )


@dataclass
class Ws:
    """A residual CNN, a 4-sample dataset and the step1 artifacts of one run, in a private directory."""

    root: Path
    model: Path
    dataset: Path
    out: Path

    @property
    def artifacts(self) -> tuple[Path, Path, Path]:
        return self.out / "cnn.model", self.out / "cnn.data", self.out / "cnn.quantization.cfg"

    @property
    def cfg(self) -> Path:
        return self.artifacts[2]

    def step2_args(self, cfg: Path | None = None, output: Path | None = None) -> list[object]:
        m, d, c = self.artifacts
        return ["step2", m, d, cfg or c, "-o", output or self.root / "q.onnx"]

    def edit_cfg(self, old: str, new: str, count: int = 1) -> int:
        """Replace the first `count` occurrences of `old` (a leading newline anchors it at column 0) in the cfg.

        Returns the 1-based line where the first replaced text starts.
        """
        text = self.cfg.read_text()
        assert old in text, old
        start = text.index(old) + len(old) - len(old.lstrip("\n"))
        line = text[:start].count("\n") + 1
        self.cfg.write_text(text.replace(old, new, count))
        return line


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step1 run of the residual CNN (and one of another model, in other/), copied by each test."""
    root = tmp_path_factory.mktemp("pristine")
    listing = models.residual_cnn_step1(root)
    (root / "other").mkdir()
    onnx.save(models.residual_cnn(seed=7), root / "other" / "cnn.onnx")
    hybridq.step1(root / "other" / "cnn.onnx", listing, out=root / "other" / "ws")
    return root


@pytest.fixture
def ws(pristine: Path, tmp_path: Path) -> Ws:
    root = tmp_path / "w"
    shutil.copytree(pristine, root)
    return Ws(root, root / "cnn.onnx", root / "data" / "dataset.txt", root / "ws")


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


# ---- model files -------------------------------------------------------------------------------------


def test_model_file_missing(ws, capsys):
    assert_clean(hq(capsys, "step1", ws.root / "nope.onnx", "--dataset", ws.dataset), USAGE, "nope.onnx", "does not exist")


def test_model_file_is_not_onnx(ws, capsys):
    bad = ws.root / "notes.onnx"
    bad.write_text("this is a README, not a model\n" * 20)
    assert_clean(hq(capsys, "step1", bad, "--dataset", ws.dataset), USAGE, "notes.onnx")


def test_model_file_is_a_directory(ws, capsys):
    assert_clean(hq(capsys, "step1", ws.root / "data", "--dataset", ws.dataset), USAGE, "data", "directory")


def test_a_path_too_long_for_the_file_system(ws, capsys):
    """A model path, or a dataset line of paths joined by commas, over the file system's name limit: exit 2 naming the
    path (and the list line), not an internal error."""
    assert_clean(hq(capsys, "step1", ws.root / ("m" * 300 + ".onnx"), "--dataset", ws.dataset), USAGE, "mmmmmmmm", "too long")
    line = ",".join(f"img_{i:04d}.png" for i in range(30))
    (ws.root / "commas.txt").write_text(line + "\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.root / "commas.txt"), USAGE, "line 1", "with spaces, not commas")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_model_file_truncated(ws, capsys, fraction):
    data = ws.model.read_bytes()
    cut = ws.root / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert_clean(hq(capsys, "step1", cut, "--dataset", ws.dataset), USAGE, "cut.onnx")


def test_model_with_invalid_graph_names_file_and_node(ws, capsys):
    # conv2 reads a tensor nobody produces.
    model = models.residual_cnn()
    model.graph.node[2].input[0] = "ghost"
    bad = ws.root / "broken.onnx"
    onnx.save(model, bad)
    assert_clean(hq(capsys, "step1", bad, "--dataset", ws.dataset), USAGE, "broken.onnx", "ghost")


def test_model_onnx_runtime_cannot_load(ws, capsys):
    # Valid protobuf and checker-clean, but an op from an unknown domain: ORT refuses it.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob", domain="com.example")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 7
    bad = ws.root / "custom_op.onnx"
    onnx.save(model, bad)
    assert_clean(hq(capsys, "step1", bad, "--dataset", ws.dataset), USAGE, "Frobnicate")


# ---- dataset lists -----------------------------------------------------------------------------------


def test_dataset_list_missing(ws, capsys):
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.root / "nolist.txt"), USAGE, "nolist.txt", "does not exist")


def test_dataset_list_empty(ws, capsys):
    empty = ws.root / "empty.txt"
    empty.write_text("# nothing yet\n\n   \n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", empty), USAGE, "empty.txt", "empty")


def test_dataset_list_names_a_missing_file_with_its_line(ws, capsys):
    listing = ws.root / "data" / "bad.txt"
    listing.write_text("# header\nx_0.npy\nx_1.npy\nx_99.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "bad.txt", "line 4", "x_99.npy")


@pytest.mark.parametrize("name, content", [("cat.jpg", b"not a jpeg at all"), ("dog.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                                            ("empty.bmp", b"")])
def test_dataset_unreadable_image_is_named_with_its_line(ws, capsys, name, content):
    (ws.root / "data" / name).write_bytes(content)
    listing = ws.root / "data" / "imgs.txt"
    listing.write_text(f"x_0.npy\n{name}\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, name, "line 2")


def test_dataset_file_of_unknown_kind_is_named(ws, capsys):
    (ws.root / "data" / "notes.txt").write_text("hello")
    listing = ws.root / "data" / "kinds.txt"
    listing.write_text("x_0.npy\nnotes.txt\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "notes.txt", "line 2", ".npy")


def test_dataset_line_that_is_a_directory_says_so(ws, capsys):
    # a directory has no extension: the message was "extension '(none)' ... convert the file", which misleads
    (ws.root / "data" / "more").mkdir()
    listing = ws.root / "data" / "dirs.txt"
    listing.write_text("x_0.npy\nmore\n")
    output = assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing, "--out", ws.root / "w6"), USAGE,
                          "dirs.txt", "line 2", "'more' is a directory", "list the files in it", "--dataset")
    assert "'(none)'" not in output and "Convert the file" not in output, output


def test_dataset_wrong_number_of_paths_per_line(ws, capsys):
    listing = ws.root / "data" / "pairs.txt"
    listing.write_text("x_0.npy\nx_1.npy x_2.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "pairs.txt", "line 2", "2 paths", "'x'")


def test_dataset_one_path_for_a_two_input_model(ws, capsys):
    model = ws.root / "two.onnx"
    onnx.save(models.two_input(), model)
    listing = models.write_npy_dataset(ws.root / "two", {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, 2)
    listing.write_text(listing.read_text() + "a_0.npy\n")
    assert_clean(hq(capsys, "step1", model, "--dataset", listing), USAGE, "line 4", "1 path", "'a', 'b'")


@pytest.mark.parametrize(
    "array, culprits",
    [
        (np.zeros((1, 3, 8, 8), np.float32), ["(1, 3, 8, 8)", "(1, 3, 16, 16)"]),
        (np.zeros((3, 16), np.float32), ["(3, 16)"]),
        (np.zeros((1, 3, 16, 16), np.int64), ["int64", "float32"]),
        (np.array(["a", "b"]), ["<U1", "float32"]),
    ],
    ids=["shape", "rank", "int64", "strings"],
)
def test_dataset_npy_wrong_shape_or_dtype(ws, capsys, array, culprits):
    np.save(ws.root / "data" / "odd.npy", array)
    listing = ws.root / "data" / "odd.txt"
    listing.write_text("x_0.npy\n\nodd.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "odd.npy", "line 3", *culprits)


@pytest.mark.parametrize("cores", [2, 4])  # 2: batches binned in the workers that ran them; 4: in the main thread
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dataset_npy_with_nan_or_inf(ws, capsys, monkeypatch, bad, cores):
    from hybridq import _runtime

    monkeypatch.setattr(_runtime, "cores", lambda: cores)
    sample = np.ones((1, 3, 16, 16), np.float32)
    sample[0, 1, 2, 3] = bad
    np.save(ws.root / "data" / "nan.npy", sample)
    listing = ws.root / "data" / "nan.txt"
    listing.write_text("x_0.npy\nnan.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "nan.npy", "line 2", "NaN or Inf")


def test_dataset_npz_wrong_key_and_corrupt_npy(ws, capsys):
    np.savez(ws.root / "data" / "wrong.npz", y=np.zeros((1, 3, 16, 16), np.float32))
    (ws.root / "data" / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    for name, culprit in (("wrong.npz", "'y'"), ("junk.npy", "junk.npy")):
        listing = ws.root / "data" / "l.txt"
        listing.write_text(f"{name}\n")
        assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, name, "line 1", culprit)


def test_dataset_pickled_npy_is_refused_without_running_it(ws, capsys):
    np.save(ws.root / "data" / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    listing = ws.root / "data" / "obj.txt"
    listing.write_text("obj.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "obj.npy", "pickle")


def test_dataset_list_lines_are_never_executed(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws.root)
    listing = ws.root / "data" / "shell.txt"
    listing.write_text("$(touch PWNED).npy\n`touch PWNED2`.npy\n")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", listing), USAGE, "touch PWNED")
    assert not list(ws.root.rglob("PWNED*"))


# ---- cfg ---------------------------------------------------------------------------------------------


def test_cfg_yaml_syntax_error_gives_line_and_column(ws, capsys):
    line = ws.edit_cfg("    dtype: uint8\n", "    dtype: uint8: int8\n")
    col = len("    dtype: uint8:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}:{col}", "YAML syntax error")


def test_cfg_unclosed_bracket_gives_a_line(ws, capsys):
    ws.edit_cfg("    min: [0.0]", "    min: [0.0")
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE, "YAML syntax error")
    assert re.search(r"cnn\.quantization\.cfg:\d+:\d+", out), out


def test_cfg_unknown_top_level_key_did_you_mean(ws, capsys):
    line = ws.edit_cfg("\nquantize_parameters:", "\nquantize_paramters:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", "quantize_paramters", "Did you mean", "'quantize_parameters'")


def test_cfg_unknown_entry_key_did_you_mean(ws, capsys):
    ws.edit_cfg("    ori_min:", "    ori_mni:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "ori_mni", "'ori_min'", "'r1'")


def test_cfg_unknown_setting_did_you_mean(ws, capsys):
    line = ws.edit_cfg("  weight_dtype:", "  weight_dtpye:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}:", "weight_dtpye", "'weight_dtype'")


def test_a_bad_setting_value_names_its_own_line(ws, capsys):
    """The error points at the setting's line, not at the `settings:` line some 20 lines above it."""
    text = ws.cfg.read_text()
    old = next(ln for ln in text.splitlines() if ln.startswith("  percentile:"))
    line = ws.edit_cfg(old, "  percentile: 40")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}:", "percentile 40", "outside")


def test_quantize_ops_typo_is_refused_in_the_cfg_and_in_hybridq_yaml(ws, capsys):
    """'Gem' for Gemm would leave every Gemm float in silence: refused, with the op type meant."""
    ws.edit_cfg("quantize_ops: [Conv, Gemm,", "quantize_ops: [Conv, Gem,")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "quantize_ops", "'Gem'", "Did you mean", "'Gemm'")
    (ws.root / "hybridq.yaml").write_text("quantize_ops: [Conv, Gem]\n")
    args = ["step1", ws.model, "--dataset", ws.dataset, "--out", ws.root / "again", "--config", ws.root / "hybridq.yaml"]
    assert_clean(hq(capsys, *args), USAGE, "quantize_ops", "'Gem'", "'Gemm'")
    assert not (ws.root / "again").exists()


def test_the_quantize_ops_settings_accept_are_the_op_types_the_targets_quantize():
    from hybridq.recurrent import RECURRENT
    from hybridq.settings import QUANTIZE_OP_TYPES
    from hybridq.targets import NPU_QUANTIZABLE

    assert set(QUANTIZE_OP_TYPES) == set(NPU_QUANTIZABLE) | set(RECURRENT)


def test_cfg_unknown_layer_did_you_mean(ws, capsys):
    ws.edit_cfg("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv22: float16")
    line = _line_of(ws.cfg, "conv22")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", "conv22", "Did you mean", "'conv2'")


def test_cfg_unknown_tensor_did_you_mean(ws, capsys):
    ws.edit_cfg("  r1:\n", "  r11:\n")
    line = _line_of(ws.cfg, "  r11:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", "r11", "Did you mean", "'r1'")


@pytest.mark.parametrize("name, what", [("true", "the boolean true"), ("FALSE", "the boolean false"), ("~", "null (no name)"),
                                        ("Null", "null (no name)")])
def test_cfg_layer_name_yaml_reads_as_a_boolean_or_null_says_to_quote_it(ws, capsys, name, what):
    # Was "entry 'True' is neither a node nor a tensor": the parsed value, not the name written. YAML 1.2 (ruamel) keeps
    # yes/no/on/off as names, so only true/false/null/~ (any case) are converted.
    ws.edit_cfg("custom_quantize_layers: {}", f"custom_quantize_layers:\n  conv1: int16\n  {name}: float32")
    line = _line_of(ws.cfg, f"  {name}: float32")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}: the custom_quantize_layers entry {name} is read "
                 f"by YAML as {what}, not as a name; quote the name ('{name}': float32)")
    ws.edit_cfg(f"  {name}: float32", "  yes: float32")  # a name: looked up as written
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "custom_quantize_layers entry 'yes' is neither a node nor a tensor")


def test_cfg_model_input_as_layer(ws, capsys):
    ws.edit_cfg("custom_quantize_layers: {}", "custom_quantize_layers:\n  x: float16")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "'x'", "model input")


@pytest.mark.parametrize(
    "old, new, culprits",
    [
        ("    dtype: uint8\n", "    dtype: uint9\n", ["uint9", "'r1'", "uint8, int8", "int16"]),
        ("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: fp8", ["fp8", "conv2", "float16", "float32"]),
        ("  dtype: uint8\n  qtype", "  dtype: uint4\n  qtype", ["uint4", "uint8, int8", "int16"]),
        ("  weight_dtype: int8", "  weight_dtype: int4", ["int4", "int8 or int16"]),
        ("  algorithm: minmax\n  percentile", "  algorithm: minmx\n  percentile", ["minmx", "'minmax'"]),
        ("  algorithm: minmax\n  percentile", "  algorithm: 42\n  percentile", ["algorithm 42", "minmax, percentile, kl, mse",
                                                                               "normal as minmax", "kl_divergence as kl", "mmse as mse"]),
    ],
    ids=["entry", "layer", "settings", "weight", "algorithm", "algorithm-rknn-names"],
)
def test_cfg_unknown_dtype_lists_the_allowed_ones(ws, capsys, old, new, culprits):
    ws.edit_cfg(old, new)
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, *culprits)


def test_cfg_min_greater_than_max(ws, capsys):
    line = _line_of(ws.cfg, "  r1:")
    ws.edit_cfg("    min: [0.0]", "    min: [100.0]")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", "'r1'", "100.0", "min <= max")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "'abc'", "[]", "true"])
def test_cfg_non_finite_or_non_number_min(ws, capsys, value):
    line = _line_of(ws.cfg, "  r1:")
    ws.edit_cfg("    min: [0.0]", f"    min: [{value}]" if value != "[]" else "    min: []")
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", "min", "'r1'")
    if value not in ("[]",):
        assert value.strip("'").lstrip("-.").lower()[:3] in out.lower(), out


@pytest.mark.parametrize("zp", ["300", "-1", "1.5", "'a'"])
def test_cfg_zero_point_out_of_range(ws, capsys, zp):
    ws.edit_cfg("    zero_point: [0]", f"    zero_point: [{zp}]")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "zero_point", "'r1'", zp.strip("'"))


def test_cfg_weight_zero_point_must_stay_zero(ws, capsys):
    # Weights are symmetric: a non-zero (or out of range) zero_point edit cannot be honoured, so it is refused, not ignored.
    text = ws.cfg.read_text()
    start = text.index("\n  w3:")
    ws.cfg.write_text(text[:start] + text[start:].replace("zero_point: [0,", "zero_point: [300,", 1))
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "zero_point", "'w3'", "300")
    ws.cfg.write_text(text[:start] + text[start:].replace("zero_point: [0,", "zero_point: [5,", 1))
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "zero_point", "'w3'", "symmetric")


def test_cfg_value_outside_float32(ws, capsys):
    ws.edit_cfg("    ori_max: [", "    ori_max: [1e300, ")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "ori_max", "'r1'", "1e+300", "float32")


def test_cfg_weight_min_greater_than_max_names_the_channel(ws, capsys):
    text = ws.cfg.read_text()
    start = text.index("\n  w3:")
    ws.cfg.write_text(text[:start] + re.sub(r"min: \[-?[0-9.e-]+,", "min: [9.5,", text[start:], count=1))
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "'w3'", "9.5", "channel 0")


def test_cfg_deleted_scale_and_zero_point_fall_back_to_the_statistics(ws, capsys):
    # Found by the property test below: an entry without scale/zero_point and nothing else edited.
    text = ws.cfg.read_text()
    start = text.index("\n  r1:")
    end = text.index("\n  r2:") if "\n  r2:" in text else len(text)
    block = re.sub(r"\n    (scale|zero_point): \[[^\]]*\]", "", text[start:end])
    ws.cfg.write_text(text[:start] + block + text[end:])
    assert_clean(hq(capsys, *ws.step2_args()), 0)


def test_cfg_zero_scale(ws, capsys):
    ws.edit_cfg("    scale: [", "    scale: [0.0, ")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "scale", "'r1'")


@pytest.mark.parametrize("scale, stored", [("1e-50", "stores as 0;"), ("1e-40", "stores as the subnormal 9.99995e-41")])
def test_cfg_scale_that_float32_stores_as_zero_or_subnormal_is_refused_at_its_line(ws, capsys, scale, stored):
    # 1e-50 built with exit 0 and a QuantizeLinear scale of 0.0 (float32 underflow); 1e-40 built a denormal scale.
    line = _line_of(ws.cfg, "  r1:")
    ws.edit_cfg("    scale: [", f"    scale: [{scale}]  # [")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}: 'r1' has a scale {scale}", stored,
                 "smallest normal float32")
    assert not (ws.root / "q.onnx").exists()


def test_cfg_not_a_mapping_and_empty(ws, capsys):
    ws.cfg.write_text("- just\n- a list\n")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "cnn.quantization.cfg", "mapping")
    ws.cfg.write_text("")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "cnn.quantization.cfg")


def test_cfg_not_utf8(ws, capsys):
    ws.cfg.write_bytes(b"\xff\xfe\x00garbage")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, "cnn.quantization.cfg")


def _duplicate_line(ws: Ws, after: str, prefix: str) -> tuple[int, int]:
    """Repeat the first line starting with `prefix` below the line `after`; returns (its line, the copy's line), 1-based."""
    lines = ws.cfg.read_text().splitlines(keepends=True)
    i = next(k for k in range(lines.index(after), len(lines)) if lines[k].startswith(prefix))
    ws.cfg.write_text("".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]))
    return i + 1, i + 2


def test_cfg_duplicate_field_names_the_key_the_entry_and_both_lines(ws, capsys):
    # ruamel's own message showed the number-list placeholders (`__hqlist8__`) and advised fixing indentation.
    first, second = _duplicate_line(ws, "  r1:\n", "    max:")
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE,
                       f"cnn.quantization.cfg:{second}: 'max' appears twice in the entry of 'r1' (lines {first} and {second}); keep one.")
    assert "__hq" not in out and "indentation" not in out, out


def test_cfg_duplicate_tensor_entry_names_both_lines_without_a_dump(ws, capsys):
    text = ws.cfg.read_text()
    lines = text.splitlines(keepends=True)
    start = lines.index("  r1:\n")
    end = next(k for k in range(start + 1, len(lines)) if re.match(r"  [^ #]", lines[k]))
    ws.cfg.write_text(text + "".join(lines[start:end]))
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE,
                       f"'r1' appears twice in quantize_parameters (lines {start + 1} and {len(lines) + 1}); keep one.")
    assert "__hq" not in out and "{" not in out, out


def test_cfg_duplicate_layer_names_both_lines(ws, capsys):
    line = ws.edit_cfg("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: float16\n  conv2: float32")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE,
                 f"cnn.quantization.cfg:{line + 2}: 'conv2' appears twice in custom_quantize_layers (lines {line + 1} and {line + 2})")


def test_cfg_entries_below_empty_braces_say_remove_the_braces(ws, capsys):
    # step1 writes `custom_quantize_layers: {}`; adding a line below it without deleting `{}` is the likeliest first edit.
    line = ws.edit_cfg("custom_quantize_layers: {}", "custom_quantize_layers: {}  # none yet\n  conv2: float32")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line + 1}:3",
                 "remove the '{}' after 'custom_quantize_layers:' when you add entries below it")


def test_cfg_indented_top_level_key_is_named(ws, capsys):
    line = ws.edit_cfg("\nquantize_parameters:", "\n quantize_parameters:")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}:2",
                 "top-level key 'quantize_parameters:' is indented by 1 space", "remove the indentation")


def test_cfg_line_indented_under_a_value_is_named(ws, capsys):
    first, second = _duplicate_line(ws, "  r1:\n", "    max:")
    lines = ws.cfg.read_text().splitlines(keepends=True)
    lines[second - 1] = "  " + lines[second - 1].replace("max:", "min:")
    ws.cfg.write_text("".join(lines))
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{second}",
                 f"indented deeper than line {first}, which already has a value")


@pytest.mark.parametrize("quote", ['"', "'"])
def test_cfg_unclosed_quote_names_the_line_where_it_starts(ws, capsys, quote):
    # ruamel reports the end of the file, where it gave up; the user needs the line the string starts on.
    line = ws.edit_cfg("custom_quantize_layers: {}", f"custom_quantize_layers:\n  conv2: {quote}float32")
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line + 1}:10", "never closed",
                       f"add the closing {quote}")
    assert not re.search(rf"cfg:{len(ws.cfg.read_text().splitlines()) + 1}:", out), out


@pytest.mark.parametrize("text, what", [("", "is empty"), ("  \n\n\t\n", "is empty"), ("# only\n# comments\n", "is empty"),
                                        ("- a\n- b\n", "is a YAML list"), ("hello\n", "is a single value")],
                         ids=["empty", "blank", "comments", "list", "scalar"])
def test_cfg_empty_or_not_a_mapping_says_what_to_do(ws, capsys, text, what):
    ws.cfg.write_text(text)
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg: the cfg {what}", "re-run step1")
    assert "NoneType" not in out and "CommentedSeq" not in out, out
    bak = ws.cfg.with_name(ws.cfg.name + ".20260101-000000.bak")
    bak.write_text("settings: {}\n")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"restore it from '{bak}'")


def test_cfg_non_utf8_byte_names_its_line_and_column(ws, capsys):
    lines = ws.cfg.read_bytes().split(b"\n")
    lines.insert(2, "# café".encode("latin-1"))
    ws.cfg.write_bytes(b"\n".join(lines))
    out = assert_clean(hq(capsys, *ws.step2_args()), USAGE, "cnn.quantization.cfg:3:6: byte 0xe9", "save the file as UTF-8")
    assert "position" not in out, out


@pytest.mark.parametrize("name, reader", [("w3", "conv3"), ("fc_b", "fc")])
def test_cfg_weight_as_layer_names_the_layer_that_reads_it(ws, capsys, name, reader):
    ws.edit_cfg("custom_quantize_layers: {}", f"custom_quantize_layers:\n  {name}: float32")
    line = _line_of(ws.cfg, f"  {name}: float32")
    assert_clean(hq(capsys, *ws.step2_args()), USAGE, f"cnn.quantization.cfg:{line}", f"'{name}' is a weight",
                 f"name the layer that reads it ({reader})")


@pytest.mark.parametrize(
    "payload",
    [
        'custom_quantize_layers: !!python/object/apply:os.system ["touch PWNED"]\n',
        'custom_quantize_layers:\n  conv2: !!python/object/apply:os.system ["touch PWNED"]\n',
        'quantize_parameters:\n  r1:\n    min: !!python/object/apply:os.system ["touch PWNED"]\n',
        'settings: !!python/object/new:os.system ["touch PWNED"]\n',
        'hybridq: !!python/object/apply:os.system ["touch PWNED"]\n',
        '!!python/object/apply:os.system ["touch PWNED"]\n',
    ],
)
def test_cfg_loading_never_executes_code(ws, capsys, monkeypatch, payload):
    monkeypatch.chdir(ws.root)
    ws.cfg.write_text(payload)
    status, output = hq(capsys, *ws.step2_args())
    assert status in (0, USAGE) and "Traceback" not in output and "internal error" not in output, output
    assert not list(ws.root.rglob("PWNED"))
    assert not Path("PWNED").exists()


# ---- step1 artifacts ---------------------------------------------------------------------------------


def test_mixed_artifacts_name_the_data_file(ws, capsys):
    m, _, c = ws.artifacts
    other = ws.root / "other" / "ws" / "cnn.data"
    assert_clean(hq(capsys, "step2", m, other, c, "-o", ws.root / "q.onnx"), USAGE, str(other), "different step1 runs")


def test_mixed_artifacts_name_the_model_file(ws, capsys):
    _, d, c = ws.artifacts
    other = ws.root / "other" / "ws" / "cnn.model"
    assert_clean(hq(capsys, "step2", other, d, c, "-o", ws.root / "q.onnx"), USAGE, str(other), "different step1 runs")


def test_mixed_artifacts_name_the_cfg(ws, capsys):
    m, d, _ = ws.artifacts
    other = ws.root / "other" / "ws" / "cnn.quantization.cfg"
    assert_clean(hq(capsys, "step2", m, d, other, "-o", ws.root / "q.onnx"), USAGE, str(other))
    assert not (ws.root / "q.onnx").exists()


def test_cfg_without_its_header_is_matched_by_its_weight_ranges_and_said_so(ws, capsys):
    # Without the hybridq: header, step2 skipped the check that the cfg belongs to the model, in silence: the cfg of
    # another model with the same tensor names built.
    other = ws.root / "other" / "ws" / "cnn.quantization.cfg"
    foreign = ws.root / "foreign.cfg"
    foreign.write_text(re.sub(r"^hybridq:\n(?:  .*\n)*", "", other.read_text(), flags=re.M))
    line = _line_of(foreign, "  ConvBnFusion_W_w2:")
    assert_clean(hq(capsys, *ws.step2_args(foreign)), USAGE, f"foreign.cfg:{line}: the cfg has no hybridq: header, and weight "
                 "'ConvBnFusion_W_w2' records ori_min [", "the cfg was written for another model")
    assert not (ws.root / "q.onnx").exists()
    ws.cfg.write_text(re.sub(r"^hybridq:\n(?:  .*\n)*", "", ws.cfg.read_text(), flags=re.M))  # its own cfg: built, and said
    assert_clean(hq(capsys, *ws.step2_args()), 0, "cnn.quantization.cfg: the cfg has no hybridq: header, so step2 cannot check "
                 "that it was written for", "(only the ranges its weight entries record were compared with the model's)")


def test_step2_given_the_original_model_or_a_foreign_data_file(ws, capsys):
    _, d, c = ws.artifacts
    assert_clean(hq(capsys, "step2", ws.model, d, c, "-o", ws.root / "q.onnx"), USAGE, str(ws.model))
    m, _, _ = ws.artifacts
    assert_clean(hq(capsys, "step2", m, ws.root / "data" / "x_0.npy", c, "-o", ws.root / "q.onnx"), USAGE, "x_0.npy")
    assert_clean(hq(capsys, "step2", m, ws.root / "missing.data", c, "-o", ws.root / "q.onnx"), USAGE, "missing.data")
    assert_clean(hq(capsys, "step2", ws.root / "missing.model", d, c, "-o", ws.root / "q.onnx"), USAGE, "missing.model")
    assert_clean(hq(capsys, "step2", m, d, ws.root / "missing.cfg", "-o", ws.root / "q.onnx"), USAGE, "missing.cfg")
    assert not (ws.root / "q.onnx").exists()


def test_step1_keeps_an_edited_cfg_as_bak_and_says_so(ws, capsys):
    ws.edit_cfg("    min: [0.0]", "    min: [-1.0]")
    edited = ws.cfg.read_text()
    out = assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.out), 0)
    baks = list(ws.out.glob("cnn.quantization.cfg.*.bak"))
    assert len(baks) == 1 and baks[0].read_text() == edited
    assert baks[0].name in out
    # An unedited cfg is replaced without a backup.
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.out), 0)
    assert len(list(ws.out.glob("*.bak"))) == 1


# ---- outputs -----------------------------------------------------------------------------------------


def test_output_under_a_regular_file(ws, capsys):
    blocker = ws.root / "somefile"
    blocker.write_text("I am a file")
    out = ws.root / "somefile" / "q.onnx"
    assert_clean(hq(capsys, *ws.step2_args(output=out)), USAGE, "somefile", "not a directory")
    assert blocker.read_text() == "I am a file"
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", blocker / "ws"), USAGE, "somefile", "not a directory")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", blocker), USAGE, "somefile", "not a directory")
    for dump in (blocker, blocker / "snap"):
        assert_clean(hq(capsys, "analyze", ws.model, ws.cfg, "--dataset", ws.dataset, "--dump", dump), USAGE, "somefile", "--dump")
    assert_clean(hq(capsys, "init", blocker), USAGE, "somefile", "not a directory")
    assert blocker.read_text() == "I am a file"
    assert no_staging_left(ws.root) == []


def test_output_directory_not_writable_exits_2(ws, capsys, monkeypatch):
    # Root may write anywhere, so the permission check (os.access) is what this test drives.
    locked = ws.root / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK else real(p, mode, **kw))
    assert_clean(hq(capsys, *ws.step2_args(output=locked / "q.onnx")), USAGE, "locked", "not writable")
    assert_clean(hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", locked / "ws"), USAGE, "locked", "not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 2, 1), (2, 0, 1)], ids=["data-model", "cfg-data", "rotated"])
def test_step2_arguments_out_of_order_say_which_file_went_where(ws, capsys, order):
    files = [ws.artifacts[i] for i in order]
    out = assert_clean(hq(capsys, "step2", *files, "-o", ws.root / "q.onnx"), USAGE, "MODEL DATA CFG", "out of order")
    assert "zip" not in out
    kinds = {0: "the ONNX model", 1: "the data file", 2: "the cfg"}
    slots = {0: "where the model", 1: "where the data file", 2: "where the cfg"}
    for slot, i in enumerate(order):
        if slot != i:
            assert f"{kinds[i]} '{ws.artifacts[i]}' {slots[slot]}" in out, out
    assert not (ws.root / "q.onnx").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_directory_without_write_permission(ws, capsys):
    locked = ws.root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_clean(hq(capsys, *ws.step2_args(output=locked / "q.onnx")), USAGE, "locked", "not writable")
    finally:
        locked.chmod(0o700)


def test_output_is_an_existing_directory(ws, capsys):
    target = ws.root / "adir.onnx"
    target.mkdir()
    assert_clean(hq(capsys, *ws.step2_args(output=target)), USAGE, "adir.onnx", "is a directory", str(target / "cnn.q.onnx"))
    assert target.is_dir() and list(target.iterdir()) == []


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_on_rename_step2_leaves_no_output(ws, capsys, monkeypatch):
    monkeypatch.setattr(os, "replace", _enospc)
    status, output = hq(capsys, *ws.step2_args())
    assert_clean((status, output), status, "q.onnx", "No space left on device")
    assert status in (USAGE, FAILURE)
    assert not (ws.root / "q.onnx").exists() and no_staging_left(ws.root) == []


def test_disk_full_while_writing_step2_leaves_no_output(ws, capsys, monkeypatch):
    real_save = onnx.save_model

    def half_then_full(model, f, *args, **kwargs):
        Path(f).write_bytes(model.SerializeToString()[:100])
        _enospc()

    monkeypatch.setattr(onnx, "save_model", half_then_full)
    status, output = hq(capsys, *ws.step2_args())
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert_clean((status, output), status, "q.onnx", "No space left on device")
    assert status in (USAGE, FAILURE)
    assert not (ws.root / "q.onnx").exists() and no_staging_left(ws.root) == []


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_disk_full_while_publishing_step1_keeps_earlier_artifacts(ws, capsys, monkeypatch, fail_at):
    before = _snapshot(ws.out)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            _enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # A different model: every artifact would change, so a partial publish would show.
    onnx.save(models.residual_cnn(seed=11), ws.model)
    status, output = hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert_clean((status, output), status, "No space left on device")
    assert status in (USAGE, FAILURE)
    assert _snapshot(ws.out) == before
    assert no_staging_left(ws.root) == []


def test_disk_full_while_writing_step1_keeps_earlier_artifacts(ws, capsys, monkeypatch):
    before = _snapshot(ws.out)
    real_save = onnx.save_model

    def full_in_out_dir(model, f, *args, **kwargs):
        if Path(f).parent.parent != ws.out:
            return real_save(model, f, *args, **kwargs)
        Path(f).write_bytes(b"half a model")
        _enospc()

    monkeypatch.setattr(onnx, "save_model", full_in_out_dir)
    onnx.save(models.residual_cnn(seed=11), ws.model)
    status, output = hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.out)
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert_clean((status, output), status, "No space left on device", str(ws.out))
    assert status in (USAGE, FAILURE)
    assert _snapshot(ws.out) == before and no_staging_left(ws.root) == []


def test_disk_full_in_the_temp_directory(ws, capsys, monkeypatch):
    # Preparation hands the model to ONNX Runtime through a temp file: a full /tmp is named, not a crash.
    def full(*_args, **_kwargs):
        _enospc()

    from hybridq import graph

    monkeypatch.setattr(onnx, "save_model", full)  # a large model's copy
    monkeypatch.setattr(graph, "open", full, raising=False)  # a small model's bytes, written as they were serialized
    status, output = hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.root / "new")
    assert_clean((status, output), status, "No space left on device", "TMPDIR")
    assert status in (USAGE, FAILURE)


@pytest.mark.parametrize("interrupt_at", [1, 2, 3])
def test_interrupt_while_publishing_step1_keeps_earlier_artifacts(ws, capsys, monkeypatch, interrupt_at):
    # Ctrl-C between two renames must not leave a .model of one run beside the .data of another.
    before = _snapshot(ws.out)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    onnx.save(models.residual_cnn(seed=11), ws.model)
    status, output = hq(capsys, "step1", ws.model, "--dataset", ws.dataset, "--out", ws.out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _snapshot(ws.out) == before
    assert status == 130 and "Traceback" not in output and "interrupted" in output, output
    assert no_staging_left(ws.root) == []
    # The earlier artifacts still build a model.
    assert_clean(hq(capsys, *ws.step2_args()), 0)


# ---- analyze -----------------------------------------------------------------------------------------


def test_analyze_bad_inputs_are_named(ws, capsys):
    hybridq.step2(*ws.artifacts, ws.root / "q.onnx")
    q = ws.root / "q.onnx"
    assert_clean(hq(capsys, "analyze", ws.root / "nope.onnx", q, "--dataset", ws.dataset), USAGE, "nope.onnx")
    assert_clean(hq(capsys, "analyze", ws.model, ws.root / "noq.onnx", "--dataset", ws.dataset), USAGE, "noq.onnx")
    assert_clean(hq(capsys, "analyze", ws.model, q, "--dataset", ws.root / "none.txt"), USAGE, "none.txt")
    assert_clean(hq(capsys, "analyze", ws.model, q), USAGE, "--dataset")
    blocker = ws.root / "blocker"
    blocker.write_text("")
    status, output = hq(capsys, "analyze", ws.model, q, "--dataset", ws.dataset, "--dump", blocker / "snap")
    assert_clean((status, output), status, "blocker")
    assert status in (USAGE, FAILURE)


def test_analyze_swapped_models_and_samples_the_model_cannot_run_are_usage_errors(ws, capsys):
    hybridq.step2(*ws.artifacts, ws.root / "q.onnx")
    q = ws.root / "q.onnx"
    assert_clean(hq(capsys, "analyze", q, ws.model, "--dataset", ws.dataset), USAGE, "other way round")
    # the quantized model twice: measured against a quantized reference it read "OK, cos 1.0"
    assert_clean(hq(capsys, "analyze", q, q, "--dataset", ws.dataset, "--strict"), USAGE, "fp32 model step1 was given")
    # a model with free input dims that runs on 16x16 only (a Reshape to 3 x 256): 20x20 samples pass the loader
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array([1, 3, 256], np.int64), "shape"),
             numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (256, 4)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "fixed_reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], inits)
    path = ws.root / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = hybridq.step1(path, ws.dataset, out=ws.root / "rws", settings={"speed_check": False})
    rq = hybridq.step2(r.model, r.data, r.cfg, ws.root / "rq.onnx").output
    wrong = models.write_npy_dataset(ws.root / "wrong", {"x": (1, 3, 20, 20)}, 2)
    assert_clean(hq(capsys, "analyze", path, rq, "--dataset", wrong), USAGE, "float model itself fails on the first sample", "x [1, 3, 20, 20]")


# ---- property tests: random cfg edits and dataset lists never crash ------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["uint8", "int8", "int16", "float16", "float32", "fp8", "asym", "sym", "layer",
                                           "channel", "kl", "mse", "percentile", "conv2", "r1", "w2", "fc", "x"]),
)
_values = st.one_of(
    _scalars, st.lists(_scalars, max_size=4),
    st.dictionaries(st.text(max_size=8), st.one_of(_scalars, st.lists(_scalars, max_size=3)), max_size=3),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data) -> object:
    """One random edit of a parsed cfg: delete, replace a value, rename a key, add a key, or nudge a number."""
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return data.draw(_values)
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "rename", "add", "nudge"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(_values)
    elif op == "rename" and isinstance(parent, dict):
        new = data.draw(st.one_of(st.text(max_size=10), st.just(str(key)[:-1]), st.just(str(key) + "x"), st.integers()))
        parent[new] = parent.pop(key)
    elif op == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10))] = data.draw(_values)
    elif isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * data.draw(st.sampled_from([-1, 0, 0.5, 2, 1e6, 1e300])) + data.draw(st.integers(-300, 300))
    return doc


def _dump(doc) -> str:
    import io

    buf = io.StringIO()
    YAML(typ="safe", pure=True).dump(doc, buf)
    return buf.getvalue()


def _cfg_property(pristine_ws: Ws, capsys, data) -> None:
    yaml = YAML(typ="safe", pure=True)
    doc = yaml.load(pristine_ws.cfg.read_text())
    for _ in range(data.draw(st.integers(1, 4))):
        doc = _mutate(doc, data)
    text = _dump(doc)
    if data.draw(st.booleans()):
        # A raw text edit too: drop a line or insert characters somewhere.
        lines = text.splitlines(keepends=True)
        i = data.draw(st.integers(0, max(0, len(lines) - 1)))
        if data.draw(st.booleans()) and lines:
            del lines[i]
        else:
            lines.insert(i, data.draw(st.text(alphabet=string.printable, max_size=20)))
        text = "".join(lines)
    cfg = pristine_ws.root / "mutated.quantization.cfg"
    out = pristine_ws.root / "mutated.q.onnx"
    cfg.write_text(text)
    if out.exists():
        out.unlink()
    status, output = hq(capsys, *pristine_ws.step2_args(cfg=cfg, output=out))
    assert status in (0, USAGE), f"{output}\n--- cfg ---\n{text}"
    assert "Traceback" not in output and "internal error" not in output, f"{output}\n--- cfg ---\n{text}"
    assert out.exists() == (status == 0)


@pytest.fixture(scope="module")
def shared_ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Ws:
    root = tmp_path_factory.mktemp("shared") / "w"
    shutil.copytree(pristine, root)
    return Ws(root, root / "cnn.onnx", root / "data" / "dataset.txt", root / "ws")


_PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=30, **_PROPERTY)
@given(data=st.data())
def test_random_cfg_edits_give_success_or_a_clean_error(shared_ws, capsys, data):
    _cfg_property(shared_ws, capsys, data)


@pytest.mark.slow
@settings(max_examples=1000, **_PROPERTY)
@given(data=st.data())
def test_random_cfg_edits_give_success_or_a_clean_error_1000(shared_ws, capsys, data):
    _cfg_property(shared_ws, capsys, data)


_TOKENS = st.one_of(
    st.sampled_from(["x_0.npy", "x_1.npy", "x_2.npy", "x_3.npy", "odd.npy", "nan.npy", "int.npy", "junk.npy", "cat.jpg",
                     "gray.png", "missing.npy", "data.npz", "../data/x_0.npy", "#", "# comment", ".", "..", "sub",
                     "x_0.NPY", "notes.txt", "\t", "x_0.npy#c", "/dev/null", "/", "~", "$(touch PWNED).npy"]),
    st.text(max_size=15),
)


def _dataset_property(root: Path, model: Path, capsys, data) -> None:
    lines = data.draw(st.lists(st.lists(_TOKENS, max_size=3).map(" ".join), max_size=6))
    listing = root / "random.txt"
    if data.draw(st.booleans()):
        listing.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    else:
        listing.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + data.draw(st.binary(max_size=8)))
    out = root / "out"
    status, output = hq(capsys, "step1", model, "--dataset", listing, "--out", out, "--samples", "3")
    assert status in (0, USAGE), f"{output}\n--- list ---\n{lines}"
    assert "Traceback" not in output and "internal error" not in output, f"{output}\n--- list ---\n{lines}"
    assert not list(root.rglob("PWNED"))


@pytest.fixture(scope="module")
def dataset_zoo(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset directory plus a sample of every bad kind, for random lists to pick from."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(pristine / "data", root / "data")
    shutil.copy(pristine / "cnn.onnx", root / "data" / "cnn.onnx")
    d = root / "data"
    np.save(d / "odd.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(d / "nan.npy", np.full((1, 3, 16, 16), np.nan, np.float32))
    np.save(d / "int.npy", np.zeros((1, 3, 16, 16), np.int32))
    (d / "junk.npy").write_bytes(b"junk")
    (d / "cat.jpg").write_bytes(b"not a jpeg")
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "gray.png")
    np.savez(d / "data.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    (d / "notes.txt").write_text("hi")
    (d / "sub").mkdir()
    return d


@settings(max_examples=30, **_PROPERTY)
@given(data=st.data())
def test_random_dataset_lists_give_success_or_a_clean_error(dataset_zoo, capsys, data):
    _dataset_property(dataset_zoo, dataset_zoo / "cnn.onnx", capsys, data)


@pytest.mark.slow
@settings(max_examples=1000, **_PROPERTY)
@given(data=st.data())
def test_random_dataset_lists_give_success_or_a_clean_error_1000(dataset_zoo, capsys, data):
    _dataset_property(dataset_zoo, dataset_zoo / "cnn.onnx", capsys, data)


@pytest.mark.slow
def test_model_over_2_gb_round_trips_through_external_data(tmp_path):
    """A 2.1 GB Gemm weight: step1 and step2 must go through ONNX external data, and the result must run."""
    import onnx
    from onnx import TensorProto, helper

    import hybridq

    k = 33_554_432  # 16 x k float32 = 2.1 GB
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, k), dtype=np.float32)
    # The weight goes straight to the external file: protobuf cannot hold a > 2 GB message, even briefly.
    w.tofile(tmp_path / "big.onnx.data")
    init = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(w.shape), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(w.nbytes))):
        init.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, tmp_path / "big.onnx")
    del model, graph
    data = tmp_path / "d"
    data.mkdir()
    x = rng.standard_normal((1, k), dtype=np.float32)
    np.save(data / "0.npy", x)
    (data / "dataset.txt").write_text("0.npy\n")
    r1 = hybridq.step1(tmp_path / "big.onnx", data / "dataset.txt", out=tmp_path / "ws")
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx.data").exists() or r2.size_quant < 2**31
    import onnxruntime as ort

    y = ort.InferenceSession(str(r2.output), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ w.T
    assert float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref))) > 0.99


def test_an_output_dir_where_nothing_can_be_created_is_an_input_error(tmp_path, monkeypatch):
    """access() passes for root on read-only and virtual file systems (/proc): the check creates an entry to know."""
    import errno

    from hybridq import _fs
    from hybridq.errors import InputError

    def refuse(**kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_fs.tempfile, "mkdtemp", refuse)
    with pytest.raises(InputError, match=r"'.*out' cannot be written: nothing can be created in '.*' \(Read-only file system\)"):
        _fs.check_output_dir(tmp_path / "out", "step1 output directory (--out)")


def test_analyze_from_a_snapshot_into_a_file_is_a_usage_error(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_clean(hq(capsys, "analyze", "--from", tmp_path, "--dump", afile), USAGE, "afile", "is a file, not a directory")


def test_option_values_that_do_nothing_or_make_no_sense_are_usage_errors(capsys, tmp_path):
    """--top -1 and --max-float-layers -1 were accepted; --max-drop without --eval was ignored."""
    code, text = hq(capsys, "analyze", "--from", tmp_path, "--top", "-1")
    assert code == USAGE and "--top" in text
    model = tmp_path / "m.onnx"
    onnx.save(models.residual_cnn(), model)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 3, 16, 16)}, 2)
    code, text = hq(capsys, "step1", model, "--dataset", listing, "--out", tmp_path / "ws", "--proposal", "--max-float-layers", "-1")
    assert code == USAGE and "--max-float-layers" in text
    assert_clean(hq(capsys, "step1", model, "--dataset", listing, "--out", tmp_path / "ws", "--proposal", "--max-drop", "0.02"),
                 USAGE, "--max-drop 0.02", "--eval")
    (tmp_path / "myeval.py").write_text("def evaluate(path):\n    return 1.0\n")
    assert_clean(hq(capsys, "step1", model, "--dataset", listing, "--out", tmp_path / "ws", "--proposal", "--eval", tmp_path / "myeval.py"),
                 USAGE, "myeval.py' names no function", "path/to/module.py:function")  # was "Empty module name"


@pytest.mark.parametrize("extra, named", [(["m.onnx", "q.onnx"], "FLOAT_MODEL, QUANT_MODEL"), (["--samples", "3", "--runtime", "cpu"], "--samples, --runtime"),
                                          (["--mean", "1,2,3", "--workers", "2"], "--mean/--std/--layout/--preprocess-hook, --workers")])
def test_analyze_from_refuses_the_options_of_a_run_it_does_not_make(capsys, tmp_path, extra, named):
    """--from re-reads a snapshot: model arguments and run options were silently ignored."""
    args = [*extra[:2], "--from", tmp_path] if extra[0].endswith(".onnx") else ["--from", tmp_path, *extra]
    assert_clean(hq(capsys, "analyze", *args), USAGE, f"--from re-reads the snapshot '{tmp_path}'", f"so {named} would do nothing")


def test_propose_without_a_cfg_or_with_a_negative_max_drop_is_a_usage_error(capsys, cnn_ws):
    """Omitting --cfg named '.' as the cfg ("cfg '.' is not a regular file"); --max-drop -1 was accepted."""
    code, _, err = run_cli(capsys, "propose", "--dataset", cnn_ws["dataset"])
    assert code == 2 and "propose needs --cfg" in err and "'.'" not in err
    code, _, err = run_cli(capsys, "propose", "--cfg", cnn_ws["dir"] / "x.cfg", "--dataset", cnn_ws["dataset"],
                           "--eval", "m.py:f", "--max-drop", "-1")
    assert code == 2 and "--max-drop -1.0" in err and "Traceback" not in err
