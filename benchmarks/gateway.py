"""What the Kubernetes gateway costs: the same TorchServe loaded directly and through servetool's
gateway (servetool/engines/torchserve/pod.py, as each pod runs it), side by side in one run.

Run: .venv/bin/python benchmarks/gateway.py [--model digits|resnet18] [--seconds 15] [--clients 8]
                                             [--compare OTHER_POD_PY]
Packages the model into a scratch store, deploys it locally on free ports, starts the gateway in
front of it (its own process, as in a pod), and loads both paths with the same load generator
(wrk when installed). Prints throughput, p50 and p99 of each and the ratios. --compare adds a
row per file: the gateway of another pod.py (e.g.
`git show REV:servetool/engines/torchserve/pod.py > /tmp/old_pod.py`), so two gateway
implementations are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.bench.serve import load_payloads, payload_files, run_load, run_wrk, wrk_path  # noqa: E402
from servetool.engines.torchserve.process import ServerOptions, free_ports  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402
from servetool.operate import lifecycle  # noqa: E402
from servetool.operate.package import package  # noqa: E402
from servetool.targets.local import LocalTarget  # noqa: E402


def load(url: str, samples: Path, key: str, clients: int, seconds: float) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if wrk_path():
        result = run_wrk(url, payload_files([samples]), concurrency=clients, duration_s=seconds,
                         headers=headers)
    else:
        result = run_load(url, load_payloads([samples]), concurrency=clients, duration_s=seconds,
                          headers=headers)
    return result.summary()


def deploy_scratch(model_dir: Path, tmp: Path) -> tuple[LocalTarget, dict]:
    """model_dir packaged into tmp/store and deployed locally on free ports (run folder tmp/run)."""
    store, run = tmp / "store", tmp / "run"
    print(f"... packaging {model_dir.name}", file=sys.stderr)
    package(load_spec(model_dir), store)
    target = LocalTarget(ServerOptions(run_dir=run, model_store=store, ports=free_ports(),
                                       base_config=ROOT / "config.properties"))
    return target, lifecycle.deploy(target, [])


def start_gateway(run: Path, keys: Path, pod: Path = ROOT / "servetool" / "engines" / "torchserve" / "pod.py",
                  ) -> tuple[subprocess.Popen, str, str]:
    """servetool's Python gateway (as each pod runs it) in front of the local server of `run`:
    (its process, its base URL, the key it accepts), once it answers ready."""
    keys.mkdir()
    shared_key = secrets.token_urlsafe(32)
    (keys / "inference-key").write_text(shared_key)
    port = free_ports(("gateway",))["gateway"]
    env = {**os.environ, "SERVETOOL_TS_CONFIG": str(run / "config.properties"),
           "SERVETOOL_WORK_DIR": str(run), "SERVETOOL_GATEWAY_KEYS": str(keys),
           "SERVETOOL_GATEWAY_LISTEN": f"127.0.0.1:{port}"}
    gateway = subprocess.Popen([sys.executable, str(pod), "gateway"],
                               env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    return gateway, base, shared_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another pod.py whose gateway to add (repeatable)")
    args = parser.parse_args()
    model_dir = ROOT / "models" / args.model
    with tempfile.TemporaryDirectory() as tmp:
        target, deployed = deploy_scratch(model_dir, Path(tmp))
        run = target.opts.run_dir
        direct_url = deployed["models"][0]["predictions_url"]
        gateways = {"gateway": start_gateway(run, Path(tmp) / "keys")}
        for i, other in enumerate(args.compare, 1):
            gateways[f"compared {i}: {other.name}"] = start_gateway(run, Path(tmp) / f"keys{i}",
                                                                    other.resolve())
        name = deployed["models"][0]["name"]
        try:
            direct_key = target.client().token("inference")
            samples = model_dir / "samples"
            paths = [("warm-up", direct_url, direct_key), ("direct", direct_url, direct_key)]
            paths += [(label, f"{base}/predictions/{name}", key)
                      for label, (_, base, key) in gateways.items()]
            rows = {}
            for label, url, key in paths:
                print(f"... {label}: {args.clients} clients, {args.seconds:.0f} s", file=sys.stderr)
                rows[label] = load(url, samples, key, args.clients, args.seconds)
        finally:
            for proc, _, _ in gateways.values():
                proc.terminate()
                proc.wait(10)
            target.down()
    direct, via = rows["direct"], rows["gateway"]
    print("| path | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for label in [r for r in rows if r != "warm-up"]:
        r = rows[label]
        print(f"| {label} | {r['throughput']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    ratio = via["throughput"] / direct["throughput"] if direct["throughput"] else 0.0
    print(f"gateway/direct throughput {ratio:.2f}, p50 +{via['p50_ms'] - direct['p50_ms']:.1f} ms")
    for label in [r for r in rows if r.startswith("compared") and rows[r]["throughput"]]:
        print(f"gateway/{label} throughput {via['throughput'] / rows[label]['throughput']:.2f}")
    print(json.dumps({"model": args.model, "direct": direct, "gateway": via,
                      "throughput_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
