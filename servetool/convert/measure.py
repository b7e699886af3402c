"""Measure one format in a fresh process: load time, batch-1 latency, batched throughput, peak RSS.

measure(REQUEST) runs `python -m servetool.convert.measure REQUEST.json`, which prints one JSON
line (`servetool bench formats` and compress's report measure through it). A process per format
keeps their thread pools, caches and memory peaks from touching each other.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from servetool.errors import ServetoolError


class MeasureError(ServetoolError):
    pass


def measure(request: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """The figures of one request (an artifact and its runtime, or the eager model) measured in a
    fresh interpreter."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "servetool.convert.measure", f.name],
                              capture_output=True, text=True, timeout=timeout_s)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:  # the exception's own line (the last), not its traceback
        lines = proc.stderr.strip().splitlines()
        raise MeasureError(f"measuring {request.get('runtime', 'eager')} failed: "
                           f"{lines[-1].strip() if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    """Peak resident memory of this process image. Not getrusage's ru_maxrss: on Linux that keeps
    the high-water mark of the parent it was forked from, which is the whole bench."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_loop(run, inputs: list[np.ndarray], iterations: int, budget_s: float) -> list[float]:
    times, started = [], time.perf_counter()
    for i in range(iterations):
        t = time.perf_counter()
        run(inputs[i % len(inputs)])
        times.append(time.perf_counter() - t)
        if i >= 10 and time.perf_counter() - started > budget_s:
            break
    return times


LENGTHS = "__lengths__"  # a text set's real lengths: its rows are padded to the longest


def load_samples(path: str) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """{input name: samples} (in the spec's order) and the samples one by one, each cut to its
    own length where the set records lengths (a text alone is never padded)."""
    with np.load(path) as npz:
        samples = {name: npz[name] for name in npz.files if name != LENGTHS}
        lengths = npz[LENGTHS] if LENGTHS in npz.files else None
    count = len(next(iter(samples.values())))
    singles = []
    for i in range(min(count, 64)):
        cut = slice(None) if lengths is None else slice(0, int(lengths[i]))
        singles.append({k: np.ascontiguousarray(v[i:i + 1, cut] if lengths is not None
                                                else v[i:i + 1]) for k, v in samples.items()})
    return samples, singles


def main() -> None:
    with open(sys.argv[1]) as f:
        req = json.load(f)
    samples, singles = load_samples(req["inputs"])
    import torch

    torch.set_num_threads(req["threads"])
    baseline = rss_mb()
    t0 = time.perf_counter()
    if req["kind"] == "eager":
        from servetool.convert import export
        from servetool.model.spec import load_spec

        run = export.runner_for(export.load_original(load_spec(req["spec"])))
    else:
        from servetool.convert.export import artifact_runner

        run = artifact_runner(req["runtime"], req["artifact"], req["threads"], req["options"],
                              list(samples))
    load_ms = (time.perf_counter() - t0) * 1000
    count = len(next(iter(samples.values())))
    batch = req["batch"]
    reps = -(-batch // count)
    batched = [{k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch])
                for k, v in samples.items()}]
    timed_loop(run, singles, req["warmup"], 1e9)  # warm-up: allocations, kernel selection
    latencies = np.array(timed_loop(run, singles, req["iterations"], req["seconds"])) * 1000
    timed_loop(run, batched, 2, 1e9)
    batch_times = timed_loop(run, batched, max(5, req["iterations"] // 10), req["seconds"])
    extra = {}
    if req.get("inputs_long"):  # the same at batch 1 on long texts: latency grows with length
        _, long_singles = load_samples(req["inputs_long"])
        timed_loop(run, long_singles, 3, 1e9)
        extra["p50_long_ms"] = float(np.percentile(
            np.array(timed_loop(run, long_singles, req["iterations"], req["seconds"])) * 1000, 50))
    print(json.dumps({
        **extra,
        "load_ms": round(load_ms, 1),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "latency_runs": len(latencies),
        "throughput": batch * len(batch_times) / sum(batch_times),
        "peak_rss_mb": round(rss_mb(), 1),
        "model_rss_mb": round(rss_mb() - baseline, 1),
    }))


if __name__ == "__main__":
    main()
