"""What fronting TorchServe for a canary costs: direct, HAProxy with the split on
(servetool/engines/torchserve/split.py, 10% to version 2.0, servetool's exporter reading its log
lines), and servetool's Python gateway (no split), side by side in one run.

Run: .venv/bin/python benchmarks/canary_proxy.py [--model digits|resnet18] [--seconds 15]
       [--clients 8] [--rounds 2]
Packages the model, deploys it locally on free ports with a second version loaded, then loads each
path with the same generator (wrk when installed), the paths alternating over the rounds. Prints
throughput, p50 and p99 of each, the ratios to direct, and each proxy's CPU seconds per 1,000
requests (psutil: what it takes from the cores the model needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gateway import deploy_scratch, load, start_gateway  # noqa: E402
from servetool.engines.torchserve import split  # noqa: E402
from servetool.engines.torchserve.process import free_ports  # noqa: E402
from servetool.operate.lifecycle import Lifecycle  # noqa: E402
from tests.test_lifecycle import rewrite_archive  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (HAProxy's worker is its master's child)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(t.user + t.system for t in (p.cpu_times() for p in [proc, *proc.children(True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = ROOT / "models" / args.model
    samples = model_dir / "samples"
    rows: dict[str, list[dict]] = {"direct": [], "haproxy-split": [], "python-gateway": []}
    cpu: dict[str, list[float]] = {"haproxy-split": [], "python-gateway": []}
    with tempfile.TemporaryDirectory() as tmp:
        target, deployed = deploy_scratch(model_dir, Path(tmp))
        store, run = target.opts.model_store, target.opts.run_dir
        name = deployed["models"][0]["name"]
        life = Lifecycle(target)
        life.install(rewrite_archive(store / f"{name}.mar", Path(tmp) / "v2" / f"{name}.mar",
                                     version="2.0"))
        life.promote(name, "1.0")
        ports = free_ports(("split", "split_metrics", "exporter"))
        # HAProxy with servetool's exporter beside it (the per-request log lines it reads into
        # histograms are part of what the split costs)
        proxy = split.start(split.SplitOptions(
            run, ("127.0.0.1", ports["split"]), ("127.0.0.1", target.opts.ports["inference"]),
            ("127.0.0.1", ports["split_metrics"]), ports["exporter"]))
        split.set_canary(run, name, "2.0", 10)
        gateway, gateway_base, shared_key = start_gateway(run, Path(tmp) / "keys")
        try:
            key = target.client().token("inference")
            paths = {"direct": (deployed["models"][0]["predictions_url"], key, None),
                     "haproxy-split": (f"http://127.0.0.1:{ports['split']}/predictions/{name}",
                                       key, proxy.pid),
                     "python-gateway": (f"{gateway_base}/predictions/{name}", shared_key,
                                        gateway.pid)}
            load(paths["direct"][0], samples, key, args.clients, 5)  # warm-up
            for round_ in range(args.rounds):
                for label, (url, token, pid) in paths.items():
                    print(f"... round {round_ + 1}: {label}", file=sys.stderr)
                    before = cpu_seconds(pid) if pid else 0.0
                    result = load(url, samples, token, args.clients, args.seconds)
                    rows[label].append(result)
                    if pid:
                        sent = max(result["throughput"] * args.seconds, 1)
                        cpu[label].append((cpu_seconds(pid) - before) / sent * 1000)
        finally:
            proxy.terminate()
            gateway.terminate()
            target.down()
    summary = {}
    for label, results in rows.items():
        summary[label] = {k: round(statistics.mean(r[k] for r in results), 2)
                          for k in ("throughput", "p50_ms", "p99_ms")}
        summary[label]["errors"] = sum(sum(r["errors"].values()) for r in results)
        if label in cpu:
            summary[label]["cpu_s_per_1000"] = round(statistics.mean(cpu[label]), 3)
    direct = summary["direct"]["throughput"]
    print("| path | req/s | vs direct | p50 ms | p99 ms | proxy CPU s / 1000 req | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, r in summary.items():
        print(f"| {label} | {r['throughput']} | {r['throughput'] / direct:.2f} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r.get('cpu_s_per_1000', '-')} | {r['errors']} |")
    print(json.dumps({"model": args.model, "clients": args.clients, "seconds": args.seconds,
                      "rounds": args.rounds, "paths": summary}))


if __name__ == "__main__":
    main()
