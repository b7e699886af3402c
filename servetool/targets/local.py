"""The local target: an embedded TorchServe on this machine, models registered through its API.

Deploying is idempotent: an archive already registered with the same digest is left alone, a new
version is registered beside the serving one, smoke-tested, made the default, and what the keep
policy drops is unloaded after it drained (servetool/operate/lifecycle.py), and the server is started only
when none is running.

What should be serving is recorded in the run folder (deployed.json: every version, each model's
default and history, kept up to date by `deploy`, `scale`, `promote`, `rollback` and the watcher).
When `deploy` finds the server crashed or stopped, it starts it again and registers all of that, not
only the archives it was named; `deploy --restart-on-crash` leaves a supervisor
(servetool/operate/supervise.py) doing the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servetool.engines.torchserve import archive, pod, process
from servetool.engines.torchserve.management import APIError, Client
from servetool.engines.torchserve.state import DEFAULT_MAX_REQUEST_SIZE, ServerState, load_state, url_host
from servetool.errors import ServetoolError
from servetool.operate import lifecycle
from servetool.operate.lifecycle import DeployError, version_key, wait_ready

__all__ = ["DeployError", "LocalTarget", "find_archives", "version_key"]


def find_archives(names: list[str] | tuple[str, ...], model_store: Path) -> list[Path]:
    """Archives named by model name or path, or every archive in the model store."""
    if not names:
        # pinned copies of registered versions (lifecycle.pin) are not archives to deploy
        found = sorted(p for p in model_store.glob("*.mar") if not lifecycle.is_pinned(p))
        if not found:
            raise DeployError(f"no archives in {model_store}: run `servetool package` first")
        return found
    paths = []
    for name in names:
        path = Path(name) if name.endswith(".mar") else model_store / f"{name}.mar"
        if not path.is_file():
            raise DeployError(f"no archive {path}: run `servetool package` for {name} first")
        if path.resolve().parent != model_store.resolve():
            raise DeployError(f"{path} is not in the model store {model_store}: TorchServe only "
                              "loads archives from there")
        paths.append(path)
    return paths


class LocalTarget:
    name = "local"
    pins_archives = True  # each version's archive keeps its own file in the model store
    keep: int | None = None  # the keep policy deploy sets for the models it installs
    promote: bool = True  # False: deploy loads new versions beside the default (for a canary)

    def __init__(self, opts: process.ServerOptions,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.opts = opts
        self.progress = progress

    # --- server ----------------------------------------------------------------------------------
    def running(self) -> ServerState | None:
        return process.running_state(self.opts.run_dir)

    def require_running(self) -> ServerState:
        state = self.running()
        if state is None:
            raise DeployError(f"no TorchServe is running from {self.opts.run_dir}: "
                              "`servetool deploy` first")
        return state

    def default_workers(self) -> int:
        """Workers for a model left on auto: one per core of the machine that serves it."""
        return default_workers()

    def make_client(self, state: ServerState) -> Client:
        return Client(state)

    def client(self) -> Client:
        return self.make_client(self.require_running())

    def failure_logs(self, state: ServerState) -> str:
        """What the server logged about a failure, quoted for an error message."""
        tail = process.log_tail(state, ("model_log.log", "ts_log.log"))
        quoted = "\n".join(f"  {line}" for line in tail)
        return f"From the logs in {state.log_dir}:\n{quoted}"

    def up(self) -> tuple[ServerState, bool]:
        state = self.running()
        if state is not None:
            return state, False
        if self.opts.split:  # an automatic canary does not outlive the server unjudged
            from servetool.operate.canary import on_server_start

            on_server_start(self.opts.run_dir)
        return process.start(self.opts, self.progress), True

    def set_split(self, model: str, version: str, weight: int) -> None:
        """Send `weight`% of MODEL's unversioned requests to VERSION at the split (deploy --split)."""
        from servetool.engines.torchserve import split

        split.set_canary(Path(self.require_running().run_dir), model, version, weight)

    def down(self) -> bool:
        from servetool.operate import supervise

        supervise.stop(self.opts.run_dir)  # first, or it would bring the server back
        stop_watcher(self.opts.run_dir)
        return process.stop(self.opts.run_dir)

    def supervise(self) -> int:
        """Start the crash supervisor for this run folder; its pid."""
        from servetool.operate import supervise

        return supervise.launch(self.opts)

    # --- models ----------------------------------------------------------------------------------
    def condition(self) -> str:
        """running, starting, crashed or stopped."""
        return process.condition(self.opts.run_dir)[0]

    def crash_detail(self) -> str:
        state = load_state(self.opts.run_dir)
        return process.crash_report(state) if state else "no server recorded"

    def deploy(self, names: list[str] | tuple[str, ...], timeout_s: float = 300) -> dict[str, Any]:
        started = time.perf_counter()
        archives = find_archives(names, self.opts.model_store)
        recorded = lifecycle.recorded_archives(self.opts.run_dir, self.opts.model_store)
        self.opts.sizes = archive.archive_sizes(archives + recorded)
        state, fresh = self.up()
        if not fresh:
            self._check_size_limits(state)
        if Path(state.model_store) != self.opts.model_store.resolve():
            raise DeployError(f"the running TorchServe serves archives from {state.model_store}, not "
                              f"{self.opts.model_store.resolve()}: use that model store, or "
                              "`servetool stop` first")
        life = lifecycle.Lifecycle(self, state)
        # what the record says should serve comes back first (every version, each default): after
        # a restart that is exactly what was serving, not only the archives named here
        results = {(r["name"], r["version"]): r for r in life.restore(timeout_s)}
        record = lifecycle.read_record(Path(state.run_dir))
        for path in self.newest_per_model(archives):
            if not names and self._behind_default(path, record):
                continue
            result = life.install(path, keep=self.keep, timeout_s=timeout_s,
                                  make_default=self.promote)
            results.setdefault((result["name"], result["version"]), result)
        return {
            "target": self.name,
            "server_started": fresh,
            "run_dir": state.run_dir,
            "endpoints": endpoints(state),
            "token_auth": state.token_auth,
            "models": list(results.values()),
            "seconds": round(time.perf_counter() - started, 2),
        }

    def _behind_default(self, path: Path, record: dict[str, Any]) -> bool:
        """An archive in the store older than its model's serving default is not deployed unless
        named: a plain `deploy` after a rollback or a watcher's upgrade must not undo it."""
        meta = archive.archive_manifest(path)["manifest"]["model"]
        model = record.get(meta["modelName"], {})
        version, default = str(meta["modelVersion"]), model.get("default")
        if not default or version in model.get("versions", {}) or \
                version_key(version) >= version_key(default):
            return False
        self.progress(f"{meta['modelName']}: {path.name} ({version}) is older than the serving "
                      f"default {default}; left out (name it to deploy it)")
        return True

    def restore(self, timeout_s: float = 300) -> dict[str, Any]:
        """The server up with every recorded version and default (the crash supervisor's job)."""
        state, _ = self.up()
        return {"models": lifecycle.Lifecycle(self, state).restore(timeout_s)}

    def _check_size_limits(self, state: ServerState) -> None:
        """max_request_size is fixed when the server starts: say so when a model needs more."""
        config = Path(state.run_dir) / "config.properties"
        if not config.is_file():
            return
        props = process.read_properties(config)
        for key, needed in zip(("max_request_size", "max_response_size"), self.opts.sizes,
                               strict=True):
            limit = int(props.get(key) or DEFAULT_MAX_REQUEST_SIZE)
            if needed and needed > limit:
                self.progress(f"warning: these models need a {key} of {needed} bytes, but the "
                              f"running server's is {limit}: `servetool stop`, then deploy "
                              "again, to raise it")

    def newest_per_model(self, archives: list[Path]) -> list[Path]:
        """One archive per model: the highest version (numeric-aware: 10.0 after 9.1), whatever
        the file names; an older one found beside it is left out, and said so."""
        newest: dict[str, tuple[tuple, Path]] = {}
        for path in archives:
            meta = archive.archive_manifest(path)["manifest"]["model"]
            key = version_key(str(meta["modelVersion"]))
            name = meta["modelName"]
            if name in newest and newest[name][0] >= key:
                self.progress(f"{name}: {path.name} ({meta['modelVersion']}) is older than "
                              f"{newest[name][1].name}; left out")
                continue
            if name in newest:
                self.progress(f"{name}: {newest[name][1].name} is older than {path.name}; left out")
            newest[name] = (key, path)
        return [path for _, path in newest.values()]

    def scale(self, name: str, workers: int, version: str | None = None) -> dict[str, Any]:
        """Set a version's worker count. The lifecycle lock is held from before TorchServe changes
        until the record holds the new count, so that a crash restore (which takes the same lock)
        never brings back a count that a scale had already changed."""
        with lifecycle.locked(Path(self.require_running().run_dir), self.progress) as models:
            result = self._scale(name, workers, version)
            entry = models.get(name, {}).get("versions", {}).get(result["version"])
            if entry is not None:  # what a restart restores, and what the next version inherits
                entry["workers"] = workers
        return result

    def _scale(self, name: str, workers: int, version: str | None = None) -> dict[str, Any]:
        client = self.client()
        if not client.has_model(name):
            raise DeployError(f"no model {name!r} is registered (see `servetool status`)")
        target = version or client.describe(name, None)[0]["modelVersion"]
        try:
            client.scale(name, workers, workers, version)
        except APIError as exc:
            # TorchServe 0.12 sometimes answers a synchronous scale-down with 500 ("Failed to start
            # workers") although the workers did stop: judge by the workers' real state instead.
            if exc.status != 500:
                raise
            try:
                ready = wait_ready(client, name, target, 30, expect=workers)
            except DeployError:
                raise DeployError(f"scaling {name} failed: {exc}\n" + self.failure_logs(
                    self.require_running())) from None
            return {"name": name, "version": target, "workers": ready}
        return {"name": name, "version": target, "workers": wait_ready(client, name, target, 120,
                                                                        expect=workers)}

    def status(self) -> dict[str, Any]:
        cond = self.condition()
        if cond == "crashed":
            return {"target": self.name, "running": False, "state": "crashed", "models": [],
                    "detail": self.crash_detail(),
                    "supervised": supervisor_pid(self.opts.run_dir) is not None,
                    "helpers": pod.read_supervised(self.opts.run_dir)}
        state = self.running()
        if state is None:
            return {"target": self.name, "running": False, "state": "stopped", "models": []}
        client = self.make_client(state)
        models: list[dict[str, Any]] = []
        try:
            listed = client.list_models()
        except ServetoolError as exc:  # the front restarting, say: the rest is still worth showing
            listed = []
            models.append({"name": None, "error": f"the management API did not answer: {exc}",
                           "workers": [], "default": False, "version": None, "batch_size": None})
        for entry in listed:
            name = entry["modelName"]
            try:  # another client may have registered a name servetool would refuse: still shown
                default = client.describe(name, None, unchecked=True)[0]["modelVersion"]
                described = client.describe(name, unchecked=True)
            except APIError as exc:
                models.append({"name": name, "error": str(exc), "workers": [], "default": False,
                               "version": None, "batch_size": None})
                continue
            for m in described:
                models.append({
                    "name": name, "version": m["modelVersion"],
                    "default": m["modelVersion"] == default,
                    "batch_size": m.get("batchSize"), "max_batch_delay_ms": m.get("maxBatchDelay"),
                    "min_workers": m.get("minWorkers"), "max_workers": m.get("maxWorkers"),
                    "workers": [{"id": w["id"], "status": w["status"], "pid": w.get("pid"),
                                 "memory_bytes": w.get("memoryUsage")} for w in m.get("workers", [])],
                })
        return {"target": self.name, "running": True, "state": cond, "run_dir": state.run_dir,
                "pid": state.pid, "endpoints": endpoints(state), "token_auth": state.token_auth,
                "supervised": supervisor_pid(self.opts.run_dir) is not None, "models": models,
                "watcher": watcher_status(self.opts.run_dir),
                "split": bool(state.split_metrics_port),
                "canary": canary_state(Path(state.run_dir)),
                "helpers": pod.read_supervised(Path(state.run_dir))}


