"""Versions, promote, rollback and hot reload on a real TorchServe under a steady load, with a
folder and a real S3 API server (moto's server: the S3 API other projects' test suites run)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from servetool.bench.serve import run_load
from servetool.engines.torchserve.process import free_ports
from servetool.operate import lifecycle
from servetool.operate.lifecycle import Lifecycle
from servetool.operate.sources import BucketSource, FolderSource, SourceError, safe_target
from servetool.operate.watch import Watcher, describe
from servetool.targets.common import DeployError
from servetool.targets.local import LocalTarget
from servetool.targets.record import is_pinned, pinned_name, read_record
from tests.conftest import DIGITS, server_options, write_spec

ONE = {"min": 1, "max": 1}
IMAGE = (DIGITS / "samples" / "digit_3.png").read_bytes()


# --- archives and publishing ---------------------------------------------------------------------
def rewrite_archive(src: Path, dst: Path, *, name: str | None = None, version: str | None = None,
                    break_import: bool = False, max_pixels: int | None = None,
                    workers: int | None = None) -> Path:
    """A copy of an archive as another model or version, or with a handler that cannot load, or
    one whose workers load but refuse the smoke test's image, or with a fixed worker count."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelName"] = name or manifest["model"]["modelName"]
                manifest["model"]["modelVersion"] = version or manifest["model"]["modelVersion"]
                data = json.dumps(manifest).encode()
            if item.filename == "entry.py" and break_import:
                data = data.replace(b"import numpy as np\n",
                                    b"import numpy as np\nimport module_nobody_installed\n")
            if item.filename == "model-config.yaml" and (max_pixels or workers):
                config = yaml.safe_load(data)
                if max_pixels:
                    config["handler"]["preprocess"]["max_pixels"] = max_pixels
                if workers:
                    config |= {"minWorkers": workers, "maxWorkers": workers}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            zout.writestr(item, data)
    return dst


def publish(root: Path, model: str, version: str, mar: Path | None = None, *,
            marker: dict | None = None, ready: bool = True) -> Path:
    folder = root / model / version
    folder.mkdir(parents=True, exist_ok=True)
    if mar is not None:
        (folder / f"{model}.mar").write_bytes(mar.read_bytes())
    if ready:
        (folder / "READY").write_text(json.dumps(marker) if marker else "")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory, model_store):
    """Model `lc` in versions 1.0 and 2.0 (ONNX, one worker each) and variants of them: the
    session's packaged digits archive rewritten (a version is only its manifest's field), not
    packaged again."""
    built = tmp_path_factory.mktemp("lc-built")
    out = {version: rewrite_archive(model_store / "digits.mar", built / version / "lc.mar",
                                    name="lc", version=version, workers=1)
           for version in ("1.0", "2.0")}
    out["broken"] = rewrite_archive(out["2.0"], built / "broken" / "lc.mar", version="3.0",
                                    break_import=True)
    out["refusing"] = rewrite_archive(out["2.0"], built / "refusing" / "lc.mar", version="3.2",
                                      max_pixels=4)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, archives):
    store = tmp_path_factory.mktemp("lc-store")
    (store / "lc.mar").write_bytes(archives["1.0"].read_bytes())
    target = LocalTarget(server_options(tmp_path_factory.mktemp("lc-run"), store))
    lifecycle.deploy(target, ["lc"])
    yield target
    target.down()


def headers(target: LocalTarget) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.client().token('inference')}"}


@contextlib.contextmanager
def steady_load(target: LocalTarget, model: str, concurrency: int = 3):
    """Closed-loop clients on the model's default URL for the whole block; the result after it."""
    stop = threading.Event()
    box: dict = {}
    url = f"{target.running().url('inference')}/predictions/{model}"
    thread = threading.Thread(target=lambda: box.setdefault("result", run_load(
        url, [(IMAGE, "image/png")], concurrency=concurrency, duration_s=None, stop=stop,
        headers=headers(target))))
    thread.start()
    time.sleep(0.5)
    try:
        yield box
    finally:
        stop.set()
        thread.join()


