"""Text serving side by side, in one run: sentence embeddings (models/minilm) per second.

Setups, the same sentences (one per request, JSON {"inputs": "..."}) and the same closed-loop load
(wrk, 8 clients):
1. the in-process limit: tokenize + the spec's format + pooling (in the graph), one process per
   core with one thread each, one sentence at a time;
2. the usual peer: a Flask server with eager transformers (AutoModel + AutoTokenizer) and mean
   pooling + L2 normalisation, as the model card shows;
3. servetool as a user runs it: `servetool package` + `servetool deploy` in a scratch folder
   outside this repository, no flags;
4. the same with the spec batching what is queued (batch 8, at most 1 ms).
TorchServe's own Hugging Face example handler is left out: it imports transformers in the worker
and pads every request to a fixed max_length, and its example configuration needs the hub.

Run on demand: .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/text_serving.py
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.serving import deploy_with_cli, measure, per_core, say, stop, wait_http  # noqa: E402
from servetool.spec import load_spec  # noqa: E402
from servetool.text_samples import sample_texts  # noqa: E402
from servetool.torchserve import free_ports  # noqa: E402

MODEL = ROOT / "models" / "minilm"
SERVETOOL = str(Path(sys.executable).with_name("servetool"))


def _limit_worker(mar: str, texts: list[str], seconds: float, queue) -> None:
    import zipfile

    from handlers.batching import collate
    from handlers.runtimes import load_runtime
    from handlers.tasks import make_task

    folder = Path(tempfile.mkdtemp(prefix="servetool-text-limit-"))
    zipfile.ZipFile(mar).extractall(folder)
    config = yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]
    runtime = load_runtime(config["runtime"], str(folder / config["artifact"]), 1,
                           {**(config.get("runtime_options") or {}),
                            "input_names": [i["name"] for i in config["inputs"]]})
    task = make_task(config, None, str(folder))

    def one(i: int) -> None:
        rows = task.preprocess(json.dumps({"inputs": texts[i % len(texts)]}).encode())
        runtime.run(collate(rows.examples, config["inputs"]))

    for i in range(10):
        one(i)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        one(done)
        done += 1
    queue.put(done / (time.perf_counter() - started))
    shutil.rmtree(folder, ignore_errors=True)


def in_process_limit(mar: Path, texts: list[str], seconds: float) -> float:
    return round(sum(per_core(_limit_worker, (str(mar), texts, seconds), seconds)), 1)


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


def flask_server(workdir: Path, threads: int) -> tuple[subprocess.Popen, str, dict]:
    app = workdir / "flask_app.py"
    app.write_text(FLASK_APP)
    port = free_ports(("flask",))["flask"]
    proc = subprocess.Popen([sys.executable, str(app), str(MODEL / "model"), str(port),
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/", timeout_s=180)
    return proc, f"http://127.0.0.1:{port}/embed", {}


def servetool_as_user(workdir: Path, batch: int | None) -> tuple[Any, str, dict]:
    """The CLI in a scratch project folder; with `batch`, a copy of the spec that batches."""
    model_dir = MODEL
    if batch:
        model_dir = workdir / "minilm"
        shutil.copytree(MODEL, model_dir, symlinks=True)
        raw = yaml.safe_load((model_dir / "servetool.yaml").read_text())
        raw["batch"] = {"size": batch, "max_delay_ms": 1}
        (model_dir / "servetool.yaml").write_text(yaml.safe_dump(raw))
    return deploy_with_cli(model_dir, "minilm", workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--python-engine", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from handlers.runtimes import available_cores

    spec = load_spec(MODEL)
    texts = sample_texts(spec, 16)
    work = Path(tempfile.mkdtemp(prefix="servetool-text-bench-"))
    payloads = work / "payloads"
    payloads.mkdir()
    for i, text in enumerate(texts):
        (payloads / f"{i:02d}.json").write_text(json.dumps({"inputs": text}))
    files = sorted(payloads.glob("*.json"))
    rows = []
    try:
        say("packaging minilm for the in-process limit")
        store = work / "store"
        subprocess.run([SERVETOOL, "package", str(MODEL), "--model-store", str(store)], cwd=work,
                       check=True, capture_output=True)
        limit = in_process_limit(store / "minilm.mar", texts, args.duration / 2)
        rows.append({"setup": f"in-process limit ({spec.format}, {available_cores()} proc x 1 "
                              "thread, one sentence at a time)", "throughput": limit})
        setups = [("Flask + eager transformers (mean pooling)",
                   lambda w: flask_server(w, available_cores())),
                  ("servetool as a user runs it (CLI, scratch folder, no flags)",
                   lambda w: servetool_as_user(w, None)),
                  ("the same, spec batching 8 (max 1 ms)", lambda w: servetool_as_user(w, 8))]
        for name, start in setups:
            workdir = Path(tempfile.mkdtemp(prefix="servetool-text-setup-"))
            say(f"starting {name}")
            handle = None
            try:
                handle, url, headers = start(workdir)
                rows.append(measure(name, url, headers, files, args))
            finally:
                if handle is not None:
                    stop(handle)
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["vs_limit"] = round(row["throughput"] / limit, 3)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"\nminilm: {args.concurrency} clients, {args.duration:.0f} s each, one sentence per "
          f"request ({len(files)} sentences)")
    print(f"{'setup':66} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs limit':>9} {'errors':>7}")
    for r in rows:
        errors = sum(r.get("errors", {}).values()) if "errors" in r else "-"
        print(f"{r['setup']:66} {r['throughput']:8.1f} {r.get('p50_ms') or '-':>8} "
              f"{r.get('p99_ms') or '-':>8} {r['vs_limit']:9.2f} {errors:>7}")


if __name__ == "__main__":
    main()
