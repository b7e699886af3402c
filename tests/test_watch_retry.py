"""The watcher under failures that pass and crashes, on a real TorchServe: a full disk (a real one:
the model store is a small tmpfs) retried with a backoff until space returns, a failed version
uploaded again with the same bytes (a folder's new ctime, a bucket's new LastModified with the same
ETag), symbolic links in a watched folder refused, and a watcher killed with SIGKILL in the middle
of an install, after which deployed.json and TorchServe agree again."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from servetool.engines.torchserve.management import APIError
from servetool.operate import lifecycle, watch
from servetool.operate.lifecycle import Lifecycle
from servetool.operate.sources import MODEL_FOLDER, FolderSource, Published, SourceError, bucket_transient
from servetool.operate.watch import Watcher, describe, transient_reason
from servetool.targets.common import DeployError
from servetool.targets.local import LocalTarget
from servetool.targets.record import locked, read_record
from tests.conftest import server_options
from tests.test_lifecycle import answering, bucket, publish, rewrite_archive  # noqa: F401

MODEL = "wr"
CLI = str(Path(sys.executable).with_name("servetool"))


# --- without a server ----------------------------------------------------------------------------
def test_failures_are_judged_temporary_or_permanent():
    import botocore.exceptions as boto

    assert transient_reason(OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on the device"
    assert transient_reason(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:  # servetool's client says "cannot reach TorchServe" and drops the cause from the message
        try:
            raise requests.ConnectionError("refused")
        except requests.ConnectionError:
            raise APIError("cannot reach TorchServe at http://127.0.0.1:1") from None
    except APIError as exc:
        assert transient_reason(exc) == "TorchServe could not be reached"
    assert transient_reason(APIError("busy", 503)) == "TorchServe answered 503"
    assert transient_reason(DeployError("registering x failed ... No space left on device"))
    assert bucket_transient(boto.EndpointConnectionError(endpoint_url="http://minio:9000"))
    assert bucket_transient(boto.ReadTimeoutError(endpoint_url="http://minio:9000"))
    slow_down = boto.ClientError({"Error": {"Code": "SlowDown"},
                                  "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    assert transient_reason(SourceError("x", transient=bucket_transient(slow_down))) == \
        "the bucket answered 503 SlowDown"
    # permanent: what publishing again with the same content would fail the same way
    missing = boto.ClientError({"Error": {"Code": "NoSuchKey"},
                                "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
    assert bucket_transient(missing) == ""
    assert transient_reason(APIError("Failed to start workers", 500)) == ""
    assert transient_reason(DeployError("max abs diff 0.02 > atol 0")) == ""
    assert transient_reason(watch.WatchError("has SHA-256 0123..., its READY marker names")) == ""
    assert transient_reason(FileNotFoundError(errno.ENOENT, "gone")) == ""


def test_a_temporary_failure_backs_off_to_a_cap_and_a_new_upload_is_tried_again(tmp_path):
    target = SimpleNamespace(opts=SimpleNamespace(run_dir=tmp_path), running=lambda: None)
    watcher = Watcher(target, FolderSource(tmp_path), say=lambda _: None, retry_base_s=30,
                      retry_max_s=100, retry_attempts=4)
    item = Published(MODEL, "2.0", True, "f1", ("wr.mar",), uploaded="100")
    full = OSError(errno.ENOSPC, "No space left on device")
    delays = []
    for attempt in range(1, 5):
        before = time.time()
        event = watcher._failed(item, full)
        assert (event["attempts"], event["transient"]) == (attempt, "no space left on the device")
        if attempt < 4:
            delays.append(round(event["retry_at_s"] - before))
            assert f"attempt {attempt} of 4" in event["detail"] and event["retry_at"]
    assert delays == [30, 60, 100]  # doubling, capped
    assert event["retry_at"] is None and "the last of 4" in event["detail"]
    seen = watcher.state["versions"][MODEL]["2.0"]
    assert not watcher._due(seen, item)  # the last attempt failed: it waits
    # published again: the same bytes (fingerprint) uploaded anew (a new ctime or LastModified)
    assert watcher._due(seen, Published(MODEL, "2.0", True, "f1", ("wr.mar",), uploaded="200"))
    assert watcher._due(seen, Published(MODEL, "2.0", True, "f2", ("wr.mar",), uploaded="100"))
    # a new upload starts the count again; a permanent failure has no retry time
    event = watcher._failed(Published(MODEL, "2.0", True, "f1", uploaded="200"), ValueError("x"))
    assert (event["attempts"], event["transient"], event["retry_at"]) == (1, "", None)
    # a retry is due once its time has come
    event = watcher._failed(item, full)
    seen = watcher.state["versions"][MODEL]["2.0"]
    assert not watcher._due(seen, item)
    seen["retry_at_s"] = time.time() - 1
    assert watcher._due(seen, item)


def test_a_folder_source_refuses_symbolic_links_and_never_follows_one(tmp_path):
    source, elsewhere = tmp_path / "published", tmp_path / "elsewhere"
    real = publish(elsewhere, MODEL, "5.0", Path(__file__))
    publish(source, MODEL, "4.0", Path(__file__))
    (source / MODEL / "5.0").symlink_to(real)  # a version folder
    publish(source, MODEL, "5.1", ready=True)
    (source / MODEL / "5.1" / f"{MODEL}.mar").symlink_to(real / f"{MODEL}.mar")  # a file in one
    (source / "linked").symlink_to(elsewhere / MODEL)  # a model folder
    found = {(p.model, p.version): p for p in FolderSource(source).scan()}
    assert set(found) == {(MODEL, "4.0"), (MODEL, "5.0"), (MODEL, "5.1"), ("linked", MODEL_FOLDER)}
    assert not found[MODEL, "4.0"].refused and found[MODEL, "4.0"].files == (f"{MODEL}.mar",)
    assert "version folder" in found[MODEL, "5.0"].refused
    assert "symbolic link" in found[MODEL, "5.1"].refused and not found[MODEL, "5.1"].files
    assert "model folder" in found["linked", MODEL_FOLDER].refused
    for item in (found[MODEL, "5.0"], found[MODEL, "5.1"]):
        with pytest.raises(SourceError, match="symbolic link"):
            FolderSource(source).fetch(item, tmp_path / "stage")
    # a link swapped in between the listing and the copy is refused as well
    good = found[MODEL, "4.0"]
    (source / MODEL / "4.0" / f"{MODEL}.mar").unlink()
    (source / MODEL / "4.0" / f"{MODEL}.mar").symlink_to("/etc/passwd")
    with pytest.raises(SourceError, match="symbolic link"):
        FolderSource(source).fetch(good, tmp_path / "stage2")
    assert not (tmp_path / "stage2" / f"{MODEL}.mar").exists()


# --- a real TorchServe, its model store on a small file system ------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The model store on a tmpfs of its own (a disk that can really fill up); a plain folder
    where nothing can be mounted (the full-disk tests are then skipped, and fail under CI)."""
    path = tmp_path_factory.mktemp("small-store")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs",
                              str(path)], capture_output=True, text=True)
    yield path, (mounted.stderr.strip() or "mount failed") if mounted.returncode else None
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def needs_tmpfs(store) -> Path:
    path, problem = store
    if problem:
        message = f"no tmpfs could be mounted for a full disk here (root is needed): {problem}"
        if os.environ.get("SERVETOOL_CI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory, model_store):
    """Model `wr` 1.0 (ONNX, one worker: the session's digits archive rewritten), and the same as
    other versions: rewritten, not packaged again; `slow` starts its workers 6 s late, which
    leaves time to kill a watcher mid-install."""
    built = tmp_path_factory.mktemp("wr-built")
    first = rewrite_archive(model_store / "digits.mar", built / "1.0" / f"{MODEL}.mar", name=MODEL,
                            version="1.0", workers=1)
    return {"1.0": first, "built": built}


def version_of(archives: dict, version: str, *, slow: float = 0) -> Path:
    path = archives["built"] / f"{version}{'-slow' if slow else ''}" / f"{MODEL}.mar"
    if not path.exists():
        rewrite_archive(archives["1.0"], path, version=version)
        if slow:
            staged = path.with_suffix(".tmp")
            with zipfile.ZipFile(path) as zin, zipfile.ZipFile(staged, "w") as zout:
                for info in zin.infolist():
                    data = zin.read(info)
                    if info.filename == "entry.py":
                        data = data.replace(b"import numpy as np\n", b"import numpy as np\n"
                                            + f"__import__('time').sleep({slow})\n".encode(), 1)
                    zout.writestr(info, data)
            os.replace(staged, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, archives, store):
    path = store[0]
    (path / f"{MODEL}.mar").write_bytes(archives["1.0"].read_bytes())
    target = LocalTarget(server_options(tmp_path_factory.mktemp("wr-run"), path))
    lifecycle.deploy(target, [MODEL])
    yield target
    target.down()


@contextlib.contextmanager
def disk_full(path: Path):
    """Fill the file system under `path` to the last byte, until the block ends."""
    filler = path / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):  # unbuffered: nothing left to flush at the close
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    try:
        yield filler
    finally:
        filler.unlink(missing_ok=True)


