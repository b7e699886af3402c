"""Against a real TorchServe: deploy, HTTP predictions, batching, scaling, redeploys, failures, stop."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from sklearn.datasets import load_digits

from handlers.runtimes import available_cores
from servetool.convert import export
from servetool.engines.torchserve import process
from servetool.engines.torchserve.management import APIError, Client
from servetool.engines.torchserve.process import ServerError
from servetool.model.spec import load_spec
from servetool.operate import lifecycle
from servetool.targets.common import DeployError
from servetool.targets.local import LocalTarget
from tests.conftest import DIGITS, FORMAT_TWINS, ROOT, png_bytes, server_options

pytestmark = pytest.mark.server
LABELS = (DIGITS / "labels.txt").read_text().split()


def http_predict(state, model: str, body: bytes, content_type="application/octet-stream",
                 token: str | None = "auto"):
    """A plain HTTP POST, as curl would send it (no servetool client in the way)."""
    headers = {"Content-Type": content_type}
    if token == "auto":
        token = json.loads(Path(state.key_file).read_text())["inference"]["key"]
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{state.url('inference')}/predictions/{model}", data=body,
                         headers=headers, timeout=60)


def test_deploy_registers_every_archive_with_ready_workers(served):
    _, result = served
    names = {m["name"]: m for m in result["models"]}
    assert set(names) == {"digits", "digits_ts", "digits_tensor", "digits_batch", "embednet",
                          "digits_short", *FORMAT_TWINS}
    for name, model in names.items():
        assert model["action"] == "registered"
        expected = available_cores() if name == "digits" else 1  # digits: workers on auto
        assert [w["status"] for w in model["workers"]] == ["READY"] * expected
    assert result["endpoints"]["inference"].startswith("http://127.0.0.1:")
    assert result["token_auth"] is True


def test_a_batch_waits_at_most_what_the_spec_asks(served):
    """A spec's max_delay_ms of 0 must not become TorchServe's 100 ms wait for a batch to fill:
    the registered model says 1 ms (what a lone request then costs: benchmarks/latency.py)."""
    target, _ = served
    client = target.client()
    assert [(m["batchSize"], m["maxBatchDelay"]) for m in client.describe("digits_short")] == [(4, 1)]
    assert [(m["batchSize"], m["maxBatchDelay"]) for m in client.describe("digits")] == [(8, 1)]
    state = target.running()
    body = png_bytes(load_digits().images[3])
    for _ in range(3):  # lone requests, each answered in a batch of its own
        assert http_predict(state, "digits_short", body).status_code == 200


@pytest.mark.parametrize("model", ["digits", "digits_ts", *FORMAT_TWINS])
def test_http_top1_matches_the_eager_model_on_real_digits(served, held_out, model):
    target, _ = served
    state = target.running()
    images, labels = held_out
    images, labels = images[:48], labels[:48]
    eager = export.load_original(load_spec(DIGITS))
    spec = load_spec(DIGITS)
    pixels = np.rint(images * 255) / 255  # exactly what the PNGs carry
    x = ((pixels - spec.preprocess.mean[0]) / spec.preprocess.std[0]).astype(np.float32)
    with torch.inference_mode():
        expected = eager(torch.from_numpy(x)).argmax(1).numpy()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda im: http_predict(state, model, png_bytes(im)), images))
    assert [r.status_code for r in replies] == [200] * len(images)
    served_top1 = [LABELS.index(next(iter(r.json()))) for r in replies]
    assert served_top1 == expected.tolist()
    assert np.mean(np.array(served_top1) == labels) >= 0.95


def test_multipart_upload_and_tensor_json(served, held_out):
    target, _ = served
    state = target.running()
    images, labels = held_out
    token = json.loads(Path(state.key_file).read_text())["inference"]["key"]
    reply = requests.post(f"{state.url('inference')}/predictions/digits", timeout=60,
                          headers={"Authorization": f"Bearer {token}"},
                          files={"data": ("digit.png", png_bytes(images[5]), "image/png")})
    assert reply.status_code == 200 and next(iter(reply.json())) == LABELS[labels[5]]

    x = ((images[5] - 0.305447) / 0.376037).tolist()
    reply = http_predict(state, "digits_tensor", json.dumps(x).encode(), "application/json")
    assert reply.status_code == 200
    logits = np.array(reply.json())
    assert logits.shape == (10,) and logits.argmax() == labels[5]
    bad = http_predict(state, "digits_tensor", b'{"data": [[1, 2]]}', "application/json")
    assert bad.status_code == 400 and "the model takes [1, 8, 8]" in bad.json()["error"]


def test_curl_as_the_readme_shows(served):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    target, _ = served
    state = target.running()
    token = Client(state).token("inference")
    out = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {token}", "-T",
                          str(DIGITS / "samples" / "digit_7.png"),
                          f"{state.url('inference')}/predictions/digits"],
                         capture_output=True, text=True, timeout=60)
    assert next(iter(json.loads(out.stdout))) == "seven"


def test_token_auth_is_on(served, held_out):
    state = served[0].running()
    body = png_bytes(held_out[0][0])
    assert http_predict(state, "digits", body, token=None).status_code in (400, 401)
    assert http_predict(state, "digits", body, token="wrong").status_code in (400, 401)
    assert requests.get(f"{state.url('management')}/models", timeout=10).status_code in (400, 401)


def test_bad_requests_fail_alone_inside_one_batch(served, held_out):
    target, _ = served
    state = target.running()
    images, labels = held_out
    client = Client(state)
    pid_before = client.describe("digits_batch")[0]["workers"][0]["pid"]
    bodies = [png_bytes(images[0]), b"this is not an image", png_bytes(images[1]), b""]
    before = batches_seen(state, "digits_batch")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: http_predict(state, "digits_batch", b), bodies))
    assert [r.status_code for r in replies] == [200, 400, 200, 400]
    assert next(iter(replies[0].json())) == LABELS[labels[0]]
    assert next(iter(replies[2].json())) == LABELS[labels[1]]
    assert "not an image in an accepted format" in replies[1].json()["error"]
    assert "empty request body" in replies[3].json()["error"]
    # The model batches 4 requests (waiting up to 2 s to fill a batch): the handler saw all four
    # together, as one full batch, not a partial one.
    assert batches_since(state, "digits_batch", before, 4) == [4]
    workers = client.describe("digits_batch")[0]["workers"]
    assert workers[0]["pid"] == pid_before and workers[0]["status"] == "READY"


def batches_seen(state, model: str, at_least: float = 0, version: str = "1.0") -> tuple[float, float]:
    """(batches, requests in them) the model's handler has recorded (handlers/metrics.py's
    servetool_batch_size histogram, on TorchServe's metrics port), once it holds `at_least`
    requests: the frontend reads the handler's metric lines a moment after the answers."""
    from servetool.operate.top import read_metrics

    key = ((model, version), "batch_size")
    deadline = time.monotonic() + 30
    while True:
        figures = read_metrics(f"{state.url('metrics')}/metrics")
        seen = figures["counts"].get(key, 0.0), figures["sums"].get(key, 0.0)
        if seen[1] >= at_least or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def batches_since(state, model: str, before: tuple[float, float], requests: int) -> list[float]:
    """The batches the handler ran for the `requests` sent since `before`: [size] when they all
    went in one batch, else [count, mean size]."""
    batches, rows = batches_seen(state, model, before[1] + requests)
    count, total = batches - before[0], rows - before[1]
    return [total] if count == 1 else [count, total / count if count else 0.0]


