"""The local target: an embedded TorchServe on this machine, models registered through its API.

Deploying is idempotent: an archive already registered with the same digest is left alone, a changed
one is re-registered (a new version is registered first and made default, then the old one removed,
so predictions keep being answered), and the server is started only when none is running.

What should be serving is recorded in the run folder (deployed.json: each model's version, archive
digest and worker count, kept up to date by `deploy` and `scale`). When `deploy` finds the server
crashed or stopped, it starts it again and registers all of that, not only the archives it was
named; `deploy --restart-on-crash` leaves a supervisor (servetool/supervise.py) doing the same.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servetool import archive, torchserve
from servetool.errors import ServetoolError
from servetool.management import APIError, Client

DEPLOYED_FILE = "deployed.json"


class DeployError(ServetoolError):
    pass


def find_archives(names: list[str] | tuple[str, ...], model_store: Path) -> list[Path]:
    """Archives named by model name or path, or every archive in the model store."""
    if not names:
        found = sorted(model_store.glob("*.mar"))
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

    def __init__(self, opts: torchserve.ServerOptions,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.opts = opts
        self.progress = progress

    # --- server ----------------------------------------------------------------------------------
    def running(self) -> torchserve.ServerState | None:
        return torchserve.running_state(self.opts.run_dir)

    def require_running(self) -> torchserve.ServerState:
        state = self.running()
        if state is None:
            raise DeployError(f"no TorchServe is running from {self.opts.run_dir}: "
                              "`servetool deploy` first")
        return state

    def default_workers(self) -> int:
        """Workers for a model left on auto: one per core of the machine that serves it."""
        return default_workers()

    def make_client(self, state: torchserve.ServerState) -> Client:
        return Client(state)

    def client(self) -> Client:
        return self.make_client(self.require_running())

    def failure_logs(self, state: torchserve.ServerState) -> str:
        """What the server logged about a failure, quoted for an error message."""
        tail = torchserve.log_tail(state, ("model_log.log", "ts_log.log"))
        quoted = "\n".join(f"  {line}" for line in tail)
        return f"From the logs in {state.log_dir}:\n{quoted}"

    def up(self) -> tuple[torchserve.ServerState, bool]:
        state = self.running()
        if state is not None:
            return state, False
        return torchserve.start(self.opts, self.progress), True

    def down(self) -> bool:
        from servetool import supervise

        supervise.stop(self.opts.run_dir)  # first, or it would bring the server back
        return torchserve.stop(self.opts.run_dir)

    def supervise(self) -> int:
        """Start the crash supervisor for this run folder; its pid."""
        from servetool import supervise

        return supervise.launch(self.opts)

    # --- models ----------------------------------------------------------------------------------
    def condition(self) -> str:
        """running, starting, crashed or stopped."""
        return torchserve.condition(self.opts.run_dir)[0]

    def crash_detail(self) -> str:
        state = torchserve.load_state(self.opts.run_dir)
        return torchserve.crash_report(state) if state else "no server recorded"

    def deploy(self, names: list[str] | tuple[str, ...], timeout_s: float = 300) -> dict[str, Any]:
        started = time.perf_counter()
        archives = find_archives(names, self.opts.model_store)
        recorded = recorded_archives(self.opts.run_dir, self.opts.model_store, archives)
        self.opts.sizes = archive.archive_sizes(archives + recorded)
        state, fresh = self.up()
        if fresh:  # a new server: every recorded model comes back, not only the ones named
            archives += recorded
        else:
            self._check_size_limits(state)
        archives = self.newest_per_model(archives)
        if Path(state.model_store) != self.opts.model_store.resolve():
            raise DeployError(f"the running TorchServe serves archives from {state.model_store}, not "
                              f"{self.opts.model_store.resolve()}: use that model store, or "
                              "`servetool stop` first")
        client = self.make_client(state)
        record_file = Path(state.run_dir) / DEPLOYED_FILE
        record = _read_json(record_file)
        results = []
        for path in archives:
            result = self._deploy_one(client, state, path, record, timeout_s)
            results.append(result)
            record_file.write_text(json.dumps(record, indent=2) + "\n")
        return {
            "target": self.name,
            "server_started": fresh,
            "run_dir": state.run_dir,
            "endpoints": endpoints(state),
            "token_auth": state.token_auth,
            "models": results,
            "seconds": round(time.perf_counter() - started, 2),
        }

    def _check_size_limits(self, state: torchserve.ServerState) -> None:
        """max_request_size is fixed when the server starts: say so when a model needs more."""
        config = Path(state.run_dir) / "config.properties"
        if not config.is_file():
            return
        props = torchserve.read_properties(config)
        for key, needed in zip(("max_request_size", "max_response_size"), self.opts.sizes,
                               strict=True):
            limit = int(props.get(key) or torchserve.DEFAULT_MAX_REQUEST_SIZE)
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

    def _deploy_one(self, client: Client, state: torchserve.ServerState, path: Path,
                    record: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        contents = archive.archive_manifest(path)
        meta = contents["manifest"]["model"]
        name, version = meta["modelName"], meta["modelVersion"]
        digest = archive.archive_digest(path)
        versions = _registered_versions(client, name)
        known = record.get(name, {})
        same = known.get("digest") == digest and known.get("version") == version
        # the worker count last set (scale), for the version the record describes
        workers = known.get("workers") if same else None
        if version in versions and same:
            self.progress(f"{name} {version}: unchanged, left as it is")
            action = "unchanged"
        else:
            if version in versions:  # same version, new content: it must go before it can return
                self.progress(f"{name} {version}: archive changed, re-registering")
                client.unregister(name, version)
                versions.remove(version)
                action = "re-registered"
            else:
                action = ("restored" if same else "registered") if not versions else "upgraded"
            self.progress(f"{name} {version}: registering {path.name} and starting workers")
            recorded = workers
            workers = self._register(client, state, path, name, version, contents["config"],
                                     workers)
            if recorded is not None:  # a count set by `scale` may lie outside the archive's
                self._scale(name, recorded, version)  # min/max, which registration keeps to
            if versions:
                client.set_default(name, version)
                for old in versions:
                    self.progress(f"{name}: removing old version {old}")
                    client.unregister(name, old)
            record[name] = {"version": version, "digest": digest, "archive": path.name,
                            "workers": workers}
        workers = wait_ready(client, name, version, timeout_s)
        return {"name": name, "version": version, "action": action, "archive": str(path),
                "workers": workers, "predictions_url": f"{state.url('inference')}/predictions/{name}"}

    def _register(self, client: Client, state: torchserve.ServerState, path: Path, name: str,
                  version: str, config: dict[str, Any], workers: int | None = None) -> int:
        workers = workers if workers is not None else int(config.get("minWorkers")
                                                          or self.default_workers())
        try:
            client.register(path.name, name, workers, timeout=float(config.get("responseTimeout", 120)) + 120)
        except APIError as exc:
            raise DeployError(f"registering {name} {version} failed: {exc}\n"
                              + self.failure_logs(state)) from None
        return workers

    def scale(self, name: str, workers: int, version: str | None = None) -> dict[str, Any]:
        result = self._scale(name, workers, version)
        record_file = Path(self.require_running().run_dir) / DEPLOYED_FILE
        record = _read_json(record_file)
        if record.get(name, {}).get("version") == result["version"]:  # what a restart restores
            record[name]["workers"] = workers
            record_file.write_text(json.dumps(record, indent=2) + "\n")
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
                    "supervised": supervisor_pid(self.opts.run_dir) is not None}
        state = self.running()
        if state is None:
            return {"target": self.name, "running": False, "state": "stopped", "models": []}
        client = self.make_client(state)
        models = []
        for entry in client.list_models():
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
                "supervised": supervisor_pid(self.opts.run_dir) is not None, "models": models}


def default_workers() -> int:
    """servetool's rule for a model whose spec leaves workers on auto: one worker per core, each
    with one intra-op thread (see handlers.runtimes.threads_per_worker). On a CPU this is what the
    in-process limit is measured with; more workers than cores only add contention."""
    from handlers.runtimes import available_cores

    return available_cores()


def endpoints(state: torchserve.ServerState) -> dict[str, str]:
    return {"inference": state.url("inference"), "management": state.url("management"),
            "metrics": f"{state.url('metrics')}/metrics"}


def _registered_versions(client: Client, name: str) -> list[str]:
    if not client.has_model(name):
        return []
    return [m["modelVersion"] for m in client.describe(name)]


def wait_ready(client: Client, name: str, version: str, timeout_s: float,
               expect: int | None = None) -> list[dict[str, Any]]:
    """Poll until the version's workers are all READY (and `expect` of them, when given)."""
    deadline = time.monotonic() + timeout_s
    workers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        described = client.describe(name, version)[0]
        workers = described.get("workers", [])
        want = expect if expect is not None else described.get("minWorkers", 1)
        if len(workers) == want and all(w["status"] == "READY" for w in workers):
            return [{"id": w["id"], "status": w["status"], "pid": w.get("pid")} for w in workers]
        time.sleep(0.2)
    states = ", ".join(f"{w['id']}={w['status']}" for w in workers) or "none"
    raise DeployError(f"{name} {version}: workers not READY within {timeout_s:.0f} s ({states})")


