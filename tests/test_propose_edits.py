"""`hybridq propose` on a hand-edited cfg: every edit and comment survives, "nothing changed" touches nothing, the summary adds up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import hybridq
from hybridq.artifacts import read_step1
from hybridq.cli import main
from hybridq.config import load_cfg, update_custom_layers, update_entries
from hybridq.observers import compute_range
from hybridq.api import ProposalOptions
from hybridq.build import Edits, build
from hybridq.proposal import Target
from hybridq.proposal.fixes import Context, range_fix
from tests import models
from tests.conftest import cosine, run

# Multiply-accumulates of outlier_channel_cnn, by hand: weight size x 16*16 output positions.
OUTLIER_MACS = {"conv1": 16 * 8 * 9 * 256, "conv2": 16 * 16 * 9 * 256, "conv3": 16 * 16 * 256, "conv4": 8 * 16 * 256}
# residual_cnn: three convs on 16x16 and the 10x16 Gemm on one position.
RESIDUAL_MACS = {"conv1": 16 * 3 * 9 * 256, "conv2": 16 * 16 * 9 * 256, "conv3": 16 * 16 * 256, "fc": 10 * 16}


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """Run `hybridq args...` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def pct(macs: dict[str, float], names: set[str]) -> str:
    """A MAC share as the summary prints it."""
    return f"{100 * sum(macs[n] for n in names) / sum(macs.values()):.1f} %"


def edit_entry(text: str, tensor: str, key: str, value: str) -> str:
    """Replace the `key:` line (value and any comment) inside the quantize_parameters entry of `tensor`."""
    start = text.index(f"\n  {tensor}:\n")
    end = text.find("\n  ", text.index("zero_point", start))
    end = len(text) if end < 0 else end
    block, n = re.subn(rf"(\n    {key}: )[^\n]*", lambda m: m.group(1) + value, text[start:end])
    assert n == 1, f"no {key} in the entry of {tensor}"
    return text[:start] + block + text[end:]


def inits(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def output_cosine(fp32: Path, quant: Path, listing: Path) -> float:
    """Output cosine over the whole dataset (all samples' outputs as one vector), with ORT runs and numpy."""
    xs = [np.load(listing.parent / ln) for ln in listing.read_text().splitlines() if ln.endswith(".npy")]
    return cosine(np.concatenate([run(quant, {"x": x})[0].ravel() for x in xs]), np.concatenate([run(fp32, {"x": x})[0].ravel() for x in xs]))


def float_conv_share(quant: Path, macs: dict[str, float]) -> tuple[set[str], float]:
    """MAC-counted layers of a built model whose weight is not dequantized (they run float), and their share."""
    model = onnx.load(str(quant))
    producer = {o: n for n in model.graph.node for o in n.output}
    floats = {n.name for n in model.graph.node if n.name in macs
              and getattr(producer.get(n.input[1]), "op_type", "") != "DequantizeLinear"}
    return floats, sum(macs[n] for n in floats) / sum(macs.values())


@pytest.fixture
def outlier_ws(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "m.onnx"
    onnx.save(models.outlier_channel_cnn(), path)
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (1, 8, 16, 16)}, 16)
    r1 = hybridq.step1(path, listing, out=tmp_path / "ws")
    return {"model": path, "dataset": listing, "dir": tmp_path, "cfg": r1.cfg, "temp": r1.model, "data": r1.data}


