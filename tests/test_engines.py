"""The same archives on both engines: TorchServe (the session's `served`) and the KServe engine
(servetool/engines/kserve, in-process, no JVM) give the same answers and the same error statuses,
byte for byte where the handler writes them; the KServe engine also speaks the Open Inference
Protocol v2 and KServe's v1, batches dynamically, keeps to loopback and token auth, and every
lifecycle verb drives it through the same client."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from servetool.engines.torchserve.management import Client
from servetool.engines.torchserve.process import ServerOptions, free_ports
from servetool.operate import lifecycle
from servetool.operate.lifecycle import Lifecycle
from servetool.targets.local import LocalTarget
from tests.conftest import ROOT, png_bytes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def kserve(tmp_path_factory, model_store):
    """The session's archives deployed on the KServe engine, beside TorchServe's `served`."""
    target = LocalTarget(ServerOptions(run_dir=tmp_path_factory.mktemp("kserve-run"),
                                       model_store=model_store,
                                       base_config=ROOT / "config.properties", ports=free_ports(),
                                       engine="kserve"))
    result = lifecycle.deploy(target, [])
    yield target, result
    target.down()


def kserve_beside(store: Path, run_dir: Path) -> LocalTarget:
    """The KServe engine serving `store`'s archives (for other modules' parity tests)."""
    target = LocalTarget(ServerOptions(run_dir=run_dir, model_store=store,
                                       base_config=ROOT / "config.properties", ports=free_ports(),
                                       engine="kserve"))
    lifecycle.deploy(target, [])
    return target


def endpoint(state) -> tuple[str, dict[str, str]]:
    """A server's inference URL and auth header."""
    key = json.loads(Path(state.key_file).read_text())["inference"]["key"]
    return state.url("inference"), {"Authorization": f"Bearer {key}"}


def assert_same_answers(first: tuple[str, dict], second: tuple[str, dict],
                        requests_: list[tuple[str, bytes, str]]) -> None:
    """Each (model, body, content type) answered by both servers ((url, headers) each) with the
    same status and the same bytes."""
    for model, body, kind in requests_:
        a, b = (requests.post(f"{url}/predictions/{model}", data=body, timeout=120,
                              headers={**headers, "Content-Type": kind})
                for url, headers in (first, second))
        assert (a.status_code, a.content) == (b.status_code, b.content), (model, body[:40],
                                                                          a.text, b.text)


def post(state, path: str, body: bytes, content_type: str = "application/octet-stream",
         **kwargs) -> requests.Response:
    key = json.loads(Path(state.key_file).read_text())["inference"]["key"]
    return requests.post(f"{state.url('inference')}{path}", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
                         **kwargs)


def cases(held_out) -> list[tuple[str, bytes, str]]:
    """(model, body, content type): good and bad requests for every task of the store."""
    images, _ = held_out
    x = ((images[5] - 0.305447) / 0.376037).tolist()
    return [
        ("digits", png_bytes(images[0]), "application/octet-stream"),
        ("digits", png_bytes(images[1]), "image/png"),
        ("digits", b"this is not an image", "application/octet-stream"),
        ("digits", b'{"x": 1}', "application/json"),
        ("digits", b"", "application/octet-stream"),
        ("digits_short", png_bytes(images[2]), "application/octet-stream"),
        ("digits_ts", png_bytes(images[3]), "application/octet-stream"),
        ("digits_int8s", png_bytes(images[4]), "application/octet-stream"),
        ("digits_tensor", json.dumps(x).encode(), "application/json"),
        ("digits_tensor", b'{"data": [[1, 2]]}', "application/json"),
        ("digits_tensor", b"[1, 2,", "application/json"),
        ("embednet", b"[1, 2, 3, 4]", "application/json"),
        ("embednet", b"[1, 2, 300, 4]", "application/json"),  # the model itself raises: 422
        ("embednet", b"[1.5, 2, 3, 4]", "text/plain"),
        ("nosuchmodel", b"[1]", "application/json"),
    ]


