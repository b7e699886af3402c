"""Crash to first good answer again, with `servetool deploy --restart-on-crash` on the digits model.

Run: .venv/bin/python benchmarks/crash_recovery.py [--crashes 3]
As a user would: the servetool CLI, from a scratch folder outside this repository (so no project
config.properties applies), no flags but the supervisor's and free ports. Packages models/digits,
deploys it, scales it to 2 workers, then kills the JVM with SIGKILL --crashes times and times each
recovery: from the kill to the first 200 answer, and checks the worker count came back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
from servetool.engines.torchserve.state import load_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sample = (ROOT / "models/digits/samples/digit_3.png").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ports = process.free_ports()
        port_args = [f"--{api.replace('_', '-')}-port={port}" for api, port in ports.items()]
        cli("package", str(ROOT / "models/digits"), cwd=work, timeout_s=600)
        print("deploying (supervised) ...", file=sys.stderr)
        cli("deploy", "--restart-on-crash", *port_args, cwd=work, timeout_s=600)
        cli("scale", "digits", "--workers", "2", cwd=work, timeout_s=600)
        url = f"http://127.0.0.1:{ports['inference']}/predictions/digits"
        times = []
        try:
            for i in range(args.crashes):
                state = load_state(work / ".servetool")
                os.kill(state.jvm_pid, signal.SIGKILL)
                killed = time.perf_counter()
                while True:
                    try:
                        key = json.loads((work / ".servetool/key_file.json").read_text())
                        reply = requests.post(url, data=sample, timeout=5, headers={
                            "Authorization": f"Bearer {key['inference']['key']}"})
                        if reply.status_code == 200:
                            break
                    except (requests.RequestException, OSError, ValueError, KeyError):
                        pass
                    if time.perf_counter() - killed > 120:
                        raise SystemExit("no good answer within 120 s of the crash")
                    time.sleep(0.05)
                times.append(time.perf_counter() - killed)
                workers = json.loads(cli("status", "--json", cwd=work, timeout_s=600))["models"][0]["workers"]
                print(f"crash {i + 1}: first good answer after {times[-1]:.2f} s, "
                      f"{len(workers)} workers", file=sys.stderr)
                time.sleep(3)  # let the supervisor finish registering before the next crash
        finally:
            cli("stop", cwd=work, timeout_s=600)
    result = {"crashes": len(times), "median_s": round(statistics.median(times), 2),
              "max_s": round(max(times), 2), "each_s": [round(t, 2) for t in times]}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