def test_propose_round_trip_keeps_every_edit_and_comment_and_step2_honours_them(outlier_ws, capsys):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    text = "# my top comment: edited by hand\n" + cfg.read_text()
    # conv4 is float by policy (it writes the graph output); the user moves it to uint8.
    text = text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv4: uint8  # my own choice")
    text = edit_entry(text, "r1", "algorithm", "percentile")  # the outlier tensor: the MSE clip's favourite
    text = edit_entry(text, "r3", "algorithm", "percentile")
    text = edit_entry(edit_entry(text, "x", "min", "[-2.0]"), "x", "max", "[3.0]")
    text = edit_entry(text, "r2", "dtype", "int16  # wider for r2")
    text = edit_entry(text, "w3", "qmethod", "layer")
    text = text.replace("  # output of conv3\n", "  # output of conv3\n  # my note on r3\n")
    cfg.write_text(text)
    edited = hybridq.step2(ws["temp"], ws["data"], cfg, ws["dir"] / "edited.onnx")

    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.99", "--max-float-fraction", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    after = cfg.read_text()

    # The proposal floats conv2 (it reads the outlier tensor) and touches no edited entry: every activation was edited.
    assert "conv2" in report["layers"] and set(report["layers"].values()) == {"float32"} and report["met"]
    assert not set(report["entries"]) & {"x", "r1", "r2", "r3", "w3"}
    # Every line of the edited cfg is still there, unchanged and in order; new lines are the proposal's.
    added = [ln for ln in after.splitlines() if ln not in text.splitlines()]
    assert [ln for ln in after.splitlines() if ln not in added] == text.splitlines()
    layer_lines = [ln for ln in added if re.match(r"  conv\d: float32  # proposal", ln)]
    assert len(layer_lines) == len(report["layers"]) and all(ln in layer_lines or "bias_correction" in ln for ln in added), added
    assert after.startswith("# my top comment: edited by hand\n")
    assert "  conv4: uint8  # my own choice\n  conv" in after
    assert "    dtype: int16  # wider for r2\n" in after and "  # my note on r3\n  r3:\n" in after
    parsed = load_cfg(cfg)
    assert parsed.custom == {"conv4": "uint8", **report["layers"]}
    assert parsed.entries["r1"].values["algorithm"] == "percentile" and parsed.entries["r3"].values["algorithm"] == "percentile"
    assert parsed.entries["x"].values["min"] == [-2.0] and parsed.entries["x"].values["max"] == [3.0]
    assert parsed.entries["r2"].values["dtype"] == "int16" and parsed.entries["w3"].values["qmethod"] == "layer"
    # The hand-edited cfg was kept as a backup, byte for byte.
    assert report["written"] and Path(report["backup"]).read_text() == text

    # step2 builds what the edits say (the cfg before the proposal's float layers, so every edited tensor is
    # still quantized); the numbers are computed here with numpy.
    built = hybridq.step2(ws["temp"], ws["data"], cfg, ws["dir"] / "q.onnx")
    q = inits(edited.output)
    scale = np.float32((3.0 - -2.0) / 255)
    assert q["x_scale"] == pytest.approx(scale, rel=1e-6) and int(q["x_zero_point"]) == int(np.round(2.0 / scale)) == 102
    assert q["r2_zero_point"].dtype == np.int16
    w3 = numpy_helper.to_array(next(i for i in onnx.load(str(ws["model"])).graph.initializer if i.name == "w3"))
    assert q["w3_scale"].shape == () and q["w3_scale"] == pytest.approx(np.float32(np.abs(w3).max() / 127), rel=1e-6)
    bundle = read_step1(ws["temp"], ws["data"], None, cfg)
    lo, hi = compute_range(bundle.observers["r3"], "percentile", 255, 99.99)
    assert q["r3_scale"] == pytest.approx(np.float32((hi - min(lo, 0.0)) / 255), rel=1e-6)
    after_q = inits(built.output)
    assert "w4_quantized" in after_q and after_q["w2"].dtype == np.float32  # conv4 quantized as the user asked, conv2 float

    # The baseline is the user's cfg as edited, and the measured figure is the written cfg's model.
    assert report["baseline_label"] == "your cfg as edited"
    assert report["baseline"]["outputs"]["out"]["cosine"] == pytest.approx(output_cosine(ws["model"], edited.output, ws["dataset"]), abs=1e-4)
    assert report["measured"]["outputs"]["out"]["cosine"] == pytest.approx(output_cosine(ws["model"], built.output, ws["dataset"]), abs=1e-4)

    # Float compute: the proposed layers only; conv4 would be float by policy but the user made it uint8.
    floats, share = float_conv_share(built.output, OUTLIER_MACS)
    assert floats == set(report["layers"])
    assert report["float_compute"]["total"] == pytest.approx(share) and report["float_compute"]["policy"] == 0.0

    # A second run: the edited cfg now meets the target; nothing is written, and the summary says why.
    stat = cfg.stat()
    baks = set(cfg.parent.glob("*.bak"))
    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.99")
    assert code == 0, err
    assert "Proposal: your cfg as edited already meets the target; nothing to change." in out
    assert f"Nothing changed: {cfg} was left as it was (not rewritten, no backup)." in out
    yours = sorted(load_cfg(cfg).custom.values())
    assert f"float layers proposed: 0 (yours: {yours.count('float32')} float32, 1 uint8)" in out
    assert cfg.read_text() == after and cfg.stat().st_ino == stat.st_ino and cfg.stat().st_mtime_ns == stat.st_mtime_ns
    assert set(cfg.parent.glob("*.bak")) == baks


