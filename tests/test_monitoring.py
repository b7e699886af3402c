"""servetool's per-version handler metrics, scraped by a real Prometheus (Debian's package) with
the configuration `servetool monitor` writes, and read back through Prometheus's HTTP API."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from servetool.bench.serve import run_load
from servetool.engines.torchserve.process import free_ports
from servetool.operate.monitor import queries
from tests.test_lifecycle import IMAGE

CI = os.environ.get("SERVETOOL_CI") == "1"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if CI:
            pytest.fail("prometheus (Debian's package) is needed in CI: scripts/setup.sh --test "
                        "installs it")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return found


def query(port: int, promql: str) -> dict[str, float]:
    reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql},
                         timeout=10).json()
    assert reply["status"] == "success", reply
    return {r["metric"].get("ModelVersion", r["metric"].get("version", "")): float(r["value"][1])
            for r in reply["data"]["result"]}


TOTALS = 'sum by (ModelVersion) (servetool_requests_total{ModelName="mon"})'


def settled_totals(port: int, timeout_s: float = 20.0) -> dict[str, float]:
    """Each version's request count once two scrapes in a row (1.5 s apart) read the same."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, float] | None = None
    while time.monotonic() < deadline:
        totals = query(port, TOTALS) if _ready(port) else None
        if totals and totals == last:
            return totals
        last = totals
        time.sleep(1.5)
    raise AssertionError(f"Prometheus' request totals did not settle: {last}")


def _ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).ok
    except requests.ConnectionError:
        return False


def at_most_bucket_above(slowest_s: float) -> float:
    """An upper bound for a histogram quantile (servetool's handler histograms, Prometheus' default
    buckets) of observations no longer than `slowest_s`: the bucket that holds it ends at most
    2.5 times above it (0.01 -> 0.025, 0.1 -> 0.25), or at 5 ms, the first bound. A figure in the
    wrong unit (milliseconds for seconds) is a thousand times over it, whatever the machine."""
    return max(2.5 * slowest_s, 0.005)


