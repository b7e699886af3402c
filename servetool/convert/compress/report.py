"""The compression report: one row per step (the original, each pruning step, the distilled
result, int8 on top) with parameters, MACs, file size, bare latency at batch 1 and 16 in each
serving format measured (compress.formats: ONNX Runtime and TorchScript by default) and top-1
accuracy; written as JSON, CSV and a PNG of accuracy against latency.

Latency is measured as `bench formats` measures it (servetool.convert.measure: each model
in its own process after a warm-up, on the same real inputs), on each step's ONNX export.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from servetool.model.spec import ModelSpec

COLUMNS = ["step", "params", "macs", "size_mb", "p50_ms_b1", "ms_b16", "speedup_b1", "accuracy",
           "accuracy_drop_points", "recovered_accuracy", "note"]
LATENCY_BATCH = 16
FILES = {"json": "compress-report.json", "csv": "compress-report.csv", "png": "compress-report.png"}


@dataclass(frozen=True)
class Bench:
    """How latency is measured; seconds 0 measures nothing (the rows keep the other columns)."""

    samples: np.ndarray  # real inputs (the validation set's first rows)
    folder: Path  # where the measuring process reads them from
    threads: int = 1
    seconds: float = 3.0
    formats: tuple[str, ...] = ("onnx", "torchscript")  # the first is the primary columns'

    def inputs_for(self, spec: ModelSpec) -> Path:
        """The samples as an .npz under the input name of `spec`'s model (a program names its
        input after forward's argument, which may not be the original's name)."""
        name = spec.inputs[0].name
        path = self.folder / f"latency-{name}.npz"
        if not path.is_file():
            np.savez(path, **{name: np.ascontiguousarray(self.samples[:64])})
        return path


def module_spec(spec: ModelSpec) -> ModelSpec:
    """The spec as the exporters should read it for a pruning step's model: a Python module,
    whatever the original's source was (a program or a Hugging Face folder takes other paths)."""
    return replace(spec, source=replace(spec.source, kind="state_dict"))


def exports(model, spec: ModelSpec, folder: Path, formats: tuple[str, ...],
            skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """The model in each format, exported as `package` exports it: {format: Artifact}. A format
    this model cannot take (TorchScript of an ONNX original) is left out, its reason kept in
    `skipped`."""
    from servetool.convert import export
    from servetool.errors import ServetoolError

    made = {}
    for fmt in formats:
        try:
            made[fmt] = export.export(spec, model, folder / fmt, fmt)
        except ServetoolError as exc:
            if skipped is not None:
                skipped[fmt] = str(exc).splitlines()[0]
    return made


def timing(artifacts: dict[str, Any], spec: ModelSpec, bench: Bench) -> dict[str, Any]:
    """A row's latency fields: per format, p50 ms of a batch of 1 and mean ms of a batch of 16;
    the first format's also as the row's primary columns."""
    if not bench.seconds:
        return {}
    from servetool.errors import ServetoolError

    per_format, failed = {}, {}
    for fmt, artifact in artifacts.items():
        try:
            per_format[fmt] = latency(artifact, spec, bench)
        except ServetoolError as exc:  # one format's measurement: the others' numbers stand
            failed[fmt] = str(exc)
    primary = next(iter(per_format.values()), {})
    return {**primary, "latency": per_format, **({"latency_failed": failed} if failed else {})}


def latency(artifact, spec: ModelSpec, bench: Bench) -> dict[str, float]:
    from servetool.convert.measure import measure

    numbers = measure({"kind": "runtime", "runtime": artifact.format.runtime,
                       "artifact": str(artifact.path), "options": artifact.runtime_options or {},
                       "inputs": str(bench.inputs_for(spec)), "threads": bench.threads,
                       "batch": LATENCY_BATCH, "iterations": 300, "seconds": bench.seconds,
                       "warmup": 10})
    return {"p50_ms_b1": round(numbers["p50_ms"], 4),
            "ms_b16": round(1000 * LATENCY_BATCH / numbers["throughput"], 4)}


def row(step: str, *, accuracy: float | None, size: int | None = None,
        counts: tuple[int, int] | None = None, timing: dict[str, float] | None = None,
        note: str = "") -> dict[str, Any]:
    macs, params = counts if counts else (None, None)
    return {"step": step, "params": params, "macs": macs,
            "size_mb": round(size / 1e6, 4) if size else None, **(timing or {}),
            "accuracy": accuracy, "note": note}


def finish(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's accuracy drop and batch-1 speed-up against the original (the first row), in
    each format."""
    first = rows[0]
    for r in rows:
        if r.get("accuracy") is not None and first.get("accuracy") is not None:
            r["accuracy_drop_points"] = round((first["accuracy"] - r["accuracy"]) * 100, 2)
        if r.get("p50_ms_b1") and first.get("p50_ms_b1"):
            r["speedup_b1"] = round(first["p50_ms_b1"] / r["p50_ms_b1"], 2)
        for fmt, why in r.pop("latency_failed", {}).items():
            r["note"] = "; ".join(filter(None, [r.get("note"), f"{fmt} not measured ({why})"]))
        for fmt, numbers in r.get("latency", {}).items():
            base = first.get("latency", {}).get(fmt) or first.get("latency", {}).get("onnx")
            if base:  # int8 runs in ONNX Runtime: against the original's ONNX
                numbers["speedup_b1"] = round(base["p50_ms_b1"] / numbers["p50_ms_b1"], 2)
    return rows


def write(report: dict[str, Any], out: Path) -> dict[str, str]:
    """compress-report.json, .csv and .png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: str(out / name) for kind, name in FILES.items()}
    report = {**report, "files": paths}
    Path(paths["json"]).write_text(json.dumps(report, indent=2) + "\n")
    formats = _formats(report)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + [f"{fmt}_{key}" for fmt in formats
                                                         for key in ("p50_ms_b1", "ms_b16")],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **{f"{fmt}_{key}": value for fmt, numbers in
                                  r.get("latency", {}).items() for key, value in numbers.items()}}
                         for r in report["rows"])
    _chart(report, Path(paths["png"]))
    return paths


