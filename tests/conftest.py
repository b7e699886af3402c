"""Shared fixtures: the digits example, its archives, and one real TorchServe for the server tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from servetool.convert.export import import_file
from servetool.engines.torchserve.process import ServerOptions, free_ports
from servetool.model.spec import load_spec
from servetool.operate import lifecycle
from servetool.operate.package import package
from servetool.targets.local import LocalTarget

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits"


@pytest.fixture(scope="session")
def digits_train():
    """models/digits/train.py as a module: its split() gives the real held-out digits."""
    return import_file(DIGITS / "train.py", "digits_train")


@pytest.fixture(scope="session")
def held_out(digits_train):
    _, _, images, labels = digits_train.split()
    return images, labels


def write_spec(directory: Path, **overrides) -> Path:
    """A copy of the digits spec in `directory`, pointing at the real model files, with overrides."""
    raw = yaml.safe_load((DIGITS / "servetool.yaml").read_text())
    raw["source"] = {"model_file": str(DIGITS / "model.py"), "class": "DigitsNet",
                     "state_dict": str(DIGITS / "digits.pt")}
    raw["labels"] = str(DIGITS / "labels.txt")
    for key in ("validation", "calibration"):
        raw[key] = {"data": str(DIGITS / raw[key]["data"])}
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return directory


# One archive per further CPU format, so each one round-trips through a real TorchServe.
FORMAT_TWINS = {"digits_fp16": "onnx-fp16", "digits_int8": "onnx-int8",
                "digits_int8s": "onnx-int8-static", "digits_ov": "openvino",
                "digits_ovbf16": "openvino-bf16"}


def server_options(run_dir: Path, model_store: Path) -> ServerOptions:
    return ServerOptions(run_dir=run_dir, model_store=model_store,
                         base_config=ROOT / "config.properties", ports=free_ports(),
                         startup_timeout_s=120)


def _package_folders(spec_dirs: list[str], store: str) -> None:
    for folder in spec_dirs:
        package(load_spec(Path(folder)), Path(store))


def package_all(spec_dirs: list[Path], store: Path) -> None:
    """package() each spec into `store`, half of them in a second process where there is a second
    core: most of a package is single-threaded (the export, and the pre-flight's fresh interpreter
    importing its runtime), so the archives are built in about half the time. This process does
    the other half itself, so that it warms up its exporters as it did before. Spawned, not
    forked: a forked process that inherits torch's thread pools can hang."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    folders = [str(f) for f in spec_dirs]
    if (os.cpu_count() or 1) < 2 or len(folders) < 2:
        _package_folders(folders, str(store))
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        other = pool.submit(_package_folders, folders[1::2], str(store))
        _package_folders(folders[0::2], str(store))
        other.result()  # its first failure is raised here, with its own message


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """Archives for each format x task the server tests serve, built once per session."""
    store = tmp_path_factory.mktemp("model_store")
    specs = tmp_path_factory.mktemp("specs")
    folders = [DIGITS]  # auto workers: one per core
    one = {"min": 1, "max": 1}  # the twins keep to one worker each, to spare the test machine
    folders.append(write_spec(specs / "ts", name="digits_ts", format="torchscript", workers=one))
    folders.append(write_spec(specs / "tensor", name="digits_tensor", format="torchscript",
                              task="tensor", preprocess=None, labels=None, workers=one))
    for name, fmt in FORMAT_TWINS.items():
        folders.append(write_spec(specs / name, name=name, format=fmt, workers=one))
    # A batching-friendly twin: a long batch delay so that concurrent requests share one batch.
    folders.append(write_spec(specs / "batchy", name="digits_batch",
                              batch={"size": 4, "max_delay_ms": 2000}, workers=one))
    # torchvision's Resize(int) + CenterCrop: the shorter side to 10, the middle 8x8
    # ... batching with no wait asked for (TorchServe alone would read the 0 as 100 ms)
    folders.append(write_spec(specs / "short", name="digits_short", workers=one,
                              batch={"size": 4, "max_delay_ms": 0}, preprocess={
        **yaml.safe_load((DIGITS / "servetool.yaml").read_text())["preprocess"],
        "resize": 10, "center_crop": [8, 8]}))
    # A model that raises on some inputs (token ids out of its embedding's range), batching 8.
    from tests.test_isolation import fragile_spec

    fragile = fragile_spec(specs / "embed", "EmbedNet", [4], "int64", "onnx")
    raw = yaml.safe_load((fragile / "servetool.yaml").read_text())
    raw |= {"batch": {"size": 8, "max_delay_ms": 1500}, "workers": one}
    (fragile / "servetool.yaml").write_text(yaml.safe_dump(raw))
    folders.append(fragile)
    package_all(folders, store)
    return store


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_store):
    """One real TorchServe with every test archive registered; stopped (and checked) at the end."""
    target = LocalTarget(server_options(tmp_path_factory.mktemp("run"), model_store))
    result = lifecycle.deploy(target, [])
    yield target, result
    target.down()