def test_every_answer_and_error_status_is_the_same_on_both_engines(served, kserve, held_out):
    torchserve_state, kserve_state = served[0].running(), kserve[0].running()
    assert kserve_state.engine == "kserve" and torchserve_state.engine == "torchserve"
    for model, body, kind in cases(held_out):
        a = post(torchserve_state, f"/predictions/{model}", body, kind)
        b = post(kserve_state, f"/predictions/{model}", body, kind)
        where = f"{model} {body[:30]!r} {kind}"
        assert a.status_code == b.status_code, (where, a.text, b.text)
        if a.status_code == 404:  # the server's own answer: its words differ, not its meaning
            assert "nosuchmodel" in a.text and "nosuchmodel" in b.text
            continue
        assert a.content == b.content, (where, a.text, b.text)
        assert a.headers.get("X-Model-Version") == b.headers.get("X-Model-Version") == "1.0"
        assert a.headers["Content-Type"].startswith("application/json")
        assert b.headers["Content-Type"].startswith("application/json")


def test_one_request_never_fails_another_in_a_dynamic_batch(kserve):
    """embednet batches 8 with a 1.5 s wait: eight concurrent requests make one batch; the bad
    ones answer alone, the rest are served."""
    state = kserve[0].running()
    bodies = [[1, 2, 3, 4], [1, 2, 300, 4], [0, 0, 0, 0], [1, 2 ** 70, 3, 4], [9, 8, 7, 6],
              [1.5, 2, 3, 4], [5, 5, 5, 5], {"data": [1, 2, 3, True]}]
    metrics = f"{state.url('metrics')}/metrics"
    before = _batches(metrics, "embednet")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: post(state, "/predictions/embednet",
                                               json.dumps(b).encode(), "application/json"),
                                bodies))
    assert [r.status_code for r in replies] == [200, 422, 200, 400, 200, 400, 200, 400]
    count, rows = (now - then for now, then in zip(_batches(metrics, "embednet"), before,
                                                   strict=True))
    assert (count, rows) == (1, 8)  # one full batch, not eight of one
    # the handler's metrics with TorchServe's names and labels (its frontend adds Hostname)
    import socket

    text = requests.get(metrics, timeout=10).text
    assert (f'servetool_requests_total{{Hostname="{socket.gethostname()}",Level="Model",'
            'ModelName="embednet",ModelVersion="1.0",Status="2xx"}') in text
    assert "servetool_inference_seconds_bucket{" in text and "_created" not in text


def _batches(url: str, model: str) -> tuple[float, float]:
    from servetool.operate.top import read_metrics

    figures = read_metrics(url)
    key = ((model, "1.0"), "batch_size")
    return figures["counts"].get(key, 0.0), figures["sums"].get(key, 0.0)


def test_open_inference_protocol_v2_and_v1(kserve, held_out):
    state = kserve[0].running()
    images, labels = held_out
    served = post(state, "/predictions/digits", png_bytes(images[7])).json()
    v2 = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                      "parameters": {"content_type": "base64"},
                      "data": [base64.b64encode(png_bytes(images[i])).decode() for i in (7, 8)]}]}
    reply = post(state, "/v2/models/digits/infer", json.dumps(v2).encode(), "application/json")
    assert reply.status_code == 200, reply.text
    output = reply.json()["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("answer", "BYTES", [2])
    assert json.loads(output["data"][0]) == served
    # a tensor model takes a numeric tensor: one request per row
    x = ((images[:3] - 0.305447) / 0.376037).astype(np.float32)
    v2 = {"inputs": [{"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32",
                      "data": x.reshape(-1).tolist()}]}
    reply = post(state, "/v2/models/digits_tensor/infer", json.dumps(v2).encode(),
                 "application/json")
    assert reply.status_code == 200, reply.text
    logits = np.array([json.loads(d) for d in reply.json()["outputs"][0]["data"]])
    assert logits.shape == (3, 10) and list(logits.argmax(1)) == list(labels[:3])
    # a bad element fails the request with a 4xx naming it (v2 has no per-element status)
    v2["inputs"][0] = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}
    reply = post(state, "/v2/models/digits_tensor/infer", json.dumps(v2).encode(),
                 "application/json")
    assert reply.status_code == 400 and "element 0" in reply.text
    ready = requests.get(f"{state.url('inference')}/v2/health/ready", timeout=10)
    assert ready.status_code == 200
    meta = requests.get(f"{state.url('inference')}/v2/models/digits", timeout=10, headers={
        "Authorization": f"Bearer {Client(state).token('inference')}"})
    assert meta.json()["name"] == "digits"
    v1 = {"instances": [{"b64": base64.b64encode(png_bytes(images[7])).decode()}]}
    reply = post(state, "/v1/models/digits:predict", json.dumps(v1).encode(), "application/json")
    assert reply.status_code == 200 and reply.json()["predictions"] == [served]


