"""`servetool bench formats`: one row per serving format, measured in one run on the same inputs.

Each format is converted and gated (the gate's verdict is reported, not enforced, so that a format
that drifts still shows its numbers), then measured in its own process: batch-1 latency after a
warm-up, throughput at a larger batch, artifact size and peak memory, and speedup against eager
PyTorch measured the same way.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from servetool.convert import export
from servetool.convert.measure import measure
from servetool.convert.pipeline import convert
from servetool.errors import ServetoolError
from servetool.model.formats import FORMATS
from servetool.model.samples import load_data
from servetool.model.spec import ModelSpec

COLUMNS = ["format", "precision", "accuracy", "accuracy_drop_points", "map50", "gate", "p50_ms", "p90_ms",
           "p50_long_ms", "throughput", "size_mb", "peak_rss_mb", "load_ms", "speedup_vs_eager"]


def bench_formats(spec: ModelSpec, formats: list[str], *, batch: int = 32, iterations: int = 300,
                  seconds: float = 8.0, threads: int | None = None,
                  others: list[ModelSpec] = (),
                  progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The table; `others` are other versions of the same model (the folder `servetool compress`
    wrote): their rows are measured in the same run, on the same inputs, and their accuracy drop
    and speedup read against this model's eager reference."""
    from handlers.runtimes import available_cores

    threads = threads or available_cores()
    original = export.load_original(spec)
    with tempfile.TemporaryDirectory(prefix=f"servetool-bench-{spec.name}-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        common = {"inputs": str(inputs), "threads": threads, "batch": batch,
                  "iterations": iterations, "seconds": seconds, "warmup": 20}
        if spec.is_text():  # short sentences, and long texts for a second batch-1 latency
            text_sets, tokens = save_text_sets(spec, Path(tmp))
            common.update(inputs=str(text_sets["short"]), inputs_long=str(text_sets["long"]))
        else:
            samples = export.sample_inputs(spec, 64)
            np.savez(inputs, **(samples if isinstance(samples, dict) else
                                {spec.inputs[0].name: samples}))
        rows: list[dict[str, Any]] = []
        if spec.source.kind != "onnx":
            progress("eager PyTorch: measuring")
            eager = measure({**common, "kind": "eager", "spec": str(spec.spec_file),
                             "input_names": [i.name for i in spec.inputs]})
            rows.append(_row("eager", "fp32", None, eager, _source_size(spec),
                             accuracy=_eager_accuracy(spec, original)))
        rows += _format_rows(spec, formats, common, Path(tmp), progress, original)
        for other in others:  # another version: its own original, the same inputs
            label = f"v{other.version}"
            rows += _format_rows(other, formats, {**common, "inputs": str(_renamed(
                inputs, spec, other, Path(tmp)))} if not spec.is_text() else common,
                Path(tmp) / label, progress, None, label)
    eager = next((r for r in rows if r["format"] == "eager"), {})
    eager_p50 = eager.get("p50_ms")
    for row in rows:
        if row.get("version") and eager.get("accuracy") is not None and row.get("accuracy") \
                is not None:  # against this model's original, not the version's own
            row["accuracy_drop_points"] = round((eager["accuracy"] - row["accuracy"]) * 100, 2)
    for row in rows:
        if "p50_ms" in row:
            row["speedup_vs_eager"] = round(eager_p50 / row["p50_ms"], 2) if eager_p50 else None
    result = {"model": spec.name, "threads": threads, "batch": batch, "rows": rows,
              "task": spec.task}
    if spec.task == "object-detection":
        from servetool.model.coco_eval import SETTINGS

        result["evaluator"] = SETTINGS
    if spec.is_text():
        result["tokens"] = tokens
    return result


