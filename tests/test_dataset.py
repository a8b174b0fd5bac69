"""Dataset sources, list parsing, image preprocessing and every user-error message of hybridq.dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from hybridq.dataset import InputSpec, Preprocess, input_specs, load_dataset, parse_floats
from hybridq.errors import DatasetError, ExitCode, ModelError

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _spec(shape: tuple, name: str = "x", dtype: type = np.float32) -> InputSpec:
    return InputSpec(name, shape, np.dtype(dtype))


def _rgb(h: int = 4, w: int = 5) -> np.ndarray:
    """A deterministic HxWx3 uint8 image with distinct values per pixel and channel."""
    return ((np.arange(h * w * 3).reshape(h, w, 3) * 7) % 256).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(fn, *args, **kwargs) -> str:
    """Run fn, assert it raises DatasetError (exit code 2), return the message."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == ExitCode.USAGE
    return str(info.value)


# ---- input_specs -----------------------------------------------------------------------------------


def test_input_specs_skips_initializers_and_keeps_symbolic_dims() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None, 8])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 7])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g", [x, w, ids], [out],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])],
    )
    specs = input_specs(helper.make_model(graph))
    assert specs == [
        InputSpec("x", ("batch", 3, None, 8), np.dtype(np.float32)),
        InputSpec("ids", (1, 7), np.dtype(np.int64)),
    ]


def test_input_specs_refuses_non_tensor_inputs() -> None:
    seq = helper.make_value_info("seq", helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SequenceAt", ["seq", "i"], ["y"])], "g", [seq], [out],
                              initializer=[helper.make_tensor("i", TensorProto.INT64, [], [0])])
    with pytest.raises(ModelError, match="'seq'"):
        input_specs(onnx.ModelProto(graph=graph))


# ---- options -------------------------------------------------------------------------------------


def test_parse_floats_accepts_commas_spaces_and_brackets() -> None:
    assert parse_floats("123.675,116.28,103.53", "--mean") == MEAN
    assert parse_floats(" [1, 2 3] ", "--std") == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("text, culprit", [("1,abc,3", "'abc'"), ("", "empty"), ("1,,2", "''"), ("inf", "'inf'")])
def test_parse_floats_names_the_option_and_the_junk(text: str, culprit: str) -> None:
    message = _error(parse_floats, text, "--mean")
    assert "--mean" in message and culprit in message


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"color": "rbg"}, "'rbg'"),
        ({"resize": "crop"}, "letterbox"),
        ({"layout": "chw"}, "nchw"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"mean": "1,x"}, "'x'"),
        ({"hook": "nocolon"}, "'nocolon'"),
        ({"hook": "h.py:f", "mean": (1.0,)}, "mean"),
    ],
)
def test_preprocess_refuses_bad_options(kwargs: dict, culprit: str) -> None:
    assert culprit in _error(Preprocess, **kwargs)


def test_preprocess_normalises_case_and_text_values() -> None:
    pre = Preprocess(mean="1,2,3", std=[4, 5, 6], color="BGR", layout="NHWC", resize="Stretch")
    assert pre == Preprocess(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), color="bgr", layout="nhwc", resize="stretch")


# ---- image preprocessing --------------------------------------------------------------------------


def _one(tmp_path: Path, image: np.ndarray, spec: InputSpec, pre: Preprocess | None = None, name: str = "a.png") -> np.ndarray:
    """Preprocess a single image file through a one-line list file."""
    _save(tmp_path / name, image)
    data = load_dataset(_write(tmp_path / "list.txt", name), [spec], pre)
    return data.sample(0)[spec.name]


