"""Bare latency of a torch.export program (.pt2) served as itself (format exported-program:
PyTorch runs the program's module) against the ONNX made from the same program (ONNX Runtime),
and eager PyTorch for reference: 1 thread, batches of 1 and 16, no server.

Run: .venv/bin/python benchmarks/pt2_runtime.py [--repeats 30]
Each model (models/resnet18, models/digits) is exported with torch.export (dynamic batch) into a
scratch folder and named as source.exported_program, as a user's .pt2 would be; both formats are
made by servetool's own exporters and run through the handler's own runtime classes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.convert import export  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402

MODELS = ("resnet18", "digits")
BATCHES = (1, 16)


def program_spec(name: str, folder: Path):
    """The model exported to a .pt2 (dynamic batch) and a spec naming it as its source."""
    spec = load_spec(ROOT / "models" / name)
    model = export.load_original(spec)
    example = torch.from_numpy(export.example_batch(spec, 2))
    program = torch.export.export(model, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    folder.mkdir(parents=True)
    torch.export.save(program, str(folder / "model.pt2"))
    (folder / "servetool.yaml").write_text(yaml.safe_dump({
        "name": name, "task": "tensor", "source": {"exported_program": "model.pt2"}}))
    return load_spec(folder), model


def median_ms(run, x: np.ndarray, repeats: int) -> float:
    run(x)  # first call: allocations, ONNX Runtime's arena
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(name: str, tmp: Path, repeats: int) -> list[tuple]:
    spec, eager = program_spec(name, tmp / name)
    original = export.load_original(spec)
    runners = {"eager": export.runner_for(eager)}
    for fmt in ("exported-program", "onnx"):
        artifact = export.export(spec, original, tmp / f"{name}-{fmt}", fmt)
        runners[fmt] = export.artifact_runner(artifact.format.runtime, artifact.path, 1,
                                              artifact.runtime_options)
    torch.set_num_threads(1)  # eager too (the program's runtime already set it)
    rows = []
    for batch in BATCHES:
        x = export.example_batch(spec, batch, seed=batch)
        ms = {k: median_ms(run, x, max(5, repeats // (4 if batch > 1 else 1)))
              for k, run in runners.items()}
        rows.append((name, batch, ms["exported-program"], ms["onnx"], ms["eager"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls at batch 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name in MODELS for row in measure(name, Path(tmp), args.repeats)]
    print(f"{'model':10} {'batch':>5} {'program ms':>11} {'onnx ms':>9} {'eager ms':>9} "
          f"{'program/onnx':>13} {'program/eager':>14}")
    for name, batch, program, onnx, eager in rows:
        print(f"{name:10} {batch:5d} {program:11.3f} {onnx:9.3f} {eager:9.3f} "
              f"{program / onnx:13.2f} {program / eager:14.2f}")


if __name__ == "__main__":
    main()
