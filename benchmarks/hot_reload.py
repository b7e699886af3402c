"""Hot reload: seconds from publishing a new version to its first answer, and failed requests
during the switches, for a watched folder and a watched bucket.

Run: .venv/bin/python benchmarks/hot_reload.py [--model digits] [--publishes 5]
As a user runs it: the CLI in a scratch folder outside this repository, `servetool package`, then
`servetool deploy --watch PUBLISHED` (the default interval, no other flags but free ports). A steady
closed-loop load (4 clients) runs on /predictions/MODEL the whole time. Each publish copies a new
version's archive into PUBLISHED/MODEL/VERSION/ and writes READY last, at a random moment of the
watcher's interval; the time is taken until an answer says (X-Model-Version) it came from that
version. Then the same with a bucket: moto's S3 server (installed with the test extras) and
`servetool watch s3://... --background`, with its default interval. Last, `servetool rollback`
under the same load.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import SERVETOOL, cli  # noqa: E402
from servetool.bench.serve import run_load  # noqa: E402
from servetool.engines.torchserve.process import free_ports  # noqa: E402
from tests.test_lifecycle import moto_server, rewrite_archive  # noqa: E402


def answering(url: str, headers: dict, body: bytes) -> str | None:
    reply = requests.post(url, data=body, headers=headers, timeout=30)
    return reply.headers.get("X-Model-Version") if reply.status_code == 200 else None


def publish_and_wait(put, version: str, url: str, headers: dict, body: bytes,
                     interval_s: float) -> float:
    time.sleep(random.uniform(0, interval_s))  # any moment of the watcher's cycle
    put(version)
    published = time.perf_counter()
    while answering(url, headers, body) != version:
        if time.perf_counter() - published > 120:
            raise SystemExit(f"version {version} was not served within 120 s")
        time.sleep(0.02)
    return time.perf_counter() - published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--publishes", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    random.seed(0)
    folder = ROOT / "models" / args.model
    body = sorted((folder / "samples").iterdir())[0].read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="servetool-hot-reload-") as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        cli("package", str(folder), cwd=work)
        base = work / "model_store" / f"{args.model}.mar"
        built = Path(tmp) / "versions"
        published = Path(tmp) / "published"
        published.mkdir()
        ports = free_ports()
        port_args = [f"--{api.replace('_', '-')}-port={port}" for api, port in ports.items()]
        metrics_port = free_ports(("watch",))["watch"]
        print("deploying with --watch", file=sys.stderr)
        cli("deploy", *port_args, "--watch", str(published), "--watch-metrics-port",
            str(metrics_port), cwd=work)
        keys = json.loads((work / ".servetool" / "key_file.json").read_text())
        headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
        url = f"http://127.0.0.1:{ports['inference']}/predictions/{args.model}"
        stop = threading.Event()
        box: dict = {}
        load = threading.Thread(target=lambda: box.setdefault("r", run_load(
            url, [(body, "application/octet-stream")], concurrency=4, duration_s=None, stop=stop,
            headers=headers)))
        load.start()
        try:
            def to_folder(version: str) -> None:
                mar = rewrite_archive(base, built / version / f"{args.model}.mar", version=version)
                target = published / args.model / version
                target.mkdir(parents=True)
                (target / mar.name).write_bytes(mar.read_bytes())
                (target / "READY").touch()

            seconds = [publish_and_wait(to_folder, f"{2 + i}.0", url, headers, body, 2.0)
                       for i in range(args.publishes)]
            rows.append(("folder", 2.0, seconds))
            print(f"folder: {[round(s, 2) for s in seconds]}", file=sys.stderr)

            s3_port = free_ports(("s3",))["s3"]
            s3_server = moto_server(s3_port)
            env = {**__import__("os").environ, "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            import boto3

            endpoint = f"http://127.0.0.1:{s3_port}"
            s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
            s3.create_bucket(Bucket="models")
            # replaces the folder's watcher (one per deployment); the load runs on
            cli("watch", "s3://models/published", "--endpoint-url", endpoint, "--background",
                "--metrics-port", "0", cwd=work, env=env)

            def to_bucket(version: str) -> None:
                mar = rewrite_archive(base, built / version / f"{args.model}.mar", version=version)
                key = f"published/{args.model}/{version}"
                s3.upload_file(str(mar), "models", f"{key}/{mar.name}")
                s3.put_object(Bucket="models", Key=f"{key}/READY", Body=b"")

            first = 2 + args.publishes
            seconds = [publish_and_wait(to_bucket, f"{first + i}.0", url, headers, body, 10.0)
                       for i in range(args.publishes)]
            rows.append(("bucket", 10.0, seconds))
            print(f"bucket: {[round(s, 2) for s in seconds]}", file=sys.stderr)
            started = time.perf_counter()
            cli("rollback", args.model, cwd=work)
            rollback_s = time.perf_counter() - started
            time.sleep(1)
        finally:
            stop.set()
            load.join()
            subprocess.run([SERVETOOL, "stop"], cwd=work, capture_output=True)
            if "s3_server" in locals():
                s3_server.terminate()
        result = box["r"]
    summary = {
        "model": args.model,
        "rows": [{"source": s, "interval_s": i, "publishes": len(v),
                  "mean_s": round(statistics.mean(v), 2), "max_s": round(max(v), 2)}
                 for s, i, v in rows],
        "rollback_s": round(rollback_s, 2),
        "requests": result.sent, "ok": result.ok, "errors": result.errors, "lost": result.lost,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print("| source | default interval | publishes | publish -> first answer, mean | max |")
    print("|---|---|---|---|---|")
    for r in summary["rows"]:
        print(f"| {r['source']} | {r['interval_s']:g} s | {r['publishes']} | {r['mean_s']} s | "
              f"{r['max_s']} s |")
    print(f"\nrollback under load: {summary['rollback_s']} s (the CLI call); requests "
          f"{result.sent}, ok {result.ok}, errors {result.errors}, lost {result.lost}")


if __name__ == "__main__":
    main()
