"""The load generator's accounting against a synthetic server whose answers are known exactly."""

from __future__ import annotations

import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from servetool.bench.serve import load_payloads, run_load, run_wrk, write_outputs, wrk_path


class Known(BaseHTTPRequestHandler):
    """Answers by body: ok -> 200 after 10 ms, bad -> 400, busy -> 503, drop -> no answer."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        Known.seen.append(self.headers.get("Authorization", ""))
        if body == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if body == "ok":
            time.sleep(0.01)
        status = {"ok": 200, "bad": 400, "busy": 503}[body]
        reply = json.dumps({"body": body}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
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
    assert 10 <= summary["p50_ms"] < 200  # only 2xx latencies, each >= the server's 10 ms
    assert 0 <= summary["generator_cpu_share"] < 2.0


def test_duration_mode_stops_on_time_with_no_loss(server):
    result = run_load(server, payloads("ok"), concurrency=8, duration_s=1.0)
    summary = result.summary()
    assert 0.9 <= summary["duration_s"] < 3.0
    assert summary["lost"] == 0 and summary["errors"] == {}
    assert summary["sent"] == summary["ok"] > 100  # 8 clients x 10 ms answers for ~1 s
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
    assert summary["ok"] + sum(summary["errors"].values()) == summary["sent"] > 30
    # the three bodies take turns, so each status holds about a third of the answers
    assert abs(summary["ok"] - summary["errors"]["400"]) <= 3 + summary["sent"] // 10
    assert 10 <= summary["p50_ms"] < 200 and set(Known.seen) == {"Bearer w"}
    assert Path(write_outputs(result, tmp_path / "out", "w")["png"]).is_file()


@needs_wrk
def test_wrk_engine_counts_dropped_connections_as_lost(server, tmp_path):
    (tmp_path / "drop.txt").write_text("drop")
    result = run_wrk(server, [tmp_path / "drop.txt"], concurrency=2, duration_s=1)
    assert result.ok == 0 and result.lost > 0 and result.sent == result.lost
