"""The local target: an embedded TorchServe on this machine, models registered through its API.

`servetool deploy` (servetool/operate/lifecycle.py, deploy) brings this server up when none is
running, registers what the record says should serve and then the archives it was named; the
crash supervisor and the watcher beside it are the operate layer's, started and stopped around
these verbs (servetool/operate/companions.py).
"""

from __future__ import annotations

from pathlib import Path

from servetool.engines.torchserve import process
from servetool.engines.torchserve.management import Client
from servetool.engines.torchserve.state import ServerState, load_state
from servetool.targets.common import ServerTarget


class LocalTarget(ServerTarget):
    name = "local"

    # --- server ----------------------------------------------------------------------------------
    def running(self) -> ServerState | None:
        return process.running_state(self.opts.run_dir)

    def make_client(self, state: ServerState) -> Client:
        return Client(state)

    def failure_logs(self, state: ServerState) -> str:
        """What the server logged about a failure, quoted for an error message."""
        tail = process.log_tail(state, ("model_log.log", "ts_log.log", "kserve.log"))
        quoted = "\n".join(f"  {line}" for line in tail)
        return f"From the logs in {state.log_dir}:\n{quoted}"

    def up(self) -> tuple[ServerState, bool]:
        state = self.running()
        if state is not None:
            return state, False
        if self.opts.split:  # an automatic canary does not outlive the server unjudged
            self.companions.split_starting(self.opts.run_dir)
        return self.engine.start(self.opts, self.progress), True

    def set_split(self, model: str, version: str, weight: int) -> None:
        """Send `weight`% of MODEL's unversioned requests to VERSION at the split (deploy --split)."""
        from servetool.engines.torchserve import split

        split.set_canary(Path(self.require_running().run_dir), model, version, weight)

    def down(self) -> bool:
        self.companions.stopping(self.opts.run_dir)  # first: a supervisor would bring it back
        return self.engine.stop(self.opts.run_dir)

    def condition(self) -> str:
        """running, starting, crashed or stopped."""
        return process.condition(self.opts.run_dir)[0]

    def crash_detail(self) -> str:
        state = load_state(self.opts.run_dir)
        return process.crash_report(state) if state else "no server recorded"
