"""Canary releases through HAProxy in front of a real TorchServe (`deploy --split`), under load
from the project's load generator: the split itself, and the automatic decisions both ways."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
from PIL import Image

from servetool.bench.serve import run_load
from servetool.engines.torchserve import split, split_runtime
from servetool.operate import lifecycle
from servetool.operate.canary import Bounds, Canary, CanaryError, judge
from servetool.operate.companions import COMPANIONS
from servetool.operate.lifecycle import Lifecycle
from servetool.targets.local import LocalTarget
from tests.conftest import server_options
from tests.test_lifecycle import IMAGE, rewrite_archive

# CI must have HAProxy (scripts/setup.sh --test installs it): there the tests run and fail
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None and not os.environ.get("SERVETOOL_CI"),
                                reason="haproxy is not installed (apt-get install haproxy)")


def big_image() -> bytes:
    """The same digit at 32x32: 1,024 pixels, which version 3.0 (max_pixels 450) refuses."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(IMAGE)).resize((32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def slow_copy(src: Path, dst: Path, version: str, seconds: float) -> Path:
    """An archive whose model takes `seconds` longer per batch (a slower build of the model)."""
    rewrite_archive(src, dst.with_suffix(".tmp"), version=version)
    marker = b"        good = [i for i, item in enumerate(items) if not isinstance(item, RequestError)]\n"
    with zipfile.ZipFile(dst.with_suffix(".tmp")) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "entry.py":
                assert marker in data
                data = data.replace(marker, f"        time.sleep({seconds})\n".encode() + marker)
            zout.writestr(item, data)
    return dst


@pytest.fixture(scope="module")
def fronted(tmp_path_factory, model_store):
    """A `deploy --split` server with model `can` 1.0 (default), and 2.0 (good), 3.0 (refuses big
    images) and 4.0 (slow) loaded beside it."""
    store = tmp_path_factory.mktemp("can-store")
    built = tmp_path_factory.mktemp("can-built")
    # ONNX Runtime (one worker): TorchScript re-profiles each new batch size, which blurs timings
    v1 = rewrite_archive(model_store / "digits_fp16.mar", store / "can.mar", name="can")
    opts = dataclasses.replace(server_options(tmp_path_factory.mktemp("can-run"), store), split=True)
    target = LocalTarget(opts, companions=COMPANIONS)  # as deploy: status shows the canary
    try:  # a failed setup must not leave the server (and HAProxy) running
        lifecycle.deploy(target, ["can"])
        life = Lifecycle(target)
        for version, archive in (
                ("2.0", rewrite_archive(v1, built / "2" / "can.mar", version="2.0")),
                ("3.0", rewrite_archive(v1, built / "3" / "can.mar", version="3.0", max_pixels=450)),
                ("4.0", slow_copy(v1, built / "4" / "can.mar", "4.0", 0.005))):
            assert life.install(archive, make_default=False)["action"] == "loaded", version
        yield target
    finally:
        target.down()


@contextlib.contextmanager
def load(target: LocalTarget, payloads, concurrency: int = 3):
    stop = threading.Event()
    box: dict = {"begun": time.perf_counter()}
    url = f"{target.running().url('inference')}/predictions/can"
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    thread = threading.Thread(target=lambda: box.setdefault("result", run_load(
        url, payloads, concurrency=concurrency, duration_s=None, stop=stop, headers=headers)))
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()