def test_oversized_image_gets_413_and_the_worker_lives(served):
    import io

    from PIL import Image

    state = served[0].running()
    buffer = io.BytesIO()
    # 4.2 Mpx: over the default limit for an 8x8 model (2048x2048), found from the header alone
    Image.new("L", (2100, 2000)).save(buffer, "PNG")
    reply = http_predict(state, "digits", buffer.getvalue())
    assert reply.status_code == 413 and "over the limit of 4194304" in reply.json()["error"]
    ok = http_predict(state, "digits", (DIGITS / "samples" / "digit_4.png").read_bytes())
    assert ok.status_code == 200 and next(iter(ok.json())) == "four"


def test_scale_to_two_workers_and_back(served):
    target, _ = served
    result = target.scale("digits_ts", 2)
    assert [w["status"] for w in result["workers"]] == ["READY", "READY"]
    status = target.status()
    model = next(m for m in status["models"] if m["name"] == "digits_ts")
    assert len(model["workers"]) == 2 and model["default"] is True
    result = target.scale("digits_ts", 1)
    assert len(result["workers"]) == 1
    with pytest.raises(DeployError, match="no model 'nope'"):
        target.scale("nope", 2)


def test_redeploy_is_idempotent_and_picks_up_changed_archives(served, tmp_path):
    target, _ = served
    again = lifecycle.deploy(target, ["digits", "digits_ts"])
    assert [m["action"] for m in again["models"]] == ["unchanged", "unchanged"]
    assert again["server_started"] is False

    # a new version of digits_ts: registered beside the old one and made default; the old one
    # stays loaded (the keep policy: 2), so a rollback is instant
    from servetool.operate.package import package
    from tests.conftest import write_spec

    spec = load_spec(write_spec(tmp_path / "v2", name="digits_ts", format="torchscript",
                                version="2.0", top_k=1))
    package(spec, Path(target.opts.model_store))
    upgraded = lifecycle.deploy(target, ["digits_ts"])["models"][0]
    assert (upgraded["action"], upgraded["version"]) == ("upgraded", "2.0")
    versions = [m for m in target.status()["models"] if m["name"] == "digits_ts"]
    assert sorted((m["version"], m["default"]) for m in versions) == [("1.0", False), ("2.0", True)]
    reply = http_predict(target.running(), "digits_ts",
                         (DIGITS / "samples" / "digit_8.png").read_bytes())
    assert reply.json() == {"eight": pytest.approx(reply.json()["eight"])} and len(reply.json()) == 1


