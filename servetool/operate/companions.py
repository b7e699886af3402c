"""The helpers the operate layer runs beside a deployment's server, as its targets see them: the
crash supervisor (supervise.py), the watcher (watch.py) and a canary's controller (canary.py).

A target calls these at the edges of its verbs (servetool/targets/common.py, Companions) and never
imports them: before a server with the split starts, an automatic canary nobody judges any more
ends; before the server stops, the supervisor (first: it would bring the server back) and the
watcher stop; `status` shows all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from servetool.operate import canary, supervise, watch
from servetool.targets.common import Companions


def stopping(run_dir: Path) -> None:
    supervise.stop(run_dir)  # first, or it would bring the server back
    watch.daemon(run_dir).stop()


def supervised(run_dir: Path) -> bool:
    return supervise.running_pid(run_dir) is not None


def watcher(run_dir: Path) -> dict[str, Any] | None:
    return watch.describe(run_dir.resolve())


COMPANIONS = Companions(split_starting=canary.on_server_start, stopping=stopping,
                        supervised=supervised, watcher=watcher, canary=canary.read_state)
