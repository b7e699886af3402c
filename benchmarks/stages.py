"""Where a served request's CPU goes: per-request CPU of each stage, for one model, in one run.

Run: .venv/bin/python benchmarks/stages.py [--model resnet18] [--duration 15] [--json]
Two measurements side by side:
1. In process, servetool's handler steps one request at a time (CPU time, not wall): decode,
   preprocess, the model at the spec's batch size (per request), response encoding.
2. Served as a user runs it (the CLI in a scratch folder outside this repository, no flags), under
   wrk with 8 clients: the CPU each process used per answered request, the JVM split by thread
   (netty event loops, TorchServe's per-worker threads, JIT and GC). The workers' CPU minus the
   handler's own steps is TorchServe's worker protocol (socket, message parsing, its logging).
Needs Debian's wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cli  # noqa: E402
from servetool.bench.serve import payload_files, wrk_path  # noqa: E402
from servetool.engines.torchserve import process  # noqa: E402

JVM_MARK = "org.pytorch.serve.ModelServer"
WORKER_MARK = "model_service_worker"


def in_process(mar: Path, bodies: list[bytes], rounds: int) -> dict[str, float]:
    """Microseconds of CPU per request for each of the handler's steps, one thread."""
    import zipfile

    import yaml

    from handlers.batching import as_feeds, collate
    from handlers.errors import to_json_bytes
    from handlers.imaging import decode
    from handlers.runtimes import load_runtime
    from handlers.tasks import make_task

    folder = Path(tempfile.mkdtemp(prefix="servetool-stages-"))
    zipfile.ZipFile(mar).extractall(folder)
    model_config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config = model_config["handler"]
    batch = int(model_config.get("batchSize", 1))
    runtime = load_runtime(config["runtime"], str(folder / config["artifact"]), 1,
                           {**(config.get("runtime_options") or {}),
                            "input_names": [i["name"] for i in config["inputs"]]})
    task = make_task(config, None)
    task.output_names = list(runtime.output_names)
    names = [i["name"] for i in config["inputs"]]
    spent = {"decode": 0.0, "preprocess (after decode)": 0.0, "model": 0.0, "response encoding": 0.0}
    image = getattr(task, "formats", None) is not None

    def clock() -> float:
        return time.thread_time()

    for warm in (True, False):
        n = 3 if warm else rounds
        for i in range(n):
            body = bodies[i % len(bodies)]
            t0 = clock()
            if image:
                decode(body, mode="L" if task.channels == 1 else "RGB", formats=task.formats,
                       max_pixels=task.max_pixels, draft_size=task._draft_size())
            t1 = clock()
            example = task.preprocess(body)
            t2 = clock()
            feeds = collate([as_feeds(example, names)] * batch, config["inputs"])
            outputs = runtime.run(feeds)
            t3 = clock()
            to_json_bytes(task.postprocess([o[0] for o in outputs]))
            t4 = clock()
            if not warm:
                spent["decode"] += t1 - t0
                # task.preprocess decodes again: its cost minus the decode measured just before
                spent["preprocess (after decode)"] += max(0.0, (t2 - t1) - (t1 - t0))
                spent["model"] += (t3 - t2) / batch
                spent["response encoding"] += t4 - t3
    return {k: round(1e6 * v / rounds, 1) for k, v in spent.items()}