def answering(target: LocalTarget, model: str) -> str:
    reply = requests.post(f"{target.running().url('inference')}/predictions/{model}", data=IMAGE,
                          headers=headers(target), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.headers["X-Model-Version"]


def loaded(target: LocalTarget, model: str) -> dict[str, bool]:
    return {r["version"]: r["default"] for r in Lifecycle(target).versions(model) if r["loaded"]}


# --- without a server ----------------------------------------------------------------------------
def test_versions_sort_by_number_and_pinned_names_are_recognised():
    assert sorted(["10.0", "9.1", "1.0", "2", "1.0-rc1", "1.0.1"], key=lifecycle.version_key) == \
        ["1.0-rc1", "1.0", "1.0.1", "2", "9.1", "10.0"]
    name = pinned_name("digits", "2.0+cpu", "ab" * 32)
    assert name == "digits--2.0_cpu--abababababab.mar"
    assert is_pinned(Path(name)) and not is_pinned(Path("digits.mar"))


def test_a_first_format_record_is_read_as_versions(tmp_path):
    (tmp_path / "deployed.json").write_text(json.dumps(
        {"digits": {"version": "1.0", "digest": "d", "archive": "digits.mar", "workers": 3}}))
    assert read_record(tmp_path) == {"digits": {
        "default": "1.0", "history": ["1.0"], "keep": 2,
        "versions": {"1.0": {"archive": "digits.mar", "digest": "d", "workers": 3}}}}


def test_a_folder_source_sees_only_complete_versions_and_their_changes(tmp_path):
    source = FolderSource(tmp_path)
    publish(tmp_path, "m", "1", DIGITS / "digits.pt", ready=False)  # any bytes: a half upload
    (tmp_path / "m" / ".2-partial").mkdir()  # a publisher's temporary folder
    [item] = source.scan()
    assert (item.model, item.version, item.complete) == ("m", "1", False)
    (tmp_path / "m" / "1" / "READY").write_text(json.dumps({"sha256": "abc"}))
    [done] = source.scan()
    assert done.complete and done.marker == {"sha256": "abc"} and done.kind == "archive"
    assert done.fingerprint != item.fingerprint
    assert source.scan()[0].fingerprint == done.fingerprint  # stable while nothing changes
    (tmp_path / "m" / "1" / "m.mar").write_bytes(b"other bytes")
    assert source.scan()[0].fingerprint != done.fingerprint
    (tmp_path / "m" / "1" / "m.mar").unlink()
    assert "neither an archive" in source.scan()[0].kind
    with pytest.raises(SourceError, match="outside the version's folder"):
        safe_target(tmp_path / "stage", "../../etc/passwd")


# --- on a real server ----------------------------------------------------------------------------
def test_publish_promote_rollback_and_failures_never_fail_a_request(server, archives, tmp_path):
    source = tmp_path / "published"
    source.mkdir()
    port = free_ports(("metrics",))["metrics"]
    log: list[str] = []
    watcher = Watcher(server, FolderSource(source), metrics_port=port, say=log.append)
    life = Lifecycle(server)
    with steady_load(server, "lc") as load:
        # half published: nothing happens
        publish(source, "lc", "2.0", archives["2.0"], ready=False)
        assert watcher.check_once() == []
        # complete, with the archive's digest in its marker: served as the new default
        publish(source, "lc", "2.0", marker={"sha256": sha256(archives["2.0"])})
        [event] = watcher.check_once()
        assert event["outcome"] == "serving", event
        assert loaded(server, "lc") == {"1.0": False, "2.0": True}  # the old one kept for rollback
        assert answering(server, "lc") == "2.0"

        # a handler that cannot load: never serves, and is not retried until it changes
        publish(source, "lc", "3.0", archives["broken"])
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and "module_nobody_installed" in event["detail"]
        assert watcher.check_once() == []
        # workers that load but refuse the smoke test's request: unloaded again
        publish(source, "lc", "3.2", archives["refusing"])
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and "smoke test" in event["detail"], event
        assert "413" in event["detail"]
        # a model folder that fails the gate (fp16 against a zero tolerance)
        write_spec(source / "lc" / "3.5", name="lc", version="3.5", format="onnx-fp16",
                   workers=ONE, tolerance={"atol": 0.0, "rtol": 0.0})
        (source / "lc" / "3.5" / "READY").touch()
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and "max abs diff" in event["detail"], event
        # an archive whose bytes are not what its marker says
        publish(source, "lc", "3.6", archives["2.0"], marker={"sha256": "0" * 64})
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and "SHA-256" in event["detail"]
        # the serving 2.0 republished with other bytes: versions are immutable, 2.0 keeps serving
        rewrite_archive(archives["refusing"], source / "lc" / "2.0" / "lc.mar", version="2.0")
        (source / "lc" / "2.0" / "READY").write_text("")
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and "immutable" in event["detail"], event
        assert loaded(server, "lc") == {"1.0": False, "2.0": True}
        assert answering(server, "lc") == "2.0"

        # promote and rollback, under the same load
        life.promote("lc", "1.0")
        assert answering(server, "lc") == "1.0"
        assert life.rollback("lc") == {"name": "lc", "default": "2.0", "previous": "1.0"}
        assert answering(server, "lc") == "2.0"
        with pytest.raises(DeployError, match="already the default"):
            life.rollback("lc", to="2.0")

        # a valid model folder: packaged (gate, pre-flight) by the watcher; 1.0 leaves (keep 2)
        write_spec(source / "lc" / "4.0", name="lc", version="4.0", workers=ONE)
        (source / "lc" / "4.0" / "READY").touch()
        [event] = watcher.check_once()
        assert event["outcome"] == "serving", event
        assert loaded(server, "lc") == {"2.0": False, "4.0": True}
        assert not list(Path(server.opts.model_store).glob("lc--1.0--*.mar"))  # unpinned
        assert life.rollback("lc")["default"] == "2.0"

        # 4.0 removed from the source: unloaded; 2.0 removed too: kept, it is all that serves
        import shutil

        shutil.rmtree(source / "lc" / "4.0")
        [event] = watcher.check_once()
        assert (event["version"], event["outcome"]) == ("4.0", "removed")
        shutil.rmtree(source / "lc" / "2.0")
        [event] = watcher.check_once()
        assert (event["version"], event["outcome"]) == ("2.0", "kept")
        assert watcher.check_once() == []  # said once
    result = load["result"]
    assert result.sent > 200
    assert (result.errors, result.lost) == ({}, 0), (result.errors, result.lost)
    assert {s.version for s in result.samples} == {"1.0", "2.0", "4.0"}

    status = describe(Path(server.opts.run_dir))
    assert status["source"] == str(source.resolve()) and status["last_error"] is None
    assert {f["version"] for f in status["failed"]} == {"3.0", "3.2", "3.5", "3.6"}
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'servetool_watch_publishes_total{model="lc",outcome="failed"} 5.0' in metrics
    assert 'servetool_watch_publishes_total{model="lc",outcome="serving"} 2.0' in metrics
    assert 'servetool_watch_failed_versions{model="lc"} 4.0' in metrics

    # a restarted watcher does not redo what it did
    again = Watcher(server, FolderSource(source), say=log.append)
    assert again.check_once() == []


def test_keep_one_unloads_the_old_default_only_after_it_drained(server, archives, tmp_path):
    """With --keep 1 the version that served until now goes right after the switch: its queue
    drains first, so the requests it held are answered, not failed."""
    model = "lck"
    life = Lifecycle(server)
    life.install(rewrite_archive(archives["1.0"], tmp_path / "v1.mar", name=model), keep=1)
    with steady_load(server, model, concurrency=4) as load:
        time.sleep(1)
        result = life.install(rewrite_archive(archives["2.0"], tmp_path / "v2.mar", name=model))
        time.sleep(1)
    assert result["action"] == "upgraded"
    assert loaded(server, model) == {"2.0": True}
    assert {s.version for s in load["result"].samples} == {"1.0", "2.0"}
    assert (load["result"].errors, load["result"].lost) == ({}, 0)
    with pytest.raises(DeployError, match="only version serving"):
        life.unload(model, "2.0")


def test_a_restart_restores_every_version_and_the_default_that_served(server, archives):
    life = Lifecycle(server)
    before = loaded(server, "lc")
    default = next(v for v, is_default in before.items() if is_default)
    server.down()
    result = lifecycle.deploy(server, [])  # the store's lc.mar is 1.0, older than the default: left out
    assert result["server_started"] is True
    assert loaded(server, "lc") == before
    assert answering(server, "lc") == default
    assert {r["action"] for r in result["models"]} == {"restored"}
    assert all(r["loaded_at"] for r in life.versions("lc"))


def moto_server(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture()
def bucket(monkeypatch):
    import boto3

    port = free_ports(("s3",))["s3"]
    proc = moto_server(port)
    # credentials the usual way: boto3's chain reads them from the environment
    for key, value in {"AWS_ACCESS_KEY_ID": "servetool-test", "AWS_SECRET_ACCESS_KEY": "secret",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="models")
    yield s3, endpoint
    proc.terminate()
    proc.wait(timeout=10)


def test_a_bucket_version_is_served_once_its_marker_is_uploaded(server, archives, bucket, tmp_path):
    s3, endpoint = bucket
    model = "lcs"
    v1 = rewrite_archive(archives["1.0"], tmp_path / "v1.mar", name=model)
    v2 = rewrite_archive(archives["2.0"], tmp_path / "v2.mar", name=model)
    s3.upload_file(str(v1), "models", f"team/{model}/1.0/{model}.mar")
    s3.put_object(Bucket="models", Key=f"team/{model}/1.0/READY", Body=b"")
    source = BucketSource("s3://models/team", endpoint)
    watcher = Watcher(server, source, say=print)
    [event] = watcher.check_once()
    assert event["outcome"] == "serving" and answering(server, model) == "1.0"

    checks: list[int] = []
    check_once = watcher.check_once
    watcher.check_once = lambda: checks.append(1) or check_once()
    with steady_load(server, model, concurrency=2) as load:
        s3.upload_file(str(v2), "models", f"team/{model}/2.0/{model}.mar")
        assert watcher.check_once() == []  # no marker yet
        s3.put_object(Bucket="models", Key=f"team/{model}/2.0/READY",
                      Body=json.dumps({"sha256": sha256(v2)}).encode())
        checks.clear()
        uploaded = time.monotonic()
        thread = threading.Thread(target=watcher.run, args=(lambda: watcher.state["events"][model]
                                                            ["version"] == "2.0",))
        thread.start()
        thread.join(timeout=120)
        deadline = time.monotonic() + 30  # a bound on the wait, not a goal
        while (served := answering(server, model)) != "2.0" and time.monotonic() < deadline:
            time.sleep(0.05)
    print(f"bucket: upload of the marker to the first answer from 2.0: "
          f"{time.monotonic() - uploaded:.1f} s (interval {source.default_interval_s:g} s; "
          "benchmarks/hot_reload.py measures it)")
    # the first check after the marker installed it, and it answers: no second look, no retry
    assert not thread.is_alive() and checks == [1] and served == "2.0"
    assert watcher.state["events"][model]["outcome"] == "serving"
    assert (load["result"].errors, load["result"].lost) == ({}, 0)

    # a store that refuses the credentials: the check fails, said once, nothing unloaded
    bad = Watcher(server, BucketSource("s3://no-such-bucket/x", endpoint), say=print)
    assert bad.check_once() == []
    assert "NoSuchBucket" in bad.state["last_error"]
    assert answering(server, model) == "2.0"


def test_deploy_watch_serves_a_published_version(server, archives, tmp_path):
    """As a user runs it: `deploy --watch` leaves a background watcher (default interval) that
    serves a published version on its own, with no failed request (benchmarks/hot_reload.py
    measures how soon)."""
    model = "lcw"
    store = Path(server.opts.model_store)
    rewrite_archive(archives["1.0"], store / f"{model}.mar", name=model)
    source = tmp_path / "published"
    source.mkdir()
    port = free_ports(("metrics",))["metrics"]
    ports = server.opts.ports
    cli = [str(Path(sys.executable).with_name("servetool"))]
    common = ["--run-dir", str(server.opts.run_dir), "--model-store", str(store)]
    deploy = subprocess.run(
        cli + ["deploy", model, *common, "--watch", str(source), "--watch-metrics-port", str(port),
               "--json", *[f"--{api.replace('_', '-')}-port={p}" for api, p in ports.items()]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert deploy.returncode == 0, deploy.stderr
    assert json.loads(deploy.stdout)["watcher_pid"] > 0
    try:
        with steady_load(server, model, concurrency=2) as load:
            v2 = rewrite_archive(archives["2.0"], tmp_path / "v2.mar", name=model)
            publish(source, model, "2.0", v2)
            published = time.monotonic()
            served = answering(server, model)
            while served != "2.0" and time.monotonic() - published < 120:  # a bound, not a goal
                time.sleep(0.05)
                served = answering(server, model)
        print(f"folder: publish to the first answer from 2.0: {time.monotonic() - published:.1f} s")
        assert served == "2.0"
        assert (load["result"].errors, load["result"].lost) == ({}, 0)
        status = subprocess.run(cli + ["status", *common, "--json"], capture_output=True,
                                text=True, timeout=60)
        watcher = json.loads(status.stdout)["watcher"]
        assert watcher["running"] and watcher["events"][model]["outcome"] == "serving"
        # the watcher deploy left polls at a folder's default interval
        assert watcher["interval_s"] == FolderSource.default_interval_s
        text = subprocess.run(cli + ["status", *common], capture_output=True, text=True,
                              timeout=60).stdout
        assert f"Watcher of {source.resolve()}: running" in text
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert f'servetool_watch_publishes_total{{model="{model}",outcome="serving"}} 1.0' in metrics
        versions = json.loads(subprocess.run(cli + ["versions", model, *common, "--json"],
                                             capture_output=True, text=True, timeout=60).stdout)
        assert [(v["version"], v["default"]) for v in versions["versions"]] == \
            [("1.0", False), ("2.0", True)]
        back = subprocess.run(cli + ["rollback", model, *common], capture_output=True, text=True,
                              timeout=60)
        assert back.returncode == 0 and f"{model}: 1.0 is the default (was 2.0)" in back.stdout
        bad = subprocess.run(cli + ["promote", model, "9.9", *common], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 1 and bad.stderr.startswith("error: lcw 9.9 is not loaded")
        assert len(bad.stderr.strip().splitlines()) == 1
    finally:
        from servetool.operate import watch

        assert watch.daemon(Path(server.opts.run_dir)).stop() is True