def test_a_percentile_edit_stays_percentile_when_the_proposal_clips_other_ranges(outlier_ws):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    cfg.write_text(edit_entry(cfg.read_text(), "r2", "algorithm", "percentile"))
    result, backup = hybridq.api.propose_cfg(cfg, ws["dataset"], options=hybridq.api.ProposalOptions(hybridq.proposal.Target(cosine=0.99)))
    # The proposal changes entries here, but never the one of the tensor the user edited.
    assert result.met and result.entries and "r2" not in result.entries
    parsed = load_cfg(cfg)
    assert parsed.entries["r2"].values["algorithm"] == "percentile"
    assert all(parsed.entries[t].values == v for t, v in result.entries.items())
    assert backup is not None and "algorithm: percentile" in backup.read_text()


def test_a_global_range_setting_edit_is_not_overridden_by_clips(outlier_ws):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    text = cfg.read_text().replace("\n  algorithm: minmax\n", "\n  algorithm: percentile\n", 1)
    assert "\n  algorithm: percentile\n" in text  # the settings block's algorithm (per-tensor keys are indented deeper)
    cfg.write_text(text)
    result, _ = hybridq.api.propose_cfg(cfg, ws["dataset"], options=hybridq.api.ProposalOptions(hybridq.proposal.Target(cosine=0.99)))
    # Every unedited entry follows the edited setting; the proposal does not try to change one.
    assert result.entries == {} and "settings algorithm" in result.edits
    assert not any(r.step in ("range", "outlier", "bias") for r in result.table), result.table
    parsed = load_cfg(cfg)
    assert parsed.settings.algorithm == "percentile" and all(e.values["algorithm"] != "mse" for e in parsed.entries.values())


def test_summary_line_counts_proposed_and_policy_floats_as_the_built_model_runs_them(outlier_ws, capsys):
    ws = outlier_ws
    out_dir = ws["dir"] / "p"
    code, out, err = cli(capsys, "step1", ws["model"], "-d", ws["dataset"], "--out", out_dir, "--proposal", "--target-cosine", "0.99")
    assert code == 0, err
    # The proposed layers (whatever the search chose, read from the written cfg) and conv4, float by policy
    # (it writes the graph output): shares from the hand-counted MACs.
    proposed = set(load_cfg(out_dir / "m.quantization.cfg").custom)
    line = next(ln for ln in out.splitlines() if "float layers proposed" in ln)
    assert line.startswith(
        f"  float layers proposed: {len(proposed)}; float compute {pct(OUTLIER_MACS, proposed | {'conv4'})} of the Conv/Gemm/MatMul MACs: "
        f"{pct(OUTLIER_MACS, proposed)} proposed, {pct(OUTLIER_MACS, {'conv4'})} by policy (graph-output Conv: 1 layer)"
    ), line
    assert "yours" not in line and "baseline (the default quantization)" in out
    built = hybridq.step2(out_dir / "m.model", out_dir / "m.data", out_dir / "m.quantization.cfg", ws["dir"] / "q.onnx")
    floats, share = float_conv_share(built.output, OUTLIER_MACS)
    assert floats == proposed | {"conv4"} and f"float compute {100 * share:.1f} %" in line
    # The layers table counts the same float layers.
    n = len(floats)
    assert built.layers["float32"] == n and re.search(rf"^\s*float32\s+{n}\s*$", out, re.M)


