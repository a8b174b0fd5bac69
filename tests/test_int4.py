"""4-bit weights (cfg precision int4, MatMulNBits) and GPTQ rounding, checked against numpy and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import hybridq
from hybridq import gptq
from hybridq.artifacts import read_step1
from hybridq.errors import ConfigError
from hybridq.int4 import Int4Weight, matmul_nbits
from hybridq.settings import Settings
from tests import models
from tests.conftest import cosine, run

WEIGHT_LAYERS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "fc1": "w1", "fc2": "w2"}
DIM, SEQ = 128, 16


def unpack(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float weight [K, N] a MatMulNBits B [N, blocks, blob] and scales [N * blocks] stand for (default zero point 8)."""
    n, blocks, blob = b.shape
    nibbles = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, 2 * blob).astype(np.float64) - 8.0
    w = nibbles * scales.reshape(n, blocks, 1).astype(np.float64)
    return w.reshape(n, -1)[:, :k].T


def _nbits_model(node: onnx.NodeProto, inits: list[onnx.TensorProto], m: int, k: int, n: int) -> onnx.ModelProto:
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("a", T.FLOAT, [m, k])],
                          [helper.make_tensor_value_info(node.output[0], T.FLOAT, [m, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("k,n,block", [(64, 24, 32), (80, 16, 32), (96, 8, 16), (256, 8, 128)])
def test_matmulnbits_matches_numpy_dequantize_then_matmul(k, n, block):
    rng = np.random.default_rng(k + n)
    w = rng.normal(0, 0.5, (k, n))
    codes, scales = gptq.quantize_rtn(w, block)
    # numpy reference of the block quantization: each block's scale is its signed max-magnitude value / -8
    for b0 in range(0, k, block):
        blk = w[b0:b0 + block]
        m = blk[np.argmax(np.abs(blk), axis=0), np.arange(n)]
        np.testing.assert_allclose(scales[b0 // block], m / -8.0)
        np.testing.assert_array_equal(codes[b0:b0 + block], np.clip(np.rint(blk / (m / -8.0)), -8, 7))
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")
    new, inits = matmul_nbits(node, "a", Int4Weight("mm", w, None, "w"), codes, scales, Settings(int4_block_size=block))
    a = rng.normal(0, 1, (5, k)).astype(np.float32)
    (y,) = run(_nbits_model(new, inits, 5, k, n), {"a": a})
    w_hat = unpack(numpy_helper.to_array(inits[0]), numpy_helper.to_array(inits[1]), k)
    np.testing.assert_allclose(w_hat, gptq.dequantize(codes, scales, block), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y, a.astype(np.float64) @ w_hat, rtol=1e-4, atol=1e-4)


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    rng = np.random.default_rng(3)
    k, n = 96, 40
    x = rng.normal(0, 1, (400, k)) @ (rng.normal(0, 1, (k, k)) * (0.85 ** np.arange(k))[:, None])
    w = rng.normal(0, 0.3, (k, n))
    h = x.T @ x
    err = {}
    for name, (codes, scales) in {"rtn": gptq.quantize_rtn(w, 32), "gptq": gptq.quantize_gptq(w, h, 32)}.items():
        assert codes.min() >= -8 and codes.max() <= 7
        err[name] = float(np.sum((x @ w - x @ gptq.dequantize(codes, scales, 32)) ** 2))
    assert err["gptq"] < 0.5 * err["rtn"]


def _sample(rng: np.random.Generator, mix: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": (rng.normal(0, 1, (1, SEQ, DIM)) @ mix).astype(np.float32), "mask": np.ones((1, 1, SEQ), np.float32)}


@pytest.fixture(scope="module")
def block_ws(tmp_path_factory) -> dict:
    """The transformer block (dim 128) with 12 calibration samples of anisotropic inputs, step1 run with GPTQ statistics."""
    d = tmp_path_factory.mktemp("int4")
    model = models.attention_block(seq=SEQ, dim=DIM)
    onnx.save(model, d / "block.onnx")
    rng = np.random.default_rng(0)
    mix = rng.normal(0, 1, (DIM, DIM)) * (0.8 ** np.arange(DIM))[:, None]  # a few dominant input directions
    (d / "data").mkdir()
    lines = []
    for i in range(12):
        np.savez(d / "data" / f"s{i}.npz", **_sample(rng, mix))
        lines.append(str(d / "data" / f"s{i}.npz"))
    (d / "list.txt").write_text("\n".join(lines))
    r1 = hybridq.step1(d / "block.onnx", d / "list.txt", out=d / "ws", settings={"int4_rounding": "gptq"})
    evals = [_sample(np.random.default_rng(100 + i), mix) for i in range(4)]
    return {"dir": d, "model": model, "r1": r1, "evals": evals, "calib": lines}


def _build(ws: dict, rounding: str, name: str, float_attention: bool = True) -> hybridq.api.Step2Result:
    layers = "".join(f"  {k}: int4\n" for k in WEIGHT_LAYERS) + ("  qk: float32\n  attn_v: float32\n" if float_attention else "")
    text = ws["r1"].cfg.read_text().replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n" + layers)
    cfg = ws["dir"] / f"{name}.cfg"
    cfg.write_text(text.replace("int4_rounding: gptq", f"int4_rounding: {rounding}"))
    return hybridq.step2(ws["r1"].model, ws["r1"].data, cfg, ws["dir"] / f"{name}.onnx")


def test_step1_records_x_transpose_x_of_every_matmul_input(block_ws):
    bundle = read_step1(block_ws["r1"].model, block_ws["r1"].data, None, block_ws["r1"].cfg)
    assert {"ln::xtx", "h::xtx", "g::xtx"} <= set(bundle.observers)
    for tensor in ("ln", "g"):  # recomputed from the temp model's tensors in ORT, summed in float64
        probe = onnx.load(str(block_ws["r1"].model), load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(probe, str(block_ws["r1"].model.parent))
        probe.graph.output.append(helper.make_tensor_value_info(tensor, T.FLOAT, None))
        want = np.zeros((bundle.observers[f"{tensor}::xtx"].hessian.shape))
        for path in block_ws["calib"]:
            x = run(probe, dict(np.load(path)))[-1].astype(np.float64).reshape(-1, want.shape[0])
            want += x.T @ x
        obs = bundle.observers[f"{tensor}::xtx"]
        assert obs.rows == 12 * SEQ
        np.testing.assert_allclose(obs.hessian, want, rtol=1e-6)  # the sessions' fp32 activations differ in the last bit


def test_int4_block_runs_in_ort_shrinks_3x_and_matches_numpy(block_ws):
    r2 = _build(block_ws, "gptq", "gptq")
    q = onnx.load(str(r2.output))
    ops = {n.name: n.op_type for n in q.graph.node}
    assert all(ops[layer] == "MatMulNBits" for layer in WEIGHT_LAYERS)
    assert r2.layers == {"int4": 6, "float32": 2}
    assert Path(r2.output).stat().st_size * 3 <= (block_ws["dir"] / "block.onnx").stat().st_size
    # numpy recomputation: the fp32 block with each weight replaced by what the packed codes and scales stand for
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ref = onnx.ModelProto()
    ref.CopyFrom(block_ws["model"])
    for layer, w in WEIGHT_LAYERS.items():
        w_hat = unpack(inits[f"{layer}_int4_B"], inits[f"{layer}_int4_scales"], DIM if layer != "fc2" else 2 * DIM)
        target = next(i for i in ref.graph.initializer if i.name == w)
        target.CopyFrom(numpy_helper.from_array(w_hat.astype(np.float32), w))
    for feeds in block_ws["evals"]:
        np.testing.assert_allclose(run(q, feeds)[0], run(ref, feeds)[0], rtol=1e-3, atol=1e-3)


def test_gptq_beats_plain_rounding_on_the_block_output(block_ws):
    err = {}
    for rounding in ("rtn", "gptq"):
        out = _build(block_ws, rounding, rounding).output
        err[rounding] = np.mean([np.mean((run(out, f)[0] - run(block_ws["model"], f)[0]) ** 2) for f in block_ws["evals"]])
    assert err["gptq"] < 0.5 * err["rtn"]
    out = _build(block_ws, "gptq", "gptq_cos").output
    assert min(cosine(run(out, f)[0], run(block_ws["model"], f)[0]) for f in block_ws["evals"]) > 0.99


def test_int8_activations_and_gemm_with_transb_bias_alpha_beta(tmp_path):
    rng = np.random.default_rng(7)
    k, n = 64, 20
    w, c = rng.normal(0, 0.3, (n, k)), rng.normal(0, 0.5, n)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [4, k])], [helper.make_tensor_value_info("y", T.FLOAT, [4, n])],
                          [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(c.astype(np.float32), "c")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "gemm.onnx")
    data = models.write_npy_dataset(tmp_path / "data", {"x": (4, k)}, 4)
    r1 = hybridq.step1(tmp_path / "gemm.onnx", data, out=tmp_path / "ws")
    for acts in ("float", "int8"):
        text = r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  fc: int4")
        cfg = tmp_path / f"{acts}.cfg"
        cfg.write_text(text.replace("int4_activations: float", f"int4_activations: {acts}"))
        r2 = hybridq.step2(r1.model, r1.data, cfg, tmp_path / f"{acts}.onnx")
        q = onnx.load(str(r2.output))
        node = q.graph.node[0]
        assert node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["accuracy_level"] == (4 if acts == "int8" else 0)
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        w_hat = unpack(inits["fc_int4_B"], inits["fc_int4_scales"], k)
        codes, scales = gptq.quantize_rtn(0.5 * w.astype(np.float32).T.astype(np.float64), 32)
        np.testing.assert_allclose(w_hat, gptq.dequantize(codes, scales, 32), rtol=1e-6, atol=1e-7)
        x = rng.normal(0, 1, (4, k)).astype(np.float32)
        want = x.astype(np.float64) @ w_hat + 2.0 * c.astype(np.float32)
        tol = 1e-4 if acts == "float" else 0.05 * np.abs(want).max()  # int8 A: ORT quantizes x per block
        np.testing.assert_allclose(run(q, {"x": x})[0], want, rtol=1e-4, atol=tol)


def test_int4_on_a_conv_or_without_statistics_is_a_config_error(cnn_ws, block_ws):
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    cfg = cnn_ws["dir"] / "conv.cfg"
    cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: int4"))
    with pytest.raises(ConfigError, match=r"conv2.*int4 cannot be built: it is a Conv; int4 applies to MatMul and Gemm only"):
        hybridq.step2(r1.model, r1.data, cfg, cnn_ws["dir"] / "conv.onnx")
    cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  fc: int4").replace(
        "int4_rounding: rtn", "int4_rounding: gptq"))
    with pytest.raises(ConfigError, match=r"'fc' is int4 with int4_rounding gptq, but step1 recorded no X\^T X .*Re-run step1"):
        hybridq.step2(r1.model, r1.data, cfg, cnn_ws["dir"] / "fc.onnx")
    cfg.write_text(r1.cfg.read_text().replace("int4_block_size: 32", "int4_block_size: 48"))
    with pytest.raises(ConfigError, match=r"int4_block_size 48 is not valid; MatMulNBits needs a power of 2 >= 16"):
        hybridq.step2(r1.model, r1.data, cfg, cnn_ws["dir"] / "b.onnx")


def test_cli_gptq_step1_and_an_int4_conv_exits_2(capsys, cnn_ws, tmp_path):
    from tests.test_cli import cli

    model = tmp_path / "mlp.onnx"
    onnx.save(models.matmul_mlp(), model)
    data = models.write_npy_dataset(tmp_path / "d", {"x": (4, 32)}, 4)
    code, _, err = cli(capsys, "step1", str(model), "-d", str(data), "--out", str(tmp_path / "ws"), "--int4-rounding", "gptq")
    assert code == 0, err
    cfg = tmp_path / "ws" / "mlp.quantization.cfg"
    cfg.write_text(cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  a1: int4\n  mm2: w4a16"))
    ws = tmp_path / "ws"
    code, out, err = cli(capsys, "step2", str(ws / "mlp.model"), str(ws / "mlp.data"), str(cfg), "-o", str(tmp_path / "q.onnx"))
    assert code == 0, err
    assert [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.name in ("mm1/MatMulAddFusion", "mm2")] == ["MatMulNBits"] * 2
    cfg.write_text(cfg.read_text().replace("mm2: w4a16", "relu1: int4"))
    code, out, err = cli(capsys, "step2", str(ws / "mlp.model"), str(ws / "mlp.data"), str(cfg), "-o", str(tmp_path / "q2.onnx"))
    assert code == 2 and "Traceback" not in err
    assert "custom_quantize_layers['relu1'] = int4 cannot be built: it is a Relu" in out + err


def test_proposal_meets_a_size_budget_with_int4_on_the_least_sensitive_layers(block_ws, tmp_path):
    from hybridq.api import ProposalOptions

    d = block_ws["dir"]
    int8 = hybridq.step2(block_ws["r1"].model, block_ws["r1"].data, block_ws["r1"].cfg, tmp_path / "int8.onnx")
    budget = 0.8 * int8.size_quant / 1e6
    r1 = hybridq.step1(d / "block.onnx", d / "list.txt", out=tmp_path / "ws", settings={"int4_rounding": "gptq"},
                       proposal=ProposalOptions(max_size_mb=budget, samples=6))
    chosen = {k for k, v in r1.proposal.layers.items() if v == "int4"}
    assert 0 < len(chosen) < len(WEIGHT_LAYERS) and chosen <= set(WEIGHT_LAYERS)
    assert any(r.step == "size" and r.outcome.startswith("kept: within") for r in r1.proposal.table)
    r2 = hybridq.step2(r1.model, r1.data, r1.cfg, tmp_path / "prop.onnx")
    assert Path(r2.output).stat().st_size <= budget * 1e6 < int8.size_quant
    # the ranking it claims, re-measured: isolated cosine of each layer at int4 on the samples the proposal scored on
    every = _build(block_ws, "gptq", "every", float_attention=False).output  # as the proposal built it: qk, attn_v int8
    listing = tmp_path / "six.txt"
    listing.write_text("\n".join(block_ws["calib"][:6]))
    single = {le.layer: le.single.cosine for le in hybridq.analyze(d / "block.onnx", every, listing).layers if le.single is not None}
    assert min(single[n] for n in chosen) >= max(single[n] for n in set(WEIGHT_LAYERS) - chosen) - 1e-9


def test_gptq_statistics_are_byte_identical_on_every_worker_count(block_ws, tmp_path):
    """X^T X sums in float64 depend on how the batches are grouped; they are grouped in fixed blocks on every back
    end, so `.data` (and the run id the cfg records) do not change with --workers."""
    from hybridq.execution import Execution

    d = block_ws["dir"]
    digests = []
    for workers in (0, 2, 3):
        r = hybridq.step1(d / "block.onnx", d / "list.txt", out=tmp_path / f"w{workers}", settings={"int4_rounding": "gptq"},
                          execution=Execution(workers=workers))
        digests.append((r.data.read_bytes(), r.cfg.read_text()))
    assert digests[1] == digests[0] and digests[2] == digests[0]
