"""Reports render a hand-made AnalysisResult; the txt and csv always parse back."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from hybridq.analysis import AnalysisResult, LayerError
from hybridq.metrics import Metrics
from hybridq.report import CSV_COLUMNS, render_html, render_txt, verdict, write_reports
from hybridq.tables import rich_table
from hybridq.snapshot import load_snapshot, write_snapshot


def m(cos: float, euc: float, snr: float, mx: float) -> Metrics:
    return Metrics(cos, euc, snr, mx, per_sample={"cosine": [cos], "euclid": [euc], "snr_db": [snr], "max_abs": [mx]})


def layer(tensor: str, op: str, entire: Metrics, single: Metrics | None, name: str | None = None) -> LayerError:
    return LayerError(
        tensor, name or tensor, op, (1, 8, 4, 4), "float32", entire, single, quant_tensor=f"{tensor}_dq",
        precision="uint8" if single is not None else "float32",
    )


def result(output_cos: float = 0.9995) -> AnalysisResult:
    return AnalysisResult(
        layers=[
            # lossless: SNR is infinite
            layer("conv1_out", "Conv", m(1.0, 0.0, math.inf, 0.0), m(1.0, 0.0, math.inf, 0.0), "conv1"),
            # RKNN's fixed columns run together from a Euclidean distance of 1000 on
            layer("a/very/long/tensor:0", "Conv", m(0.99999, 123456.789, 45.1, 30.0), m(0.93, 1000.0, 12.0, 2.5)),
            # not quantized: no single error
            layer("pool", "MaxPool", m(0.9991, 1234.5, 30.2, 0.1), None),
            layer("y", "Gemm", m(output_cos, 5.0, 28.0, 0.25), m(0.9999, 0.5, 40.0, 0.01)),
        ],
        outputs=["y"],
        n_samples=4,
        notes=["single error not computed for 1 layer(s): pool"],
    )


def data_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    return [re.split(r"\s*\|\s*| {2,}", line.strip()) for line in lines[start:]]


def test_txt_columns_never_run_together() -> None:
    text = render_txt(result())
    rows = data_rows(text)
    assert len(rows) == 4
    # label + 4 entire + 4 single cells on every row, even with euclid >= 1000 and missing values
    assert {len(r) for r in rows} == {9}
    # RKNN's [OpType] first, then the one name used everywhere: node [tensor] precision
    assert rows[0][0] == "[Conv] conv1 [conv1_out] uint8"
    assert rows[1][0] == "[Conv] a/very/long/tensor:0 [a/very/long/tensor:0] uint8"
    assert float(rows[1][2]) == pytest.approx(123456.789, rel=1e-5)
    assert float(rows[1][6]) == 1000.0
    assert rows[0][3] == "inf"
    assert rows[2][5:] == ["-", "-", "-", "-"]
    # every data row has the same length: the columns line up
    assert len({len(line) for line in text.splitlines()[-4:] if "-" not in line[-2:]}) == 1
    assert "# note: single error not computed" in text


def test_write_reports_and_csv_parses_back(tmp_path: Path) -> None:
    r = result()
    paths = write_reports(r, tmp_path)
    assert [p.name for p in paths] == ["error_analysis.txt", "error_analysis.csv", "error_analysis.png", "report.html"]
    assert all(p.stat().st_size > 0 for p in paths)
    with open(tmp_path / "error_analysis.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(CSV_COLUMNS)
    assert {len(row) for row in rows} == {len(CSV_COLUMNS)}
    recs = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert [x["tensor"] for x in recs] == [x.tensor for x in r.layers]
    # full precision: float() gives the value back exactly
    assert float(recs[1]["entire_euclid"]) == 123456.789
    assert float(recs[0]["entire_snr_db"]) == math.inf
    assert recs[2]["single_cosine"] == ""
    assert (tmp_path / "error_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script>" in page and "sortable" in page
    assert "a/very/long/tensor:0" in page
    assert not list(tmp_path.glob(".*"))  # written through temp files, none left
    # the same result gives byte-identical files
    again = write_reports(result(), tmp_path / "again")
    for p, q in zip(paths, again):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_html_escapes_names() -> None:
    r = result()
    r.layers[0].layer = "<script>alert(1)</script>$x$"
    page = render_html(r, png=b"")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;$x$" in page


def test_rich_table_lists_worst_first_and_highlights() -> None:
    console = Console(record=True, width=250, color_system="truecolor")
    console.print(rich_table(result(), top=2))
    text = console.export_text(clear=False)
    assert "worst 2 of 4 layers" in text
    lines = [line for line in text.splitlines() if line.startswith("│")]
    assert "a/very/long/tensor:0" in lines[0]  # single cosine 0.93: the layer that adds error
    assert len(lines) == 2
    assert "\x1b[1;31" in console.export_text(styles=True)  # the flagged cell is bold red


def test_verdict() -> None:
    ok = verdict(result())
    assert ok.startswith("OK:") and "y [y] uint8" in ok and "a/very/long/tensor:0" in ok and "\n" not in ok
    bad = verdict(result(output_cos=0.95))
    assert bad.startswith("CHECK:") and "0.950000" in bad


def test_snapshot_of_a_result_round_trips(tmp_path: Path) -> None:
    r = result()
    write_snapshot(r, tmp_path)
    back = load_snapshot(tmp_path)
    assert back == r
    assert render_txt(back) == render_txt(r)


def test_manifest_is_strict_json_and_old_string_manifests_still_read(tmp_path: Path) -> None:
    import json

    r = result()
    write_snapshot(r, tmp_path)
    text = (tmp_path / "manifest.json").read_text()

    def refuse(token: str) -> None:
        raise ValueError(token)

    doc = json.loads(text, parse_constant=refuse)
    # conv1 is lossless: its SNR is written as null and listed as "inf" by its JSON Pointer
    assert doc["tensors"]["conv1_out"]["entire"]["snr_db"] is None
    assert doc["nonfinite"]["/tensors/conv1_out/entire/snr_db"] == "inf"
    assert '"inf"' not in text.replace('": "inf"', "")  # no number written as a string
    # a manifest from before (non-finite numbers as strings) reads back the same
    old = json.loads(text)
    for ptr, kind in old.pop("nonfinite").items():
        node = old
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]]
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = kind
        else:
            node[last] = kind
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert load_snapshot(tmp_path) == r
