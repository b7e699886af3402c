"""The run folder's lock and files: private to their user (0700 folder, 0600 files), a lock held
elsewhere is waited for with a deadline and named (never a hang), another user's lock file or a
planted link is refused at once, and `scale` holds the lock from before TorchServe changes until the
record holds the new count. Real processes throughout: a second servetool process holds the lock,
and a child running as `nobody` tries what the attacker of issue 22 did."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from servetool import runfiles
from servetool.engines.torchserve.management import Client
from servetool.operate import lifecycle
from servetool.runfiles import LockBusy, RunFileError
from servetool.targets.local import LocalTarget
from servetool.targets.record import LOCK_FILE, RECORD_FILE, locked, read_record
from tests.conftest import ROOT, server_options
from tests.test_cli import run

NOBODY = 65534
MODEL = "digits_ts"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


class Holder:
    """Another servetool process holding the run folder's lifecycle lock until told to let go."""

    def __init__(self, run_dir: Path) -> None:
        code = textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from servetool.targets.record import locked
            with locked(Path({str(run_dir)!r}), timeout_s=30):
                print("held", flush=True)
                sys.stdin.readline()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


# --- without a server ----------------------------------------------------------------------------
def test_a_lock_held_by_another_process_times_out_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    said: list[str] = []
    with Holder(run_dir) as holder:
        started = time.monotonic()
        with pytest.raises(LockBusy) as caught, locked(run_dir, said.append, timeout_s=1):
            pytest.fail("the lock was had while another process held it")
        waited = time.monotonic() - started
    assert 1 <= waited < 10
    assert f"held by pid {holder.pid}" in str(caught.value)
    assert str(run_dir / LOCK_FILE) in str(caught.value)
    assert said and said[0].startswith(f"waiting for the lock held by pid {holder.pid}")
    # once let go, it is had at once
    with locked(run_dir, said.append, timeout_s=0):
        pass


def test_another_users_lock_file_is_refused_at_once(tmp_path):
    if os.getuid() != 0:
        pytest.skip("making a file another user's takes root")
    run_dir = runfiles.private_folder(tmp_path / "run")
    lock = run_dir / LOCK_FILE
    lock.touch()
    os.chown(lock, NOBODY, NOBODY)
    started = time.monotonic()
    with pytest.raises(RunFileError) as caught, locked(run_dir, timeout_s=30):
        pytest.fail("another user's lock file was used")
    assert time.monotonic() - started < 5  # refused, not waited for
    message = str(caught.value)
    assert str(lock) in message and f"uid {NOBODY}" in message and "nobody" in message
    assert "--run-dir" in message and "rm " in message
    assert os.stat(lock).st_uid == NOBODY  # left as it was


def test_a_lock_file_that_is_a_link_or_not_a_file_is_refused(tmp_path):
    run_dir = runfiles.private_folder(tmp_path / "run")
    elsewhere = tmp_path / "victim"
    elsewhere.write_text("keep me\n")
    os.chmod(elsewhere, 0o644)
    (run_dir / LOCK_FILE).symlink_to(elsewhere)
    with pytest.raises(RunFileError, match="symbolic link"), locked(run_dir, timeout_s=1):
        pass
    assert elsewhere.read_text() == "keep me\n" and mode(elsewhere) == 0o644
    (run_dir / LOCK_FILE).unlink()
    os.mkfifo(run_dir / LOCK_FILE)
    with pytest.raises(RunFileError, match="not a regular file"), \
            locked(run_dir, timeout_s=1):
        pass


def test_a_shared_folder_is_no_run_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(RunFileError, match="sticky"):
        runfiles.private_folder(shared)
    assert mode(shared) == 0o1777


def test_the_lock_timeout_is_configurable(monkeypatch):
    monkeypatch.delenv(runfiles.LOCK_TIMEOUT_ENV, raising=False)
    assert runfiles.lock_timeout_s() == 60
    monkeypatch.setenv(runfiles.LOCK_TIMEOUT_ENV, "2.5")
    assert runfiles.lock_timeout_s() == 2.5