def test_nothing_changed_leaves_the_cfg_byte_identical_and_writes_no_backup(cnn_ws, capsys):
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    # The default meets the target; bias correction, free at run time, clearly helps (+6.6 dB), the ranges after it do not
    # beyond what 12 samples resolve (+0.5 dB): written once.
    code, out, err = cli(capsys, "propose", "--cfg", r1.cfg, "-d", cnn_ws["dataset"], "--target-cosine", "0.9")
    assert code == 0 and "Proposal: bias correction on 3 layer(s)." in out and "Wrote" in out, out + err
    backups = sorted(r1.cfg.parent.glob("*.bak"))
    # Proposing again finds nothing more: the cfg is left alone, byte for byte, with no new backup.
    for custom in ("{}", "\n  fc: float32  # keep the classifier float"):
        text = r1.cfg.read_text().replace("custom_quantize_layers: {}", f"custom_quantize_layers: {custom}".replace(": \n", ":\n"))
        r1.cfg.write_bytes(text.encode())
        stat = r1.cfg.stat()
        code, out, err = cli(capsys, "propose", "--cfg", r1.cfg, "-d", cnn_ws["dataset"], "--target-cosine", "0.9")
        assert code == 0, err
        assert "Proposal: your cfg as edited already meets the target; nothing to change." in out
        assert "Nothing changed" in out and "Wrote" not in out
        assert r1.cfg.read_bytes() == text.encode() and r1.cfg.stat().st_ino == stat.st_ino
        assert sorted(r1.cfg.parent.glob("*.bak")) == backups
    # With the user's float fc: 0 proposed, fc counted as yours, conv1 as policy (float_stem).
    line = next(ln for ln in out.splitlines() if "float layers proposed" in ln)
    assert line.startswith(
        f"  float layers proposed: 0 (yours: 1 float32); float compute {pct(RESIDUAL_MACS, {'conv1', 'fc'})} of the Conv/Gemm/MatMul MACs: "
        f"0.0 % proposed, {pct(RESIDUAL_MACS, {'fc'})} yours, {pct(RESIDUAL_MACS, {'conv1'})} by policy (float_stem: 1 layer)"
    ), line


def test_a_tensor_the_user_edited_is_never_a_range_candidate(outlier_ws):
    ws = outlier_ws
    parsed = load_cfg(ws["cfg"])
    bundle = read_step1(ws["temp"], ws["data"], None, ws["cfg"])
    plan = build(bundle.model, bundle.observers, bundle.meta, parsed.settings, Edits()).plan
    written = bundle.meta["written_entries"]
    (cand,) = range_fix(Context(bundle.model, bundle.observers, parsed.settings, plan, written, set()), Edits(), "mse")
    assert "r1" in cand.entries and cand.entries["r1"]["algorithm"] == "mse"  # unedited, the outlier tensor is clipped
    lo, hi = compute_range(bundle.observers["r1"], "mse", 255, parsed.settings.percentile)
    assert cand.entries["r1"]["max"][0] == pytest.approx(hi, rel=1e-6)
    (kept,) = range_fix(Context(bundle.model, bundle.observers, parsed.settings, plan, written, {"r1"}), Edits(), "mse")
    assert "r1" not in kept.entries and set(kept.entries) == set(cand.entries) - {"r1"}