def test_a_handler_that_fails_to_import_gives_a_clear_deploy_error(served, tmp_path):
    target, _ = served
    store = Path(target.opts.model_store)
    good = store / "digits.mar"
    broken = store / "broken.mar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "entry.py":
                data = data.replace(b"import numpy as np\n",
                                    b"import numpy as np\nimport module_nobody_installed\n")
            if item.filename == "MAR-INF/MANIFEST.json":
                data = data.replace(b'"digits"', b'"broken"')
            dst.writestr(item, data)
    try:
        with pytest.raises(DeployError) as err:
            lifecycle.deploy(target, ["broken"], timeout_s=120)
        message = str(err.value)
        assert "registering broken 1.0 failed" in message
        assert "module_nobody_installed" in message
        # the server and the other models are unharmed
        ok = http_predict(target.running(), "digits", (DIGITS / "samples" / "digit_1.png").read_bytes())
        assert ok.status_code == 200
    finally:
        broken.unlink()


def test_start_failures_are_explained(tmp_path, model_store):
    opts = server_options(tmp_path / "run", model_store)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", opts.ports["management"]))
        blocker.listen()
        with pytest.raises(ServerError, match=f"port {opts.ports['management']} on 127.0.0.1 "
                                              r"\(management API\) is already in use"):
            process.start(opts)
    assert process.running_state(opts.run_dir) is None


