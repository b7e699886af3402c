"""Deploy-to-first-prediction time and sequential latency of the digits model on a real TorchServe.

Sequential requests arrive alone: each waits at most the model's batch delay (printed beside the
p50) before its batch of one runs; a p50 near 100 ms would mean TorchServe's default delay had
replaced the spec's.

Run: .venv/bin/python benchmarks/latency.py [--requests 100]
Packages models/digits into a scratch model store, starts TorchServe on free ports in a scratch run
folder, and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.engines.torchserve.process import ServerOptions, free_ports  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402
from servetool.operate import lifecycle  # noqa: E402
from servetool.operate.package import package  # noqa: E402
from servetool.targets.local import LocalTarget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sample = (ROOT / "models/digits/samples/digit_3.png").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        package(load_spec(ROOT / "models/digits"), store)
        ports = free_ports()
        target = LocalTarget(ServerOptions(run_dir=Path(tmp) / "run", model_store=store,
                                           base_config=ROOT / "config.properties", ports=ports))
        try:
            t0 = time.perf_counter()
            lifecycle.deploy(target, ["digits"])
            t_ready = time.perf_counter()
            client = target.client()
            # how long TorchServe holds a lone request for a batch to fill (the spec's
            # max_delay_ms, at least 1: a 0 must not become TorchServe's 100 ms default)
            registered = client.describe("digits")[0]
            headers = {"Authorization": f"Bearer {client.token('inference')}"}
            url = f"{target.running().url('inference')}/predictions/digits"
            session = requests.Session()
            session.trust_env = False
            first = session.post(url, data=sample, headers=headers, timeout=60)
            t_first = time.perf_counter()
            assert first.status_code == 200, first.text
            latencies = []
            for _ in range(args.requests):
                t = time.perf_counter()
                reply = session.post(url, data=sample, headers=headers, timeout=60)
                latencies.append((time.perf_counter() - t) * 1000)
                assert reply.status_code == 200
        finally:
            target.down()
    q = statistics.quantiles(latencies, n=100)
    result = {"deploy_s": round(t_ready - t0, 2), "deploy_to_first_prediction_s": round(t_first - t0, 2),
              "requests": args.requests, "p50_ms": round(statistics.median(latencies), 2),
              "p90_ms": round(q[89], 2), "p99_ms": round(q[98], 2),
              "batch_size": registered["batchSize"],
              "max_batch_delay_ms": registered["maxBatchDelay"],
              "top1": next(iter(first.json()))}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