def test_update_custom_layers_adds_lines_and_moves_no_comment():
    base = "# top\nsettings:\n  dtype: uint8\n# layers\ncustom_quantize_layers: {}  # none yet\n# params\nquantize_parameters: {}\n"
    out = update_custom_layers(base, {"conv2": "float32", "a: b": "float16"}, {"conv2": "proposal rank 1"})
    # `{}` becomes a block; the comment after it stays before quantize_parameters; a name with ': ' is quoted.
    assert out == ("# top\nsettings:\n  dtype: uint8\n# layers\ncustom_quantize_layers:  # none yet\n"
                   "  conv2: float32  # proposal rank 1\n  'a: b': float16\n# params\nquantize_parameters: {}\n")
    block = "custom_quantize_layers:\n    conv3: int16  # mine\n    # trailing note\n\n# params\nquantize_parameters: {}\n"
    out = update_custom_layers(block, {"conv2": "float32", "conv3": "float32"}, {})
    # The user's conv3 is not changed; the new entry takes the section's indentation, after its last line.
    assert out == "custom_quantize_layers:\n    conv3: int16  # mine\n    # trailing note\n    conv2: float32\n\n# params\nquantize_parameters: {}\n"
    assert update_custom_layers(block, {"conv3": "float16"}, {}) == block
    odd = "custom_quantize_layers: #mine\n  conv3: int16\nquantize_parameters: {}\n"  # the user's header line is kept as typed
    assert update_custom_layers(odd, {"conv2": "float32"}, {}) == "custom_quantize_layers: #mine\n  conv3: int16\n  conv2: float32\nquantize_parameters: {}\n"
    flow = "custom_quantize_layers: {conv3: int16}\nquantize_parameters: {}\n"
    assert load_cfg_text(update_custom_layers(flow, {"conv2": "float32"}, {})) == {"conv3": "int16", "conv2": "float32"}


def load_cfg_text(text: str) -> dict[str, str]:
    """custom_quantize_layers of cfg text, through the real loader."""
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load(text)["custom_quantize_layers"])


def test_update_entries_keeps_an_existing_comment_on_a_changed_key():
    text = "quantize_parameters:\n  r3:\n    algorithm: minmax\n    min: [0.0]\n    max: [8.9]  # looked at it\n    scale: [0.035]\n"
    out = update_entries(text, {"r3": {"algorithm": "mse", "min": [0.0], "max": [5.0], "scale": [0.0196]}}, {"r3": "proposal: clip"})
    assert out == "quantize_parameters:\n  r3:\n    algorithm: mse  # proposal: clip\n    min: [0.0]\n    max: [5.0]  # looked at it\n    scale: [0.0196]\n"


def test_keys_a_fix_adds_go_above_the_next_entrys_comment():
    """ruamel keeps the lines after an entry's last key ("# input of conv_b") on that key: keys a fix appends must
    come before them, or the next entry's comment reads as part of this one (the cfg still loads the same)."""
    text = ("quantize_parameters:\n  # input of conv_a\n  a:\n    max: [1.0]\n    zero_point: [128]\n"
            "  # input of conv_b\n  b:\n    max: [2.0]\n    zero_point: [128]  # mine\n  # input of conv_c\n  c:\n    max: [3.0]\n")
    out = update_entries(text, {"a": {"max": [1.0], "algorithm": "mse"}, "b": {"max": [2.0], "bias_correction": [0.5, 0.25]}},
                         {"a": "proposal: mse"})
    assert out == ("quantize_parameters:\n  # input of conv_a\n  a:\n    max: [1.0]\n    zero_point: [128]\n"
                   "    algorithm: mse # proposal: mse\n  # input of conv_b\n  b:\n    max: [2.0]\n    zero_point: [128]  # mine\n"
                   "    bias_correction: [0.5, 0.25]\n  # input of conv_c\n  c:\n    max: [3.0]\n")
    block = "quantize_parameters:\n  a:\n    max:\n    - 1.0\n  # input of b\n  b:\n    max: [2.0]\n"  # the comment on a list item
    assert update_entries(block, {"a": {"max": [1.0], "algorithm": "mse"}}, {}).endswith("    algorithm: mse\n  # input of b\n  b:\n    max: [2.0]\n")
    fixed = "quantize_parameters:\n  a:\n    max: [1.0]\n    bias_correction: [0.5]\n  # input of b\n  b:\n    max: [2.0]\n"
    assert update_entries(fixed, {"a": {"max": [1.0], "algorithm": "mse"}}, {}) == (  # the key holding it deleted: kept
        "quantize_parameters:\n  a:\n    max: [1.0]\n    algorithm: mse\n  # input of b\n  b:\n    max: [2.0]\n")
    empty = "quantize_parameters:\n  a: {}\n  b:\n    max: [1.0]\n"  # an entry with no key yet: nothing to move
    assert update_entries(empty, {"a": {"algorithm": "mse"}}, {}) == "quantize_parameters:\n  a:\n    algorithm: mse\n  b:\n    max: [1.0]\n"