def test_stop_leaves_no_process_behind(tmp_path, model_store):
    target = LocalTarget(server_options(tmp_path / "run", model_store))
    result = lifecycle.deploy(target, ["digits"])
    state = target.running()
    members = process.group_members(state.pid)
    assert len(members) >= 3  # launcher, JVM, one worker
    worker_pid = result["models"][0]["workers"][0]["pid"]
    assert worker_pid in members
    assert target.down() is True
    assert process.group_members(state.pid) == []
    assert target.running() is None
    for port in state.ports.values():
        assert not process.port_in_use("127.0.0.1", port)
    assert target.down() is False


def test_readme_curl_line_and_config_are_secure(served):
    state = served[0].running()
    rendered = process.read_properties(Path(state.run_dir) / "config.properties")
    for key in ("inference_address", "metrics_address"):
        assert rendered[key].startswith("http://127.0.0.1:")
    # management: TorchServe on a private socket, servetool's front on 127.0.0.1
    assert rendered["management_address"].startswith(f"unix:{state.run_dir}/private/")
    assert state.url("management").startswith("http://127.0.0.1:")
    assert rendered["grpc_inference_address"] == "127.0.0.1"
    assert "disable_token_authorization" not in rendered
    client = Client(state)
    for url in ("http://example.com/x.mar", "file:///etc/passwd", "../digits.mar"):
        with pytest.raises(APIError) as err:
            client.register(url, "evil", 1, timeout=30)
        # refused by the front: as outside the store, or (a '/' the client encoded) as a target
        # whose decoded form would hold an encoded '/'
        assert (err.value.status, "model store" in str(err.value) or "encoded '/'" in
                str(err.value)) in ((403, True), (400, True)), str(err.value)
    metrics = client.metrics()
    assert "ts_inference_requests_total" in metrics or "Requests2XX" in metrics
    assert (ROOT / "config.properties").is_file()


def with_base_config(opts, tmp_path, extra: str):
    config = tmp_path / "config.properties"
    config.write_text((ROOT / "config.properties").read_text() + "\n" + extra + "\n")
    opts.base_config = config
    return opts


def test_a_jvm_that_dies_at_start_is_quoted_not_waited_for(tmp_path):
    opts = with_base_config(server_options(tmp_path / "run", tmp_path), tmp_path,
                            "vmargs=-XX:+NoSuchJvmOptionForServetool")
    with pytest.raises(ServerError) as err:
        process.start(opts)
    # seen exiting, not waited for until the start-up timeout ("was not healthy within ...")
    assert "exited during start-up" in str(err.value)
    assert "NoSuchJvmOptionForServetool" in str(err.value)
    assert process.running_state(opts.run_dir) is None


def test_keys_are_renewed_only_once_expired_and_a_failed_renewal_is_reported(tmp_path):
    opts = with_base_config(server_options(tmp_path / "run", tmp_path), tmp_path,
                            "token_expiration_min=0.2")  # 12 seconds
    state = process.start(opts)
    try:
        inference = json.loads(state.key_file.read_text())["inference"]
        first = inference["key"]
        # Seconds before it expires, a key is still the key: renewing now would revoke it for every
        # client using it (curl scripts, load generators).
        assert Client(state).token("inference") == first
        assert http_ping(state, first).status_code == 200
        wait_until_expired(inference["expiration time"])
        assert http_ping(state, first).status_code == 400  # TorchServe's answer to an expired key
        assert Client(state).ping() == {"status": "Healthy"}  # renewed behind the scenes
        assert json.loads(state.key_file.read_text())["inference"]["key"] != first
        # The front renews TorchServe's management key for itself: its own key does not expire.
        assert Client(state).list_models() == []

        keys = json.loads(state.key_file.read_text())
        keys["inference"]["expiration time"] = "2000-01-01T00:00:00Z"
        keys["API"]["key"] = "not-the-api-key"
        state.key_file.write_text(json.dumps(keys))
        with pytest.raises(APIError, match="renewing the expired inference key failed: TorchServe "
                                           "answered 400"):
            Client(state).ping()
    finally:
        process.stop(opts.run_dir)