def test_rgb_mean_std_nchw_matches_numpy(tmp_path: Path) -> None:
    image = _rgb()
    got = _one(tmp_path, image, _spec((1, 3, 4, 5)), Preprocess(mean=MEAN, std=STD))
    want = ((image.astype(np.float64) - MEAN) / STD).transpose(2, 0, 1)[None]
    assert got.dtype == np.float32 and got.shape == (1, 3, 4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bgr_nhwc_reverses_channels_before_mean(tmp_path: Path) -> None:
    image = _rgb()
    got = _one(tmp_path, image, _spec((1, 4, 5, 3)), Preprocess(mean=(10.0, 20.0, 30.0), std=(2.0,), color="bgr"))
    want = ((image[..., ::-1].astype(np.float64) - (10, 20, 30)) / 2.0)[None]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_explicit_layout_overrides_inference(tmp_path: Path) -> None:
    # (1, 3, 4, 3) would infer NCHW; the user says NHWC with H=3, W=4.
    image = _rgb(3, 4)
    got = _one(tmp_path, image, _spec((1, 3, 4, 3)), Preprocess(layout="nhwc"))
    np.testing.assert_array_equal(got, image[None].astype(np.float32))


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    got = _one(tmp_path, gray, _spec((1, 3, 4, 5)))
    np.testing.assert_array_equal(got[0], np.stack([gray] * 3).astype(np.float32))


def test_grayscale_stays_one_channel_for_a_one_channel_model(tmp_path: Path) -> None:
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    got = _one(tmp_path, gray, _spec((1, 1, 4, 5)), Preprocess(mean=(1.0,)))
    np.testing.assert_array_equal(got, gray[None, None].astype(np.float32) - 1)


def test_colour_becomes_luma_for_a_one_channel_model(tmp_path: Path) -> None:
    image = _rgb()
    got = _one(tmp_path, image, _spec((1, 4, 5, 1)))
    want = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(got[0, ..., 0], want, rtol=1e-5)


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    image = _rgb()
    rgba = np.concatenate([image, np.zeros((4, 5, 1), np.uint8)], axis=2)
    got = _one(tmp_path, rgba, _spec((1, 4, 5, 3)))
    np.testing.assert_array_equal(got[0], image.astype(np.float32))


def test_palette_with_transparency_becomes_rgb(tmp_path: Path) -> None:
    palette = Image.new("P", (5, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    data = load_dataset(_write(tmp_path / "list.txt", "p.png"), [_spec((1, 3, 4, 5))])
    got = data.sample(0)["x"][0]
    np.testing.assert_array_equal(got[:, 0, 0], [10, 20, 30])


def test_sixteen_bit_png_is_scaled_by_257(tmp_path: Path) -> None:
    deep = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    got = _one(tmp_path, deep, _spec((1, 1, 4, 5)))
    np.testing.assert_allclose(got[0, 0], deep / 257.0, rtol=1e-6)


def test_bmp_is_lossless_and_jpg_decodes(tmp_path: Path) -> None:
    image = _rgb()
    np.testing.assert_array_equal(_one(tmp_path, image, _spec((1, 4, 5, 3)), name="a.bmp")[0], image)
    jpg = _one(tmp_path, image, _spec((1, 3, 4, 5)), name="a.JPG")
    assert jpg.shape == (1, 3, 4, 5) and jpg.dtype == np.float32


def test_uint8_model_input_gets_raw_pixels(tmp_path: Path) -> None:
    image = _rgb()
    got = _one(tmp_path, image, _spec((1, 4, 5, 3), dtype=np.uint8))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], image)


def _png16_rgb(path: Path, values: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_colour_png_keeps_the_high_byte_with_a_note(tmp_path: Path) -> None:
    values = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(np.uint16)
    _png16_rgb(tmp_path / "deep.png", values)
    data = load_dataset(_write(tmp_path / "list.txt", "deep.png\n"), [_spec((1, 4, 5, 3))])
    got = next(data.samples())["x"][0]
    np.testing.assert_array_equal(got, (values >> 8).astype(np.float32))
    assert np.abs(got - values / 257.0).max() <= 1.0
    (note,) = data.notes()
    assert "16-bit pixels (raw mode RGB;16B)" in note and "deep.png" in note and "high byte" in note


def test_int8_model_input_notes_the_pixels_it_clips(tmp_path: Path) -> None:
    image = _rgb()  # values 0..252: those above 127 cannot be held by int8
    _save(tmp_path / "a.png", image)
    data = load_dataset(_write(tmp_path / "list.txt", "a.png\n"), [_spec((1, 4, 5, 3), dtype=np.int8)])
    got = next(data.samples())["x"]
    np.testing.assert_array_equal(got[0], np.minimum(image, 127).astype(np.int8))
    (note,) = data.notes()
    assert "outside int8" in note and "a.png" in note and "clipped" in note and ".npy" in note
    fits = load_dataset(_write(tmp_path / "fits.txt", "a.png\n"), [_spec((1, 4, 5, 3), dtype=np.uint8)])
    list(fits.samples())
    assert fits.notes() == []


def test_symbolic_height_and_width_use_the_image_size(tmp_path: Path) -> None:
    image = _rgb(6, 7)
    assert _one(tmp_path, image, _spec(("n", 3, "h", None))).shape == (1, 3, 6, 7)


def test_letterbox_keeps_aspect_and_pads_zero_before_mean(tmp_path: Path) -> None:
    # A constant 2x4 (HxW) image scaled x2 into 8x8: rows 2..5 hold content, rows 0-1 and 6-7 are padding.
    flat = np.full((2, 4, 3), 100, np.uint8)
    got = _one(tmp_path, flat, _spec((1, 3, 8, 8)), Preprocess(mean=(10.0,), resize="letterbox"))
    want = np.full((3, 8, 8), -10.0, np.float32)
    want[:, 2:6, :] = 90.0
    np.testing.assert_allclose(got[0], want, atol=1e-4)


def test_letterbox_centres_horizontally(tmp_path: Path) -> None:
    # 4x2 (HxW) into 8x8: content 8x4 in columns 2..5.
    flat = np.full((4, 2), 50, np.uint8)
    got = _one(tmp_path, flat, _spec((1, 1, 8, 8)), Preprocess(resize="letterbox"))
    assert got[0, 0, :, 2:6].min() == pytest.approx(50, abs=1e-3)
    assert not got[0, 0, :, :2].any() and not got[0, 0, :, 6:].any()


def test_letterbox_with_symbolic_width_keeps_aspect_without_padding(tmp_path: Path) -> None:
    # OCR-style input: fixed height 4, any width; a 2x3 image becomes 4x6.
    got = _one(tmp_path, np.full((2, 3, 3), 9, np.uint8), _spec((1, 3, 4, "w")), Preprocess(resize="letterbox"))
    assert got.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(got, 9.0, atol=1e-4)


def test_stretch_matches_pillow_bilinear(tmp_path: Path) -> None:
    image = _rgb(6, 10)
    got = _one(tmp_path, image, _spec((1, 4, 5, 3)), Preprocess(resize="stretch"))
    want = np.asarray(Image.fromarray(image).resize((5, 4), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_allclose(got[0], want, atol=1.0)


def test_size_mismatch_without_resize_names_file_and_both_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "big.png", _rgb(8, 6))
    data = load_dataset(_write(tmp_path / "list.txt", "# header\nbig.png\n"), [_spec((1, 3, 4, 5))])
    message = _error(data.sample, 0)
    assert "big.png" in message and "line 2" in message and "6x8" in message and "5x4" in message


# ---- list files, directories, globs ----------------------------------------------------------------


def test_list_comments_blanks_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "a.npy", np.zeros((1, 2), np.float32))
    np.save(tmp_path / "data" / "b#1.npy", np.ones((1, 2), np.float32))
    np.save(tmp_path / "abs.npy", np.full((1, 2), 2, np.float32))
    text = f"# calibration set\n\n  a.npy   # trailing comment\nb#1.npy\n{tmp_path / 'abs.npy'}\n   \n"
    data = load_dataset(_write(tmp_path / "data" / "list.txt", text), [_spec((1, 2))])
    assert len(data) == 3
    assert [line for line, _ in data.entries()] == [3, 4, 5]
    assert data.entries()[1][1] == [tmp_path / "data" / "b#1.npy"]
    assert [float(s["x"][0, 0]) for s in data.samples()] == [0.0, 1.0, 2.0]


def test_k_paths_per_line_feed_inputs_in_order(tmp_path: Path) -> None:
    np.save(tmp_path / "img.npy", np.zeros((3, 2, 2), np.float32))
    np.save(tmp_path / "ids.npy", np.array([[5, 6]], np.int64))
    specs = [_spec((1, 3, 2, 2), "image"), _spec((1, 2), "ids", np.int64)]
    sample = load_dataset(_write(tmp_path / "list.txt", "img.npy ids.npy\n"), specs).sample(0)
    assert sample["image"].shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(sample["ids"], [[5, 6]])


def test_one_npz_per_line_feeds_every_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", ids=np.array([[1, 2]], np.int64), mask=np.ones((1, 2), np.float32))
    specs = [_spec(("b", 2), "ids", np.int64), _spec(("b", 2), "mask")]
    data = load_dataset(_write(tmp_path / "list.txt", "s.npz\n"), specs)
    assert data.entries() == [(1, [tmp_path / "s.npz"] * 2)]
    sample = data.sample(0)
    np.testing.assert_array_equal(sample["ids"], [[1, 2]])
    np.testing.assert_array_equal(sample["mask"], [[1.0, 1.0]])


def test_directory_is_sorted_and_skips_other_files(tmp_path: Path) -> None:
    for name in ("b.npy", "a.npy", "c.npy"):
        np.save(tmp_path / name, np.zeros((2,), np.float32))
    (tmp_path / "README.md").write_text("not a sample")
    data = load_dataset(tmp_path, [_spec((1, 2))])
    assert [paths[0].name for _, paths in data.entries()] == ["a.npy", "b.npy", "c.npy"]
    assert {line for line, _ in data.entries()} == {0}


def test_directory_of_npz_feeds_a_multi_input_model(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", a=np.zeros((1, 1), np.float32), b=np.ones((1, 1), np.float32))
    data = load_dataset(tmp_path, [_spec((1, 1), "a"), _spec((1, 1), "b")])
    assert float(data.sample(0)["b"][0, 0]) == 1.0


def test_glob_is_sorted_and_a_single_file_is_one_sample(tmp_path: Path) -> None:
    for name in ("z.png", "m.png", "skip.bmp"):
        _save(tmp_path / name, _rgb())
    spec = _spec((1, 3, 4, 5))
    assert [p[0].name for _, p in load_dataset(tmp_path / "*.png", [spec]).entries()] == ["m.png", "z.png"]
    assert len(load_dataset(str(tmp_path / "z.png"), [spec])) == 1


def test_batches_concatenate_with_a_dynamic_batch_dim(tmp_path: Path) -> None:
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.full((1, 2), i, np.float32))
    data = load_dataset(tmp_path, [_spec(("N", 2))])
    batches = list(data.batches(2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[1]["x"][:, 0], [2, 3])
    assert [b["x"].shape[0] for b in data.batches(2, limit=3)] == [2, 1]
    assert len(list(data.samples(limit=0))) == 0


# ---- arrays ----------------------------------------------------------------------------------------


def test_npy_without_batch_dim_and_float64_are_accepted(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float64).reshape(3, 2))
    got = load_dataset(tmp_path / "a.npy", [_spec((1, 3, 2))]).sample(0)["x"]
    assert got.shape == (1, 3, 2) and got.dtype == np.float32


@pytest.mark.parametrize(
    "array, culprits",
    [
        (np.zeros((1, 4, 2), np.float32), ["(1, 4, 2)", "(1, 3, 2)"]),  # wrong shape: expected vs got
        (np.zeros((1, 3, 2), np.int32), ["int32", "float32"]),  # int array for a float input
        (np.array([[[np.nan, 0], [0, 0], [0, np.inf]]], np.float32), ["NaN or Inf", "2 of 6"]),
        (np.array([[[1e300, 0], [0, 0], [0, 0]]], np.float64), ["NaN or Inf"]),  # overflows float32
    ],
)
def test_bad_npy_names_file_line_and_values(tmp_path: Path, array: np.ndarray, culprits: list[str]) -> None:
    np.save(tmp_path / "bad.npy", array)
    data = load_dataset(_write(tmp_path / "list.txt", "\nbad.npy\n"), [_spec((1, 3, 2))])
    message = _error(data.sample, 0)
    assert "bad.npy" in message and "line 2" in message
    for culprit in culprits:
        assert culprit in message


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    message = _error(load_dataset(tmp_path / "obj.npy", [_spec((1,))]).sample, 0)
    assert "obj.npy" in message and "pickle" in message


def test_npz_missing_key_lists_the_keys_present(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", imput=np.zeros((1, 2), np.float32), other=np.zeros(1))
    message = _error(load_dataset(_write(tmp_path / "l.txt", "s.npz"), [_spec((1, 2), "input")]).sample, 0)
    assert "s.npz" in message and "line 1" in message and "'imput'" in message and "'other'" in message


# ---- list errors (raised eagerly by load_dataset) ------------------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    assert "nope.txt" in _error(load_dataset, tmp_path / "nope.txt", [_spec((1,))])


def test_empty_list(tmp_path: Path) -> None:
    message = _error(load_dataset, _write(tmp_path / "list.txt", "# only comments\n\n"), [_spec((1,))])
    assert "list.txt" in message and "empty" in message


def test_listed_file_missing_names_list_line_and_path(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(1, np.float32))
    message = _error(load_dataset, _write(tmp_path / "list.txt", "a.npy\n#\nghost.npy\n"), [_spec((1,))])
    assert "list.txt" in message and "line 3" in message and "ghost.npy" in message


def test_wrong_number_of_paths_names_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(1, np.float32))
    specs = [_spec((1,), "image"), _spec((1,), "mask")]
    message = _error(load_dataset, _write(tmp_path / "list.txt", "a.npy a.npy a.npy\n"), specs)
    assert "line 1" in message and "3 paths" in message and "2 inputs" in message
    assert "'image'" in message and "'mask'" in message


def test_unsupported_extension_lists_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "a.tiff").write_bytes(b"x")
    message = _error(load_dataset, _write(tmp_path / "list.txt", "a.tiff\n"), [_spec((1,))])
    assert "a.tiff" in message and "line 1" in message and ".jpg" in message and ".npz" in message


@pytest.mark.parametrize("hook", [None, "hook.py:load"], ids=["plain", "hook"])
def test_listed_directory_is_named_as_one_with_what_to_do(tmp_path: Path, hook: str | None) -> None:
    # a directory is no file of an unknown kind (it has no extension) nor a missing file: it gets its own message
    np.save(tmp_path / "a.npy", np.zeros(1, np.float32))
    (tmp_path / "more.d").mkdir()
    pre = Preprocess(hook=str(tmp_path / hook) if hook else None)
    message = _error(load_dataset, _write(tmp_path / "list.txt", "a.npy\nmore.d\n"), [_spec((1,))], pre)
    assert "list.txt" in message and "line 2" in message and "'more.d' is a directory" in message
    assert "list the files in it" in message and "--dataset" in message and "extension '" not in message


def test_binary_list_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe\x00junk")
    assert "list.txt" in _error(load_dataset, tmp_path / "list.txt", [_spec((1,))])


def test_empty_glob_and_directory(tmp_path: Path) -> None:
    assert "*.png" in _error(load_dataset, str(tmp_path / "*.png"), [_spec((1,))])
    assert ".jpg" in _error(load_dataset, tmp_path, [_spec((1,))])


def test_directory_of_images_for_multi_input_model(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb())
    message = _error(load_dataset, tmp_path, [_spec((1, 3, 4, 5), "l"), _spec((1, 3, 4, 5), "r")])
    assert "a.png" in message and "'l'" in message and "'r'" in message


def test_image_for_non_4d_input(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb())
    assert "'tokens'" in _error(load_dataset, tmp_path, [_spec((1, 7), "tokens")])


def test_layout_that_cannot_be_inferred(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb())
    assert "nchw or nhwc" in _error(load_dataset, tmp_path, [_spec((1, 4, 5, 6))])


def test_mean_length_must_match_channels(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb())
    message = _error(load_dataset, tmp_path, [_spec((1, 1, 4, 5))], Preprocess(mean=MEAN))
    assert "mean" in message and "1-channel" in message


def test_mean_for_integer_input(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb())
    assert "uint8" in _error(load_dataset, tmp_path, [_spec((1, 4, 5, 3), dtype=np.uint8)], Preprocess(mean=MEAN))


# ---- per-sample and iteration errors --------------------------------------------------------------------


def test_corrupt_image_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    data = load_dataset(_write(tmp_path / "list.txt", "\n\nbroken.jpg\n"), [_spec((1, 3, 4, 5))])
    message = _error(data.sample, 0)
    assert "broken.jpg" in message and "line 3" in message


def test_batches_need_a_symbolic_batch_dim(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 2), np.float32))
    data = load_dataset(tmp_path, [_spec((1, 2))])
    message = _error(data.batches, 2)
    assert "'x'" in message and "fixed batch dim" in message
    assert "0" in _error(data.batches, 0)
    assert "-1" in _error(data.samples, -1)