def serve_in_process(folder: Path, config: dict, bodies: list) -> tuple[list, list[int], list[str]]:
    """One batch through servetool's handler as a TorchServe worker runs it (TorchServe's own
    Context): the JSON answers, each request's status and its reason phrase."""
    import json

    from ts.context import Context, RequestProcessor

    from handlers.entry import ServeHandler

    context = Context("m", str(folder), {}, len(bodies), None, "0.12.0", model_yaml_config=config)
    handler = ServeHandler()
    handler.initialize(context)
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    replies = handler.handle([{"body": b} for b in bodies], context)
    assert all(isinstance(r, bytes) for r in replies)  # serialized by the handler itself
    raw = [context.get_response_status(i) for i in range(len(bodies))]
    return [json.loads(r) for r in replies], [s[0] or 200 for s in raw], [s[1] for s in raw]


def png_bytes(image01: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.rint(image01[0] * 255).astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


# --- a real Docker engine (tests marked `docker`) ---------------------------------------------------
ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"
LOCAL_BASE_IMAGE = "local/bookworm-python:3.11"


def _docker_env() -> dict[str, str]:
    import os

    root = os.environ.get("SERVETOOL_DOCKER_ROOT", "/tmp/servetool-docker")
    return {**os.environ, "DOCKER_HOST": f"unix://{root}/docker.sock"}


@pytest.fixture(scope="session")
def docker_engine():
    """A Docker engine with the locally built base image (no registry can be reached here).

    Tests marked `docker` are skipped locally with `pytest -m "not docker"` or
    SERVETOOL_SKIP_DOCKER=1; under CI (SERVETOOL_CI=1, set by .ci/run) they must run, so an engine
    that cannot be set up fails them instead of skipping. An engine this fixture started is stopped
    (by its pid) at the end; one that was already running is left as it was.
    """
    import os
    import subprocess

    ci = os.environ.get("SERVETOOL_CI") == "1"
    if os.environ.get("SERVETOOL_SKIP_DOCKER") == "1" and not ci:
        pytest.skip("SERVETOOL_SKIP_DOCKER=1")
    env = _docker_env()
    was_running = subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0 \
        if _which("docker") else False
    proc = subprocess.run([str(ENGINE_SCRIPT), "base-image"], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        message = f"no Docker engine could be set up here: {proc.stderr.strip()[-500:]}"
        if ci:
            pytest.fail(message)
        pytest.skip(message)
    yield env
    if not was_running:
        subprocess.run([str(ENGINE_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory, model_store):
    """A server with model `mon` in versions 1.0 (the default) and 2.0, both loaded (one worker
    each): the monitoring and canary tests read and split them."""
    from servetool.operate.lifecycle import Lifecycle
    from tests.test_lifecycle import rewrite_archive

    store = tmp_path_factory.mktemp("mon-store")
    v1 = rewrite_archive(model_store / "digits_ts.mar", store / "mon.mar", name="mon")
    target = LocalTarget(server_options(tmp_path_factory.mktemp("mon-run"), store))
    lifecycle.deploy(target, ["mon"])
    life = Lifecycle(target)
    life.install(rewrite_archive(v1, tmp_path_factory.mktemp("v2") / "mon.mar", version="2.0"))
    life.promote("mon", "1.0")
    yield target
    target.down()