def test_predict_and_bench_serve_keep_working_across_key_expiries(tmp_path, model_store):
    """TorchServe takes token_expiration_min in fractions of a minute (0.1: 6 s). `predict` after
    the key expired, and `bench serve` runs longer than a key lives, with each engine: every
    request answered 200, the key renewed as it lapsed (85% failed before, with a 1-minute expiry)."""
    from servetool.bench.serve import wrk_path
    from tests.test_cli import run

    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(model_store / "digits_ts.mar", store / "digits_ts.mar")
    opts = with_base_config(server_options(tmp_path / "run", store), tmp_path,
                            "token_expiration_min=0.1")
    target = LocalTarget(opts)
    lifecycle.deploy(target, [])
    where = ["--run-dir", str(opts.run_dir), "--model-store", str(store)]
    sample = DIGITS / "samples" / "digit_7.png"
    try:
        keys = json.loads(target.running().key_file.read_text())
        first = keys["inference"]["key"]
        wait_until_expired(keys["inference"]["expiration time"])
        assert http_ping(target.running(), first).status_code == 400  # expired for any client
        predicted = run("predict", "digits_ts", str(sample), *where, "--json")
        assert predicted.returncode == 0, predicted.stderr
        assert next(iter(json.loads(predicted.stdout)["prediction"])) == "seven"
        assert json.loads(target.running().key_file.read_text())["inference"]["key"] != first

        for engine in ["python"] + (["wrk"] if wrk_path() else []):
            bench = run("bench", "serve", "digits_ts", *where, "--engine", engine, "--duration",
                        "9", "-c", "2", "--payload", str(sample), "--out", str(tmp_path / engine),
                        "--json")
            assert bench.returncode == 0, bench.stderr
            summary = json.loads(bench.stdout)
            assert summary["errors"] == {} and summary["lost"] == 0, (engine, summary)
            assert summary["ok"] == summary["sent"] > 0
            assert summary["key_renewals"] >= 1 and "renewed" in bench.stderr, (engine, summary)
            if engine == "wrk":  # rounds that end before the key expires, renewed between them
                assert summary["rounds"] >= 2 and summary["retried"] == 0
    finally:
        target.down()


def wait_until_expired(stamp: str) -> None:
    from datetime import datetime

    when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, when - time.time()) + 0.2)


def http_ping(state, key: str) -> requests.Response:
    return requests.get(f"{state.url('inference')}/ping", timeout=10,
                        headers={"Authorization": f"Bearer {key}"})


def test_wrk_gets_the_key_from_its_environment_not_its_command_line(served):
    """`ps` shows every local user a process's arguments; bench serve's wrk must not carry the key."""
    import threading

    from servetool.bench.serve import run_wrk, wrk_path

    if wrk_path() is None:
        pytest.skip("wrk is not installed (the setup installs it as root)")
    state = served[0].running()
    key = Client(state).token("inference")
    seen: list[bytes] = []

    def watch() -> None:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and not seen:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    text = cmdline.read_bytes()
                except OSError:
                    continue
                if text.startswith(b"wrk") or b"/wrk\0" in text:
                    seen.append(text)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = run_wrk(f"{state.url('inference')}/predictions/digits",
                     [DIGITS / "samples" / "digit_1.png"], concurrency=2, duration_s=2,
                     headers={"Authorization": f"Bearer {key}"})
    watcher.join()
    assert seen, "wrk was never seen running"
    assert key.encode() not in seen[0] and b"Bearer" not in seen[0]
    assert result.ok > 0 and not result.errors  # and yet every request was authorized


def test_deploy_refuses_a_model_store_the_running_server_does_not_use(served, tmp_path):
    target, _ = served
    other = LocalTarget(process.ServerOptions(run_dir=Path(target.opts.run_dir),
                                                 model_store=tmp_path, ports=target.opts.ports))
    (tmp_path / "digits.mar").write_bytes((Path(target.opts.model_store) / "digits.mar").read_bytes())
    with pytest.raises(DeployError, match="serves archives from"):
        lifecycle.deploy(other, ["digits"])


