"""The private infrastructure modules: atomic files, ONNX Runtime sessions, graph index, opset, qdq map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from hybridq import _fs, _onnx, _runtime
from hybridq.errors import ConfigError, ModelError, OutputError
from hybridq.kernels import X64_PRECISION_KEY
from hybridq.qdq import QDQ_MAP_KEY, QdqMap
from hybridq.settings import canonical, check_value


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


# --------------------------------------------------------------------------- _runtime


def _relu_model(opset: int = 13) -> onnx.ModelProto:
    return onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1, 4] x) => (float[1, 4] y) {{
            r = Relu(x)
            y = Identity(r)
        }}"""
    )


def _config(sess: object, key: str) -> str | None:
    try:
        return sess.get_session_options().get_session_config_entry(key)  # type: ignore[attr-defined]
    except RuntimeError:  # not set
        return None


@pytest.mark.parametrize("saturates", [True, False])
def test_session_sets_the_exact_int8_option_only_where_the_cpu_needs_it(monkeypatch: pytest.MonkeyPatch, saturates: bool) -> None:
    monkeypatch.setattr(_runtime, "u8s8_saturates", lambda: saturates)
    exact = _runtime.session(_relu_model(), exact_int8=True)
    plain = _runtime.session(_relu_model())
    assert _config(exact, X64_PRECISION_KEY) == ("1" if saturates else None)
    assert _config(plain, X64_PRECISION_KEY) is None
    assert _runtime.is_exact(exact)
    assert _runtime.is_exact(plain) is not saturates


def test_session_falls_back_to_default_kernels_when_the_exact_rewrite_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(_runtime, "u8s8_saturates", lambda: True)
    real = ort.InferenceSession

    def refuse_exact(model: object, so: object, **kw: object) -> object:
        if _config_of(so) == "1":
            raise RuntimeError("AddInitializedOrtValue Attempt to replace the existing tensor")
        return real(model, so, **kw)

    def _config_of(so: object) -> str | None:
        try:
            return so.get_session_config_entry(X64_PRECISION_KEY)  # type: ignore[attr-defined]
        except RuntimeError:
            return None

    monkeypatch.setattr(ort, "InferenceSession", refuse_exact)
    sess = _runtime.session(_relu_model(), exact_int8=True)
    assert not _runtime.is_exact(sess)


def test_session_threads_arena_and_memory_pattern() -> None:
    sess = _runtime.session(_relu_model(), threads=1, shared_arena=True, mem_pattern=False, optimization="basic")
    so = sess.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.enable_mem_pattern is False
    assert _config(sess, "session.use_env_allocators") == "1"
    x = np.array([[-1.0, 0.0, 2.0, -3.0]], np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x, 0))


def test_session_over_the_size_limit_goes_through_external_data(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _relu_model()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4096, np.float32), "unused"))
    monkeypatch.setattr(_onnx, "LARGE_MODEL_BYTES", 1000)
    assert _onnx.is_large(m)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(_runtime.session(m).run(None, {"x": x})[0], x)


def test_cores_is_the_affinity_mask() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _runtime.cores() == expected >= 1


# --------------------------------------------------------------------------- _onnx


def test_graph_index() -> None:
    m = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2] x) => (float[2] y, float[2] z) {
            a = Relu(x)
            y = Add(a, a)
            z = Neg(a)
        }"""
    )
    idx = _onnx.GraphIndex(m.graph)
    relu, add, neg = idx.nodes
    assert idx.producer == {"a": 0, "y": 1, "z": 2}
    assert idx.producer_node("a") is relu and idx.producer_node("x") is None
    # a node reading a tensor twice is listed twice (callers count readers)
    assert idx.consumers["a"] == [1, 1, 2]
    assert [n.op_type for n in idx.consumer_nodes("a")] == ["Add", "Add", "Neg"]
    assert idx.consumer_nodes("y") == []
    assert idx.tensors() == {"a", "y", "z"}
    assert set(idx.by_name) == {n.name for n in m.graph.node}


def test_main_opset_and_convert_opset_keep_metadata() -> None:
    m = _relu_model(opset=11)
    onnx.helper.set_model_props(m, {"k": "v"})
    assert _onnx.main_opset(m) == 11
    up = _onnx.convert_opset(m, 13)
    assert _onnx.main_opset(up) == 13 and _onnx.main_opset(m) == 11
    assert {p.key: p.value for p in up.metadata_props} == {"k": "v"}
    # no ai.onnx import at all
    del m.opset_import[:]
    assert _onnx.main_opset(m) == 0


def _weighty_model() -> onnx.ModelProto:
    """Opset 11: a 4 KB weight initializer, a 4 KB Constant, int64 shape data and a Squeeze whose axes become an input at 13."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "w")
    c = onnx.numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "c")
    shape = onnx.numpy_helper.from_array(np.array([1, 1, 32, 32], np.int64), "shape")
    h = onnx.helper
    nodes = [
        h.make_node("Constant", [], ["cv"], value=c),
        h.make_node("MatMul", ["x", "w"], ["a"]),
        h.make_node("Add", ["a", "cv"], ["b"]),
        h.make_node("Reshape", ["b", "shape"], ["r"]),
        h.make_node("Squeeze", ["r"], ["y"], axes=[0]),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [32, 32])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w, shape])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 11)])


