"""The load generator's accounting against a synthetic server whose answers are known exactly."""

from __future__ import annotations

import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from servetool.bench.serve import (
    Auth,
    LoadError,
    load_payloads,
    run_load,
    run_wrk,
    write_outputs,
    wrk_path,
)
from servetool.engines.torchserve.management import APIError


class Known(BaseHTTPRequestHandler):
    """Answers by body: ok -> 200 after 10 ms, bad -> 400, busy -> 503, drop -> no answer; with
    `keys` set, a request without one of them gets TorchServe's 400 for a refused key."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []
    keys: set[str] = set()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        Known.seen.append(self.headers.get("Authorization", ""))
        if Known.keys and self.headers.get("Authorization") not in Known.keys:
            body = "refused"
        if body == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if body == "ok":
            time.sleep(0.01)
        status = {"ok": 200, "bad": 400, "busy": 503, "refused": 400}[body]
        reply = json.dumps({"body": body} if body != "refused" else {
            "code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. "
            "Token either incorrect, expired, or not provided correctly"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    Known.keys = set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Known)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/predictions/known"
    httpd.shutdown()
    httpd.server_close()


def payloads(*bodies: str):
    return [(b.encode(), "text/plain") for b in bodies]


def test_exact_counts_and_classification(server):
    Known.seen.clear()
    result = run_load(server, payloads("ok", "bad", "busy", "drop"), concurrency=4,
                      requests=200, duration_s=None, headers={"Authorization": "Bearer k"})
    summary = result.summary()
    assert summary["sent"] == 200  # exactly the count asked for, each accounted once
    assert summary["ok"] == 50
    assert summary["errors"] == {"400": 50, "503": 50}
    assert summary["lost"] == 50
    assert summary["ok"] + sum(summary["errors"].values()) + summary["lost"] == summary["sent"]
    assert set(Known.seen) == {"Bearer k"}
    # only 2xx latencies, each at least the server's 10 ms (how much more is the machine's)
    ok = [s.latency_ms for s in result.samples if s.status == 200]
    assert summary["p50_ms"] == round(float(np.percentile(ok, 50)), 2) and summary["p50_ms"] >= 10
    assert 0 <= summary["generator_cpu_share"] < 2.0


def test_duration_mode_stops_on_time_with_no_loss(server):
    result = run_load(server, payloads("ok"), concurrency=8, duration_s=1.0)
    summary = result.summary()
    # ran the whole second and sent nothing after it (the answers to requests in flight are
    # waited for); how many fit in a second is the machine's business
    assert result.duration_s >= 1.0 and all(s.start_s < 1.0 for s in result.samples)
    assert summary["lost"] == 0 and summary["errors"] == {}
    assert summary["sent"] == summary["ok"] > 0
    assert summary["throughput"] == pytest.approx(summary["ok"] / result.duration_s, rel=0.01)


def test_an_unreachable_server_counts_every_request_as_lost():
    result = run_load("http://127.0.0.1:9/predictions/none", payloads("ok"), concurrency=2,
                      requests=10, duration_s=None, timeout_s=2)
    assert (result.sent, result.ok, result.lost) == (10, 0, 10)


def test_outputs_exist_and_parse(server, tmp_path):
    result = run_load(server, payloads("ok", "bad"), concurrency=2, requests=40, duration_s=None)
    files = write_outputs(result, tmp_path, "known")
    with open(files["requests_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["status"] for r in rows} == {"200", "400"}
    with open(files["csv"]) as f:
        summary = next(csv.DictReader(f))
    assert summary["sent"] == "40" and summary["errors"] == "400=20"
    with open(files["markdown"]) as f:
        assert "| 2 |" in f.read()
    with Image.open(files["png"]) as chart:
        assert chart.format == "PNG"


def test_payload_folders_and_content_types(tmp_path):
    (tmp_path / "a.json").write_text("[1]")
    (tmp_path / "b.png").write_bytes(b"\x89PNG")
    loaded = load_payloads([tmp_path])
    assert loaded == [(b"[1]", "application/json"), (b"\x89PNG", "application/octet-stream")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        load_payloads([tmp_path / "empty"])


needs_wrk = pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed (setup installs it)")


@needs_wrk
def test_wrk_engine_classifies_the_same_answers(server, tmp_path):
    files = []
    for body in ("ok", "bad", "busy"):
        (tmp_path / f"{body}.txt").write_text(body)
        files.append(tmp_path / f"{body}.txt")
    Known.seen.clear()
    result = run_wrk(server, files, concurrency=3, duration_s=2, headers={"Authorization": "Bearer w"})
    summary = result.summary()
    assert summary["engine"] == "wrk" and summary["lost"] == 0
    assert set(summary["errors"]) == {"400", "503"}
    assert summary["ok"] + sum(summary["errors"].values()) == summary["sent"]
    # the three bodies take turns, so each status holds about a third of the answers
    assert abs(summary["ok"] - summary["errors"]["400"]) <= 3 + summary["sent"] // 10
    assert summary["p50_ms"] >= 10 and set(Known.seen) == {"Bearer w"}
    assert summary["rounds"] == 1 and summary["key_renewals"] == 0
    assert Path(write_outputs(result, tmp_path / "out", "w")["png"]).is_file()


@needs_wrk
def test_wrk_engine_counts_dropped_connections_as_lost(server, tmp_path):
    (tmp_path / "drop.txt").write_text("drop")
    result = run_wrk(server, [tmp_path / "drop.txt"], concurrency=2, duration_s=1)
    assert result.ok == 0 and result.lost > 0 and result.sent == result.lost


def test_a_refused_key_is_renewed_once_and_the_request_sent_again(server):
    """The key expires mid-run: the first client refused renews it (once, for all), and every
    refused request is sent again with the new key, so none fails."""
    Known.keys = {"Bearer new"}
    Known.seen.clear()
    renewals: list[int] = []

    def renew() -> str:
        renewals.append(1)
        time.sleep(0.05)  # the management API's answer: other clients are refused meanwhile
        return "Bearer new"

    auth = Auth("Bearer old", renew)
    result = run_load(server, payloads("ok", "bad"), concurrency=4, requests=40, duration_s=None,
                      headers={"Authorization": "Bearer ignored"}, auth=auth)
    summary = result.summary()
    assert (summary["sent"], summary["ok"], summary["errors"], summary["lost"]) == (40, 20, {"400": 20}, 0)
    assert renewals == [1] and summary["key_renewals"] == 1 and auth.header == "Bearer new"
    assert 1 <= summary["retried"] <= 4  # the requests in flight with the old key, each once
    assert Known.seen.count("Bearer old") == summary["retried"]
    assert "Bearer ignored" not in Known.seen  # the Auth's header wins


def test_a_key_that_cannot_be_renewed_is_said_and_the_load_goes_on(server):
    Known.keys = {"Bearer new"}

    def renew() -> str:
        raise APIError("renewing the expired inference key failed: TorchServe answered 400")

    result = run_load(server, payloads("ok"), concurrency=2, requests=10, duration_s=None,
                      auth=Auth("Bearer old", renew))
    summary = result.summary()
    assert (summary["sent"], summary["errors"], summary["retried"]) == (10, {"400": 10}, 0)
    assert "TorchServe answered 400" in summary["key_error"]
    # the same key read back (a wrong key, not an expired one): not sent again either
    result = run_load(server, payloads("ok"), concurrency=2, requests=10, duration_s=None,
                      auth=Auth("Bearer old", lambda: "Bearer old"))
    assert (result.errors, result.retried, result.key_renewals) == ({400: 10}, 0, 0)


@needs_wrk
def test_wrk_runs_in_rounds_that_end_before_the_key_expires(server, tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    keys = iter(["Bearer k2", "Bearer k3", "Bearer k4"])
    expiry = {"at": time.time() + 2.3}  # a 2.3 s key: a 1 s round, then a renewal

    def renew() -> str:
        key = next(keys)
        Known.keys = {key}
        expiry["at"] = time.time() + 2.3
        return key

    Known.keys = {"Bearer k1"}
    Known.seen.clear()
    said: list[str] = []
    result = run_wrk(server, [tmp_path / "ok.txt"], concurrency=2, duration_s=3,
                     auth=Auth("Bearer k1", renew), key_expires_at=lambda: expiry["at"],
                     progress=said.append)
    summary = result.summary()
    assert summary["rounds"] == 3 and summary["key_renewals"] == 2
    assert summary["errors"] == {} and summary["lost"] == 0 and summary["ok"] == summary["sent"] > 0
    assert set(Known.seen) == {"Bearer k1", "Bearer k2", "Bearer k3"}
    assert any("rounds" in line for line in said)
    # percentiles of the three rounds together: ordered, and each answer took the server's 10 ms
    assert 10 <= summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]


@needs_wrk
def test_wrk_refuses_a_key_too_short_lived_for_its_rounds(server, tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    expiry = {"at": time.time() + 0.3}

    def renew() -> str:
        expiry["at"] = time.time() + 0.6  # token_expiration_min=0.01
        return "Bearer short"

    with pytest.raises(LoadError, match="use --engine python"):
        run_wrk(server, [tmp_path / "ok.txt"], concurrency=1, duration_s=2,
                auth=Auth("Bearer k1", renew), key_expires_at=lambda: expiry["at"])


def test_wrk_rounds_merge_into_one_distribution():
    from servetool.bench.serve import WRK_PERCENTILES, _merged_latency

    def report(requests: int, scale: float) -> dict:
        curve = [scale * (1000 + 10 * p) for p in WRK_PERCENTILES]  # 1 ms to 2 ms, uniform
        return {"requests": requests, "latency_us": curve, "p50_us": scale * 1500,
                "p90_us": scale * 1900, "p99_us": scale * 1990, "mean_us": scale * 1500}

    one = _merged_latency([report(100, 1.0)])
    assert one == {"p50_ms": 1.5, "p90_ms": 1.9, "p99_ms": 1.99, "mean_ms": 1.5}
    same = _merged_latency([report(100, 1.0), report(300, 1.0)])
    assert same["p50_ms"] == pytest.approx(1.5, abs=0.011)
    assert same["p99_ms"] == pytest.approx(1.99, abs=0.011)
    # a slow round of 100 answers (10 to 20 ms) beside 900 fast ones: only the tail moves
    mixed = _merged_latency([report(900, 1.0), report(100, 10.0)])
    assert mixed["p50_ms"] == pytest.approx(1.556, abs=0.02)
    assert mixed["p99_ms"] == pytest.approx(19.0, abs=0.2)
    assert mixed["mean_ms"] == pytest.approx(0.9 * 1.5 + 0.1 * 15, abs=0.01)