def version_key(version: str) -> tuple:
    """Sort key of a version string: numbers compare as numbers (2.10 after 2.9), and a release
    after its pre-releases (1.0 after 1.0-rc1)."""
    parts = [(2, int(p), "") if p.isdigit() else (0, 0, p.lower())
             for p in re.findall(r"\d+|[A-Za-z]+", version)]
    # zeros that end a run of numbers say nothing: 2.0 == 2, and 1.0rc1 is 1rc1
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == (2, 0, "") and (i + 1 == len(parts) or parts[i + 1][0] != 2):
            del parts[i]
    # the end sorts after a suffix (1.0-rc1 < 1.0) and before more numbers (1.0 < 1.0.1)
    return (*parts, (1, 0, ""))


def recorded_archives(run_dir: Path, model_store: Path, named: list[Path]) -> list[Path]:
    """The archives of recorded models that `named` leaves out and the store still holds."""
    have = {p.name for p in named}
    found = []
    for entry in _read_json(run_dir / DEPLOYED_FILE).values():
        path = model_store / str(entry.get("archive", ""))
        if path.name not in have and path.suffix == ".mar" and path.is_file():
            found.append(path)
            have.add(path.name)
    return found


def read_record(run_dir: Path) -> dict[str, Any]:
    """What should be serving: {model: {version, digest, archive, workers}} (deployed.json)."""
    return _read_json(run_dir / DEPLOYED_FILE)


def supervisor_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's crash supervisor, if one is alive."""
    from servetool import supervise

    return supervise.running_pid(run_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
