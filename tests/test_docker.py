"""The Docker target against a real Docker engine: build, run, predict, scale, stop, and its errors.

The engine is Debian's docker.io started by scripts/docker-engine.sh (no systemd, its own sockets);
the base image is built locally with debootstrap because no registry can be reached here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from servetool.engines.torchserve.process import free_ports, read_properties
from servetool.targets import image
from tests.conftest import LOCAL_BASE_IMAGE, ROOT, png_bytes
from tests.test_cli import assert_clean_error, run


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 900):
    return run(*args, env=env, cwd=cwd, timeout=timeout)  # image builds take minutes


def port_args(ports: dict[str, int]) -> list[str]:
    return [x for api, port in ports.items() for x in (f"--{api.replace('_', '-')}-port", str(port))]


def test_no_engine_is_one_clear_line(tmp_path, model_store):
    env = {**__import__("os").environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    proc = cli("deploy", "digits", "--target", "docker", "--model-store", str(model_store),
               env=env, cwd=tmp_path, timeout=120)
    assert_clean_error(proc, "no Docker engine reachable", "no-such.sock", "docker-engine.sh")


def test_rendered_dockerfile_passes_hadolint(tmp_path, model_store):
    opts = image.ImageOptions(model_store=model_store, out_dir=tmp_path / "ctx",
                              base_config=ROOT / "config.properties", ca_certs=[])
    context = image.render(opts, [model_store / "digits.mar"])
    hadolint = Path(__import__("sys").executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), str(context / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The context holds what the image needs and nothing secret.
    assert (context / "model-store" / "digits.mar").is_file()
    reqs = (context / "build" / "requirements.txt").read_text()
    assert "onnxruntime==" in reqs and "torchserve==0.12.0" in reqs
    props = read_properties(context / "runtime" / "config.properties")
    assert props["enable_envvars_config"] == "true"
    allowed = re.compile(props["allowed_urls"].replace("\\\\", "\\"))
    assert allowed.fullmatch("file:///home/model-server/model-store/digits.mar")
    assert not allowed.fullmatch("http://169.254.169.254/latest.mar")
    assert not allowed.fullmatch("file:///etc/passwd")
    assert not list(context.rglob("key_file.json"))


KILL_JVM = ("import os, signal\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    if b'ModelServer' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
            "        os.kill(int(p), signal.SIGKILL)\n")


@pytest.mark.docker
def test_docker_deploy_predict_scale_stop(tmp_path, model_store, docker_engine, held_out):
    env = {**docker_engine, "SERVETOOL_TARGET": "docker"}
    ports = free_ports()
    started = time.perf_counter()
    proc = cli("deploy", "digits", "--target", "docker", "--network", "host",
               "--base-image", LOCAL_BASE_IMAGE, "--model-store", str(model_store),
               "--config", str(ROOT / "config.properties"), "--container-name", "servetool-e2e",
               "--cpus", "1", "--restart-on-crash", "--json", *port_args(ports), env=env,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deployed = json.loads(proc.stdout)
    print(f"docker deploy (build + run + register): {time.perf_counter() - started:.1f} s, image "
          f"{deployed['image']['size_bytes'] / 1e6:.0f} MB")
    try:
        assert deployed["target"] == "docker" and deployed["models_baked"]
        assert (tmp_path / "deploy" / "docker" / "Dockerfile").is_file()
        model = deployed["models"][0]
        assert model["name"] == "digits" and all(w["status"] == "READY" for w in model["workers"])
        assert len(model["workers"]) == 1  # workers on auto follow the container's CPU limit
        url = model["predictions_url"]
        assert url == f"http://127.0.0.1:{ports['inference']}/predictions/digits"

        # Token auth is on in the container: no key, no answer; the key servetool reads works.
        assert requests.post(url, data=b"x", timeout=30).status_code in (400, 401)
        key = cli("token", env=env, cwd=tmp_path).stdout.strip()
        auth = {"Authorization": f"Bearer {key}"}
        images, labels = held_out
        names = [line.strip() for line in (ROOT / "models/digits/labels.txt").read_text().splitlines()]
        for i in range(6):
            reply = requests.post(url, data=png_bytes(images[i]), headers=auth, timeout=30)
            assert reply.status_code == 200, reply.text
            assert max(reply.json(), key=reply.json().get) == names[int(labels[i])]
        bad = requests.post(url, data=b"not an image", headers=auth, timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()

        # The container runs as the image's non-root user, with tini as PID 1.
        engine = image.docker_client_for(docker_engine["DOCKER_HOST"])
        container = engine.containers.get("servetool-e2e")
        assert container.attrs["Config"]["User"] == "1000:1000"
        assert "tini" in container.attrs["Config"]["Entrypoint"][0]
        assert container.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
        # What the image carries: under 1 GB, a Java runtime of only the frontend's modules (made
        # by jlink: no compiler, no jshell), no pip.
        assert deployed["image"]["size_bytes"] < 1e9, deployed["image"]
        modules = container.exec_run(["java", "--list-modules"], user="1000").output.decode()
        assert "java.base@" in modules and "jdk.compiler" not in modules, modules
        assert container.exec_run(["python3", "-m", "pip", "--version"]).exit_code != 0

        # Management goes through servetool's front in the container: registering anything but
        # an archive of the model store (here a directory inside the container) is refused.
        mkey = cli("token", "--kind", "management", env=env, cwd=tmp_path).stdout.strip()
        mgmt = f"http://127.0.0.1:{ports['management']}"
        refused = requests.post(f"{mgmt}/models?url=/opt/venv&model_name=x",
                                headers={"Authorization": f"Bearer {mkey}"}, timeout=30)
        assert refused.status_code == 403 and "model store" in refused.json()["error"]
        listed = requests.get(f"{mgmt}/models", headers={"Authorization": f"Bearer {mkey}"},
                              timeout=30)
        assert listed.headers["Server"].startswith("servetool-management")
        assert [m["modelName"] for m in listed.json()["models"]] == ["digits"]

        scaled = cli("scale", "digits", "--workers", "2", "--json", env=env, cwd=tmp_path)
        assert scaled.returncode == 0, scaled.stderr
        assert len(json.loads(scaled.stdout)["workers"]) == 2

        # The image's HEALTHCHECK reads the key inside the container and reports healthy.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads(cli("status", "--json", env=env, cwd=tmp_path).stdout)
            if status["health"] == "healthy":
                break
            time.sleep(2)
        assert status["health"] == "healthy", status
        assert [len(m["workers"]) for m in status["models"]] == [2]

        # A crash (the JVM killed in the container): the restart policy brings the container back
        # and TorchServe restores its snapshot, both workers included, with no client involved.
        container.exec_run(["python3", "-c", KILL_JVM], user="1000")
        crashed = time.monotonic()
        healed = None
        while time.monotonic() - crashed < 90 and healed is None:
            try:
                key = cli("token", env=env, cwd=tmp_path).stdout.strip()
                reply = requests.post(url, data=png_bytes(images[0]), timeout=10,
                                      headers={"Authorization": f"Bearer {key}"})
                if reply.status_code == 200:
                    healed = time.monotonic() - crashed
            except requests.RequestException:
                pass
            time.sleep(0.5)
        print(f"docker: crash to first good answer {healed} s")
        assert healed is not None
        container.reload()
        assert container.attrs["RestartCount"] >= 1
        status = json.loads(cli("status", "--json", env=env, cwd=tmp_path).stdout)
        assert [len(m["workers"]) for m in status["models"]] == [2]

        # Deploying again changes nothing: same image, same container, model left as it is.
        again = cli("deploy", "digits", "--target", "docker", "--network", "host", "--base-image",
                    LOCAL_BASE_IMAGE, "--model-store", str(model_store), "--config",
                    str(ROOT / "config.properties"), "--container-name", "servetool-e2e", "--json",
                    "--cpus", "1", "--restart-on-crash", *port_args(ports), env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        again = json.loads(again.stdout)
        assert not again["server_started"] and again["models"][0]["action"] == "unchanged"
    finally:
        stopped = cli("stop", "--json", env=env, cwd=tmp_path)
    assert json.loads(stopped.stdout)["stopped"] is True
    left = engine.containers.list(all=True, filters={"name": "servetool-e2e"})
    assert left == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{ports['inference']}/ping", timeout=5)


@pytest.mark.docker
def test_build_failure_quotes_the_failing_step(tmp_path, model_store, docker_engine):
    # A base image without a shell or Python: the build stage's first RUN cannot start.
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("empty\n")
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
    subprocess.run(["docker", "import", "-", "local/empty:test"], input=tar.stdout,
                   env=docker_engine, capture_output=True, check=True)
    proc = cli("deploy", "digits", "--target", "docker", "--network", "host", "--base-image",
               "local/empty:test", "--model-store", str(model_store), *port_args(free_ports()),
               env=docker_engine, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = proc.stderr[proc.stderr.index("\nerror: ") + 1:]
    # the first RUN instruction of the rendered Dockerfile, counted as the builder counts steps
    instructions = [line.split()[0] for line in
                    (tmp_path / "deploy" / "docker" / "Dockerfile").read_text().splitlines()
                    if line[:1].isupper()]
    first_run = instructions.index("RUN") + 1
    assert error.startswith(f"error: the image build failed at step {first_run}/"), error
    assert "/bin/bash" in error and "---> " not in error


@pytest.mark.docker
def test_container_that_exits_is_explained(tmp_path, model_store, docker_engine):
    # A JVM that cannot start: the container exits at once and its last log lines are quoted.
    broken = tmp_path / "config.properties"
    broken.write_text((ROOT / "config.properties").read_text()
                      + "\nvmargs=-XX:+ThisOptionDoesNotExist\n")
    proc = cli("deploy", "digits", "--target", "docker", "--network", "host", "--base-image",
               LOCAL_BASE_IMAGE, "--model-store", str(model_store), "--config", str(broken),
               "--container-name", "servetool-broken", *port_args(free_ports()),
               env=docker_engine, cwd=tmp_path, timeout=600)
    try:
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert "ThisOptionDoesNotExist" in proc.stderr
        assert "docker logs" in proc.stderr
        # The exited container stays for inspection, and status says why it is down.
        status = cli("status", "--target", "docker", env=docker_engine, cwd=tmp_path)
        assert status.returncode == 1  # a crashed server is a problem, said as one
        assert "container servetool-broken is exited" in status.stdout
        assert "ThisOptionDoesNotExist" in status.stdout
    finally:
        cli("stop", "--target", "docker", env=docker_engine, cwd=tmp_path)


def test_published_ports_are_loopback_only_by_default():
    from servetool.targets.docker import container_env, published_ports

    ports = {"inference": 18080, "management": 18081, "metrics": 18082, "grpc_inference": 17070,
             "grpc_management": 17071}
    assert published_ports("ports", ports) == {"8080/tcp": ("127.0.0.1", 18080),
                                               "8081/tcp": ("127.0.0.1", 18081),
                                               "8082/tcp": ("127.0.0.1", 18082)}
    assert container_env("ports", ports) == {}  # inside, TorchServe keeps the image's ports
    # On the host network nothing is published and TorchServe itself binds loopback.
    assert published_ports("host", ports) == {}
    env = container_env("host", ports)
    assert env["TS_INFERENCE_ADDRESS"] == "http://127.0.0.1:18080"
    # management: TorchServe keeps its private socket; servetool's front takes the port
    assert "TS_MANAGEMENT_ADDRESS" not in env and env["SERVETOOL_FRONT_LISTEN"] == "127.0.0.1:18081"
    assert env["TS_GRPC_INFERENCE_ADDRESS"] == "127.0.0.1" and env["TS_GRPC_INFERENCE_PORT"] == "17070"


def test_the_split_in_a_container_fronts_the_inference_port_and_publishes_its_metrics(tmp_path):
    """With --split, HAProxy takes the container's inference port and TorchServe moves behind it
    on loopback; the split's metrics port is published on the host's loopback. The config,
    rendered for the container's paths, is one HAProxy accepts (once those paths exist)."""
    from servetool.engines.torchserve import split
    from servetool.targets.docker import CONTAINER_SPLIT_PORTS, published_ports, split_env

    ports = {"inference": 18080, "management": 18081, "metrics": 18082}
    env, metrics_port = split_env("ports", ports)
    assert env["TS_INFERENCE_ADDRESS"] == f"http://127.0.0.1:{CONTAINER_SPLIT_PORTS['upstream']}"
    text = env["SERVETOOL_SPLIT_CONFIG_TEXT"]
    assert "bind 0.0.0.0:8080\n" in text and f"{image.CONTAINER_WORK}/haproxy.sock" in text
    assert published_ports("ports", ports, "127.0.0.1", metrics_port)["8088/tcp"] == \
        ("127.0.0.1", metrics_port)
    host_env, _ = split_env("host", ports)
    assert "bind 127.0.0.1:18080\n" in host_env["SERVETOOL_SPLIT_CONFIG_TEXT"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace(image.CONTAINER_WORK, str(tmp_path)))
    for name in (split.WEIGHTS, split.VERSIONS):
        (tmp_path / name).touch()
    if shutil.which("haproxy"):
        split.check_config(config)