# --- on a real TorchServe ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store):
    """digits_ts (one worker) served from a run folder an older servetool left readable by all."""
    run_dir = tmp_path_factory.mktemp("locks") / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    old_lock = run_dir / LOCK_FILE
    old_lock.touch()
    old_lock.chmod(0o644)
    target = LocalTarget(server_options(run_dir, model_store))
    lifecycle.deploy(target, [MODEL])
    yield target
    target.down()


def workers(target: LocalTarget) -> int:
    described = Client(target.require_running()).describe(MODEL, None)[0]
    return len(described.get("workers", []))


def recorded_workers(target: LocalTarget) -> int | None:
    model = read_record(target.opts.run_dir)[MODEL]
    return model["versions"][model["default"]]["workers"]


@pytest.mark.server
def test_lock_state_and_key_files_are_private_in_a_private_run_folder(server):
    server.scale(MODEL, 1)
    run_dir = server.opts.run_dir
    assert mode(run_dir) == 0o700  # it was 0755: fixed when servetool started in it
    for name in (LOCK_FILE, RECORD_FILE, "server.json", "key_file.json",
                 "front_key.json"):
        assert mode(run_dir / name) == 0o600, name
        assert os.stat(run_dir / name).st_uid == os.getuid()
    assert not list(run_dir.glob("*.partial")) and not list(run_dir.glob(".*.partial"))
    if os.getuid() != 0:
        return
    # the probe's attacker: another local user can no longer open the lock (nor read a key)
    for name in (LOCK_FILE, "key_file.json"):
        tried = subprocess.run(["cat", str(run_dir / name)], preexec_fn=as_nobody,
                               capture_output=True, text=True, timeout=30)
        assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried
    control = subprocess.run(["cat", "/etc/passwd"], preexec_fn=as_nobody, capture_output=True,
                             timeout=30)
    assert control.returncode == 0  # the child did run, as nobody


@pytest.mark.server
def test_a_scale_waits_for_the_lock_before_it_changes_torchserve(server):
    server.scale(MODEL, 1)
    said: list[str] = []
    target = LocalTarget(server.opts, said.append)
    box: dict = {}
    with Holder(server.opts.run_dir) as holder:
        thread = threading.Thread(target=lambda: box.setdefault("result", target.scale(MODEL, 2)))
        thread.start()
        deadline = time.monotonic() + 30
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said and said[0].startswith(f"waiting for the lock held by pid {holder.pid}"), said
        time.sleep(0.5)
        assert workers(server) == 1 and recorded_workers(server) == 1  # nothing changed yet
    thread.join(timeout=120)
    assert len(box["result"]["workers"]) == 2
    assert workers(server) == 2 and recorded_workers(server) == 2
    server.scale(MODEL, 1)


@pytest.mark.server
def test_a_scale_that_cannot_have_the_lock_fails_and_changes_nothing(server, monkeypatch):
    server.scale(MODEL, 1)
    monkeypatch.setenv(runfiles.LOCK_TIMEOUT_ENV, "1")
    with Holder(server.opts.run_dir) as holder:
        started = time.monotonic()
        with pytest.raises(LockBusy, match=f"held by pid {holder.pid}"):
            server.scale(MODEL, 3)
        assert time.monotonic() - started < 10
        # the command a person runs: a clear error, not a hang
        where = ("--run-dir", str(server.opts.run_dir), "--model-store", str(server.opts.model_store))
        env = {**os.environ, runfiles.LOCK_TIMEOUT_ENV: "1"}
        scaled = run("scale", MODEL, "--workers", "3", *where, env=env, timeout=60)
        assert scaled.returncode == 1 and "Traceback" not in scaled.stderr, scaled.stderr
        waiting, error = scaled.stderr.strip().splitlines()[0], scaled.stderr.strip().splitlines()[-1]
        assert waiting.startswith(f"... waiting for the lock held by pid {holder.pid}"), waiting
        assert error.startswith("error: ") and f"held by pid {holder.pid}" in error
        assert str(server.opts.run_dir / LOCK_FILE) in error
    assert workers(server) == 1 and recorded_workers(server) == 1
    record = json.loads((server.opts.run_dir / RECORD_FILE).read_text())
    assert record["models"][MODEL]["default"]