def _thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """CPU ticks of each live thread of one process, with its group (by the name the kernel keeps)."""
    threads: dict[str, tuple[str, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = ("netty event loops" if name.startswith("epollEventLoop")
                 else "TorchServe worker threads" if re.match(r"W-\d+", name)
                 else "JIT compiler" if "Compiler" in name
                 else "GC and VM" if name.startswith(("VM ", "GC ")) else "other JVM threads")
        threads[tid] = (group, int(fields[11]) + int(fields[12]))
    return threads


def _group_diff(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Ticks per group between two snapshots (the JVM starts and ends compiler threads as it
    likes: a thread counts from zero when it is new, and what an ended one did is not seen)."""
    groups: dict[str, int] = {}
    for tid, (group, ticks) in after.items():
        groups[group] = groups.get(group, 0) + ticks - before.get(tid, (group, 0))[1]
    return groups


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(work: Path, model: str, body: Path, seconds: float, clients: int) -> dict[str, Any]:
    import psutil

    ports = process.free_ports()
    cli("deploy", *(f"--{api.replace('_', '-')}-port={port}" for api, port in ports.items()),
        cwd=work)
    try:
        key = json.loads((work / ".servetool" / "key_file.json").read_text())["inference"]["key"]
        script = work / "post.lua"
        script.write_text(f'wrk.method = "POST"\nwrk.body = io.open("{body}", "rb"):read("*a")\n'
                          f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        url = f"http://127.0.0.1:{ports['inference']}/predictions/{model}"
        wrk = [wrk_path(), "-t1", f"-c{clients}", "--latency", "-s", str(script)]
        subprocess.run([*wrk, "-d10s", url], capture_output=True, check=True)  # JIT warm-up
        # this deployment's processes (their command lines name its run folder), no other server's
        procs = {p.pid: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
                 if str(work) in " ".join(p.info["cmdline"] or [])}
        # the JVM itself, not a shell whose command line carries the same words
        jvm = next(pid for pid, cmd in procs.items()
                   if JVM_MARK in cmd and psutil.Process(pid).name() == "java")
        workers = [pid for pid, cmd in procs.items() if WORKER_MARK in cmd]
        before = {pid: _cpu_seconds(pid) for pid in [jvm, *workers]}
        threads_before = _thread_ticks(jvm)
        run = subprocess.Popen([*wrk, f"-d{int(seconds)}s", url], stdout=subprocess.PIPE, text=True)
        out, _ = run.communicate()
        after = {pid: _cpu_seconds(pid) for pid in [jvm, *workers]}
        threads_after = _thread_ticks(jvm)
    finally:
        cli("stop", cwd=work)
    answered = int(re.search(r"(\d+) requests in", out).group(1))
    tick = os.sysconf("SC_CLK_TCK")
    per = {f"frontend: {g}": round(1e6 * ticks / tick / answered, 1)
           for g, ticks in sorted(_group_diff(threads_before, threads_after).items())}
    per["workers (all of them)"] = round(1e6 * sum(after[w] - before[w] for w in workers)
                                         / answered, 1)
    p50 = re.search(r"50%\s+([0-9.]+)(\w+)", out)
    return {"req_per_s": round(answered / seconds, 1), "p50": "".join(p50.groups()) if p50 else "?",
            "per_request_us": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200, help="in-process requests timed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not wrk_path():
        sys.exit("needs wrk (apt-get install wrk)")
    folder = ROOT / "models" / args.model
    files = payload_files([folder / "samples"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"packaging {args.model} ...", file=sys.stderr)
        cli("package", str(folder), cwd=work)
        mar = work / "model_store" / f"{args.model}.mar"
        stages = in_process(mar, [f.read_bytes() for f in files], args.rounds)
        print(f"serving {args.model} under load ...", file=sys.stderr)
        load = served(work, args.model, files[0], args.duration, args.clients)
    handler = sum(stages.values())
    load["per_request_us"]["workers: TorchServe's protocol (workers minus the handler's steps)"] = \
        round(load["per_request_us"]["workers (all of them)"] - handler, 1)
    result = {"model": args.model, "in_process_us": stages, "served": load}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: CPU per request (microseconds)")
    for name, us in stages.items():
        print(f"  handler: {name:58} {us:9.1f}")
    for name, us in load["per_request_us"].items():
        print(f"  {name:67} {us:9.1f}")
    print(f"  served at {load['req_per_s']} req/s, p50 {load['p50']}, {args.clients} clients")


if __name__ == "__main__":
    main()