def test_prometheus_reads_p99_and_error_ratio_per_version(two_versions, tmp_path):
    binary = prometheus_binary()
    target = two_versions
    config = tmp_path / "prometheus.yml"
    cli = str(Path(sys.executable).with_name("servetool"))
    proc = subprocess.run([cli, "monitor", "--run-dir", str(target.opts.run_dir), "--model-store",
                           str(target.opts.model_store), "--prometheus-config", str(config),
                           "--scrape-interval", "1", "--model", "mon", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["targets"] == {"torchserve": f"127.0.0.1:{target.opts.ports['metrics']}"}
    port = free_ports(("prometheus",))["prometheus"]
    server = subprocess.Popen([binary, f"--config.file={config}",
                               f"--web.listen-address=127.0.0.1:{port}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
        base = f"{target.running().url('inference')}/predictions/mon"
        good = [(IMAGE, "image/png")]
        mixed = good * 3 + [(b"not an image", "image/png")]  # a quarter of 2.0's requests are bad
        before = settled_totals(port)  # deploy's and install's own checks were counted
        results: dict[str, object] = {}
        loads = [threading.Thread(target=lambda v=version, u=url, p=payloads: results.setdefault(
                     v, run_load(u, p, concurrency=2, duration_s=8, headers=headers)))
                 for version, url, payloads in (("1.0", base, good), ("2.0", f"{base}/2.0", mixed))]
        for t in loads:
            t.start()
        for t in loads:
            t.join()
        time.sleep(3)  # the last scrapes
        q = queries("mon", window="30s")
        errors = query(port, q["error_ratio"])
        assert errors["1.0"] == 0.0
        assert errors["2.0"] == pytest.approx(0.25, abs=0.05)
        p99 = query(port, q["inference_p99_s"])
        assert set(p99) == {"1.0", "2.0"} and all(v > 0 and not math.isnan(v) for v in p99.values())
        for version, result in results.items():  # in seconds: no longer than the client waited
            slowest = max(s.latency_ms for s in result.samples) / 1000
            assert p99[version] <= at_most_bucket_above(slowest), (version, p99, slowest)
        # both versions' request rates are read, each in proportion to the requests its load sent
        # (an absolute floor, 10 req/s, depended on the machine's speed and failed once in CI)
        rates = query(port, q["requests_per_s"])
        assert rates["1.0"] > 0 and rates["2.0"] > 0
        # and every request is counted once under its own version: the scraped totals reach what
        # each load sent (rate()'s ratio, extrapolated over a window its series only partly fill,
        # moved by 40% on a busy machine: totals do not depend on the machine's speed)
        want = {v: before.get(v, 0) + result.sent for v, result in results.items()}
        deadline = time.monotonic() + 20
        while (totals := query(port, TOTALS)) != want and time.monotonic() < deadline:
            time.sleep(1)  # a scrape still to come
        assert totals == want, before
        bad = requests.get(f"http://127.0.0.1:{port}/api/v1/query",
                           params={"query": q["bad_requests_per_s"]}, timeout=10).json()
        reasons = {(r["metric"]["ModelVersion"], r["metric"]["Reason"])
                   for r in bad["data"]["result"]}
        assert reasons == {("2.0", "invalid_input")}
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_top_interpolates_quantiles_as_prometheus_does():
    from servetool.operate.top import quantile

    before = {0.005: 10.0, 0.01: 10.0, float("inf"): 10.0}
    after = {0.005: 60.0, 0.01: 110.0, float("inf"): 110.0}  # 50 new in each bucket
    assert quantile(0.5, before, after) == pytest.approx(0.005)
    assert quantile(0.99, before, after) == pytest.approx(0.005 + 0.005 * 49 / 50)
    assert quantile(0.99, after, after) is None  # nothing new: no figure, not zero
    beyond = {0.005: 0.0, 0.01: 0.0, float("inf"): 5.0}
    assert quantile(0.5, {}, beyond) == 0.01  # past the last bound: its edge is all we know


def test_top_shows_each_version_live(two_versions):
    target = two_versions
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    base = f"{target.running().url('inference')}/predictions/mon"
    mixed = [(IMAGE, "image/png")] * 3 + [(b"not an image", "image/png")]
    stop = threading.Event()
    results: list = []
    loads = [threading.Thread(target=lambda u=url, p=payloads: results.append(run_load(
                 u, p, concurrency=2, duration_s=None, stop=stop, headers=headers)))
             for url, payloads in ((base, [(IMAGE, "image/png")]), (f"{base}/2.0", mixed))]
    for t in loads:
        t.start()
    try:
        time.sleep(1)
        cli = str(Path(sys.executable).with_name("servetool"))
        proc = subprocess.run([cli, "top", "--once", "--json", "--interval", "4", "--run-dir",
                               str(target.opts.run_dir), "--model-store",
                               str(target.opts.model_store)],
                              capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        for t in loads:
            t.join()
    assert proc.returncode == 0, proc.stderr
    rows = {r["version"]: r for r in json.loads(proc.stdout)["rows"] if r["model"] == "mon"}
    assert rows["1.0"]["default"] and not rows["2.0"]["default"]
    assert rows["1.0"]["error_ratio"] == 0 and rows["2.0"]["error_ratio"] == pytest.approx(0.25, abs=0.07)
    # how fast the model answered is the machine's business (benchmarks/serving.py measures it):
    # each row has live figures, in milliseconds (no longer than any client waited)
    slowest_s = max(s.latency_ms for result in results for s in result.samples) / 1000
    for row in rows.values():
        assert row["requests_per_s"] > 0 and row["workers_ready"] == 1
        assert 0 < row["inference_p50_ms"] <= row["inference_p99_ms"]
        assert row["inference_p99_ms"] <= 1000 * at_most_bucket_above(slowest_s)
        assert row["mean_batch"] >= 1
