"""The compression example side by side: bare ONNX Runtime latency of the original model and of
what `servetool compress` made from it (pruned + distilled, and int8 on top), 1 thread, batches
of 1 and 16, measured in rounds that alternate the models so a busy machine slows all of them
alike. Accuracy is each folder's own gate figure (compress-report.json).

Run (after the compress run the README shows):
    .venv/bin/python models/digits-resnet/make_data.py --train
    .venv/bin/servetool compress models/digits-resnet --out /tmp/digits-resnet-compressed
    .venv/bin/python benchmarks/compress.py models/digits-resnet /tmp/digits-resnet-compressed
Served throughput: benchmarks/compress_served.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.convert.pipeline import convert  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402

BATCHES = (1, 16)


def onnx_file(folder: Path, fmt: str, scratch: Path) -> Path:
    """The folder's model as servetool packages it in `fmt`, gated as package gates it."""
    spec = load_spec(folder)
    artifact, report = convert(spec, fmt, scratch / f"{folder.name}-{fmt}")
    if not report.ok:
        raise SystemExit(f"{folder} in {fmt} failed its gate: {report.problems}")
    return artifact.path


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def one_round(run, feeds: dict, seconds: float) -> float:
    """Median ms of the calls made in `seconds`."""
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0, help="per round, model and batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="servetool-bench-compress-") as tmp:
        models = {"original (onnx)": onnx_file(args.original, "onnx", Path(tmp)),
                  "pruned + distilled (onnx)": onnx_file(args.compressed, "onnx", Path(tmp)),
                  "pruned + distilled (onnx-int8-static)":
                      onnx_file(args.compressed, "onnx-int8-static", Path(tmp))}
        sessions = {name: session(path) for name, path in models.items()}
        sizes = {name: path.stat().st_size for name, path in models.items()}
        spec = load_spec(args.original)
        shape = tuple(spec.inputs[0].shape)  # one example, without the batch axis
        name_in = spec.inputs[0].name
        rng = np.random.default_rng(0)
        feeds = {b: {name_in: rng.standard_normal((b, *shape)).astype(np.float32)}
                 for b in BATCHES}
        for s in sessions.values():  # warm up, and name the input as each file does
            s.run(None, {s.get_inputs()[0].name: feeds[1][name_in]})
        samples: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for b in BATCHES:
                for name, s in sessions.items():
                    x = {s.get_inputs()[0].name: feeds[b][name_in]}
                    samples.setdefault((name, b), []).append(one_round(s.run, x, args.seconds))
    report = json.loads((args.compressed / "compress-report.json").read_text())
    gate = report.get("gate") or {}
    base = {b: statistics.median(samples[(next(iter(sessions)), b)]) for b in BATCHES}
    print(f"# {spec.name}: ONNX Runtime 1 thread, median of {args.rounds} alternating rounds; "
          f"top-1 original {gate.get('original', float('nan')):.4f}, compressed "
          f"{gate.get('result', float('nan')):.4f} ({gate.get('samples')} held-out images)")
    print("| model | file MB | b=1 ms | speed-up b=1 | b=16 ms | speed-up b=16 |")
    print("|---|---|---|---|---|---|")
    for name in sessions:
        ms = {b: statistics.median(samples[(name, b)]) for b in BATCHES}
        print(f"| {name} | {sizes[name] / 1e6:.2f} | {ms[1]:.2f} | {base[1] / ms[1]:.2f}x | "
              f"{ms[16]:.1f} | {base[16] / ms[16]:.2f}x |")


if __name__ == "__main__":
    main()