def default_workers() -> int:
    """servetool's rule for a model whose spec leaves workers on auto: one worker per core, each
    with one intra-op thread (see handlers.runtimes.threads_per_worker). On a CPU this is what the
    in-process limit is measured with; more workers than cores only add contention."""
    from handlers.runtimes import available_cores

    return available_cores()


def endpoints(state: ServerState) -> dict[str, str]:
    found = {"inference": state.url("inference"), "management": state.url("management"),
             "metrics": f"{state.url('metrics')}/metrics"}
    if state.split_metrics_port:  # HAProxy's exporter, when the canary split fronts inference
        found["split_metrics"] = f"http://127.0.0.1:{state.split_metrics_port}/metrics"
    # OpenAI's /v1/embeddings, TEI's /embed, /rerank (servetool/engines/torchserve/clients.py)
    if state.clients_port:
        found["clients"] = f"http://{url_host(state.host)}:{state.clients_port}"
    return found


def supervisor_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's crash supervisor, if one is alive."""
    from servetool.operate import supervise

    return supervise.running_pid(run_dir)


def stop_watcher(run_dir: Path) -> bool:
    """End the background watcher of a run folder (`deploy --watch`), if one runs."""
    from servetool.operate import watch

    return watch.daemon(run_dir).stop()


def watcher_status(run_dir: Path) -> dict[str, Any] | None:
    from servetool.operate import watch

    return watch.describe(run_dir.resolve())


def canary_state(run_dir: Path) -> dict[str, Any] | None:
    from servetool.operate.canary import read_state

    return read_state(run_dir)
