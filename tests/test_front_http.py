"""servetool's own listeners under a client that does not play by the rules, and the helpers that
come back when they die (issue 22).

One small real server (`deploy --split`: TorchServe, servetool's management front on the
management port, HAProxy and its exporter on the inference port) and a gateway in front of it.
Every listener refuses a broken Content-Length, a Content-Length beside Transfer-Encoding and an
oversized head with 400 and a closed connection; the front and the gateway answer a body over
their limit before reading it, and close a connection whose body they did not read, so nothing a
client sends can be read as a second request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from servetool.engines.torchserve import pod
from servetool.targets.local import LocalTarget
from tests.conftest import ROOT, server_options
from tests.test_gateway import start_gateway

POD = ROOT / "servetool" / "engines" / "torchserve" / "pod.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("empty_store")
    opts = server_options(tmp_path_factory.mktemp("front_run"), store)
    opts.split = True
    target = LocalTarget(opts)
    state, _ = target.up()
    yield target, state
    target.down()


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    _, state = server
    keys = tmp_path_factory.mktemp("gateway_keys")
    (keys / "key").write_text("gateway-key")
    proc, base = start_gateway(Path(state.run_dir), Path(state.run_dir) / "config.properties", keys)
    yield int(base.rsplit(":", 1)[1])
    proc.terminate()
    proc.wait(10)


def front_key(state) -> str:
    return json.loads((Path(state.run_dir) / pod.FRONT_KEY_FILE).read_text())["management"]["key"]


def exchange(port: int, raw: bytes, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; what came back, and whether the server closed the connection (within
    wait_s of its last byte)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it read everything: still read what it answered
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk


def statuses(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def listeners(server, gateway) -> dict[str, int]:
    _, state = server
    return {"front": state.ports["management"], "gateway": gateway,
            "split (HAProxy)": state.ports["inference"]}


@pytest.mark.parametrize("head", [
    "GET /token HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello12",
    "POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    "POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    "0\r\n\r\n",
    "POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "GET /token HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * 70000 + "\r\n\r\n",
], ids=["negative", "conflicting", "not-a-number", "with-transfer-encoding", "odd-encoding",
        "oversized-head"])
def test_broken_framing_is_refused_and_closed_on_every_listener(server, gateway, head):
    for name, port in listeners(server, gateway).items():
        data, closed = exchange(port, head.encode())
        assert statuses(data) and 400 <= statuses(data)[0] < 600, (name, data[:200])
        assert statuses(data)[0] != 200 and closed, (name, data[:300])


def test_a_body_over_the_limit_is_answered_before_it_is_sent(server, gateway):
    """The old front buffered ~200 MB for `Content-Length: -1` on /token without any key."""
    _, state = server
    huge = "POST /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n" \
           "Content-Length: 300000000\r\n\r\n"
    cases = {state.ports["management"]: front_key(state), gateway: "gateway-key"}
    for port, key in cases.items():
        data, closed = exchange(port, huge.format(key=key).encode())  # the body never comes
        assert statuses(data) == [413] and closed, data[:300]
    data, closed = exchange(state.ports["management"],
                            b"GET /token?type=inference HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 300000000\r\n\r\n")
    assert statuses(data) == [413] and closed, data[:300]


def test_a_refusal_never_lets_the_unread_body_be_read_as_a_second_request(server, gateway):
    _, state = server
    smuggled = b"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + \
        front_key(state).encode() + b"\r\n\r\n"
    for port in (state.ports["management"], gateway):
        raw = b"POST /models HTTP/1.1\r\nHost: x\r\nContent-Length: " + \
            str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled  # no key: refused unread
        data, closed = exchange(port, raw)
        assert statuses(data) == [401] and closed, data[:400]


def test_a_missing_or_wrong_key_is_401_with_a_challenge(server, gateway):
    _, state = server
    for port, realm in ((state.ports["management"], "servetool-management"),
                        (gateway, "servetool-gateway")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            reply = requests.get(f"http://127.0.0.1:{port}/models", headers=headers, timeout=10)
            assert reply.status_code == 401, reply.text
            assert reply.headers["WWW-Authenticate"] == f'Bearer realm="{realm}"'
            assert "key" in reply.json()["error"]


def test_a_head_sent_a_byte_at_a_time_does_not_hold_the_connection(server, tmp_path):
    """A front of its own with a 1 s deadline for a request's head."""
    _, state = server
    port = pod_free_port()
    env = {**os.environ, "SERVETOOL_WORK_DIR": state.run_dir, "SERVETOOL_HEAD_TIMEOUT_S": "1",
           "SERVETOOL_TS_CONFIG": str(Path(state.run_dir) / "config.properties")}
    proc = subprocess.Popen([sys.executable, str(POD), "front", f"127.0.0.1:{port}"], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        wait_answering(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server, before our 10 s timeout
            assert time.monotonic() - started < 9
        key = front_key(state)  # a complete request on a new connection is still answered
        reply = requests.get(f"http://127.0.0.1:{port}/models", timeout=10,
                             headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
    finally:
        proc.terminate()
        proc.wait(10)


def pod_free_port() -> int:
    from servetool.engines.torchserve.process import free_ports

    return free_ports(("front",))["front"]


def wait_answering(port: int, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing answers on {port}")


class Load:
    """Requests in a loop on another thread while a helper is killed: what each one got."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        import threading

        self.url, self.headers, self.results, self.errors = url, headers, [], []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stopping.is_set():
                try:
                    self.results.append(session.get(self.url, headers=self.headers,
                                                    timeout=10).status_code)
                except requests.RequestException as exc:
                    self.results.append(None)  # refused while the helper was down
                    self.errors.append(repr(exc)[:200])
                    time.sleep(0.02)

    def until_back(self, state, name: str, old: int, deadline_s: float = 30) -> list:
        """Wait until the keeper started a new `name` and 20 requests after that were answered
        200, then stop; all results."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and kept_pid(state, name) == old:
            time.sleep(0.05)
        since = len(self.results)
        while time.monotonic() < deadline and self.results[since:][-20:] != [200] * 20:
            time.sleep(0.05)
        self.stopping.set()
        self.thread.join(15)
        return self.results


def kept_pid(state, name: str) -> int:
    return json.loads((Path(state.run_dir) / f"supervised-{name}.json").read_text())["pid"]


def test_a_killed_front_comes_back_under_load_with_the_same_key(server):
    target, state = server
    key = front_key(state)
    old = kept_pid(state, "front")
    load = Load(f"http://127.0.0.1:{state.ports['management']}/models",
                {"Authorization": f"Bearer {key}"})
    time.sleep(0.5)
    os.kill(old, signal.SIGKILL)
    results = load.until_back(state, "front", old)
    # every request was either answered 200 or refused outright while the front was down: none
    # got a wrong answer, and the client's key works again after the restart
    assert set(results) <= {200, None} and results[-20:] == [200] * 20, (results[-40:], load.errors)
    assert kept_pid(state, "front") != old
    helpers = target.status()["helpers"]
    assert helpers["front"]["restarts"] >= 1
    assert helpers["front"]["crashes"][-1]["reason"] == "killed by SIGKILL"


def test_a_killed_split_comes_back_under_load(server):
    target, state = server
    inference_key = json.loads(Path(state.key_file).read_text())["inference"]["key"]
    old = kept_pid(state, "split")
    load = Load(f"http://127.0.0.1:{state.ports['inference']}/ping",
                {"Authorization": f"Bearer {inference_key}"})
    time.sleep(0.5)
    os.kill(old, signal.SIGKILL)  # the runtime; HAProxy ends with it and comes back with the new
    results = load.until_back(state, "split", old)
    assert set(results) <= {200, 503, None} and results[-20:] == [200] * 20, (results[-40:], load.errors)
    assert kept_pid(state, "split") != old
    assert target.status()["helpers"]["split"]["restarts"] >= 1


def test_the_management_key_survives_a_restart_of_the_server(server):
    target, state = server
    key = front_key(state)
    target.down()
    state, _ = target.up()
    reply = requests.get(f"http://127.0.0.1:{state.ports['management']}/models", timeout=10,
                         headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
