"""The cfg's quantize_parameters block written without ruamel is ruamel's text, byte for byte, and reads back the same."""

from __future__ import annotations

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hybridq
from hybridq import api, config
from hybridq.config import load_cfg, render_cfg
from hybridq.settings import Settings
from tests import models


def _ruamel_text(*args) -> str:
    """The cfg as ruamel alone writes it (the direct block turned off)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(config, "_entries_block", lambda *a: None)
    try:
        return render_cfg(*args)
    finally:
        mp.undo()


def _entry(qtype: str = "asym") -> dict:
    return {"qtype": qtype, "qmethod": "layer", "dtype": "uint8", "algorithm": "minmax", "min": [-1.5], "max": [2.0],
            "ori_min": [-1.5], "ori_max": [2.0], "scale": [0.013725490309298038], "zero_point": [109]}


def _args(entries: dict, comments: dict) -> tuple:
    header = {"version": "0.1.0", "model": "m.onnx", "model_sha256": "ab" * 32, "dataset": "d.txt", "samples": 3}
    return header, Settings(), {"conv1": "float16"}, {"conv1": "kept in float"}, entries, comments, "m"


@pytest.mark.parametrize("factory", [models.residual_cnn, models.matmul_mlp, models.two_input, models.detector_head, models.attention_block])
def test_step1_cfg_is_ruamels_text(tmp_path, monkeypatch, factory):
    # Every fixture model's cfg, as step1 renders it, equals ruamel's rendering (written directly) and reads back the same.
    model = factory()
    shapes = {i.name: tuple(d.dim_value or 2 for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    listing = models.write_npy_dataset(tmp_path / "data", shapes, 4)
    seen = []

    def both(*args):
        text = render_cfg(*args)
        seen.append((text, _ruamel_text(*args), config._entries_block(args[4], args[5], []) is not None or not args[4]))
        return text

    monkeypatch.setattr(api, "render_cfg", both)
    result = hybridq.step1(path, listing, out=tmp_path / "out")
    (direct, ruamel, direct_unless_empty), = seen
    assert direct_unless_empty and direct == ruamel
    assert result.cfg.read_text(encoding="utf-8") == direct
    (tmp_path / "ruamel.cfg").write_text(ruamel, encoding="utf-8")
    a, b = load_cfg(result.cfg), load_cfg(tmp_path / "ruamel.cfg")
    assert {k: (e.line, e.values) for k, e in a.entries.items()} == {k: (e.line, e.values) for k, e in b.entries.items()}
    assert (a.header, a.settings, a.custom) == (b.header, b.settings, b.custom)


def test_awkward_names_fall_back_to_ruamel():
    # Names YAML would quote or read as another type (number, bool, null, key: value) leave the block to ruamel.
    for name in ["1e3", "true", "null", "a: b", "a #b", "-x", "x:", "ü", "'q'", "a" * 130, ""]:
        args = _args({name: _entry()}, {})
        assert config._entries_block(args[4], args[5], []) is None
        assert render_cfg(*args) == _ruamel_text(*args)


def test_direct_block_layout():
    # Slashes, double colons and comments with punctuation or accents are written directly, as ruamel would.
    entries = {"/backbone/conv1/Conv_output_0": _entry(), "onnx::Conv_12": _entry("sym"), "l1.r": _entry()}
    args = _args(entries, {"l1.r": "input of l2.conv; proposal: kept", "onnx::Conv_12": "weight of conv (é)"})
    text = render_cfg(*args)
    assert config._entries_block(args[4], args[5], []) is not None
    assert text == _ruamel_text(*args)
    assert "  # input of l2.conv; proposal: kept\n  l1.r:\n    qtype: asym\n" in text


_chars = st.sampled_from(list("abcXYZ019_./-: #'\"!%&*?[]{},|>@`\té\n"))


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.text(_chars, min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
    word=st.sampled_from(["asym", "sym", "yes", "on", "null", "1.5", "int16", "kl", "a:b", "x y"]),
    comment=st.one_of(st.none(), st.text(_chars, max_size=20)),
)
def test_any_block_is_ruamels_text(names, word, comment):
    # Whatever the names, words and comments, the cfg text is ruamel's (written directly or by ruamel itself).
    entries = {n: dict(_entry(), qtype=word) for n in names}
    args = _args(entries, {} if comment is None else {names[0]: comment})
    assert render_cfg(*args) == _ruamel_text(*args)


def test_number_lists_print_as_before():
    # The all-floats fast path prints what the general rule prints (ints as ints, anything else as its float).
    import numpy as np

    def general(values) -> str:
        return "[" + ", ".join(str(int(v)) if isinstance(v, int) else repr(float(v)) for v in values) + "]"

    cases = [[0.1, -2.5e-08, 1e300, 0.0, -0.0, 3.0], [1, 2, True], [np.float32(0.1), 2.0], [np.int64(3), 4], [], (x / 7 for x in range(3))]
    for values in cases:
        values = list(values)
        lists: list[str] = []
        config._number_list(values, lists)
        assert lists == [general(values)]