def _format_rows(spec: ModelSpec, formats: list[str], common: dict[str, Any], tmp: Path,
                 progress: Callable[[str], None], original=None,
                 version: str | None = None) -> list[dict[str, Any]]:
    """Each format converted, gated (reported, not enforced) and measured in its own process."""
    rows = []
    for i, fmt in enumerate(formats, 1):
        name = f"{fmt} ({version})" if version else fmt
        progress(f"[{i}/{len(formats)}] {name}: converting and gating")
        try:
            artifact, report = convert(spec, fmt, tmp / fmt, original=original, accept_drift=True)
        except ServetoolError as exc:
            rows.append({"format": name, "skipped": str(exc).splitlines()[0]})
            progress(f"[{i}/{len(formats)}] {name}: skipped ({str(exc).splitlines()[0]})")
            continue
        progress(f"[{i}/{len(formats)}] {name}: measuring")
        numbers = measure({**common, "kind": "runtime", "runtime": artifact.format.runtime,
                           "artifact": str(artifact.path), "options": artifact.runtime_options})
        rows.append({**_row(name, artifact.format.precision, report, numbers, artifact.size_bytes),
                     **({"version": version} if version else {})})
    return rows


def _renamed(inputs: Path, spec: ModelSpec, other: ModelSpec, tmp: Path) -> Path:
    """The same inputs under the other version's input name (a program names its input after
    forward's argument)."""
    if [i.name for i in other.inputs] == [i.name for i in spec.inputs]:
        return inputs
    with np.load(inputs) as data:
        arrays = [data[i.name] for i in spec.inputs]
    path = tmp / f"inputs-v{other.version}.npz"
    np.savez(path, **{i.name: a for i, a in zip(other.inputs, arrays, strict=True)})
    return path


def save_text_sets(spec: ModelSpec, folder: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """The sample sentences as the short set; long texts (several sentences joined, cut at the
    model's max_length) as the long one. Each an .npz padded to its longest, with lengths."""
    from servetool.convert.measure import LENGTHS
    from servetool.model.samples import collate_texts, encode_texts, sample_texts

    short = sample_texts(spec, 64)
    joined = " ".join(short)
    long = [" ".join([joined[i:], joined[:i]]) for i in range(0, 64 * 37, 37)][:64]
    paths, tokens = {}, {}
    for name, texts in (("short", short), ("long", long)):
        encoded = encode_texts(spec, texts)
        lengths = [e.tokens for e in encoded]
        tokens[name] = int(np.mean(lengths))  # the mean: what the latency column is read by
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], **collate_texts(spec, encoded), **{LENGTHS: np.array(lengths)})
    return paths, tokens


def _source_size(spec: ModelSpec) -> int:
    path = spec.source.path
    if path is None:
        return 0
    if path.is_dir():  # a Hugging Face folder: its weights
        from servetool.model import hf

        return sum((path / name).stat().st_size for name in hf.WEIGHTS if (path / name).is_file())
    return path.stat().st_size


def _eager_accuracy(spec: ModelSpec, original) -> float | tuple[float, float] | None:
    """The original's top-1 accuracy, or a detector's (mAP@0.5:0.95, mAP@0.5), on the spec's
    labelled set."""
    if spec.validation is None:
        return None
    if spec.task == "object-detection":
        from servetool.convert import detection_gate

        found = detection_gate.original_map(spec, export.runner_for(original))
        return (found["map"], found["map50"]) if found else None
    from servetool.convert.gate import top1_accuracy

    x, y = load_data(spec, spec.validation)
    if y is None:
        return None
    return top1_accuracy(export.runner_for(original), export.as_input_dtypes(spec, x), y)