def test_batches_refuse_a_model_whose_batch_axis_is_not_first(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((4, 1, 8), np.float32))
    seq_first = load_dataset(tmp_path, [_spec(("seq", "batch_size", 8))])
    message = _error(lambda: list(seq_first.batches(2)))
    assert "'x'" in message and "axis 1 'batch_size'" in message and "batch size 1" in message
    assert [b["x"].shape for b in seq_first.batches(1)] == [(4, 1, 8)]
    np.save(tmp_path / "a.npy", np.zeros((1, 4, 8), np.float32))
    batch_first = load_dataset(tmp_path, [_spec(("Batch", "seq", 8))])
    assert [b["x"].shape for b in batch_first.batches(2)] == [(1, 4, 8)]


def test_batching_images_of_different_sizes_names_both_files(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb(4, 5))
    _save(tmp_path / "b.png", _rgb(4, 6))
    data = load_dataset(tmp_path, [_spec(("n", 3, "h", "w"))])
    message = _error(lambda: list(data.batches(2)))
    assert "a.png" in message and "b.png" in message and "images at one size" in message and "resize" not in message


def test_batching_arrays_of_different_shapes_does_not_suggest_resize(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 4, 5), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((1, 3, 4, 6), np.float32))
    message = _error(lambda: list(load_dataset(tmp_path, [_spec(("n", 3, "h", "w"))]).batches(2)))
    assert "a.npy" in message and "b.npy" in message and "resize" not in message and "one shape" in message