def table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table (what the command prints)."""
    formats = _formats(report)
    heads = ["step", "params", "MMACs", "size MB",
             *(f"{fmt} ms b=1 / b=16 (speed-up)" for fmt in formats), "top-1", "drop (pts)",
             "note"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in report["rows"]:
        cells = [r["step"], _number(r.get("params")),
                 f"{r['macs'] / 1e6:.2f}" if r.get("macs") else "-", _number(r.get("size_mb")),
                 *(_latency_cell(r, fmt) for fmt in formats),
                 f"{r['accuracy']:.2%}" if r.get("accuracy") is not None else "-",
                 _number(r.get("accuracy_drop_points")), r.get("note") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _formats(report: dict[str, Any]) -> list[str]:
    """The formats measured, in their first appearance's order (int8's is its own)."""
    seen: dict[str, None] = {}
    for r in report["rows"]:
        seen.update(dict.fromkeys(r.get("latency", {})))
    return list(seen)


def _latency_cell(row: dict[str, Any], fmt: str) -> str:
    numbers = row.get("latency", {}).get(fmt)
    if not numbers:
        return "-"
    speedup = f" ({numbers['speedup_b1']:.2f}x)" if numbers.get("speedup_b1") else ""
    return f"{numbers['p50_ms_b1']:g} / {numbers['ms_b16']:g}{speedup}"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("accuracy") is not None]
    timed = [r for r in rows if r.get("p50_ms_b1")]
    fig, axis = plt.subplots(figsize=(7, 4.5))
    if timed:
        primary = next(iter(timed[0].get("latency", {"ONNX Runtime": 0})))
        xs, label = [r["p50_ms_b1"] for r in timed], f"{primary} p50 latency, batch 1 (ms)"
    else:  # no latency measured: MACs stand in for the cost
        timed = [r for r in rows if r.get("macs")]
        xs, label = [r["macs"] / 1e6 for r in timed], "MMACs per example"
    ys = [r["accuracy"] * 100 for r in timed]
    axis.plot(xs, ys, "o-", color="#4C72B0")
    recovered = [(x, r["recovered_accuracy"] * 100) for x, r in zip(xs, timed, strict=True)
                 if r.get("recovered_accuracy") is not None]
    if recovered:  # between pruning steps: the same model after its recovery epochs
        axis.plot(*zip(*recovered, strict=True), "o", mfc="none", color="#55A868",
                  label="after recovery")
        axis.legend(fontsize=8)
    for x, y, r in zip(xs, ys, timed, strict=True):
        axis.annotate(r["step"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel(label)
    axis.set_ylabel("top-1 accuracy on the validation set (%)")
    axis.set_title(f"{report['model']}: compression steps")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
