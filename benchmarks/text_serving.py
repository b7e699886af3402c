"""Text serving side by side, in one run: embeddings/s and reranking pairs/s served by a real
TorchServe against the in-process limit of the same archive.

Models:
- minilm: all-MiniLM-L6-v2 sentence embeddings (models/minilm, its spec as shipped);
- reranker: a cross-encoder shaped as cross-encoder/ms-marco-MiniLM-L-6-v2 (BertForSequenceClass-
  ification on MiniLM-L6-H384, num_labels=1), built from MiniLM's config.json with random weights
  and MiniLM's tokenizer, as tests/test_text_heads.py builds its smaller ones (their helper's
  2-layer, 32-wide BERT would measure only overhead; random weights score as fast as trained ones).

Both are packaged once with `servetool package` in a scratch project folder outside this
repository (onnx-transformer, each through the gate and the reference check) and served by one
`servetool deploy` there (no flags but free ports: every worker count and thread as a user gets
them). The same archives give the in-process limit: the unpacked archive's own handler
(servetool.convert.reference.served.ServedPath: the same tokenizer, ONNX model and postprocessing, JSON
answers included) run on the same request bodies one after another, one process per core with
one thread each, no server; run before serving and again after, the better run counts (other
jobs on a shared machine only slow it down). Each served row is over HTTP with wrk (8 clients,
closed loop; wrk shares the cores), warmed up first:
- embeddings: one sentence per request, {"inputs": text} on /predictions/minilm, and the OpenAI
  SDK's body ({"model", "input", "encoding_format": "base64"}) on the clients' front's
  /v1/embeddings;
- reranking: one query and --passages (8) passages per request, TEI's {"query", "texts"} on
  /predictions/reranker and on the clients' front's /rerank; a pair is one passage scored.

The CPU per embedding or pair is counted beside the rates: the limit's processes' own CPU
time, and for a served row the CPU every process of the server used while measured (TorchServe's
JVM, its workers, the clients' front; with --flask, Flask's process; never wrk's). served/limit
is the limit's CPU per item over the server's: the share of the in-process capacity the server
keeps (items a core gives, served against in-process). The measured rates' ratio is printed too,
but on a machine shared with other jobs it is not that: the scheduler shares the cores per
runnable thread, so the server's many threads get more of them than the limit's one thread per
core, and the rates move with the other jobs' load.

Options: --flask adds the embeddings peer (Flask + eager transformers, the model card's mean
pooling); --batch 8 adds minilm served with the spec batching what is queued (at most 1 ms).

Run on demand (about 3.5 minutes on 2 cores, packaging both models 30-50 s of it):
    .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/text_serving.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import SERVETOOL, cli  # noqa: E402
from benchmarks.serving import measure, per_core, say, stop, wait_http  # noqa: E402
from servetool.engines.torchserve.process import free_ports  # noqa: E402
from servetool.model.samples import sample_texts  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402

MODEL = ROOT / "models" / "minilm"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


# --- the models ----------------------------------------------------------------------------------
def reranker_folder(project: Path) -> Path:
    """models-like folder `reranker/`: the cross-encoder (see the module's docstring) saved as a
    Hugging Face folder, and a spec as a user would write it (the format minilm ships)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = project / "reranker"
    config = BertConfig.from_pretrained(str(MODEL / "model"), num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(folder / "model")
    for name in TOKENIZER_FILES:
        shutil.copyfile(MODEL / "model" / name, folder / "model" / name)
    shutil.copyfile(MODEL / "samples.txt", folder / "samples.txt")
    (folder / "servetool.yaml").write_text(yaml.safe_dump({
        "name": "reranker", "source": {"transformers": "model"}, "task": "text-reranking",
        "format": "onnx-transformer", "text": {"samples": "samples.txt"}}, sort_keys=False))
    return folder


def batching_copy(project: Path, size: int) -> Path:
    """minilm's folder again, named minilm_b{size}, its spec batching what is queued."""
    folder = project / f"minilm_b{size}"
    folder.mkdir()
    raw = yaml.safe_load((MODEL / "servetool.yaml").read_text())
    raw["name"] = folder.name
    raw["source"]["transformers"] = str((MODEL / raw["source"]["transformers"]).resolve())
    raw["text"]["samples"] = str(MODEL / raw["text"]["samples"])
    raw["batch"] = {"size": size, "max_delay_ms": 1}
    (folder / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


# --- the request bodies --------------------------------------------------------------------------
def write_bodies(folder: Path, bodies: list[dict[str, Any]]) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for i, body in enumerate(bodies):
        files.append(folder / f"{i:02d}.json")
        files[-1].write_text(json.dumps(body))
    return files


def bodies(texts: list[str], passages: int) -> dict[str, list[dict[str, Any]]]:
    """Per workload, the request bodies (one file each for wrk): `texts` cycled."""
    n = len(texts)
    return {
        "embed": [{"inputs": t} for t in texts],
        "openai": [{"model": "minilm", "input": t, "encoding_format": "base64"} for t in texts],
        "rerank": [{"query": texts[i], "texts": [texts[(i + 1 + k) % n] for k in range(passages)]}
                   for i in range(n)],
    }


# --- 1. the in-process limit ---------------------------------------------------------------------
def _limit_worker(mar: str, payloads: list[bytes], seconds: float, queue) -> None:
    """The unpacked archive's handler, one request after another, one thread: requests/s."""
    import zipfile

    from servetool.convert.reference.served import ServedPath
    from servetool.engines.torchserve.archive import archive_manifest

    folder = Path(tempfile.mkdtemp(prefix="servetool-text-limit-"))
    try:
        zipfile.ZipFile(mar).extractall(folder)
        config = archive_manifest(Path(mar))["config"]
        handler = config["handler"]
        handler["runtime_options"] = {**(handler.get("runtime_options") or {}),
                                      "intra_op_threads": 1}
        served = ServedPath(folder, config)
        for body in payloads:  # warm-up, and every body must be answered
            _, statuses, reasons = served.answer([body])
            if statuses[0] != 200:
                raise RuntimeError(f"the handler answered {statuses[0]} ({reasons[0]}) to "
                                   f"{body[:80]!r}")
        done, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            served.answer([payloads[done % len(payloads)]])
            done += 1
        queue.put((done / (time.perf_counter() - started), (time.process_time() - cpu) / done))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def in_process_limit(mar: Path, files: list[Path], seconds: float) -> tuple[float, float]:
    """The archive's handler in-process, one process per core: requests/s summed over them, and
    CPU seconds per request (their mean)."""
    payloads = [f.read_bytes() for f in files]
    found = per_core(_limit_worker, (str(mar), payloads, seconds), seconds)
    return round(sum(r for r, _ in found), 1), sum(c for _, c in found) / len(found)


# --- 2. served: servetool package + servetool deploy, as a user runs them -----------------------
def deploy(project: Path) -> tuple[dict[str, int], dict[str, str]]:
    """`servetool deploy` in `project` (every archive in its model_store) on free ports: the
    ports and the auth headers (`servetool token --header`)."""
    ports = free_ports((*(api for api in ("inference", "management", "metrics",
                                          "grpc_inference", "grpc_management")), "clients"))
    cli("deploy", *(f"--{api.replace('_', '-')}-port={port}" for api, port in ports.items()),
        cwd=project)
    name, _, value = cli("token", "--header", cwd=project).strip().partition(": ")
    headers = {name: value}
    wait_http(f"http://127.0.0.1:{ports['clients']}/v1/models", headers=headers)
    return ports, headers


def deployment_cpu(project: Path) -> tuple[float, int]:
    """CPU seconds used so far by this deployment's processes, and how many: those whose command
    line names the project folder (TorchServe's JVM, its workers, the keepers) and everything
    they started (the clients' front), no other server's."""
    import psutil

    return tree_cpu([p for p in psutil.process_iter(["cmdline"])
                     if str(project) in " ".join(p.info["cmdline"] or [])])


def tree_cpu(roots: list) -> tuple[float, int]:
    """CPU seconds used so far by these processes and their descendants, and how many."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    total = 0.0
    for proc in seen.values():
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total, len(seen)


FLASK_APP = textwrap.dedent('''
    """The model card's recipe behind Flask: eager transformers, mean pooling, normalisation."""
    import sys
    import torch
    import torch.nn.functional as F
    from flask import Flask, request, jsonify
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(int(sys.argv[3]))
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
    model = AutoModel.from_pretrained(sys.argv[1], local_files_only=True).eval()
    app = Flask(__name__)

    @app.post("/embed")
    def embed():
        texts = request.get_json()["inputs"]
        texts = [texts] if isinstance(texts, str) else texts
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)
        return jsonify({"embeddings": vectors.tolist()})

    @app.get("/")
    def ready():
        return "ok"

    app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
''')


def flask_server(workdir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    app = workdir / "flask_app.py"
    app.write_text(FLASK_APP)
    port = free_ports(("flask",))["flask"]
    proc = subprocess.Popen([sys.executable, str(app), str(MODEL / "model"), str(port),
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout_s=180)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/embed"


# --- the run -------------------------------------------------------------------------------------
def run(args, work: Path) -> list[dict[str, Any]]:
    from handlers.runtimes import available_cores

    project = work / "project"
    project.mkdir()
    texts = sample_texts(load_spec(MODEL), 16)
    files = {kind: write_bodies(work / "bodies" / kind, items)
             for kind, items in bodies(texts, args.passages).items()}
    folders = [MODEL, reranker_folder(project)]
    if args.batch:
        folders.append(batching_copy(project, args.batch))
    say(f"packaging {', '.join(f.name for f in folders)} with the CLI in {project} "
        "(export, gate, reference check)")
    started = time.perf_counter()
    cli("package", *map(str, folders), cwd=project)
    say(f"packaged in {time.perf_counter() - started:.0f} s")
    store = project / "model_store"
    cores = available_cores()
    workloads = [  # (model, unit, items per request, limit's bodies, served rows)
        ("minilm", "embeddings", 1, files["embed"],
         [("/predictions/minilm", "inference", "/predictions/minilm", files["embed"]),
          ("clients' front /v1/embeddings (OpenAI body, base64)", "clients", "/v1/embeddings",
           files["openai"])]
         + ([(f"/predictions/minilm_b{args.batch} (spec batching {args.batch}, max 1 ms)",
              "inference", f"/predictions/minilm_b{args.batch}", files["embed"])]
            if args.batch else [])),
        ("reranker", "pairs", args.passages, files["rerank"],
         [("/predictions/reranker", "inference", "/predictions/reranker", files["rerank"]),
          ("clients' front /rerank (TEI)", "clients", "/rerank", files["rerank"])]),
    ]
    rows: list[dict[str, Any]] = []

    def limits_pass(when: str) -> dict[str, tuple[float, float]]:
        found = {}
        for model, _, _, limit_files, _ in workloads:
            say(f"{model}: in-process limit {when} ({cores} processes x 1 thread, "
                f"{args.limit:.0f} s)")
            found[model] = in_process_limit(store / f"{model}.mar", limit_files, args.limit)
        return found

    before = limits_pass("before serving")
    say("deploying every archive with `servetool deploy`")
    try:
        ports, headers = deploy(project)
        for model, unit, per, _, served in workloads:
            for name, api, path, body_files in served:
                url = f"http://127.0.0.1:{ports[api]}{path}"
                row = measure(f"{model}: {name}", url, headers, body_files, args,
                             lambda: deployment_cpu(project))
                rows.append({**row, "model": model, "unit": unit, "setup": f"served: {name}",
                             "requests_s": row["throughput"],
                             "items_s": round(row["throughput"] * per, 1),
                             "cpu_ms_per_item": 1000 * row["server_cpu_s_per_request"] / per})
    finally:  # also after a deploy that failed half-way
        say("stopping the server")
        subprocess.run([SERVETOOL, "stop"], cwd=project, capture_output=True)
    # Other jobs on a shared machine only slow a run down: the limit is the better of two runs,
    # one before serving and one after, each model's CPU per request the lower.
    after = limits_pass("after serving")
    limits: dict[str, tuple[float, float]] = {}
    for model, unit, per, _, _ in workloads:
        rate = max(before[model][0], after[model][0])
        cpu = min(before[model][1], after[model][1])
        limits[model] = (rate * per, cpu / per)
        rows.append({"model": model, "unit": unit, "setup": f"in-process limit: the archive's "
                     f"handler, {cores} proc x 1 thread, best of 2", "requests_s": rate,
                     "items_s": round(rate * per, 1), "cpu_ms_per_item": 1000 * cpu / per,
                     "runs_requests_s": [before[model][0], after[model][0]]})
    if args.flask:
        workdir = work / "flask"
        workdir.mkdir()
        say("starting Flask + eager transformers")
        proc, url = flask_server(workdir, cores)
        try:
            import psutil

            flask_process = psutil.Process(proc.pid)
            row = measure("minilm: Flask", url, {}, files["embed"], args,
                         lambda: tree_cpu([flask_process]))
        finally:
            stop(proc)
        rows.append({**row, "model": "minilm", "unit": "embeddings",
                     "setup": "peer: Flask + eager transformers (mean pooling)",
                     "requests_s": row["throughput"], "items_s": row["throughput"],
                     "cpu_ms_per_item": 1000 * row["server_cpu_s_per_request"]})
    for row in rows:
        rate, cpu = limits[row["model"]]
        row["rate_vs_limit"] = round(row["items_s"] / rate, 3)
        if "cpu_ms_per_item" in row:  # items a core gives: the capacity, whatever else runs
            row["items_per_core_s"] = round(1000 / row["cpu_ms_per_item"], 1)
            row["vs_limit"] = round(1000 * cpu / row["cpu_ms_per_item"], 3)
    return rows


def table(rows: list[dict[str, Any]], args) -> str:
    lines = [f"\nload average (1 min) at the start {args.load[0]:.2f}, at the end {args.load[1]:.2f} "
             f"on {os.cpu_count()} cores",
             f"{args.concurrency} clients (wrk), {args.warmup:.0f} s warm-up then "
             f"{args.duration:.0f} s per served row; the limit {args.limit:.0f} s; embeddings: "
             f"one sentence a request; reranking: one query + {args.passages} passages a request",
             f"{'model':9} {'setup':60} {'req/s':>6} {'items/s':>7} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'CPU ms/item':>11} {'items/s/core':>12} {'served/limit':>12} "
             f"{'(by rate)':>9} {'errors':>6}"]
    order = ["minilm", "reranker"]
    ms = lambda v, digits=1: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (order.index(r["model"]), "limit" not in r["setup"])):
        errors = sum(r["errors"].values()) + r.get("lost", 0) if "errors" in r else "-"
        lines.append(f"{r['model']:9} {r['setup']:60} {r['requests_s']:6.1f} {r['items_s']:7.1f} "
                     f"{ms(r.get('p50_ms')):>7} {ms(r.get('p99_ms')):>7} "
                     f"{ms(r.get('cpu_ms_per_item'), 2):>11} {ms(r.get('items_per_core_s')):>12} "
                     f"{ms(r.get('vs_limit'), 2):>12} {r['rate_vs_limit']:9.2f} {errors:>6}")
    lines.append("items: embeddings (minilm), (query, passage) pairs (reranker); served/limit: the "
                 "limit's CPU per item over the deployment's (the capacity ratio); (by rate): the "
                 "measured rates' ratio, which on a shared machine also moves with other jobs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per served row")
    parser.add_argument("--warmup", type=float, default=8.0,
                        help="seconds of load before each served row (the JVM compiles its hot "
                             "paths under load)")
    parser.add_argument("--limit", type=float, default=10.0,
                        help="seconds per process for the in-process limits")
    parser.add_argument("--passages", type=int, default=8, help="passages per rerank request")
    parser.add_argument("--flask", action="store_true",
                        help="add the embeddings peer: Flask + eager transformers")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="add minilm served with the spec batching N (max 1 ms)")
    parser.add_argument("--python-engine", action="store_true",
                        help="drive the load with the Python engine even where wrk is installed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.flask:
        try:
            import flask  # noqa: F401
        except ImportError:
            sys.exit("Flask is needed for --flask: .venv/bin/pip install -e '.[bench]'")
    work = Path(tempfile.mkdtemp(prefix="servetool-text-bench-"))
    start_load = os.getloadavg()[0]
    try:
        rows = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.load = (start_load, os.getloadavg()[0])
    print(json.dumps({"load_average": args.load, "rows": rows}, indent=2) if args.json
          else table(rows, args))


if __name__ == "__main__":
    main()
