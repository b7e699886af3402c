"""Detached helper processes of a run folder (the crash supervisor, the watcher): started once,
found again by pid and command line, stopped by SIGTERM.

Each keeps RUN_DIR/NAME.json ({"pid", "options"}) and logs to RUN_DIR/NAME.log (outside logs/,
which every server start empties); both are this user's alone (0600, servetool/runfiles.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from servetool import runfiles
from servetool.engines.torchserve import pod
from servetool.errors import ServetoolError


class Daemon:
    def __init__(self, run_dir: Path, name: str, module: str) -> None:
        self.run_dir = run_dir.resolve()
        self.name = name  # "supervisor", "watcher"
        self.module = module  # run as `python -m MODULE RUN_DIR`
        self.file = self.run_dir / f"{name}.json"
        self.log = self.run_dir / f"{name}.log"

    def pid(self) -> int | None:
        """Its pid if it is alive and really is this run folder's process of this kind."""
        try:
            pid = int(json.loads(self.file.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        mine = self.module.encode() in cmdline and str(self.run_dir).encode() in cmdline
        return pid if mine else None

    def options(self) -> dict[str, Any]:
        return json.loads(self.file.read_text())["options"]

    def launch(self, options: dict[str, Any]) -> int:
        """Start it (once: a running one is kept) and return its pid."""
        if (pid := self.pid()) is not None:
            return pid
        runfiles.private_folder(self.run_dir)
        runfiles.write_private(self.file, json.dumps({"pid": None, "options": options}))
        log = os.fdopen(runfiles.open_private(self.log), "ab")  # handed to the child
        # under a keeper (servetool/engines/torchserve/pod.py keep), which starts it again if it dies
        command = [sys.executable, "-m", self.module, str(self.run_dir)]
        keeper = [sys.executable, pod.__file__, "keep", self.name, str(self.run_dir), "--", *command]
        proc = subprocess.Popen(keeper,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.run_dir)
        log.close()
        runfiles.write_private(self.file, json.dumps({"pid": proc.pid, "options": options}))
        deadline = time.monotonic() + 10  # until the child has become the process (exec'd)
        while self.pid() != proc.pid and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServetoolError(f"the {self.name} exited at once (code {proc.returncode}); "
                                     f"see {self.log}")
            time.sleep(0.02)
        return proc.pid

    def stop(self, timeout_s: float = 10.0) -> bool:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        self.file.unlink(missing_ok=True)
        return pid is not None
