"""How long task preprocessing takes on the fuzz suite's mutated images, the slowest ones included.

Run: .venv/bin/python benchmarks/fuzz_inputs.py [--inputs 5000] [--slowest 5] [--json]
The same seeded inputs tests/test_fuzz.py feeds (its corpus and mutations, INPUTS_PER_FORMAT per
format by default), each preprocessed for an 8x8 image model. Per format: inputs per second, the
median and p99 per input, and the slowest inputs with their seeds (to reproduce one:
tests/test_fuzz.py's mutated_inputs). The test asserts only that nothing escapes; a pathological
input (a decoder looping over a crafted header) shows here as a slow outlier, in wall time and in
this thread's CPU time (which another process's load does not inflate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handlers.imaging import DEFAULT_FORMATS  # noqa: E402
from tests.test_fuzz import INPUTS_PER_FORMAT, mutated_inputs  # noqa: E402


def one_format(fmt: str, inputs: int, slowest: int) -> dict:
    timings = []
    for seed, task, data in mutated_inputs(fmt, inputs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            task.preprocess(data)
        except Exception:  # noqa: BLE001, S110 (refusals are the point; the test checks which)
            pass
        timings.append((time.perf_counter() - wall, time.thread_time() - cpu, seed))
    walls = sorted(t[0] for t in timings)
    worst = sorted(timings, reverse=True)[:slowest]
    return {"format": fmt, "inputs": inputs, "inputs_per_s": round(inputs / sum(walls), 1),
            "median_ms": round(1000 * statistics.median(walls), 3),
            "p99_ms": round(1000 * walls[int(0.99 * (len(walls) - 1))], 3),
            "slowest": [{"seed": seed, "wall_ms": round(1000 * w, 1), "cpu_ms": round(1000 * c, 1)}
                        for w, c, seed in worst]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=INPUTS_PER_FORMAT)
    parser.add_argument("--slowest", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = [one_format(fmt, args.inputs, args.slowest) for fmt in DEFAULT_FORMATS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'format':<6} {'inputs/s':>9} {'median ms':>10} {'p99 ms':>8} {'slowest ms':>11} "
          f"{'its CPU ms':>10}  seed")
    for r in rows:
        top = r["slowest"][0]
        print(f"{r['format']:<6} {r['inputs_per_s']:>9} {r['median_ms']:>10} {r['p99_ms']:>8} "
              f"{top['wall_ms']:>11} {top['cpu_ms']:>10}  {top['seed']}")
    ratios = "  ".join(f"{r['format']} {r['slowest'][0]['wall_ms'] / max(r['median_ms'], 1e-6):.0f}x"
                       for r in rows)
    print(f"slowest input / median input: {ratios}")


if __name__ == "__main__":
    main()