# ---- preprocess hook -------------------------------------------------------------------------------------


def test_hook_replaces_loading_for_every_file(tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text("import numpy as np\n\ndef load(path, spec):\n    return np.full((2,), len(path), np.float64)\n")
    (tmp_path / "sample.raw").write_bytes(b"")
    data = load_dataset(_write(tmp_path / "list.txt", "sample.raw\n"), [_spec(("n", 2))], Preprocess(hook=f"{hook}:load"))
    np.testing.assert_array_equal(data.sample(0)["x"], [[len(str(tmp_path / "sample.raw"))] * 2])


@pytest.mark.parametrize(
    "source, ref, culprits",
    [
        (None, "missing.py:load", ["missing.py"]),
        ("def lode(path, spec):\n    return None\n", "hook.py:load", ["'load'", "'lode'"]),
        ("raise RuntimeError('boom')\n", "hook.py:load", ["hook.py", "boom"]),
    ],
)
def test_hook_import_errors_name_module_and_function(tmp_path: Path, source: str | None, ref: str, culprits: list[str]) -> None:
    if source is not None:
        (tmp_path / "hook.py").write_text(source)
    np.save(tmp_path / "a.npy", np.zeros(1, np.float32))
    message = _error(load_dataset, tmp_path / "a.npy", [_spec((1,))], Preprocess(hook=f"{tmp_path / ref}"))
    for culprit in culprits:
        assert culprit in message


def test_hook_failure_and_bad_result_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "hook.py").write_text("def fail(path, spec):\n    raise ValueError('nope')\n\ndef junk(path, spec):\n    return [1]\n")
    np.save(tmp_path / "a.npy", np.zeros(1, np.float32))
    for function, culprit in (("fail", "nope"), ("junk", "list")):
        data = load_dataset(tmp_path / "a.npy", [_spec((1,))], Preprocess(hook=f"{tmp_path / 'hook.py'}:{function}"))
        message = _error(data.sample, 0)
        assert "a.npy" in message and culprit in message