def next_events(watcher: Watcher, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = watcher.check_once()
        if events:
            return events
        time.sleep(0.2)
    raise AssertionError(f"no event within {timeout_s} s")


def agree(target: LocalTarget) -> dict:
    """deployed.json and TorchServe say the same: versions, default, no install half done."""
    life = Lifecycle(target)
    record = read_record(Path(target.opts.run_dir))
    for name, model in record.items():
        assert lifecycle.INTENT not in model, model
        assert set(model["versions"]) == set(life.registered(name)), (name, model)
        assert life.server_default(name) == model["default"], (name, model)
    return record[MODEL]


def versions_text(target: LocalTarget) -> str:
    proc = subprocess.run([CLI, "versions", MODEL, "--run-dir", str(target.opts.run_dir),
                           "--model-store", str(target.opts.model_store)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_full_disk_is_retried_with_a_backoff_and_served_once_space_returns(server, archives,
                                                                             store, tmp_path):
    path = needs_tmpfs(store)
    run_dir = Path(server.opts.run_dir)
    source = tmp_path / "published"
    source.mkdir()
    log: list[str] = []
    watcher = Watcher(server, FolderSource(source), say=log.append, retry_base_s=1.0,
                      retry_max_s=2.0, retry_attempts=5)
    with disk_full(path):
        publish(source, MODEL, "2.0", version_of(archives, "2.0"))
        [event] = watcher.check_once()
        assert event["outcome"] == "failed", event
        assert "No space left on device" in event["detail"] and "attempt 1 of 5" in event["detail"]
        assert (event["transient"], event["attempts"]) == ("no space left on the device", 1)
        assert event["retry_at"] and event["retry_at_s"] > time.time()
        # nothing half done: the record, TorchServe and the store as before
        assert "2.0" not in agree(server)["versions"]
        assert not [p.name for p in path.iterdir() if p.name.endswith(".partial")]
        assert watcher.check_once() == []  # before its time, not tried again
        [failed] = describe(run_dir)["failed"]  # what `status --json` shows
        assert (failed["version"], failed["attempts"]) == ("2.0", 1) and failed["retry_at"]
        text = versions_text(server)
        assert "2.0" in text and "temporary: no space left on the device" in text, text
        assert "retry at" in text, text
        # its time comes with the disk still full: the second attempt, the wait doubled
        [event] = next_events(watcher, 10)
        assert (event["outcome"], event["attempts"]) == ("failed", 2), event
        assert "(in 2 s)" in event["detail"]
    # space back: served at the next retry, without being published again
    [event] = next_events(watcher, 10)
    assert event["outcome"] == "serving", event
    assert answering(server, MODEL) == "2.0"
    record = agree(server)
    assert record["default"] == "2.0" and record["versions"]["2.0"]["source"] == str(source)
    assert describe(run_dir)["failed"] == []
    assert watcher.check_once() == []


def test_a_failed_version_published_again_with_the_same_bytes_is_tried_again(
        server, archives, store, tmp_path, bucket):  # noqa: F811 (the fixture)
    path = needs_tmpfs(store)
    # a folder: the files rewritten with their old mtimes (`cp -p`): the same fingerprint
    source = FolderSource(tmp_path / "published")
    (tmp_path / "published").mkdir()
    watcher = Watcher(server, source, say=print, retry_base_s=0.2, retry_attempts=1)
    with disk_full(path):
        folder = publish(source.root, MODEL, "3.0", version_of(archives, "3.0"))
        [event] = watcher.check_once()
        assert event["outcome"] == "failed" and event["retry_at"] is None, event
        assert "the last of 1" in event["detail"]
    time.sleep(0.5)
    assert watcher.check_once() == []  # no attempts left: it waits to be published again
    [before] = source.scan()
    for file in folder.iterdir():
        info = file.stat()
        file.write_bytes(file.read_bytes())
        os.utime(file, ns=(info.st_atime_ns, info.st_mtime_ns))
    [again] = source.scan()
    assert again.fingerprint == before.fingerprint and again.uploaded != before.uploaded
    [event] = watcher.check_once()
    assert event["outcome"] == "serving", event
    assert answering(server, MODEL) == "3.0"

    # a bucket: the same bytes uploaded again keep their ETag, LastModified tells
    s3, endpoint = bucket
    from servetool.operate.sources import BucketSource

    mar = version_of(archives, "4.0")
    key = f"team/{MODEL}/4.0"
    bucket_watcher = Watcher(server, BucketSource("s3://models/team", endpoint), say=print,
                             retry_attempts=1)
    with disk_full(path):
        s3.upload_file(str(mar), "models", f"{key}/{MODEL}.mar")
        s3.put_object(Bucket="models", Key=f"{key}/READY", Body=b"")
        [event] = bucket_watcher.check_once()
        assert event["outcome"] == "failed" and event["transient"], event
    assert bucket_watcher.check_once() == []
    etag = s3.head_object(Bucket="models", Key=f"{key}/{MODEL}.mar")["ETag"]
    time.sleep(1.1)  # S3 keeps LastModified to the second
    s3.upload_file(str(mar), "models", f"{key}/{MODEL}.mar")
    assert s3.head_object(Bucket="models", Key=f"{key}/{MODEL}.mar")["ETag"] == etag
    [event] = bucket_watcher.check_once()
    assert event["outcome"] == "serving", event
    assert answering(server, MODEL) == "4.0"
    agree(server)


def test_symbolic_links_in_a_watched_folder_and_the_store_are_refused(server, archives, tmp_path):
    source, elsewhere = tmp_path / "published", tmp_path / "elsewhere"
    real = publish(elsewhere, MODEL, "5.0", version_of(archives, "5.0"))
    (source / MODEL).mkdir(parents=True)
    (source / MODEL / "5.0").symlink_to(real)
    log: list[str] = []
    watcher = Watcher(server, FolderSource(source), say=log.append)
    [event] = watcher.check_once()
    assert (event["version"], event["outcome"]) == ("5.0", "refused"), event
    assert "is a symbolic link" in event["detail"] and str(real) in event["detail"]
    assert "5.0" not in Lifecycle(server).registered(MODEL)
    assert watcher.check_once() == []  # said once
    assert [r["version"] for r in describe(Path(server.opts.run_dir))["refused"]] == ["5.0"]
    assert "5.0" in versions_text(server)
    # the model folder a link: refused, and what it served before is not unloaded as removed
    (source / MODEL / "5.0").unlink()
    (source / MODEL).rmdir()
    (source / MODEL).symlink_to(elsewhere / MODEL)
    [event] = watcher.check_once()
    assert (event["version"], event["outcome"]) == (MODEL_FOLDER, "refused")
    assert "model folder" in event["detail"]
    assert watcher.check_once() == []
    # the model store: an archive that is a link is not installed
    store = Path(server.opts.model_store)
    (store / "linked.mar").symlink_to(real / f"{MODEL}.mar")
    try:
        with pytest.raises(DeployError, match="symbolic link"):
            Lifecycle(server).install(store / "linked.mar")
    finally:
        (store / "linked.mar").unlink()
    agree(server)


def intent_of(run_dir: Path) -> dict | None:
    return read_record(run_dir).get(MODEL, {}).get(lifecycle.INTENT)


def processes(*argv: str) -> list[int]:
    """Processes whose command line holds these arguments in this order (a keeper's holds its
    child's command too: the real process is the one whose own command it is)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
        except OSError:
            continue
        if proc.name.isdigit() and args[1:1 + len(argv)] == list(argv):
            found.append(int(proc.name))
    return found


def kill_mid_install(run_dir: Path, log: Path, pid: int, version: str) -> None:
    """SIGKILL the installing process once its registration of `version` has begun: the intent
    is in the record and it said it registers (TorchServe's management API answers nothing else
    during a synchronous registration, so TorchServe cannot be asked); the version's workers take
    6 s to start, so the kill lands inside the registration."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        intent = intent_of(run_dir)
        if intent and intent["version"] == version and \
                f"{MODEL} {version}: registering" in log.read_text():
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{pid} never began to register {version}: {log.read_text()}")
    time.sleep(1)  # the request is on its way
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
        time.sleep(0.05)
    record = read_record(run_dir)[MODEL]
    assert record[lifecycle.INTENT]["version"] == version and version not in record["versions"]


def test_a_watcher_killed_mid_install_leaves_record_and_engine_agreeing(server, archives, tmp_path):
    run_dir = Path(server.opts.run_dir).resolve()
    source = tmp_path / "published"
    source.mkdir()
    start = {"endpoint_url": None, "interval_s": 0.3, "keep": None, "metrics_port": 0}
    watcher = ("-m", "servetool.operate.watch", str(run_dir))
    watch.launch(server, str(source), **start)
    try:
        publish(source, MODEL, "6.0", version_of(archives, "6.0", slow=6))
        deadline = time.monotonic() + 20
        while not processes(*watcher) and time.monotonic() < deadline:
            time.sleep(0.05)
        [pid] = processes(*watcher)  # the watcher itself, under its keeper if it has one
        kill_mid_install(run_dir, run_dir / "watcher.log", pid, "6.0")
        # back (its keeper restarts it, else it is started again): it settles the install its
        # predecessor left (undone: TorchServe unregisters 6.0), then publishes 6.0 again
        watch.launch(server, str(source), **start)
        deadline = time.monotonic() + 120
        while watch.describe(run_dir)["events"].get(MODEL, {}).get("version") != "6.0" and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert watch.describe(run_dir)["events"][MODEL]["outcome"] == "serving"
        assert answering(server, MODEL) == "6.0"
        assert agree(server)["default"] == "6.0"
        said = (run_dir / "watcher.log").read_text()
        assert "an install was interrupted: wr 6.0" in said and "interrupted before it served" in said
    finally:
        watch.daemon(run_dir).stop()
        for pid in processes(*watcher):  # one its keeper left behind
            os.kill(pid, signal.SIGTERM)


def test_a_deploy_killed_mid_install_is_undone_by_the_crash_restore(server, archives, tmp_path):
    """The crash path (`deploy` after a crash, the supervisor): Lifecycle.restore settles an
    install whose process was killed while TorchServe was still starting the version's workers."""
    run_dir = Path(server.opts.run_dir).resolve()
    before = agree(server)
    store = Path(server.opts.model_store)
    log = tmp_path / "install.log"
    script = ("import json, sys; from pathlib import Path; "
              "from servetool.operate.lifecycle import Lifecycle; "
              "from servetool.targets.local import LocalTarget; "
              "from servetool.engines.torchserve.process import ServerOptions; "
              "run, store, ports, path = sys.argv[1:]; "
              "target = LocalTarget(ServerOptions(run_dir=Path(run), model_store=Path(store), "
              "ports=json.loads(ports)), lambda m: print(m, flush=True)); "
              "Lifecycle(target).install(Path(path))")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir), str(store),
                                 json.dumps(server.opts.ports),
                                 str(version_of(archives, "7.0", slow=6))],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        kill_mid_install(run_dir, log, proc.pid, "7.0")
    finally:
        proc.kill()
        proc.wait()
    lifecycle.restore_server(server)
    record = agree(server)
    assert record["default"] == before["default"] and "7.0" not in record["versions"]
    assert set(record["versions"]) == set(before["versions"])
    assert not list(store.glob(f"{MODEL}--7.0--*.mar"))  # its pin went with it
    assert answering(server, MODEL) == before["default"]


def test_an_install_interrupted_after_it_became_the_default_is_completed(server, archives):
    """Killed between TorchServe's set-default and the record's commit: the version passed its
    smoke test and serves, so the restore completes the record instead of undoing it."""
    run_dir = Path(server.opts.run_dir)
    Lifecycle(server).install(version_of(archives, "8.0"))  # the previous default stays loaded
    record = agree(server)
    default = record["default"]
    previous = next(v for v in reversed(record["history"]) if v != default)
    assert previous in record["versions"]  # kept loaded by the policy
    with locked(run_dir) as models:
        model = models[MODEL]
        entry = model["versions"].pop(default)
        model[lifecycle.INTENT] = {"version": default, "archive": entry["archive"],
                                   "digest": entry["digest"], "origin": None, "since": "then",
                                   "pid": 1 << 22, "replaces": None}
        model["default"] = previous
        model["history"] = [v for v in model["history"] if v != default]
    lifecycle.restore_server(server)
    record = agree(server)
    assert record["default"] == default and record["history"][-1] == default
    assert record["versions"][default]["digest"] == entry["digest"]
    assert answering(server, MODEL) == default
