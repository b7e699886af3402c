"""Cold start: from `servetool deploy` to the first answer, as a user runs it.

Run: .venv/bin/python benchmarks/cold_start.py [--model resnet18|minilm] [--runs 3] [--docker]
The servetool CLI in a scratch folder outside this repository, no flags but free ports. The model
is packaged once (not timed); then, per run: `servetool deploy` until it returns (the frontend up
and every worker READY), the first prediction, and `servetool stop`. TorchServe's own
WorkerLoadTime (from the metrics port) splits the deploy into the frontend's start and the
workers' load. With --docker the same runs on the Docker target (the image built once before).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cli  # noqa: E402
from servetool.engines.torchserve import process  # noqa: E402

WORKER_LOAD = re.compile(r'^WorkerLoadTime\{WorkerName="W-\d+-[^"]*".*\}\s+([0-9.]+)', re.M)


def one_run(work: Path, model: str, sample: tuple[bytes, str], target_args: list[str],
            ports: dict[str, int]) -> dict[str, float]:
    port_args = [f"--{api.replace('_', '-')}-port={port}" for api, port in ports.items()
                 if not api.startswith("grpc")]
    start = time.perf_counter()
    cli("deploy", *target_args, *port_args, cwd=work)
    deployed = time.perf_counter()
    header = cli("token", "--header", *target_args[:2], cwd=work).strip()
    name, _, value = header.partition(": ")
    asked = time.perf_counter()
    body, content_type = sample
    reply = requests.post(f"http://127.0.0.1:{ports['inference']}/predictions/{model}",
                          data=body, headers={name: value, "Content-Type": content_type},
                          timeout=120)
    answered = time.perf_counter()
    if reply.status_code != 200:
        raise SystemExit(f"first prediction answered {reply.status_code}: {reply.text[:300]}")
    metrics = requests.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
    loads = [float(v) / 1000 for v in WORKER_LOAD.findall(metrics)]
    cli("stop", *target_args[:2], cwd=work)
    # The token's CLI call is not the server's time: deploy + the request itself.
    return {"deploy_s": deployed - start, "first_answer_s": answered - asked,
            "total_s": deployed - start + answered - asked,
            "worker_load_s": max(loads) if loads else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--docker", action="store_true", help="the Docker target (engine needed)")
    parser.add_argument("--base-image", default=None, help="docker: the image to build on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = ROOT / "models" / args.model
    if (folder / "samples").is_dir():  # an image model's sample files
        sample = (sorted((folder / "samples").iterdir())[0].read_bytes(), "application/octet-stream")
    else:  # a text model: its first sample sentence
        text = (folder / "samples.txt").read_text(encoding="utf-8").splitlines()[0]
        sample = (json.dumps({"inputs": text}).encode(), "application/json")
    target_args = ["--target", "docker", "--network", "host"] if args.docker else []
    if args.docker and args.base_image:
        target_args += ["--base-image", args.base_image]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"packaging {args.model} ...", file=sys.stderr)
        cli("package", str(folder), cwd=work)
        ports = process.free_ports()
        runs = []
        for i in range(args.runs + (1 if args.docker else 0)):
            run = one_run(work, args.model, sample, target_args, ports)
            if args.docker and i == 0:
                print("(first docker run builds the image: not counted)", file=sys.stderr)
                continue
            runs.append(run)
            print(f"run {len(runs)}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.items()),
                  file=sys.stderr)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {"model": args.model, "target": "docker" if args.docker else "local",
              "runs": runs, "median": median}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} on {result['target']}, median of {len(runs)} runs: deploy "
          f"{median['deploy_s']:.2f} s (of which the slowest worker's load "
          f"{median['worker_load_s']:.2f} s), first answer +{median['first_answer_s']:.3f} s, "
          f"deploy to first answer {median['total_s']:.2f} s")


if __name__ == "__main__":
    main()
