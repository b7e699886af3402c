"""servetool's Kubernetes gateway (servetool/engines/torchserve/pod.py) in front of a real local
TorchServe, as each pod runs it: the shared keys, probes, forwarding, and the bodies it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from servetool.engines.torchserve.process import free_ports
from tests.conftest import ROOT, png_bytes

POD = ROOT / "servetool" / "engines" / "torchserve" / "pod.py"


def start_gateway(run_dir: Path, config: Path, keys: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(("gateway",))["gateway"]
    env = {**os.environ, "SERVETOOL_TS_CONFIG": str(config), "SERVETOOL_WORK_DIR": str(run_dir),
           "SERVETOOL_GATEWAY_KEYS": str(keys), "SERVETOOL_GATEWAY_LISTEN": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, str(POD), "gateway"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{base}/healthz", timeout=1)
            return proc, base
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stderr.read().decode())


@pytest.fixture(scope="module")
def gateway(served, tmp_path_factory):
    target, _ = served
    run_dir = Path(target.opts.run_dir).resolve()
    folder = tmp_path_factory.mktemp("gateway")
    keys = folder / "keys"
    keys.mkdir()
    (keys / "inference-key").write_text("key-one\n")
    (keys / "next-key").write_text("key-two")  # a rotation in progress: both are accepted
    config = folder / "config.properties"
    config.write_text((run_dir / "config.properties").read_text() + "max_request_size=20000\n")
    proc, base = start_gateway(run_dir, config, keys)
    yield base
    proc.terminate()
    proc.wait(10)


def test_probes_answer_without_a_key(gateway):
    assert requests.get(f"{gateway}/healthz", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{gateway}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text


def test_shared_keys_are_required_and_forwarded_with_the_servers_own(gateway, held_out):
    images, labels = held_out
    names = (ROOT / "models/digits/labels.txt").read_text().split()
    url = f"{gateway}/predictions/digits"
    for key in ("key-one", "key-two"):
        reply = requests.post(url, data=png_bytes(images[1]), timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
        assert max(reply.json(), key=reply.json().get) == names[int(labels[1])]
    for headers in ({}, {"Authorization": "Bearer key-three"}, {"Authorization": "key-one"}):
        refused = requests.post(url, data=png_bytes(images[1]), headers=headers, timeout=30)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")


def test_chunked_bodies_and_per_request_errors_pass_through(gateway, held_out):
    images, _ = held_out
    body = png_bytes(images[2])
    chunks = (body[i:i + 100] for i in range(0, len(body), 100))  # Transfer-Encoding: chunked
    auth = {"Authorization": "Bearer key-one"}
    reply = requests.post(f"{gateway}/predictions/digits", data=chunks, headers=auth, timeout=30)
    assert reply.status_code == 200, reply.text
    bad = requests.post(f"{gateway}/predictions/digits", data=b"not an image", headers=auth,
                        timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()  # the handler's own 4xx, unchanged
    missing = requests.post(f"{gateway}/predictions/nope", data=body, headers=auth, timeout=30)
    assert missing.status_code == 404


def test_bodies_past_max_request_size_are_refused_before_buffering(gateway):
    reply = requests.post(f"{gateway}/predictions/digits", data=b"x" * 50_000, timeout=30,
                          headers={"Authorization": "Bearer key-one"})
    assert reply.status_code == 413 and "max_request_size" in reply.json()["error"]
    # The gateway still serves the next request.
    assert requests.get(f"{gateway}/healthz", timeout=5).status_code == 200


def test_a_dead_server_makes_the_pod_unready_and_requests_503(served, tmp_path):
    target, _ = served
    run_dir = Path(target.opts.run_dir).resolve()
    config = tmp_path / "config.properties"
    dead = free_ports(("dead",))["dead"]
    config.write_text((run_dir / "config.properties").read_text() +
                      f"inference_address=http://127.0.0.1:{dead}\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k").write_text("key-one")
    proc, base = start_gateway(run_dir, config, keys)
    try:
        ready = requests.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and "ping failed" in ready.json()["detail"]
        reply = requests.post(f"{base}/predictions/digits", data=b"x", timeout=30,
                              headers={"Authorization": "Bearer key-one"})
        assert reply.status_code == 503 and "not answering" in reply.json()["error"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_gateway_without_keys_refuses_to_start(tmp_path):
    env = {**os.environ, "SERVETOOL_GATEWAY_KEYS": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, str(POD), "gateway"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "no keys" in proc.stderr


def test_the_gateway_follows_new_server_keys(tmp_path):
    # A restarted TorchServe container writes new keys: the gateway must use them at once.
    sys.path.insert(0, str(POD.parent))
    try:
        import pod
    finally:
        sys.path.pop(0)
    path = tmp_path / "key_file.json"
    path.write_text('{"inference": {"key": "old"}}')
    keys = pod.Keys(path)
    assert keys.read()["inference"]["key"] == "old"
    path.write_text('{"inference": {"key": "new"}}')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert keys.read()["inference"]["key"] == "new"
    path.unlink()
    assert keys.read() == {}