def _row(fmt: str, precision: str, report, numbers: dict[str, Any], size: int,
         accuracy: float | None = None) -> dict[str, Any]:
    """One table row; `report` is the gate's (None for the eager reference, whose accuracy is given)."""
    drop = 0.0 if accuracy is not None else None
    map50 = None
    if isinstance(accuracy, tuple):  # a detector's eager mAPs
        accuracy, map50 = accuracy
    if report is not None and report.accuracy is not None:
        accuracy, drop = report.accuracy.converted, report.accuracy.drop_points
    detection = report.detection if report is not None else None
    if detection and detection.get("map_converted") is not None:
        accuracy, drop = detection["map_converted"], detection["drop_points"]
        map50 = detection["map50_converted"]
    if report is None:
        gate = "reference"
    else:
        gate = "pass" if report.ok else "FAIL: " + "; ".join(report.problems)
    return {
        "format": fmt,
        "precision": precision,
        "accuracy": None if accuracy is None else round(accuracy, 4),
        "accuracy_drop_points": None if drop is None else round(drop, 2),
        "map50": None if map50 is None else round(map50, 4),
        "gate": gate,
        "p50_ms": round(numbers["p50_ms"], 4),
        "p90_ms": round(numbers["p90_ms"], 4),
        "p50_long_ms": round(numbers["p50_long_ms"], 4) if "p50_long_ms" in numbers else None,
        "throughput": round(numbers["throughput"], 1),
        "size_mb": round(size / 1e6, 3),
        "peak_rss_mb": numbers["peak_rss_mb"],
        "load_ms": numbers["load_ms"],
    }


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """The table as Markdown and CSV, and a PNG bar chart; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['model']}-formats"
    measured = [r for r in result["rows"] if "p50_ms" in r]
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["skipped"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    Path(f"{stem}.md").write_text(markdown_table(result))
    _chart(result, measured, Path(f"{stem}.png"))
    return {"markdown": f"{stem}.md", "csv": f"{stem}.csv", "png": f"{stem}.png"}


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "accuracy" and row.get("map50") is None:
        return f"{value:.2%}"
    if key in ("accuracy", "map50"):  # mAP: as COCO reports it
        return f"{value:.4f}"
    if key in ("p50_ms", "p90_ms", "p50_long_ms"):
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    if key == "speedup_vs_eager":
        return f"{value:.2f}x"
    return str(value)


def markdown_table(result: dict[str, Any]) -> str:
    heads = ["format", "precision", "top-1 accuracy", "drop (pts)", "p50 ms (b=1)", "p90 ms (b=1)",
             f"throughput/s (b={result['batch']})", "size MB", "peak RSS MB", "speedup vs eager",
             "gate"]
    keys = ["format", "precision", "accuracy", "accuracy_drop_points", "p50_ms", "p90_ms",
            "throughput", "size_mb", "peak_rss_mb", "speedup_vs_eager", "gate"]
    if "tokens" in result:  # text: batch-1 latency on short sentences and on long texts
        short, long = result["tokens"]["short"], result["tokens"]["long"]
        heads[4:6] = [f"p50 ms (b=1, ~{short} tokens)", f"p50 ms (b=1, ~{long} tokens)"]
        keys[4:6] = ["p50_ms", "p50_long_ms"]
        heads[6] = f"texts/s (b={result['batch']}, short)"
    if result.get("task") == "object-detection":  # the mission's table: mAP, not top-1
        heads[2:4] = ["mAP@0.5:0.95", "drop (pts)", "mAP@0.5"]
        keys[2:4] = ["accuracy", "accuracy_drop_points", "map50"]
    lines = [f"# {result['model']}: serving formats ({result['threads']} thread(s), same inputs)",
             "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['format']} | skipped: {row['skipped']} |" + " |" * (len(heads) - 2))
        else:
            lines.append("| " + " | ".join(_cell(row, k) for k in keys) + " |")
    if result.get("evaluator"):
        lines += ["", f"mAP: {result['evaluator']}."]
    return "\n".join(lines) + "\n"


def _chart(result: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["format"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(names, [r["p50_ms"] for r in rows], color="#4C72B0")
    left.set_title("p50 latency, batch 1 (ms, lower is better)")
    for bar, row in zip(bars, rows, strict=True):
        if row.get("speedup_vs_eager"):
            left.annotate(f"{row['speedup_vs_eager']:.1f}x", (bar.get_x() + bar.get_width() / 2,
                                                            bar.get_height()), ha="center",
                          va="bottom", fontsize=8)
    right.bar(names, [r["throughput"] for r in rows], color="#55A868")
    right.set_title(f"throughput at batch {result['batch']} (samples/s)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=35, labelsize=8)
    fig.suptitle(f"{result['model']}: {result['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFAULT_FORMATS = [f for f in FORMATS if not f.startswith("tensorrt")] + ["tensorrt"]
