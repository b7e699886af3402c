"""The crash supervisor of a local deployment (`servetool deploy --restart-on-crash`).

One small detached process per run folder. Every second it asks whether the server is running,
stopped (by `servetool stop`, which ends the supervisor first) or crashed; after a crash it ends
what is left of the server, starts TorchServe again and registers every recorded model with its
version and worker count (the same `deploy` a person would run). Failed restarts back off.
Its pid and the server's options are in RUN_DIR/supervisor.json, its log in RUN_DIR/supervisor.log
(outside logs/, which every server start empties).

    python -m servetool.operate.supervise RUN_DIR
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from servetool.engines.torchserve import process
from servetool.errors import ServetoolError
from servetool.operate import canary, lifecycle
from servetool.operate.daemon import Daemon
from servetool.targets.common import Companions
from servetool.targets.local import LocalTarget

POLL_S = 1.0
MAX_BACKOFF_S = 60.0


def daemon(run_dir: Path) -> Daemon:
    return Daemon(run_dir, "supervisor", "servetool.operate.supervise")


def running_pid(run_dir: Path) -> int | None:
    """The supervisor's pid if it is alive (and really is this run folder's supervisor)."""
    return daemon(run_dir).pid()


def launch(opts: process.ServerOptions) -> int:
    """Start the supervisor for opts.run_dir (once: a running one is kept) and return its pid."""
    # absolute: the supervisor runs in the run folder, not where deploy was started
    options = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    return daemon(opts.run_dir).launch(options)


def stop(run_dir: Path, timeout_s: float = 10.0) -> bool:
    """End the supervisor (before the server is stopped, so it does not bring it back)."""
    return daemon(run_dir).stop(timeout_s)


def _say(message: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} {message}", flush=True)


def _options(run_dir: Path) -> process.ServerOptions:
    raw = daemon(run_dir).options()
    return process.ServerOptions(
        run_dir=Path(raw["run_dir"]), model_store=Path(raw["model_store"]),
        base_config=Path(raw["base_config"]) if raw.get("base_config") else None,
        host=raw["host"], ports={k: int(v) for k, v in raw["ports"].items()},
        startup_timeout_s=float(raw["startup_timeout_s"]), split=bool(raw.get("split")),
        clients_port=int(raw["clients_port"]) if raw.get("clients_port") else None,
        engine=raw.get("engine") or "torchserve")


def restore(opts: process.ServerOptions) -> dict:
    """Start the crashed server again with every recorded version and default (a split's
    automatic canary ends: its controller may be gone with the server)."""
    target = LocalTarget(opts, _say, Companions(split_starting=canary.on_server_start))
    return lifecycle.restore_server(target)


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
        cond, state = process.condition(run_dir)
        if cond == "stopped":
            _say("the server was stopped: the supervisor ends too")
            return 0
        if cond == "crashed" and state is not None:
            crashed_at = time.monotonic()
            _say("TorchServe crashed:\n" + process.explain_failure(state))
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