def test_conversions_are_noted_once_per_kind_with_count_and_first_file(tmp_path: Path) -> None:
    image = _rgb()
    _save(tmp_path / "g1.png", image[..., 0])
    _save(tmp_path / "g2.png", image[..., 1])
    _save(tmp_path / "a.png", np.concatenate([image, np.full((4, 5, 1), 9, np.uint8)], axis=2))
    _save(tmp_path / "deep.png", (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5))
    _save(tmp_path / "plain.png", image)
    data = load_dataset(_write(tmp_path / "list.txt", "g1.png\ng2.png\na.png\ndeep.png\nplain.png\n"), [_spec((1, 3, 4, 5))])
    assert data.notes() == []
    for _ in range(2):  # loading again (as a proposal does) counts each file once
        list(data.samples())
    notes = data.notes()
    assert len(notes) == 3, notes
    gray, alpha, deep = notes
    assert "grayscale in 3 images" in gray and "g1.png" in gray and "R, G and B" in gray
    assert "alpha channel in 1 image " in alpha and "a.png" in alpha and "dropped" in alpha
    assert "16-bit" in deep and "deep.png" in deep and "257" in deep
    rgb_only = load_dataset(_write(tmp_path / "rgb.txt", "plain.png\n"), [_spec((1, 3, 4, 5))])
    list(rgb_only.samples())
    assert rgb_only.notes() == []
    luma = load_dataset(_write(tmp_path / "luma.txt", "plain.png\n"), [_spec((1, 1, 4, 5))])
    list(luma.samples())
    assert len(luma.notes()) == 1 and "one gray channel" in luma.notes()[0]


