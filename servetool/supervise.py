"""The crash supervisor of a local deployment (`servetool deploy --restart-on-crash`).

One small detached process per run folder. Every second it asks whether the server is running,
stopped (by `servetool stop`, which ends the supervisor first) or crashed; after a crash it ends
what is left of the server, starts TorchServe again and registers every recorded model with its
version and worker count (the same `deploy` a person would run). Failed restarts back off.
Its pid and the server's options are in RUN_DIR/supervisor.json, its log in RUN_DIR/supervisor.log
(outside logs/, which every server start empties).

    python -m servetool.supervise RUN_DIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from servetool import torchserve
from servetool.errors import ServetoolError

SUPERVISOR_FILE = "supervisor.json"
LOG_FILE = "supervisor.log"
POLL_S = 1.0
MAX_BACKOFF_S = 60.0


def running_pid(run_dir: Path) -> int | None:
    """The supervisor's pid if it is alive (and really is this run folder's supervisor)."""
    try:
        pid = int(json.loads((run_dir / SUPERVISOR_FILE).read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if b"servetool.supervise" in cmdline and str(run_dir.resolve()).encode() in cmdline \
        else None


def launch(opts: torchserve.ServerOptions) -> int:
    """Start the supervisor for opts.run_dir (once: a running one is kept) and return its pid."""
    run_dir = opts.run_dir.resolve()
    if (pid := running_pid(run_dir)) is not None:
        return pid
    # absolute: the supervisor runs in the run folder, not where deploy was started
    options = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    (run_dir / SUPERVISOR_FILE).write_text(json.dumps({"pid": None, "options": options}))
    log = open(_log_path(run_dir), "ab")  # noqa: SIM115 (handed to the child)
    proc = subprocess.Popen([sys.executable, "-m", "servetool.supervise", str(run_dir)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=run_dir)
    log.close()
    (run_dir / SUPERVISOR_FILE).write_text(json.dumps({"pid": proc.pid, "options": options}))
    deadline = time.monotonic() + 10  # until the child has become the supervisor (exec'd)
    while running_pid(run_dir) != proc.pid and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServetoolError(f"the crash supervisor exited at once (code {proc.returncode}); "
                                 f"see {_log_path(run_dir)}")
        time.sleep(0.02)
    return proc.pid


def stop(run_dir: Path, timeout_s: float = 10.0) -> bool:
    """End the supervisor (before the server is stopped, so it does not bring it back)."""
    pid = running_pid(run_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while running_pid(run_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    (run_dir / SUPERVISOR_FILE).unlink(missing_ok=True)
    return pid is not None


def _log_path(run_dir: Path) -> Path:
    # not logs/: torchserve.start empties that folder at every start
    return run_dir / LOG_FILE


def _say(message: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} {message}", flush=True)


def _options(run_dir: Path) -> torchserve.ServerOptions:
    raw = json.loads((run_dir / SUPERVISOR_FILE).read_text())["options"]
    return torchserve.ServerOptions(
        run_dir=Path(raw["run_dir"]), model_store=Path(raw["model_store"]),
        base_config=Path(raw["base_config"]) if raw.get("base_config") else None,
        host=raw["host"], ports={k: int(v) for k, v in raw["ports"].items()},
        startup_timeout_s=float(raw["startup_timeout_s"]))


def restore(opts: torchserve.ServerOptions) -> dict:
    """Start the crashed server again with every recorded model (the local target's deploy)."""
    from servetool.targets.local import LocalTarget, read_record

    record = read_record(opts.run_dir)
    target = LocalTarget(opts, _say)
    if not record:  # nothing was serving: the server alone
        target.up()
        return {"models": []}
    names = [str(opts.model_store / entry["archive"]) for entry in record.values()]
    return target.deploy(names)


def main(run_dir: Path) -> int:
    run_dir = run_dir.resolve()
    opts = _options(run_dir)
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    _say(f"supervising the TorchServe of {run_dir}")
    failures = 0
    while not stopping:
        cond, state = torchserve.condition(run_dir)
        if cond == "stopped":
            _say("the server was stopped: the supervisor ends too")
            return 0
        if cond == "crashed" and state is not None:
            crashed_at = time.monotonic()
            _say("TorchServe crashed:\n" + torchserve.explain_failure(state))
            try:
                result = restore(opts)
                failures = 0
                models = ", ".join(f"{m['name']} {m['version']} ({len(m['workers'])} workers)"
                                   for m in result["models"]) or "no models"
                _say(f"restarted in {time.monotonic() - crashed_at:.1f} s with {models}")
            except (ServetoolError, OSError) as exc:
                failures += 1
                wait = min(MAX_BACKOFF_S, 2.0 ** failures)
                _say(f"restart failed ({exc}); trying again in {wait:.0f} s")
                time.sleep(wait)
        time.sleep(POLL_S)
    _say("supervisor stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