def test_one_request_never_fails_another_in_a_real_batch(served):
    """Batches of 8 on a model that raises on some inputs: only those requests get an error."""
    state = served[0].running()
    client = served[0].make_client(state)
    pid_before = client.describe("embednet")[0]["workers"][0]["pid"]
    bodies = [json.dumps([1, 2, 3, 4]), json.dumps([1, 2, 300, 4]), json.dumps([0, 0, 0, 0]),
              json.dumps([1, 2 ** 70, 3, 4]), json.dumps([9, 8, 7, 6]), json.dumps([1.5, 2, 3, 4]),
              json.dumps([5, 5, 5, 5]), '{"data": [1, 2, 3, true]}']
    first = batches_seen(state, "embednet")
    alone = {i: http_predict(state, "embednet", bodies[i].encode(), "application/json").json()
             for i in (0, 2, 4, 6)}
    before = batches_seen(state, "embednet", first[1] + len(alone))
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: http_predict(state, "embednet", b.encode(),
                                                       "application/json"), bodies))
    assert [r.status_code for r in replies] == [200, 422, 200, 400, 200, 400, 200, 400]
    # one full batch of 8 (the model waits up to 1.5 s to fill one), not partial ones
    assert batches_since(state, "embednet", before, 8) == [8]
    assert "the model could not process this input" in replies[1].json()["error"]
    assert "outside the int64 range" in replies[3].json()["error"]
    assert "integers only, got fractions" in replies[5].json()["error"]
    assert "got booleans" in replies[7].json()["error"]
    for i, expected in alone.items():
        np.testing.assert_allclose(replies[i].json(), expected, atol=1e-5)
    workers = client.describe("embednet")[0]["workers"]
    assert workers[0]["pid"] == pid_before and workers[0]["status"] == "READY"


def test_an_image_that_makes_the_decoder_raise_fails_alone(served, held_out):
    """A TIFF the fuzzer found (Pillow raises TypeError on it) batched with good images."""
    state = served[0].running()
    escape = (ROOT / "tests" / "fuzz_corpus" / "escapes").glob("*.bin")
    bad = next(iter(sorted(escape))).read_bytes()
    images, labels = held_out
    bodies = [png_bytes(images[0]), bad, png_bytes(images[1]), b"GIF89a\x01"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: http_predict(state, "digits_batch", b), bodies))
    assert [r.status_code for r in replies] == [200, 400, 200, 400]
    assert next(iter(replies[0].json())) == LABELS[labels[0]]
    assert next(iter(replies[2].json())) == LABELS[labels[1]]
    assert replies[1].json()["error"].startswith("image could not be decoded (TypeError")


def test_archives_of_one_model_are_ordered_by_version_not_file_name(tmp_path, model_store):
    from servetool.operate.lifecycle import version_key
    from tests.test_lifecycle import rewrite_archive

    assert sorted(["10.0", "9.1", "1.0", "2", "1.0-rc1", "1.0.1"], key=version_key) == \
        ["1.0-rc1", "1.0", "1.0.1", "2", "9.1", "10.0"]
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(model_store / "digits_ts.mar", store / "digits_ts.mar")  # version 1.0
    # version 2.0 of the same archive (a version is only its manifest's field), sorting first by name
    rewrite_archive(model_store / "digits_ts.mar", store / "a-digits_ts-2.0.mar", version="2.0")
    target = LocalTarget(server_options(tmp_path / "run", store))
    try:
        for _ in range(2):  # a second deploy must not "upgrade" 2.0 to 1.0
            result = lifecycle.deploy(target, [])
            assert [(m["name"], m["version"]) for m in result["models"]] == [("digits_ts", "2.0")]
        versions = [m["version"] for m in target.status()["models"]]
        assert versions == ["2.0"]
    finally:
        target.down()