def test_image_options_on_npy_samples_get_a_note_that_they_were_not_applied(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 4, 4), np.float32))
    (tmp_path / "ds.txt").write_text("a.npy\n")
    spec = [InputSpec("x", (1, 3, 4, 4), np.dtype(np.float32))]
    ds = load_dataset(tmp_path / "ds.txt", spec, Preprocess(mean=(127.5,), std=(127.5,)))
    assert [n for n in ds.notes() if n.startswith("mean, std not applied")], ds.notes()
    np.testing.assert_array_equal(ds.sample(0)["x"], np.zeros((1, 3, 4, 4), np.float32))  # fed as stored
    assert load_dataset(tmp_path / "ds.txt", spec).notes() == []
    bgr = load_dataset(tmp_path / "ds.txt", spec, Preprocess(color="bgr"))
    assert [n for n in bgr.notes() if n.startswith("color bgr not applied")], bgr.notes()


# ---- conversions seen wherever the samples are read ------------------------------------------------------


def _mixed_images(root: Path) -> Path:
    """16x16 images: RGB, grayscale, RGBA, grayscale, grayscale (conversions after the first sample), and their list."""
    image = _rgb(16, 16)
    _save(root / "rgb.png", image)
    for k in (1, 2, 3):
        _save(root / f"g{k}.png", image[..., k - 1])
    _save(root / "rgba.png", np.concatenate([image, np.full((16, 16, 1), 9, np.uint8)], axis=2))
    return _write(root / "list.txt", "rgb.png\ng1.png\nrgba.png\ng2.png\ng3.png\n")