@pytest.mark.docker
def test_mounted_models_and_config_instead_of_baked(tmp_path, model_store, docker_engine, held_out):
    env = {**docker_engine, "SERVETOOL_TARGET": "docker"}
    # The ONNX archive, as in the other tests: the same packages, so the build stage is cached.
    # pytest's folders are private (0700): the container's user cannot read them, and is told so.
    private = cli("deploy", "digits", "--target", "docker", "--network", "host", "--mount-models",
                  "--base-image", LOCAL_BASE_IMAGE, "--model-store", str(model_store),
                  "--container-name", "servetool-mounted", *port_args(free_ports()), env=env,
                  cwd=tmp_path)
    assert private.returncode == 1 and "not readable by the container's user" in private.stderr
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    shutil.copy(model_store / "digits.mar", shared / "digits.mar")
    (shared / "digits.mar").chmod(0o644)
    tmp_path.chmod(0o755)
    model_store = shared
    ports = free_ports()
    config = tmp_path / "config.properties"
    config.write_text((ROOT / "config.properties").read_text())

    def deploy():
        proc = cli("deploy", "digits", "--target", "docker", "--network", "host", "--mount-models",
                   "--mount-config", "--config", str(config), "--base-image", LOCAL_BASE_IMAGE,
                   "--model-store", str(model_store), "--container-name", "servetool-mounted",
                   "--json", *port_args(ports), env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def predict(body: bytes) -> requests.Response:
        key = cli("token", env=env, cwd=tmp_path).stdout.strip()
        return requests.post(result["models"][0]["predictions_url"], data=body,
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)

    result = deploy()
    try:
        assert result["models_baked"] is False and result["config_baked"] is False
        assert not (tmp_path / "deploy/docker/model-store/digits.mar").exists()
        engine = image.docker_client_for(docker_engine["DOCKER_HOST"])
        mounts = engine.containers.get("servetool-mounted").attrs["Mounts"]
        assert sorted((m["Destination"], m["RW"]) for m in mounts) == sorted([
            (image.CONTAINER_CONFIG, False), (image.CONTAINER_STORE, False)])
        images, _ = held_out
        assert predict(png_bytes(images[0])).status_code == 200
        # A config change: the same image (its tag ignores the mounted config), a new container
        # that reads the new config (TorchServe now refuses bodies over 20 kB).
        config.write_text(config.read_text() + "max_request_size=20000\n")
        changed = deploy()
        assert changed["image"]["tag"] == result["image"]["tag"] and not changed["image"]["built"]
        assert changed["server_started"]
        assert predict(b"x" * 50_000).status_code == 413
        assert predict(png_bytes(images[0])).status_code == 200
    finally:
        cli("stop", env=env, cwd=tmp_path)


def test_docker_deploy_watch_serves_published_versions_and_a_new_container_restores_them(
        tmp_path, model_store, docker_engine):
    """`deploy --target docker --watch --split`: the watcher on the host adds versions to the
    mounted store; rollback and a replaced container keep to what was serving; the canary split
    runs inside the container (one image and container for both: each costs minutes here)."""
    from tests.test_lifecycle import IMAGE, publish, rewrite_archive

    env = {**docker_engine, "SERVETOOL_TARGET": "docker"}
    tmp_path.chmod(0o755)  # the container's user reads the store and the pinned archives
    store, source = tmp_path / "store", tmp_path / "published"
    store.mkdir(mode=0o755)
    source.mkdir(mode=0o755)
    shutil.copy(model_store / "digits.mar", store / "digits.mar")
    (store / "digits.mar").chmod(0o644)
    ports = free_ports()
    common = ["--model-store", str(store), "--json"]

    def deploy():
        proc = cli("deploy", "digits", "--target", "docker", "--network", "host", "--watch",
                   str(source), "--watch-metrics-port", "0", "--split", "--base-image",
                   LOCAL_BASE_IMAGE, "--container-name", "servetool-watch", *common,
                   *port_args(ports), env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def answering() -> str:
        key = cli("token", env=env, cwd=tmp_path).stdout.strip()
        reply = requests.post(f"http://127.0.0.1:{ports['inference']}/predictions/digits",
                              data=IMAGE, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.headers["X-Model-Version"]

    def versions() -> dict[str, bool]:
        rows = json.loads(cli("versions", "digits", *common, env=env, cwd=tmp_path).stdout)
        return {r["version"]: r["default"] for r in rows["versions"] if r["loaded"]}

    result = deploy()
    try:
        assert result["models_baked"] is False and result["watcher_pid"] > 0
        assert answering() == "1.0"
        publish(source, "digits", "2.0", rewrite_archive(store / "digits.mar",
                                                         tmp_path / "v2" / "digits.mar",
                                                         version="2.0"))
        deadline = time.monotonic() + 60
        while answering() != "2.0":
            assert time.monotonic() < deadline, cli("status", env=env, cwd=tmp_path).stdout
            time.sleep(0.2)
        assert versions() == {"1.0": False, "2.0": True}
        status = json.loads(cli("status", "--json", env=env, cwd=tmp_path).stdout)
        assert status["watcher"]["running"] and status["watcher"]["events"]["digits"]["outcome"] \
            == "serving"
        assert cli("rollback", "digits", env=env, cwd=tmp_path).returncode == 0
        assert answering() == "1.0"
        check_split_in_container(env, tmp_path, common,
                                 f"http://127.0.0.1:{ports['inference']}/predictions/digits")
        # a new container (stop, deploy): the record survives with a mounted store
        assert cli("stop", env=env, cwd=tmp_path).returncode == 0
        assert deploy()["server_started"] is True
        assert versions() == {"1.0": True, "2.0": False}
        assert answering() == "1.0"
    finally:
        cli("stop", env=env, cwd=tmp_path)


def check_split_in_container(env: dict, tmp_path: Path, common: list[str], url: str) -> None:
    """HAProxy and servetool's exporter inside the container, TorchServe behind them: `servetool
    canary` sets the weight through the container; the split's metrics (HAProxy's and
    servetool's) answer on the host's loopback and count each version's answers."""
    from prometheus_client.parser import text_string_to_metric_families

    from servetool.engines.torchserve.split import EXPORTER_PATH
    from tests.test_lifecycle import IMAGE

    token = cli("token", env=env, cwd=tmp_path).stdout.strip()
    session = requests.Session()

    def answering() -> str:
        reply = session.post(url, data=IMAGE, headers={"Authorization": f"Bearer {token}"},
                             timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.headers["X-Model-Version"]

    status = json.loads(cli("status", "--json", env=env, cwd=tmp_path).stdout)
    split_url = status["endpoints"]["split_metrics"]
    assert split_url.startswith("http://127.0.0.1:")

    def figures() -> dict:
        text = requests.get(split_url.rsplit("/", 1)[0] + EXPORTER_PATH, timeout=5).text
        return {(s.name, s.labels.get("version"), s.labels.get("status")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    set_weight = cli("canary", "digits", "2.0", "--weight", "50", *common, env=env, cwd=tmp_path)
    assert set_weight.returncode == 0, set_weight.stderr
    before = figures()
    answers = [answering() for _ in range(200)]
    seen = {v: answers.count(v) for v in set(answers)}
    assert 0.5 - 0.13 < seen.get("2.0", 0) / 200 < 0.5 + 0.13, seen  # 3.5 sigma
    time.sleep(0.5)  # log lines are datagrams, read by another process
    after = figures()
    assert after[("servetool_canary_weight", "2.0", None)] == 50
    for version in ("1.0", "2.0"):
        key = ("servetool_request_seconds_count", version, "2xx")
        assert after[key] - before.get(key, 0) == seen[version], (version, after)
    aborted = cli("canary", "digits", "--abort", *common, env=env, cwd=tmp_path)
    assert aborted.returncode == 0, aborted.stderr
    assert {answering() for _ in range(30)} == {"1.0"}


def test_the_kserve_engine_image_context_has_no_java_and_no_torch_for_onnx(tmp_path, model_store):
    opts = image.ImageOptions(model_store=model_store, out_dir=tmp_path / "ctx",
                              base_config=ROOT / "config.properties", ca_certs=[],
                              engine="kserve")
    context = image.render(opts, [model_store / "digits.mar"])
    hadolint = Path(__import__("sys").executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), str(context / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dockerfile = (context / "Dockerfile").read_text()
    assert "jdk" not in dockerfile and "jre" not in dockerfile.lower()
    reqs = (context / "build" / "requirements.txt").read_text().split()
    assert any(r.startswith("kserve==") for r in reqs) and any(r.startswith("onnxruntime==")
                                                               for r in reqs)
    assert not any(r.startswith(("torch", "torchserve")) for r in reqs), reqs
    settings = json.loads((context / image.KSERVE_CONFIG).read_text())
    assert settings["token_auth"] is True and settings["run_dir"] == image.CONTAINER_WORK
    assert (context / "runtime" / "lib" / "servetool" / "engines" / "kserve" / "server.py").is_file()
    # a TorchScript archive's image needs torch, still no Java
    context = image.render(opts, [model_store / "digits_ts.mar"])
    assert any(r.startswith("torch==") for r in
               (context / "build" / "requirements.txt").read_text().split())


@pytest.mark.docker
def test_kserve_engine_in_docker_serves_without_java_or_torch(tmp_path, model_store, docker_engine,
                                                              held_out):
    env = {**docker_engine, "SERVETOOL_TARGET": "docker", "SERVETOOL_ENGINE": "kserve"}
    ports = free_ports()
    proc = cli("deploy", "digits", "--target", "docker", "--network", "host",
               "--base-image", LOCAL_BASE_IMAGE, "--model-store", str(model_store),
               "--config", str(ROOT / "config.properties"), "--container-name",
               "servetool-kserve-e2e", "--json", *port_args(ports), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deployed = json.loads(proc.stdout)
    try:
        assert deployed["engine"] == "kserve"
        assert deployed["image"]["size_bytes"] <= 700e6, deployed["image"]
        url = deployed["models"][0]["predictions_url"]
        assert requests.post(url, data=b"x", timeout=30).status_code == 401
        key = cli("token", env=env, cwd=tmp_path).stdout.strip()
        images, labels = held_out
        names = (ROOT / "models/digits/labels.txt").read_text().split()
        reply = requests.post(url, data=png_bytes(images[0]), timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200 and next(iter(reply.json())) == names[int(labels[0])]
        engine = image.docker_client_for(docker_engine["DOCKER_HOST"])
        container = engine.containers.get("servetool-kserve-e2e")
        assert container.attrs["Config"]["User"] == "1000:1000"
        code, out = container.exec_run(["sh", "-c", "command -v java; ls /opt/venv/lib/python3*/"
                                                    "site-packages | grep -c '^torch' || true"])
        assert out.decode().split() == ["0"], out  # no java on the PATH, no torch package
        # as a Kubernetes pod runs it (servetool/engines/kserve/manifest.py): every archive
        # loaded before the port opens, the Secret's one key for every API, read-only root
        pod_ports = free_ports(("inference", "management", "metrics"))
        pod = engine.containers.run(
            deployed["image"]["tag"], detach=True, name="servetool-kserve-pod", network_mode="host",
            read_only=True, tmpfs={"/home/model-server/work": "uid=1000"},
            environment={"SERVETOOL_KSERVE_HOST": "127.0.0.1", "SERVETOOL_KSERVE_LOAD_MODELS": "all",
                         "SERVETOOL_KSERVE_TOKEN": "pod-secret-key",
                         **{f"SERVETOOL_KSERVE_{api.upper()}_PORT": str(port)
                            for api, port in pod_ports.items()}})
        try:
            base = f"http://127.0.0.1:{pod_ports['inference']}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.5)
            reply = requests.post(f"{base}/predictions/digits", data=png_bytes(images[1]),
                                  headers={"Authorization": "Bearer pod-secret-key"}, timeout=30)
            assert reply.status_code == 200, pod.logs()[-2000:]
            assert next(iter(reply.json())) == names[int(labels[1])]
            listed = requests.get(f"http://127.0.0.1:{pod_ports['management']}/models", timeout=10,
                                  headers={"Authorization": "Bearer pod-secret-key"})
            assert [m["modelName"] for m in listed.json()["models"]] == ["digits"]
        finally:
            pod.remove(force=True)
    finally:
        stopped = cli("stop", env=env, cwd=tmp_path)
        assert stopped.returncode == 0 and "container removed" in stopped.stdout
