"""Serving throughput side by side, in one run: the in-process limit, Flask + eager PyTorch, stock
TorchServe (a tutorial handler with default config and logging), servetool's default deployment,
and the same run as a user gets it (the CLI in a scratch folder outside this repository, no flags).

Same machine, same model, same request bodies, same closed-loop load (servetool's load generator,
whose own CPU use is reported). Run on demand, not in CI:

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/serving.py                      # resnet18, then digits
    .venv/bin/python benchmarks/serving.py --models digits --duration 10 --json

Every server binds 127.0.0.1 on free ports and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.bench.serve import load_payloads, payload_files, run_load, run_wrk, wrk_path  # noqa: E402
from servetool.convert import export  # noqa: E402
from servetool.engines.torchserve.process import ServerOptions, free_ports  # noqa: E402
from servetool.model.spec import ModelSpec, load_spec  # noqa: E402
from servetool.operate import lifecycle  # noqa: E402
from servetool.operate.package import package  # noqa: E402
from servetool.targets.local import LocalTarget  # noqa: E402


def say(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def wait_http(url: str, timeout_s: float = 120, headers: dict | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2, headers=headers or {}).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {timeout_s} s")


# --- 1. the in-process limit -----------------------------------------------------------------
def _limit_worker(artifact: str, runtime: str, config: dict, bodies: list[bytes], seconds: float,
                  batch: int, queue) -> None:
    import numpy as np

    from handlers.runtimes import load_runtime
    from handlers.tasks import make_task

    run = load_runtime(runtime, artifact, 1, config.get("runtime_options") or {}).run
    task = make_task(config, None)

    def one_batch(start: int) -> None:
        run(np.stack([task.preprocess(bodies[(start + i) % len(bodies)]) for i in range(batch)]))

    one_batch(0)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        one_batch(done)
        done += batch
    queue.put(done / (time.perf_counter() - started))


def in_process_limit(spec: ModelSpec, fmt: str, bodies: list[bytes], seconds: float) -> dict[str, Any]:
    """decode + preprocess + inference (in batches of the spec's size), one process per core with
    one thread each."""
    from servetool.convert.pipeline import convert
    from servetool.engines.torchserve import archive

    tmp = Path(tempfile.mkdtemp(prefix="servetool-limit-"))
    artifact, _ = convert(spec, fmt, tmp)
    config = archive.handler_config(spec, artifact)
    rates = per_core(_limit_worker, (str(artifact.path), artifact.format.runtime, config, bodies,
                                     seconds, spec.batch_size), seconds)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"throughput": round(sum(rates), 2), "processes": len(rates)}


def per_core(worker, args: tuple, seconds: float) -> list[float]:
    """worker(*args, queue) in one fresh process per core; the rate each one puts on the queue."""
    from handlers.runtimes import available_cores

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(*args, queue)) for _ in range(available_cores())]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    return rates


# --- 2. Flask dev server + eager PyTorch ---------------------------------------------------
FLASK_APP = textwrap.dedent('''
    """The classic first serving tutorial: Flask, eager PyTorch, Pillow preprocessing."""
    import io, json, sys
    import numpy as np, torch
    from flask import Flask, request, jsonify
    from PIL import Image
    sys.path.insert(0, sys.argv[2])
    from servetool.convert.export import load_original
    from servetool.model.spec import load_spec

    spec = load_spec(sys.argv[1])
    model = load_original(spec)
    pre = spec.preprocess
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        image = Image.open(io.BytesIO(request.get_data())).convert("L" if pre.grayscale else "RGB")
        if isinstance(pre.resize, int):  # torchvision's Resize(int): the shorter side
            w, h = image.size
            s = pre.resize
            image = image.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s))
        elif pre.resize:
            image = image.resize((pre.resize[1], pre.resize[0]))
        if pre.center_crop:
            h, w = pre.center_crop
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        x = (x - torch.tensor(pre.mean).view(-1, 1, 1)) / torch.tensor(pre.std).view(-1, 1, 1)
        with torch.no_grad():
            probs = torch.softmax(model(x[None])[0], 0)
        top = torch.topk(probs, min(5, probs.numel()))
        return jsonify({str(int(i)): float(p) for p, i in zip(top.values, top.indices)})

    app.run(host="127.0.0.1", port=int(sys.argv[3]), threaded=True)
''')


def flask_server(spec: ModelSpec, workdir: Path) -> tuple[subprocess.Popen, str, dict]:
    app = workdir / "flask_app.py"
    app.write_text(FLASK_APP)
    port = free_ports(("flask",))["flask"]
    proc = subprocess.Popen([sys.executable, str(app), str(spec.spec_file), str(ROOT), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/")
    return proc, f"http://127.0.0.1:{port}/predict", {}


# --- 3. stock TorchServe, tutorial handler, defaults ---------------------------------------
TUTORIAL_HANDLER = textwrap.dedent('''
    """A tutorial-style handler: BaseHandler, eager model from model.py + state_dict, Pillow."""
    import io
    import numpy as np
    import torch
    from PIL import Image
    from ts.torch_handler.base_handler import BaseHandler

    PRE = __PRE__

    class TutorialHandler(BaseHandler):
        def preprocess(self, data):
            batch = []
            for row in data:
                raw = row.get("data") or row.get("body")
                image = Image.open(io.BytesIO(raw)).convert("L" if PRE["grayscale"] else "RGB")
                if isinstance(PRE["resize"], int):  # torchvision's Resize(int): shorter side
                    w, h = image.size
                    s = PRE["resize"]
                    image = image.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s))
                elif PRE["resize"]:
                    image = image.resize((PRE["resize"][1], PRE["resize"][0]))
                if PRE["center_crop"]:
                    h, w = PRE["center_crop"]
                    left, top = (image.width - w) // 2, (image.height - h) // 2
                    image = image.crop((left, top, left + w, top + h))
                x = torch.from_numpy(np.asarray(image, np.float32) / 255.0)
                x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
                mean = torch.tensor(PRE["mean"]).view(-1, 1, 1)
                std = torch.tensor(PRE["std"]).view(-1, 1, 1)
                batch.append((x - mean) / std)
            return torch.stack(batch)

        def postprocess(self, data):
            probs = torch.softmax(data, 1)
            top = torch.topk(probs, min(5, probs.shape[1]), dim=1)
            return [{str(int(i)): float(p) for p, i in zip(v, ix)}
                    for v, ix in zip(top.values, top.indices)]
''')


def stock_torchserve(spec: ModelSpec, workdir: Path) -> tuple[subprocess.Popen, str, dict]:
    import torch
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    store = workdir / "stock_store"
    store.mkdir()
    handler = workdir / "tutorial_handler.py"
    handler.write_text(TUTORIAL_HANDLER.replace("__PRE__", repr(spec.preprocess.as_dict())))
    # BaseHandler wants model.py to define exactly one class: the tutorial's shape
    (workdir / "user_model.py").write_text(spec.source.model_file.read_text())
    model_def = workdir / "model.py"
    model_def.write_text(f"from user_model import {spec.source.class_name} as _Base\n\n\n"
                         f"class Model(_Base):\n    pass\n")
    weights = workdir / "weights.pt"
    torch.save(export.load_original(spec).state_dict(), weights)
    generate_model_archive(ModelArchiverConfig(
        model_name=spec.name, handler=str(handler), version="1.0", serialized_file=str(weights),
        model_file=str(model_def), extra_files=str(workdir / "user_model.py"),
        export_path=str(store), force=True))
    ports = free_ports()
    config = workdir / "stock.properties"  # only what must differ: ports, to avoid collisions
    config.write_text(f"inference_address=http://127.0.0.1:{ports['inference']}\n"
                      f"management_address=http://127.0.0.1:{ports['management']}\n"
                      f"metrics_address=http://127.0.0.1:{ports['metrics']}\n"
                      f"grpc_inference_port={ports['grpc_inference']}\n"
                      f"grpc_management_port={ports['grpc_management']}\n")
    (workdir / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(workdir / "tmp")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
         "--model-store", str(store), "--models", f"{spec.name}={spec.name}.mar",
         "--ts-config", str(config)], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # a server that never answers must not outlive the benchmark
        key_file = workdir / "key_file.json"
        deadline = time.monotonic() + 180
        keys = None
        while keys is None and time.monotonic() < deadline:  # the file appears before its content
            try:
                keys = json.loads(key_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.3)
        if keys is None:
            raise RuntimeError(f"stock TorchServe wrote no {key_file} within 180 s")
        headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
        url = f"http://127.0.0.1:{ports['inference']}/predictions/{spec.name}"
        _wait_prediction(url, headers)
    except BaseException:
        stop(proc)
        raise
    return proc, url, headers


def _wait_prediction(url: str, headers: dict, timeout_s: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.post(url, data=SAMPLE_BODY[0], headers=headers, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} answered no prediction within {timeout_s} s")


# --- 4. servetool's default deployment -----------------------------------------------------
def servetool_default(spec: ModelSpec, workdir: Path) -> tuple[LocalTarget, str, dict]:
    store = workdir / "servetool_store"
    package(spec, store)
    ports = free_ports()
    target = LocalTarget(ServerOptions(run_dir=workdir / "servetool_run", model_store=store,
                                       base_config=ROOT / "config.properties", ports=ports))
    lifecycle.deploy(target, [spec.name])
    client = target.client()
    headers = {"Authorization": f"Bearer {client.token('inference')}"}
    return target, f"{target.running().url('inference')}/predictions/{spec.name}", headers


# --- 5. servetool as a user runs it: the CLI, from a folder outside this repository, no flags -------
def servetool_as_user(spec: ModelSpec, workdir: Path) -> tuple[Any, str, dict]:
    """`servetool package` and `servetool deploy` in a scratch project folder: no
    config.properties of this repository applies, only servetool's own defaults."""
    return deploy_with_cli(spec.directory, spec.name, workdir)


def deploy_with_cli(model_dir: Path, name: str, workdir: Path) -> tuple[Any, str, dict]:
    """Package and deploy model_dir with the CLI from workdir/project, on free ports: (a stop
    function, the predictions URL, the auth headers)."""
    cli = str(Path(sys.executable).with_name("servetool"))
    project = workdir / "project"
    project.mkdir()
    subprocess.run([cli, "package", str(model_dir)], cwd=project, check=True,
                   capture_output=True)
    ports = free_ports()
    subprocess.run([cli, "deploy", *(f"--{api.replace('_', '-')}-port={port}"
                                     for api, port in ports.items())],
                   cwd=project, check=True, capture_output=True)
    keys = json.loads((project / ".servetool" / "key_file.json").read_text())
    headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
    url = f"http://127.0.0.1:{ports['inference']}/predictions/{name}"
    return (lambda: subprocess.run([cli, "stop"], cwd=project, capture_output=True)), url, headers


SAMPLE_BODY: list[bytes] = []


def stop(handle) -> None:
    if isinstance(handle, LocalTarget):
        handle.down()
        return
    if callable(handle):
        handle()
        return
    try:
        os.killpg(handle.pid, signal.SIGTERM)
        handle.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(handle.pid, signal.SIGKILL)


def measure(name: str, url: str, headers: dict, files, args,
            cpu: Callable[[], tuple[float, int]] | None = None) -> dict[str, Any]:
    """Warm up, then measure, with wrk where installed (a tenth of the Python engine's CPU, which
    on 2 cores is CPU taken from the server under test) and the Python engine otherwise. With
    `cpu` (the server's CPU seconds so far, and its process count), also the server's CPU per
    request while measured."""
    def load(seconds: float):
        if wrk_path() and not args.python_engine:
            return run_wrk(url, files, concurrency=args.concurrency, duration_s=seconds,
                           headers=headers)
        return run_load(url, load_payloads(files), concurrency=args.concurrency,
                        duration_s=seconds, headers=headers)

    # Warm up for a while, not a few requests: a JVM compiles TorchServe's hot paths under load.
    say(f"{name}: warming up for {args.warmup:.0f} s")
    load(args.warmup)
    say(f"{name}: {args.concurrency} clients for {args.duration:.0f} s")
    before, count = cpu() if cpu else (0.0, 0)
    summary = load(args.duration).summary()
    result = {"setup": name, **{k: summary[k] for k in (
        "engine", "throughput", "p50_ms", "p99_ms", "sent", "ok", "errors", "lost",
        "generator_cpu_share")}}
    if cpu:
        used = cpu()[0] - before
        say(f"{name}: {summary['throughput']:.1f} req/s, the server's {count} processes used "
            f"{used:.1f} s of CPU")
        result["server_cpu_s_per_request"] = used / max(1, summary["ok"])
    return result


def bench_model(model: str, args) -> dict[str, Any]:
    spec = load_spec(ROOT / "models" / model)
    files = payload_files([ROOT / "models" / model / "samples"])
    bodies = [f.read_bytes() for f in files]
    SAMPLE_BODY[:] = bodies[:1]
    rows = []
    say(f"{model}: in-process limit ({spec.format}, decode + preprocess + inference)")
    limit = in_process_limit(spec, spec.format, bodies, args.duration / 2)
    at = f", batch {spec.batch_size}" if spec.batch_size > 1 else ""
    rows.append({"setup": f"in-process limit ({spec.format}, {limit['processes']} proc x 1 thread{at})",
                 "throughput": limit["throughput"]})
    if args.int8:
        int8 = in_process_limit(spec, "onnx-int8-static", bodies, args.duration / 2)
        rows.append({"setup": f"in-process limit (onnx-int8-static, {int8['processes']} proc x 1 thread)",
                     "throughput": int8["throughput"]})
    setups = [("Flask dev server + eager PyTorch", flask_server),
              ("stock TorchServe (tutorial handler, defaults)", stock_torchserve),
              ("servetool default deployment", servetool_default),
              ("servetool as a user runs it (CLI, scratch folder, no flags)", servetool_as_user)]
    if args.int8:  # the same deployment, with the format swapped for one that passes the gate
        setups.append(("servetool default deployment, onnx-int8-static",
                       lambda spec, workdir: servetool_default(replace(spec, format="onnx-int8-static"),
                                                               workdir)))
    # The same deployment batching what is queued (waiting at most 1 ms), against the in-process
    # limit at that batch size: batching changes what the model itself costs per example.
    limits = {}
    for size in args.batch_variants:
        batched = replace(spec, batch_size=size, max_batch_delay_ms=1)
        lim = in_process_limit(batched, spec.format, bodies, args.duration / 2)
        limits[f"batch {size}"] = lim["throughput"]
        rows.append({"setup": f"in-process limit ({spec.format}, {lim['processes']} proc x 1 thread, "
                              f"batch {size})", "throughput": lim["throughput"], "limit": f"batch {size}"})
        setups.append((f"servetool default deployment, batch {size} (max 1 ms)",
                       lambda _spec, workdir, b=batched: servetool_default(b, workdir)))
    for name, start in setups:
        if args.only and not any(o in name for o in args.only):
            continue
        workdir = Path(tempfile.mkdtemp(prefix="servetool-serving-"))
        say(f"{model}: starting {name}")
        handle = None
        try:
            handle, url, headers = start(spec, workdir)
            row = measure(name, url, headers, files, args)
            if ", batch " in name:
                row["limit"] = name.rsplit(", ", 1)[1].split(" (")[0]
            rows.append(row)
        finally:
            if handle is not None:
                stop(handle)
            shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        row["vs_limit"] = round(row["throughput"] / limits.get(row.get("limit"), limit["throughput"]), 3)
    return {"model": model, "concurrency": args.concurrency, "duration_s": args.duration,
            "payloads": len(files), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"\n{result['model']}: {result['concurrency']} clients, {result['duration_s']:.0f} s each, "
             f"{result['payloads']} payload file(s)",
             f"{'setup':58} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs limit':>9} {'errors':>7} "
             f"{'lost':>5} {'gen CPU':>8}"]
    for r in result["rows"]:
        errors = sum(r.get("errors", {}).values()) if "errors" in r else "-"
        gen = f"{r['generator_cpu_share']:.0%}" if "generator_cpu_share" in r else "-"
        lines.append(f"{r['setup']:58} {r['throughput']:8.1f} {r.get('p50_ms') or '-':>8} "
                     f"{r.get('p99_ms') or '-':>8} {r['vs_limit']:9.2f} {errors:>7} "
                     f"{r.get('lost', '-'):>5} {gen:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "digits"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load before measuring")
    parser.add_argument("--only", nargs="*", help="run only setups whose name contains one of these")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8 in-process limit")
    parser.add_argument("--python-engine", action="store_true",
                        help="drive the load with the Python engine even where wrk is installed")
    parser.add_argument("--batch-variants", nargs="*", type=int, default=[],
                        help="also serve at these batch sizes (each against its own limit)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import flask  # noqa: F401
    except ImportError:
        sys.exit("Flask is needed for the baseline: .venv/bin/pip install -e '.[bench]'")
    results = [bench_model(m, args) for m in args.models]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