def test_a_cfg_changed_while_the_proposal_ran_is_not_overwritten(outlier_ws, monkeypatch):
    cfg = outlier_ws["cfg"]
    real = hybridq.api.run_proposal

    def edit_meanwhile(*args, **kwargs):
        out = real(*args, **kwargs)
        cfg.write_text(cfg.read_text() + "# edited meanwhile\n")
        return out

    monkeypatch.setattr(hybridq.api, "run_proposal", edit_meanwhile)
    with pytest.raises(hybridq.errors.OutputError, match="was changed while the proposal ran"):
        hybridq.api.propose_cfg(cfg, outlier_ws["dataset"])
    assert cfg.read_text().endswith("# edited meanwhile\n") and list(cfg.parent.glob("*.bak")) == []


@pytest.mark.parametrize("tensor,key,value,message", [
    ("r1", "algorithm", "percentil", "algorithm 'percentil' of 'r1' is not valid. Did you mean: 'percentile'?"),
    # Found only when the edited cfg is built: still reported at the entry's line of the file.
    ("x", "zero_point", "[300]", "zero_point 300 of 'x' is outside uint8 [0, 255]"),
])
def test_an_invalid_edit_exits_2_at_its_line_and_leaves_the_cfg(outlier_ws, capsys, tensor, key, value, message):
    cfg = outlier_ws["cfg"]
    cfg.write_text(edit_entry(cfg.read_text(), tensor, key, value))
    before = cfg.read_bytes()
    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", outlier_ws["dataset"])
    assert code == 2 and "Traceback" not in err
    line = cfg.read_text().splitlines().index(f"  {tensor}:") + 1
    assert f"m.quantization.cfg:{line}: {message}" in err
    assert cfg.read_bytes() == before and list(cfg.parent.glob("*.bak")) == []


def test_a_layer_entry_step2_refuses_stops_the_proposal_before_it_writes(cnn_ws, capsys):
    """An entry only step2 finds wrong (a precision the layer has no quantized form for) is found before the search:
    the cfg is neither rewritten nor backed up. It was rewritten with the proposed float layers, then the final check
    exited 2."""
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    cfg = r1.cfg
    cfg.write_text(cfg.read_text().replace("custom_quantize_layers: {}\n", "custom_quantize_layers:\n  flatten: uint8\n"))
    before = cfg.read_bytes()
    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", cnn_ws["dataset"], "--target-snr", "80", "--max-float-fraction", "1")
    assert code == 2 and "Traceback" not in err
    assert "custom_quantize_layers['flatten'] = uint8 has no effect" in err, err
    assert cfg.read_bytes() == before and list(cfg.parent.glob("*.bak")) == []


