"""The two engines side by side, in one run: TorchServe and the KServe engine serving the SAME
archive, against the in-process limit of that archive.

For each model (models/resnet18 fp32, models/digits, models/minilm embeddings), as a user runs
it: `servetool package` in a scratch project folder outside this repository, then for each
engine `servetool deploy --engine E` there on free ports (no other flag), warmed up, and loaded
with wrk (8 clients, closed loop, sharing the cores). The engines alternate over --rounds rounds
so that a busy machine slows both alike. Reported per engine: req/s per round and their mean,
the ratio to TorchServe's and to the in-process limit, p50/p99, the server's CPU per request,
cold start (the deploy command's wall time: server start and the model's workers ready), the
server's processes and their RSS.

The in-process limit is the unpacked archive's own handler run on the same bodies, one process
per core with one thread each (benchmarks/text_serving.py's).

Run on demand (about 8 minutes on 2 cores with the defaults):
    .venv/bin/python benchmarks/engines.py
    .venv/bin/python benchmarks/engines.py --models digits --duration 10 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import measure, say  # noqa: E402
from benchmarks.text_serving import in_process_limit, tree_cpu, write_bodies  # noqa: E402
from servetool.bench.serve import payload_files  # noqa: E402
from servetool.engines.torchserve.process import free_ports  # noqa: E402

CLI = str(Path(sys.executable).with_name("servetool"))
ENGINES = ("torchserve", "kserve")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"servetool {' '.join(args)} failed: {proc.stderr.strip()[-600:]}")
    return proc.stdout


def bodies_for(model: str, work: Path) -> list[Path]:
    if model == "minilm":
        texts = [t for t in (ROOT / "models" / "minilm" / "samples.txt").read_text().splitlines()
                 if t.strip()]
        return write_bodies(work / "bodies", [{"inputs": t} for t in texts])
    return payload_files([ROOT / "models" / model / "samples"])


class Deployment:
    """One engine's deployment of the project's archives, on its own run folder and ports."""

    def __init__(self, project: Path, engine: str) -> None:
        self.project, self.engine = project, engine
        self.run_dir = project / f".run-{engine}"
        ports = free_ports()
        self.env = {"SERVETOOL_RUN_DIR": str(self.run_dir), "SERVETOOL_ENGINE": engine,
                    **{f"SERVETOOL_{api.upper()}_PORT": str(port) for api, port in ports.items()}}
        self.ports = ports

    def up(self) -> float:
        started = time.perf_counter()
        cli("deploy", "--clients-port", "0", cwd=self.project, env=self.env)
        return time.perf_counter() - started

    def headers(self) -> dict[str, str]:
        name, _, value = cli("token", "--header", cwd=self.project,
                             env=self.env).strip().partition(": ")
        return {name: value}

    def processes(self) -> list:
        import psutil

        state = json.loads((self.run_dir / "server.json").read_text())
        root = psutil.Process(state["pid"])
        return [root, *root.children(recursive=True)]

    def rss_mb(self) -> tuple[int, float]:
        procs = self.processes()
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except Exception:  # noqa: BLE001 (a process gone meanwhile)
                continue
        return len(procs), round(total / 2 ** 20, 1)

    def cpu(self) -> tuple[float, int]:
        return tree_cpu(self.processes()[:1])

    def down(self) -> None:
        cli("stop", cwd=self.project, env=self.env)


def bench_model(model: str, args) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"servetool-engines-{model}-"))
    project = work / "project"
    project.mkdir()
    try:
        say(f"{model}: servetool package (scratch project, no flags)")
        cli("package", str(ROOT / "models" / model), cwd=project)
        mar = next((project / "model_store").glob("*.mar"))
        files = bodies_for(model, work)
        say(f"{model}: in-process limit of the archive's handler")
        limit, limit_cpu = in_process_limit(mar, files, args.duration / 2)
        rows: dict[str, dict[str, Any]] = {e: {"rounds": [], "cold_start_s": []} for e in ENGINES}
        for round_ in range(args.rounds):
            for engine in ENGINES:
                deployment = Deployment(project, engine)
                say(f"{model}: round {round_ + 1}, deploying on {engine}")
                cold = deployment.up()
                try:
                    url = f"http://127.0.0.1:{deployment.ports['inference']}/predictions/{model}"
                    result = measure(f"{model} on {engine}", url, deployment.headers(), files,
                                     args, cpu=deployment.cpu)
                    row = rows[engine]
                    row["rounds"].append(result["throughput"])
                    row["cold_start_s"].append(round(cold, 2))
                    row.update({k: result[k] for k in ("p50_ms", "p99_ms", "errors", "lost")})
                    row["server_cpu_ms_per_request"] = round(
                        1000 * result["server_cpu_s_per_request"], 2)
                    row["processes"], row["rss_mb"] = deployment.rss_mb()
                finally:
                    deployment.down()
        for row in rows.values():
            row["throughput"] = round(statistics.mean(row["rounds"]), 1)
            row["vs_limit"] = round(row["throughput"] / limit, 3)
        base = rows["torchserve"]["throughput"]
        for row in rows.values():
            row["vs_torchserve"] = round(row["throughput"] / base, 3)
        return {"model": model, "limit": limit, "limit_cpu_ms_per_request":
                round(1000 * limit_cpu, 2), "engines": rows, "duration_s": args.duration,
                "concurrency": args.concurrency}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    heads = ["model", "engine", "req/s per round", "mean req/s", "vs TorchServe", "vs limit",
             "p50 ms", "p99 ms", "CPU ms/req", "cold start s", "processes", "RSS MB", "errors"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in results:
        lines.append(f"| {r['model']} | in-process limit | | {r['limit']} | | 1.00 | | | "
                     f"{r['limit_cpu_ms_per_request']} | | | | |")
        for engine, row in r["engines"].items():
            errors = sum((row.get("errors") or {}).values())
            lines.append(
                f"| {r['model']} | {engine} | {' / '.join(f'{t:.0f}' for t in row['rounds'])} | "
                f"{row['throughput']} | {row['vs_torchserve']:.2f}x | {row['vs_limit']:.2f} | "
                f"{row.get('p50_ms')} | {row.get('p99_ms')} | {row['server_cpu_ms_per_request']} | "
                f"{' / '.join(map(str, row['cold_start_s']))} | {row['processes']} | "
                f"{row['rss_mb']} | {errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "digits", "minilm"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--python-engine", action="store_true",
                        help="drive the load with the Python engine even where wrk is installed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [bench_model(m, args) for m in args.models]
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