def versions_seen(target: LocalTarget, n: int, path: str = "can") -> dict[str, int]:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    seen: dict[str, int] = {}
    for _ in range(n):
        reply = session.post(f"{target.running().url('inference')}/predictions/{path}",
                             data=IMAGE, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        version = reply.headers["X-Model-Version"]
        seen[version] = seen.get(version, 0) + 1
    return seen


def test_judge_waits_for_evidence_then_compares_with_the_default():
    bounds = Bounds(max_error_increase=0.01, max_p99_ratio=1.5, min_requests=50)
    base = {"requests": 500, "error_ratio": 0.0, "inference_p99_ms": 4.9, "inference_mean_ms": 0.4}
    assert judge(base, {"requests": 12}, bounds)[0] == "wait"
    assert "12 of the 50" in judge(base, {"requests": 12}, bounds)[1]
    good = {"requests": 60, "error_ratio": 0.005, "inference_p99_ms": 4.9, "inference_mean_ms": 0.5}
    assert judge(base, good, bounds)[0] == "pass"
    verdict, why = judge(base, {**good, "error_ratio": 0.25}, bounds)
    assert verdict == "breach" and "error ratio 25.0%" in why
    # 10.9% against 9.6% over a few hundred requests: chance, not a breach (seen in a test run)
    noisy = ({"requests": 900, "error_ratio": 0.096}, {"requests": 300, "error_ratio": 0.109})
    assert judge(*noisy, bounds)[0] == "pass"
    assert judge(noisy[0], {"requests": 300, "error_ratio": 0.2}, bounds)[0] == "breach"
    verdict, why = judge(base, {**good, "inference_mean_ms": 2.5}, bounds)
    assert verdict == "breach" and "mean inference time 2.50 ms" in why
    assert judge(base, {**good, "inference_mean_ms": 0.7}, bounds)[0] == "pass"  # +0.3 ms: noise


def test_a_restart_ends_an_unjudged_automatic_canary_but_keeps_a_manual_weight(tmp_path):
    import json

    from servetool.operate.canary import on_server_start

    for status, after in (("running", "other 5\ncan 0\n"), ("manual", "can 30\nother 5\n")):
        (tmp_path / split.WEIGHTS).write_text("can 30\nother 5\n")
        (tmp_path / "canary.json").write_text(json.dumps(
            {"model": "can", "candidate": "2.0", "default": "1.0", "weight": 30, "status": status,
             "controller_pid": os.getpid()}))
        on_server_start(tmp_path)
        assert (tmp_path / split.WEIGHTS).read_text() == after
        state = json.loads((tmp_path / "canary.json").read_text())
        assert state["status"] == ("aborted" if status == "running" else "manual")


def split_figures(target: LocalTarget) -> dict[tuple[str, ...], float]:
    """servetool's exporter at the split: (metric, labels...) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{target.running().split_metrics_port}"
                        f"{split.EXPORTER_PATH}", timeout=5).text
    return {(s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if "le" not in s.labels}


def test_a_canary_whose_controller_is_gone_reads_orphaned_and_one_controller_runs_at_a_time(
        fronted):
    import json
    import subprocess
    import sys

    from servetool.operate.canary import read_state

    run_dir = Path(fronted.running().run_dir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid, status in ((gone.pid, "orphaned"), (os.getpid(), "running")):
        (run_dir / "canary.json").write_text(json.dumps(
            {"model": "can", "candidate": "2.0", "default": "1.0", "weight": 25,
             "status": "running", "controller_pid": pid}))
        state = read_state(run_dir)
        assert state["status"] == status, state
        assert (f"pid {pid}) is gone with the weight at 25%" in (state.get("reason") or "")) == \
            (status == "orphaned")
    with pytest.raises(CanaryError, match=f"controller \\(pid {os.getpid()}\\) is already running"):
        Canary(fronted).run("can", "2.0")
    (run_dir / "canary.json").unlink()



def test_a_controller_that_is_killed_or_hung_up_sends_everything_back_first(fronted):
    """SIGTERM (a job's timeout, kill) and SIGHUP (its terminal closed) stop --auto as Ctrl-C
    does: weight 0 and `aborted` before it exits, not an orphaned canary at 10%."""
    import signal
    import subprocess
    import sys

    from servetool.operate.canary import read_state

    run_dir = Path(fronted.running().run_dir)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("servetool")), "canary", "can", "2.0", "--auto",
             "--interval", "60", "--run-dir", str(run_dir),
             "--model-store", str(fronted.opts.model_store)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while (read_state(run_dir) or {}).get("controller_pid") != proc.pid or \
                    read_state(run_dir)["weight"] != 10:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.2)
            assert "2.0" in versions_seen(fronted, 60)  # 10% of 60: P(none) = 0.2%
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        state = read_state(run_dir)
        assert (state["status"], state["weight"]) == ("aborted", 0), state
        assert versions_seen(fronted, 40) == {"1.0": 40}
    (run_dir / "canary.json").unlink()

def test_the_split_sends_the_weight_and_never_a_named_version(fronted):
    ctl = Canary(fronted)
    state = ctl.set_weight("can", "2.0", 30)
    assert (state["weight"], state["default"]) == (30, "1.0")
    before = split_figures(fronted)
    seen = versions_seen(fronted, 300)
    assert set(seen) == {"1.0", "2.0"}
    # every request in the client-side histograms, under the version that answered it
    time.sleep(0.5)  # the log lines are datagrams, read by another process
    after = split_figures(fronted)
    for version in ("1.0", "2.0"):
        key = ("servetool_request_seconds_count", "model=can", "status=2xx", f"version={version}")
        assert after[key] - before.get(key, 0) == seen[version], (version, after)
    assert after[("servetool_canary_weight", "model=can", "version=2.0")] == 30
    assert 0.30 - 0.09 < seen["2.0"] / 300 < 0.30 + 0.09  # 3.5 sigma of a binomial share
    assert versions_seen(fronted, 30, "can/1.0") == {"1.0": 30}  # a named version: no split
    assert fronted.status()["canary"]["weight"] == 30 and fronted.status()["split"] is True
    ctl.abort("can")
    assert versions_seen(fronted, 50) == {"1.0": 50}
    with pytest.raises(CanaryError, match="already the default"):
        ctl.set_weight("can", "1.0", 10)
    metrics = requests.get(f"http://127.0.0.1:{fronted.running().split_metrics_port}/metrics",
                           timeout=5).text
    assert 'haproxy_backend_http_responses_total{proxy="canary",code="2xx"}' in metrics


def test_a_good_version_is_promoted_automatically(fronted):
    """A tenth of the clients' bodies are bad for every version alike: 2.0 is as good as 1.0,
    also at the 100% step, where the default answers nothing and its last figures stand in."""
    log: list[str] = []
    with load(fronted, [(IMAGE, "image/png")] * 9 + [(b"not an image", "image/png")]) as box:
        state = Canary(fronted, log.append).run("can", "2.0", steps=(25, 100), interval_s=3,
                                                bounds=Bounds(min_requests=30))
    assert state["status"] == "promoted", (state, log)
    assert Lifecycle(fronted).server_default("can") == "2.0"
    result = box["result"]
    assert set(result.errors) == {400} and result.lost == 0  # the bad bodies, nothing else
    assert {"1.0", "2.0"} <= {s.version for s in result.samples}


@pytest.mark.parametrize("bad, reason", [("3.0", "error ratio"), ("4.0", "inference time")])
def test_a_bad_version_is_rolled_back_automatically(fronted, bad, reason):
    """3.0 refuses a quarter of the inputs (big images), 4.0 is several times slower: each is
    rolled back at its first step; failures stay within its share, and none after."""
    payloads = [(IMAGE, "image/png")] * 3 + [(big_image(), "image/png")]
    log: list[str] = []
    with load(fronted, payloads) as box:
        state = Canary(fronted, log.append).run("can", bad, steps=(20, 100), interval_s=3,
                                                bounds=Bounds(min_requests=30))
        rolled_back = time.perf_counter() - box["begun"]
        time.sleep(2)
    assert state["status"] == "rolled_back" and reason in state["reason"], (state, log)
    assert state["weight"] == 0 and Lifecycle(fronted).server_default("can") == "2.0"
    samples = box["result"].samples
    failed = [s for s in samples if s.status != 200]
    assert all(s.version == bad for s in failed)  # only the candidate ever failed
    assert len(failed) <= 0.2 * 0.25 * len(samples) * 2 + 5  # its share, at most
    assert not [s for s in failed if s.start_s > rolled_back + 0.5]  # none after the rollback
    assert versions_seen(fronted, 30) == {"2.0": 30}


def test_every_dashboard_panel_reads_real_data_from_prometheus(fronted, tmp_path):
    """The Grafana dashboard (Grafana's SDK model, round-tripped), provisioned by `servetool monitor
    --grafana`, and each panel's PromQL run by a real Prometheus scraping this deployment during a
    30% canary: every panel has data, and the canary share panel reads about 30%."""
    import json
    import subprocess
    import sys

    from grafana_foundation_sdk.models.dashboard import Dashboard

    from servetool.engines.torchserve.process import free_ports
    from servetool.operate.dashboard import expressions
    from tests.test_monitoring import prometheus_binary, query

    binary = prometheus_binary()
    prom_port = free_ports(("prometheus",))["prometheus"]
    cli = str(Path(sys.executable).with_name("servetool"))
    proc = subprocess.run([cli, "monitor", "--run-dir", str(fronted.opts.run_dir), "--model-store",
                           str(fronted.opts.model_store), "--prometheus-config",
                           str(tmp_path / "prometheus.yml"), "--scrape-interval", "1", "--grafana",
                           str(tmp_path / "grafana"), "--prometheus-url",
                           f"http://127.0.0.1:{prom_port}", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["targets"]) == {"torchserve", "haproxy", "servetool-split"}
    board = json.loads(Path(out["grafana"]["dashboard"]).read_text())
    assert Dashboard.from_json(board).uid == "servetool-models"
    assert (tmp_path / "grafana/provisioning/datasources/servetool.yaml").is_file()
    default = Lifecycle(fronted).server_default("can")
    candidate = next(v for v in Lifecycle(fronted).registered("can") if v != default)
    server = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        Canary(fronted).set_weight("can", candidate, 30)
        payloads = [(IMAGE, "image/png")] * 3 + [(b"not an image", "image/png")]
        with load(fronted, payloads) as box:
            time.sleep(10)
        time.sleep(2)
        for title, expr in expressions("can", "30s").items():
            result = query(prom_port, expr)
            assert result, f"panel {title!r} has no data: {expr}"
            # versions with no traffic in the window read NaN (0/0); the two serving ones do not
            assert result.get(default, 0) == result.get(default, 0), title
            assert any(v == v for v in result.values()), title
        share = query(prom_port, expressions("can", "30s")["Canary share (observed at the split)"])
        assert 0.15 < share[""] < 0.45, share
        assert query(prom_port, expressions("can", "30s")["Canary weight (set)"]) == {candidate: 30}
        p99 = query(prom_port, expressions("can", "30s")[
            "Request p99 at the split (as the client sees it)"])
        # in seconds, whatever the machine's speed: no longer than the client's slowest request,
        # up to the end of the split's bucket that holds it (its bounds step up 2.5 times at most)
        slowest = max(s.latency_ms for s in box["result"].samples) / 1000
        bound = max(2.5 * slowest, split_runtime.BUCKETS[0])
        assert 0 < p99[default] <= bound and 0 < p99[candidate] <= bound, (p99, slowest)
    finally:
        Canary(fronted).abort("can")
        server.terminate()
        server.wait(timeout=20)


def test_a_pods_weights_file_never_stops_the_split(tmp_path, capsys):
    """What a pod's split does with its canary ConfigMap's file: nothing while it is absent, one
    complaint (not one per poll) for a file it cannot use, and a retry while HAProxy is not up."""
    from servetool.engines.torchserve.split_runtime import apply_weights_file

    path = tmp_path / "weights.json"
    assert apply_weights_file(tmp_path, path, {}) == {}
    for text, said in (("{not json", "cannot read"), ('["digits"]', "not a JSON object"),
                       ('{"digits": 7}', '{"version", "weight"} wanted'),
                       ('{"digits": {"version": "2.0", "weight": 10}}', "admin socket")):
        path.write_text(text)
        applied = apply_weights_file(tmp_path, path, {})
        applied = apply_weights_file(tmp_path, path, applied)
        err = capsys.readouterr().err
        assert err.count(said) == 1, (text, err)
        assert "digits" not in applied  # nothing was applied: tried again at the next poll