def test_a_body_over_max_request_size_is_explained(served, tmp_path):
    from tests.test_cli import run

    target = served[0]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 7_000_000)
    proc = run("predict", "digits", str(big), "--run-dir", str(target.opts.run_dir),
               "--model-store", str(target.opts.model_store))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "answered 413: the request body (7000004 bytes) is larger than the server's " \
           "max_request_size (6553500 bytes" in proc.stderr
    assert "raise max_request_size" in proc.stderr


def test_torchserve_answers_that_say_too_little_are_explained():
    from servetool.engines.torchserve.management import explain_failure

    queue = explain_failure(503, 'Model "digits" has no worker to serve inference request. Please '
                                 "use scale workers API to add workers.", 10)
    assert "job queue is full (job_queue_size" in queue and "servetool scale" in queue
    died = explain_failure(500, "Worker died.", 10)
    assert "response_timeout" in died and "model_log.log" in died
    assert explain_failure(400, "bad image", 10) == "bad image"


def test_served_answers_on_non_square_images_match_torchvision_preprocessing(served, held_out):
    """digits_short: Resize(10) + CenterCrop(8), served, against the eager model fed by a literal
    torchvision-style preprocessing of the same images (shorter side, aspect kept, rounded crop)."""
    import io

    from PIL import Image

    from tests.test_preprocess import torchvision_reference

    spec = load_spec(DIGITS)
    model = export.load_original(spec)
    state = served[0].running()
    images, _ = held_out
    for i, (width, height) in enumerate([(64, 24), (48, 64), (30, 30)]):
        gray = Image.fromarray(np.rint(images[i][0] * 255).astype(np.uint8), "L")
        picture = gray.resize((width, height), Image.NEAREST).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        reply = http_predict(state, "digits_short", buffer.getvalue())
        assert reply.status_code == 200, reply.text
        # torchvision on the RGB picture, then one channel (the picture is gray: all are equal)
        x = torchvision_reference(picture, 10, 8, "bilinear")[0] * 0.229 + 0.485
        x = (x - spec.preprocess.mean[0]) / spec.preprocess.std[0]
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x[None, None].astype(np.float32))), 1)[0]
        top = torch.topk(probs, 3)
        expected = {LABELS[int(j)]: float(p) for p, j in zip(top.values, top.indices, strict=True)}
        assert list(reply.json()) == list(expected)
        np.testing.assert_allclose(list(reply.json().values()), list(expected.values()), atol=2e-5)


def test_deploy_raises_the_request_and_response_limits_to_what_a_tensor_model_needs(tmp_path):
    """A [3, 256, 512] float input as JSON is ~8 MB, over TorchServe's 6.5 MB default both ways."""
    from servetool.operate.package import package
    from tests.test_isolation import fragile_spec

    spec = load_spec(fragile_spec(tmp_path / "spec", "ExpNet", [3, 256, 512], "float32", "onnx"))
    package(spec, tmp_path / "store")
    target = LocalTarget(server_options(tmp_path / "run", tmp_path / "store"))
    try:
        lifecycle.deploy(target, [])
        state = target.running()
        props = process.read_properties(Path(state.run_dir) / "config.properties")
        need = 3 * 256 * 512 * 24 + 64 * 1024
        assert int(props["max_request_size"]) == need and int(props["max_response_size"]) == need
        x = np.random.default_rng(0).standard_normal((3, 256, 512)).astype(np.float32)
        body = json.dumps(x.tolist()).encode()
        assert len(body) > 6_553_500
        reply = http_predict(state, "expnet", body, "application/json")
        assert reply.status_code == 200, reply.text[:300]
        np.testing.assert_allclose(np.array(reply.json(), np.float32), x * np.exp(x), rtol=1e-5)
    finally:
        target.down()