def _conversion_notes(notes: list[str], root: Path) -> None:
    """Both kinds noted once, with every file counted and the first one named."""
    gray, alpha = [n for n in notes if n.startswith("image conversion")]
    assert f"grayscale in 3 images (first: '{root / 'g1.png'}')" in gray, notes
    assert f"alpha channel in 1 image (first: '{root / 'rgba.png'}')" in alpha, notes


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_step1_and_analyze_note_every_conversion_wherever_the_samples_are_read(tmp_path: Path, workers: int) -> None:
    # the calibration (and analyze on workers) reads the samples on its own copy of the dataset: step1 noted only what
    # its first-sample probe saw (nothing when sample 0 is RGB, 1 image when all are gray), analyze --workers nothing
    from hybridq import api
    from hybridq.execution import Execution
    from tests import models

    listing, model = _mixed_images(tmp_path), tmp_path / "cnn.onnx"
    onnx.save(models.residual_cnn(), model)
    execution = Execution(workers=workers) if workers else None
    res = api.step1(model, listing, out=tmp_path / "ws", preprocess=Preprocess(mean=(127.5,), std=(127.5,)), execution=execution)
    _conversion_notes(res.notes, tmp_path)
    _conversion_notes(api.analyze(model, res.cfg, listing, execution=execution).notes, tmp_path)
