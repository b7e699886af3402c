"""Crashes heal: a killed JVM is reported as a crash, `stop` leaves nothing behind, `deploy` brings
back every model with its worker count, and the opt-in supervisor does it unasked."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from servetool.engines.torchserve import process
from servetool.engines.torchserve.management import Client
from servetool.operate import lifecycle, supervise
from servetool.operate.companions import COMPANIONS
from servetool.targets.local import LocalTarget
from tests.conftest import DIGITS, server_options
from tests.test_cli import run
from tests.test_server import http_predict

pytestmark = pytest.mark.server
SAMPLE = (DIGITS / "samples" / "digit_7.png").read_bytes()


@pytest.fixture
def target(tmp_path, model_store):
    # as `servetool deploy` makes it: its status shows the supervisor, and stop ends it first
    target = LocalTarget(server_options(tmp_path / "run", model_store), companions=COMPANIONS)
    yield target
    target.down()


def kill_jvm(target: LocalTarget) -> None:
    state = target.running()
    pid = process._member_with(state.pid, process.JVM_MARK)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process._member_with(state.pid, process.JVM_MARK) and time.monotonic() < deadline:
        time.sleep(0.05)


def deploy_and_scale(target: LocalTarget) -> None:
    lifecycle.deploy(target, ["digits_ts", "digits_tensor"])
    assert len(target.scale("digits_ts", 2)["workers"]) == 2


def workers_of(target: LocalTarget) -> dict[str, int]:
    return {m["name"]: len(m["workers"]) for m in target.status()["models"]}


def test_a_crash_is_reported_and_stop_leaves_no_process(target):
    deploy_and_scale(target)
    pgid = target.running().pid
    kill_jvm(target)
    assert target.condition() == "crashed"
    # the workers outlive the JVM for a while: they are what `stop` must not leave behind
    status = run("status", "--run-dir", str(target.opts.run_dir))
    assert status.returncode == 1, status.stdout + status.stderr
    assert "has crashed" in status.stdout and "ts_log.log" in status.stdout
    stopped = run("stop", "--run-dir", str(target.opts.run_dir))
    assert stopped.returncode == 0 and "had crashed" in stopped.stdout
    assert process.group_members(pgid) == []
    assert target.condition() == "stopped"
    assert "no TorchServe running" in run("status", "--run-dir", str(target.opts.run_dir)).stdout


def test_deploy_after_a_crash_restores_every_model_with_its_workers(target):
    deploy_and_scale(target)
    before = workers_of(target)
    kill_jvm(target)
    result = lifecycle.deploy(target, ["digits_tensor"])  # names one model; both come back
    assert result["server_started"] is True
    assert {m["name"]: m["action"] for m in result["models"]} == {"digits_tensor": "restored",
                                                                  "digits_ts": "restored"}
    assert workers_of(target) == before == {"digits_ts": 2, "digits_tensor": 1}
    reply = http_predict(target.running(), "digits_ts", SAMPLE)
    assert reply.status_code == 200 and next(iter(reply.json())) == "seven"


def test_the_supervisor_brings_a_crashed_server_back_unasked(target):
    deploy_and_scale(target)
    pid = supervise.launch(target.opts)
    assert supervise.running_pid(target.opts.run_dir) == pid and target.status()["supervised"]
    kill_jvm(target)
    crashed = time.monotonic()
    state, answered = None, False
    while time.monotonic() - crashed < 120 and not answered:  # a bound on the wait, not a goal
        state = target.running()
        try:
            answered = state is not None and http_predict(state, "digits_ts", SAMPLE).status_code == 200
        except (requests.RequestException, OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    print(f"crash to first good answer: {time.monotonic() - crashed:.1f} s")
    assert answered  # back unasked; how fast: benchmarks/crash_recovery.py
    log_file = supervise.daemon(target.opts.run_dir).log
    deadline = time.monotonic() + 60  # the other model may still be registering
    while "restarted in" not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "TorchServe crashed" in log_file.read_text() and "restarted in" in log_file.read_text()
    assert workers_of(target) == {"digits_ts": 2, "digits_tensor": 1}
    assert Client(state).describe("digits_ts")[0]["minWorkers"] == 2
    # stop ends the supervisor first: nothing brings the server back afterwards
    assert target.down() is True
    assert supervise.running_pid(target.opts.run_dir) is None
    time.sleep(2.5)
    assert target.condition() == "stopped"