def test_loopback_token_auth_and_store_only_loading(kserve, tmp_path):
    state = kserve[0].running()
    assert state.host == "127.0.0.1"
    url = state.url("inference")
    assert requests.post(f"{url}/predictions/digits", data=b"x", timeout=10).status_code == 401
    assert requests.post(f"{url}/v2/models/digits/infer", data=b"{}",
                         timeout=10).status_code == 401
    assert requests.get(f"{state.url('management')}/models", timeout=10).status_code == 401
    assert oct(Path(state.key_file).stat().st_mode & 0o777) == "0o600"
    client = Client(state)
    for url_param in ("../digits.mar", "/etc/passwd", "http://example.com/x.mar"):
        reply = client.session.post(f"{state.url('management')}/models",
                                    params={"url": url_param},
                                    headers={"Authorization": f"Bearer {client.token('management')}"},
                                    timeout=10)
        assert reply.status_code == 403 and "model store" in reply.text


def test_versions_scale_promote_and_rollback_through_the_same_client(kserve, model_store,
                                                                     tmp_path):
    """The lifecycle layer (lifecycle.py) drives the KServe engine with TorchServe's verbs."""
    from tests.test_lifecycle import rewrite_archive

    target = kserve[0]
    life = Lifecycle(target)
    old = rewrite_archive(model_store / "embednet.mar", tmp_path / "a" / "lc.mar", name="lc")
    new = rewrite_archive(old, tmp_path / "b" / "lc.mar", version="2.0")
    assert life.install(old)["version"] == "1.0"
    assert life.install(new)["version"] == "2.0"
    state = target.running()
    answer = post(state, "/predictions/lc", b"[1, 2, 3, 4]", "application/json")
    assert answer.headers["X-Model-Version"] == "2.0"
    assert life.rollback("lc")["default"] == "1.0"
    assert post(state, "/predictions/lc", b"[1, 2, 3, 4]",
                "application/json").headers["X-Model-Version"] == "1.0"
    assert post(state, "/predictions/lc/2.0", b"[1, 2, 3, 4]",
                "application/json").headers["X-Model-Version"] == "2.0"
    target.scale("lc", 2, "1.0")
    assert len(Client(state).describe("lc", "1.0")[0]["workers"]) == 2
    rows = {r["version"]: r for r in life.versions("lc")}
    assert rows["1.0"]["default"] and len(rows["1.0"]["workers"]) == 2


def test_package_and_deploy_with_the_cli_from_a_scratch_folder(tmp_path):
    """`servetool package --engine kserve && servetool deploy --engine kserve` as a user runs
    them (ports and run folder from SERVETOOL_* variables), then predict, status and stop."""
    import os

    from tests.test_cli import run

    env = {**os.environ, "SERVETOOL_ENGINE": "kserve", "SERVETOOL_RUN_DIR": str(tmp_path / "run"),
           **{f"SERVETOOL_{api.upper()}_PORT": str(port) for api, port in free_ports().items()}}
    env.pop("SERVETOOL_ENGINE")
    packaged = run("package", str(ROOT / "models" / "digits"), "--engine", "kserve", "--json",
                   env=env, cwd=tmp_path)
    assert packaged.returncode == 0 and json.loads(packaged.stdout)["models"][0]["engine"] == \
        "kserve", packaged.stderr
    env["SERVETOOL_ENGINE"] = "kserve"
    deployed = run("deploy", env=env, cwd=tmp_path)
    try:
        assert deployed.returncode == 0, deployed.stderr
        assert deployed.stdout.startswith("KServe engine started")
        predicted = run("predict", "digits", str(ROOT / "models/digits/samples/digit_3.png"),
                        env=env, cwd=tmp_path)
        assert predicted.returncode == 0 and next(iter(json.loads(predicted.stdout))) == "three"
        assert run("status", env=env, cwd=tmp_path).stdout.startswith("KServe engine running")
    finally:
        stopped = run("stop", env=env, cwd=tmp_path)
    assert stopped.stdout.startswith("The KServe engine stopped"), stopped.stdout
    assert not (tmp_path / "run" / "server.json").exists()
