"""`servetool bench formats`: real measurements, and output files that exist and parse."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import DIGITS

SERVETOOL = str(Path(sys.executable).with_name("servetool"))
REQUIRED = {"format", "accuracy", "p50_ms", "throughput", "size_mb", "speedup_vs_eager"}


def test_bench_formats_writes_a_table_csv_chart_and_json(tmp_path):
    proc = subprocess.run(
        [SERVETOOL, "bench", "formats", str(DIGITS), "--format", "onnx", "--format",
         "onnx-int8-static", "--format", "tensorrt", "--iterations", "30", "--seconds", "1",
         "--batch", "8", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[2/3] onnx-int8-static: measuring" in proc.stderr  # progress on stderr
    result = json.loads(proc.stdout)
    rows = {r["format"]: r for r in result["rows"]}
    assert list(rows) == ["eager", "onnx", "onnx-int8-static", "tensorrt"]
    for name in ("eager", "onnx", "onnx-int8-static"):
        row = rows[name]
        assert set(row) >= REQUIRED
        assert row["p50_ms"] > 0 and row["throughput"] > 0 and row["size_mb"] > 0
        assert row["accuracy"] > 0.99 and row["peak_rss_mb"] > 50
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    assert rows["onnx"]["speedup_vs_eager"] == round(rows["eager"]["p50_ms"] / rows["onnx"]["p50_ms"], 2)
    assert rows["onnx-int8-static"]["size_mb"] < rows["onnx"]["size_mb"] / 2
    assert "CUDA" in rows["tensorrt"]["skipped"]

    files = result["files"]
    with open(files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["format"] for r in table] == list(rows)
    assert float(table[1]["p50_ms"]) == rows["onnx"]["p50_ms"]
    markdown = Path(files["markdown"]).read_text()
    assert markdown.count("\n| ") == 5 and "| onnx-int8-static | int8 |" in markdown
    with Image.open(files["png"]) as chart:
        assert chart.format == "PNG" and chart.width > 500


def test_bench_formats_of_a_detector_is_the_map_table(tmp_path):
    """For a detector the table's quality columns are mAP@0.5:0.95 and mAP@0.5 on its labelled
    canvases (the eager row from the original, each format's from the gate), evaluator named."""
    example = DIGITS.parent / "digits-detect"
    proc = subprocess.run(
        [SERVETOOL, "bench", "formats", str(example), "--format", "onnx", "--iterations", "20",
         "--seconds", "1", "--batch", "4", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {r["format"]: r for r in result["rows"]}
    expected = json.loads((example / "metrics.json").read_text())
    assert rows["eager"]["accuracy"] == expected["held_out_map_50_95"]
    assert rows["eager"]["map50"] == expected["held_out_map_50"]
    assert abs(rows["onnx"]["accuracy"] - rows["eager"]["accuracy"]) < 0.002
    assert rows["onnx"]["gate"] == "pass" and rows["onnx"]["p50_ms"] > 0
    markdown = Path(result["files"]["markdown"]).read_text()
    assert "| format | precision | mAP@0.5:0.95 | drop (pts) | mAP@0.5 |" in markdown
    assert "pycocotools COCOeval, IoU 0.50:0.95" in markdown