def test_a_snapshot_of_another_model_is_refused_and_one_half_stale_is_warned_of(outlier_ws, capsys):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    # A snapshot of a residual CNN, 24 channels wide: its layers rank nothing in the outlier CNN.
    d = ws["dir"] / "other"
    d.mkdir()
    onnx.save(models.residual_cnn(channels=24), d / "cnn.onnx")  # its names are the outlier CNN's; no shape is
    listing = models.write_npy_dataset(d / "data", {"x": (1, 3, 16, 16)}, 4)
    other = hybridq.step1(d / "cnn.onnx", listing, out=d / "ws")
    hybridq.step2(other.model, other.data, other.cfg, d / "cnn.q.onnx")
    foreign = d / "foreign_snap"
    hybridq.analyze(d / "cnn.onnx", d / "cnn.q.onnx", listing, samples=2, dump=foreign)
    before = cfg.read_bytes()
    code, out, err = cli(capsys, "propose", foreign, "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.99")
    assert code == 2 and "dumped from another model" in err and str(foreign) in err and str(cfg) in err, err
    assert cfg.read_bytes() == before and not list(cfg.parent.glob("*.bak"))
    # A snapshot of this model with most layers renamed (an older model's dump): used, with a warning.
    hybridq.step2(ws["temp"], ws["data"], cfg, ws["dir"] / "q.onnx")
    own = ws["dir"] / "own_snap"
    hybridq.analyze(ws["model"], ws["dir"] / "q.onnx", ws["dataset"], samples=2, dump=own)
    manifest = json.loads((own / "manifest.json").read_text())
    names = [row["layer"] for row in manifest["tensors"].values()]
    for row in list(manifest["tensors"].values())[: len(names) // 2 + 1]:
        row["layer"] = "old_" + row["layer"]
    (own / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli(capsys, "propose", own, "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.99", "--json")
    assert code == 0 and json.loads(out)["measured"] is not None, err
    assert f"{len(names) // 2 + 1} of its {len(names)} layers (e.g. 'old_" in err, err


def test_an_edit_whose_only_reader_the_proposal_floats_is_named_as_no_longer_taking_effect(outlier_ws, capsys):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    cfg.write_text(edit_entry(cfg.read_text(), "r1", "algorithm", "percentile"))  # the outlier tensor, read by conv2 alone
    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.99", "--max-float-fraction", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"].get("conv2") == "float32", report["layers"]
    built = hybridq.step2(ws["temp"], ws["data"], cfg, ws["dir"] / "q.onnx")
    graph = onnx.load(str(built.output)).graph
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1"]
    assert "your edit of 'r1' no longer takes effect: the proposal keeps its reader conv2 float32" in err, err
    assert "your edit of 'r2'" not in err


def test_propose_strict_exits_3_when_the_target_is_not_met_and_0_when_it_is(outlier_ws, capsys):
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    unreachable = ["--target-snr", "200", "--max-float-layers", "0"]
    for strict, expected in (([], 0), (["--strict"], 3)):
        code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", ws["dataset"], *unreachable, *strict, "--json")
        assert code == expected and json.loads(out)["met"] is False, err
    code, out, err = cli(capsys, "propose", "--cfg", cfg, "-d", ws["dataset"], "--target-cosine", "0.5", "--strict", "--json")
    assert code == 0 and json.loads(out)["met"] is True, err


def _hand_edit(cfg: Path) -> str:
    """A top comment, a layer the user sets with a comment, and a dtype edit with one; returns the edited text."""
    text = "# my top comment: edited by hand\n" + cfg.read_text()
    text = text.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv4: uint8  # my own choice")
    text = edit_entry(text, "r2", "dtype", "int16  # wider for r2")
    cfg.write_text(text)
    return text


def test_step1_proposal_over_an_edited_cfg_keeps_its_entries_and_comments(outlier_ws):
    # SPEC 6: step1 --proposal, like propose, keeps the user's own entries and comments (it used to start from defaults).
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    text = _hand_edit(cfg)
    opts = hybridq.api.ProposalOptions(hybridq.proposal.Target(cosine=0.99), max_float_fraction=1.0)
    r = hybridq.step1(ws["model"], ws["dataset"], out=cfg.parent, proposal=opts)
    after = r.cfg.read_text()
    assert after != text and after.startswith("# my top comment: edited by hand\n")  # the proposal wrote into it
    assert "  conv4: uint8  # my own choice\n" in after and "    dtype: int16  # wider for r2\n" in after
    assert r.proposal.baseline_label == "your cfg as edited" and r.proposal.measured is not None
    parsed = load_cfg(r.cfg)
    assert parsed.custom["conv4"] == "uint8" and parsed.entries["r2"].values["dtype"] == "int16"
    assert r.backup.read_text() == text and list(cfg.parent.glob("*.bak")) == [r.backup]  # one backup, as before
    assert any("started from your edited cfg" in n for n in r.notes)
    built = hybridq.step2(r.model, r.data, r.cfg, cfg.parent / "q.onnx")  # the layer counts step1 printed are the cfg's
    floats, _ = float_conv_share(built.output, OUTLIER_MACS)  # read from the ONNX graph: weights not dequantized
    assert r.layers == built.layers and r.layers.get("float32", 0) == len(floats) >= len(r.proposal.layers)


def test_step1_proposal_over_a_cfg_edited_for_other_ranges_starts_fresh_and_says_why(outlier_ws):
    # Calibrated on fewer samples, the user's unedited entries would carry stale ranges: a fresh cfg, the edits in the .bak.
    ws, cfg = outlier_ws, outlier_ws["cfg"]
    text = _hand_edit(cfg)
    opts = hybridq.api.ProposalOptions(hybridq.proposal.Target(cosine=0.99), max_float_fraction=1.0, samples=4)
    r = hybridq.step1(ws["model"], ws["dataset"], out=cfg.parent, samples=8, proposal=opts)
    assert "my own choice" not in r.cfg.read_text() and r.backup.read_text() == text
    assert r.proposal.baseline_label == "the default quantization"
    assert any("not from your edited cfg" in n and "other ranges" in n for n in r.notes), r.notes


def test_a_target_not_met_names_the_budget_that_stopped_the_search(cnn_ws, capsys):
    """--max-float-layers 1 against an unreachable target: the advice names that budget (it always said
    --max-float-fraction), and with --eval it does not suggest --eval."""
    from types import SimpleNamespace

    from hybridq._cli_proposal import not_met_advice

    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws")
    code, out, err = cli(capsys, "propose", "--cfg", r1.cfg, "-d", cnn_ws["dataset"], "--target-snr", "90", "--max-float-layers", "1",
                         "--max-float-fraction", "1")
    assert code == 0, err
    assert "The target was NOT met" in out and "raise the budget (--max-float-layers)" in out, out
    assert "(--max-float-fraction)" in not_met_advice(SimpleNamespace(budget_hit="fraction", task_judged=False))
    assert "--eval" not in not_met_advice(SimpleNamespace(budget_hit=None, task_judged=True))


def test_a_hand_edited_weight_range_is_not_rescaled_by_an_equalization(tmp_path, capsys):
    """fc2 reads r1's outlier channel: the proposal equalizes r1 into w2. With w2's min/max edited by hand, that would
    apply the user's range to rescaled weights (a range they never saw): the site is left alone, the edit kept as written."""
    from tests import proposal_models as pm

    onnx.save(pm.informative_outlier_gemm(), tmp_path / "m.onnx")
    listing = models.write_npy_dataset(tmp_path / "data", {"x": (16, 32)}, 32)
    r1 = hybridq.step1(tmp_path / "m.onnx", listing, out=tmp_path / "ws", settings={"speed_check": False})
    clean = tmp_path / "clean.cfg"
    clean.write_text(r1.cfg.read_text())
    code, _, _ = cli(capsys, "propose", "--cfg", r1.cfg, "--dataset", listing)
    assert code == 0 and "equalize" in load_cfg(r1.cfg).entries["r1"].values  # the site the fix takes unedited
    w = load_cfg(clean).entries["w2"].values
    r1.cfg.write_text(edit_entry(clean.read_text(), "w2", "max", "[" + ", ".join(str(0.9 * v) for v in w["max"]) + "]"))
    edited = load_cfg(r1.cfg).entries["w2"].values["max"]
    code, _, _ = cli(capsys, "propose", "--cfg", r1.cfg, "--dataset", listing)
    cfg = load_cfg(r1.cfg)
    assert "equalize" not in cfg.entries["r1"].values and cfg.entries["w2"].values["max"] == edited


def test_a_layer_budget_used_up_by_your_own_float_layers_says_so(cnn_ws):
    """--max-float-layers 1 with the cfg's own `conv2: float32`: the proposal can add no layer, and its choice says the
    user's entry used the budget (it said only "the float budget allows no layer")."""
    r1 = hybridq.step1(cnn_ws["model"], cnn_ws["dataset"], out=cnn_ws["dir"] / "ws", settings={"speed_check": False})
    r1.cfg.write_text(r1.cfg.read_text().replace("custom_quantize_layers: {}", "custom_quantize_layers:\n  conv2: float32"))
    result, _ = hybridq.api.propose_cfg(r1.cfg, cnn_ws["dataset"], options=ProposalOptions(Target(cosine=0.99999999, snr_db=None), max_float_layers=1))
    assert not result.met and not result.layers
    assert "--max-float-layers 1 is used up by the cfg's own float layer(s) (conv2)" in result.choice, result.choice