def test_convert_opset_and_infer_shapes_set_the_weights_aside_and_give_them_back() -> None:
    """The same model, byte for byte, as onnx's own converter and shape inference on the whole model."""
    m = _weighty_model()
    before = m.SerializeToString()
    want = onnx.version_converter.convert_version(m, 13)
    assert _onnx.convert_opset(m, 13).SerializeToString() == want.SerializeToString()
    for data_prop in (False, True):
        got = _onnx.infer_shapes(want, data_prop=data_prop)
        assert got.SerializeToString() == onnx.shape_inference.infer_shapes(want, data_prop=data_prop).SerializeToString()
    assert m.SerializeToString() == before  # the input is left alone


def test_describe_error_is_one_line() -> None:
    assert _onnx.describe_error(ValueError("first\nsecond")) == "ValueError: first"
    assert _onnx.describe_error(ValueError()) == "ValueError: "


# --------------------------------------------------------------------------- qdq map


def test_qdq_map_round_trips_through_model_metadata() -> None:
    m = _relu_model()
    onnx.helper.set_model_props(m, {"other": "kept", QDQ_MAP_KEY: "{}"})
    qmap = QdqMap({"r": "r_dq"}, {"Relu_0": {"op": "Relu", "precision": "int8"}})
    qmap.write_to(m)
    assert [p.key for p in m.metadata_props] == ["other", QDQ_MAP_KEY]  # the older map replaced
    assert QdqMap.from_model(m) == qmap
    assert json.loads(qmap.to_json()) == {"tensors": {"r": "r_dq"}, "layers": {"Relu_0": {"op": "Relu", "precision": "int8"}}}


def test_qdq_map_absent_or_malformed() -> None:
    m = _relu_model()
    assert QdqMap.from_model(m) is None
    onnx.helper.set_model_props(m, {QDQ_MAP_KEY: "not json"})
    with pytest.raises(ModelError, match="not valid JSON"):
        QdqMap.from_model(m)
    onnx.helper.set_model_props(m, {QDQ_MAP_KEY: '{"tensors": []}'})
    with pytest.raises(ModelError, match="'tensors' object"):
        QdqMap.from_model(m)


# --------------------------------------------------------------------------- settings values


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dtype", "u8", "uint8"),
        ("dtype", "float16", None),  # a layer precision, not an activation dtype
        ("weight_dtype", "int16", "int16"),
        ("weight_dtype", "uint8", None),
        ("qtype", "symmetric", "sym"),
        ("qmethod", "layer", "layer"),
        ("qmethod", "group32", None),
        ("algorithm", "kl_divergence", "kl"),  # RKNN's name
        ("algorithm", "kll", None),
    ],
)
def test_settings_values_are_checked_in_one_place(key: str, value: str, expected: str | None) -> None:
    assert canonical(key, value) == expected
    if expected is None:
        with pytest.raises(ConfigError, match=rf"^cfg:3: {key} '{value}' of 't' is not valid"):
            check_value(key, value, "cfg:3", "t")
    else:
        assert check_value(key, value, "cfg:3") == expected


def test_graph_index_with_subgraph_reads() -> None:
    m = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (bool c, float[2] x) => (float[2] y) {
            a = Relu(x)
            y = If(c) <
                then_branch = t () => (float[2] o) { o = Neg(a) },
                else_branch = e () => (float[2] o) { o = Identity(a) }
            >
        }"""
    )
    assert _onnx.outer_reads(m.graph.node[1]) == ["a"]
    assert _onnx.GraphIndex(m.graph).consumers.get("a") is None
    assert _onnx.GraphIndex(m.graph, subgraph_reads=True).consumers["a"] == [1]


def test_scalar_value_reads_one_element_initializers_and_constant_nodes_only():
    from onnx import helper, numpy_helper

    from hybridq._onnx import scalar_value

    inits = {"three": numpy_helper.from_array(np.array([3.0], np.float32), "three"),
             "w": numpy_helper.from_array(np.ones((4, 4), np.float32), "w")}
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(-7.5, np.float32)))
    relu = helper.make_node("Relu", ["x"], ["r"])
    assert scalar_value("three", inits, None) == 3.0
    assert scalar_value("c", inits, const) == -7.5
    assert scalar_value("w", inits, None) is None and scalar_value("r", inits, relu) is None and scalar_value("x", inits, None) is None
