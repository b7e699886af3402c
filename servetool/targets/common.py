"""What the targets share: the error they raise, the archives a deploy names, the wait for a
version's workers, the helpers the operate layer runs beside a server (Companions), and
ServerTarget, the verbs of a target that runs one server (local, docker) alike.

A target offers verbs (up, down, running, condition, status, scale, a client, the split's weight);
the operate layer drives them: the lifecycle deploys and restores through them, and starts and
stops the crash supervisor and the watcher around them (servetool/operate/companions.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servetool import engines
from servetool.engines.base import Engine
from servetool.engines.torchserve import pod
from servetool.engines.torchserve.management import APIError, Client
from servetool.engines.torchserve.process import ServerOptions, read_properties
from servetool.engines.torchserve.state import DEFAULT_MAX_REQUEST_SIZE, ServerState, url_host
from servetool.errors import ServetoolError
from servetool.targets import record


class DeployError(ServetoolError):
    pass


def find_archives(names: list[str] | tuple[str, ...], model_store: Path) -> list[Path]:
    """Archives named by model name or path, or every archive in the model store."""
    if not names:
        # pinned copies of registered versions (lifecycle.pin) are not archives to deploy
        found = sorted(p for p in model_store.glob("*.mar") if not record.is_pinned(p))
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


def default_workers() -> int:
    """servetool's rule for a model whose spec leaves workers on auto: one worker per core, each
    with one intra-op thread (see handlers.runtimes.threads_per_worker). On a CPU this is what the
    in-process limit is measured with; more workers than cores only add contention."""
    from handlers.runtimes import available_cores

    return available_cores()


def endpoints(state: ServerState, engine: Engine) -> dict[str, str]:
    found = {"inference": state.url("inference"), "management": state.url("management"),
             "metrics": engine.metrics_url(state)}
    if state.split_metrics_port:  # HAProxy's exporter, when the canary split fronts inference
        found["split_metrics"] = f"http://127.0.0.1:{state.split_metrics_port}/metrics"
    # OpenAI's /v1/embeddings, TEI's /embed, /rerank (servetool/engines/torchserve/clients.py)
    if state.clients_port:
        found["clients"] = f"http://{url_host(state.host)}:{state.clients_port}"
    return found


def _nothing(_: Path) -> None:
    return None


@dataclass(frozen=True)
class Companions:
    """The helpers the operate layer runs beside a deployment's server: the crash supervisor, the
    watcher, a canary's controller. A target never imports them: it calls these at the edges of
    its verbs, with its run folder, and the operate layer hands it the real ones
    (servetool/operate/companions.py). By default there are none."""

    # a server with the canary split is about to (re)start
    split_starting: Callable[[Path], None] = _nothing
    # the server is about to stop (before it: a supervisor would bring it back)
    stopping: Callable[[Path], None] = _nothing
    # for status: whether a crash supervisor runs, the watcher's state, the canary's state
    supervised: Callable[[Path], bool] = lambda _: False
    watcher: Callable[[Path], dict[str, Any] | None] = _nothing
    canary: Callable[[Path], dict[str, Any] | None] = _nothing


class ServerTarget(ABC):
    """A target that runs one server (LocalTarget, DockerTarget): what they do alike. Each says how
    its server comes up and goes down, how it is reached and what it logged."""

    name = "server"
    pins_archives = True  # each version's archive keeps its own file in the model store
    keep: int | None = None  # the keep policy deploy sets for the models it installs
    promote: bool = True  # False: deploy loads new versions beside the default (for a canary)

    def __init__(self, opts: ServerOptions, progress: Callable[[str], None] = lambda _: None,
                 companions: Companions | None = None) -> None:
        self.opts = opts
        self.progress = progress
        self.companions = companions or Companions()
        self.engine: Engine = engines.get(opts.engine)  # the model server it runs

    # --- what each target says -------------------------------------------------------------------
    @abstractmethod
    def running(self) -> ServerState | None: ...

    @abstractmethod
    def make_client(self, state: ServerState) -> Client: ...

    @abstractmethod
    def failure_logs(self, state: ServerState) -> str:
        """What the server logged about a failure, quoted for an error message."""

    @abstractmethod
    def up(self) -> tuple[ServerState, bool]:
        """The server running (started when it was not); whether it was started."""

    @abstractmethod
    def down(self) -> bool: ...

    @abstractmethod
    def condition(self) -> str:
        """running, starting, crashed or stopped."""

    @abstractmethod
    def crash_detail(self) -> str: ...

    @abstractmethod
    def set_split(self, model: str, version: str, weight: int) -> None:
        """Send `weight`% of MODEL's unversioned requests to VERSION at the split (deploy --split)."""

    def prepare(self, archives: list[Path]) -> None:
        """What a deploy of these archives needs before the server comes up (an image)."""
        return None

    def deployed(self) -> dict[str, Any]:
        """What a deploy's result says about this target beyond the server and its models."""
        return {}

    # --- alike on every target -------------------------------------------------------------------
    def require_running(self) -> ServerState:
        state = self.running()
        if state is None:
            raise DeployError(f"no TorchServe is running from {self.opts.run_dir}: "
                              "`servetool deploy` first")
        return state

    def default_workers(self) -> int:
        """Workers for a model left on auto: one per core of the machine that serves it."""
        return default_workers()

    def client(self) -> Client:
        return self.make_client(self.require_running())

    def check_size_limits(self, state: ServerState) -> None:
        """max_request_size is fixed when the server starts: say so when a model needs more."""
        config = Path(state.run_dir) / "config.properties"
        if not config.is_file():
            return
        props = read_properties(config)
        for key, needed in zip(("max_request_size", "max_response_size"), self.opts.sizes,
                               strict=True):
            limit = int(props.get(key) or DEFAULT_MAX_REQUEST_SIZE)
            if needed and needed > limit:
                self.progress(f"warning: these models need a {key} of {needed} bytes, but the "
                              f"running server's is {limit}: `servetool stop`, then deploy "
                              "again, to raise it")

    def scale(self, name: str, workers: int, version: str | None = None) -> dict[str, Any]:
        """Set a version's worker count. The lifecycle lock is held from before TorchServe changes
        until the record holds the new count, so that a crash restore (which takes the same lock)
        never brings back a count that a scale had already changed."""
        with record.locked(Path(self.require_running().run_dir), self.progress) as models:
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
                    "supervised": self.companions.supervised(self.opts.run_dir),
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
                "engine": state.engine, "pid": state.pid,
                "endpoints": endpoints(state, self.engine), "token_auth": state.token_auth,
                "supervised": self.companions.supervised(self.opts.run_dir), "models": models,
                "watcher": self.companions.watcher(self.opts.run_dir),
                "split": bool(state.split_metrics_port),
                "canary": self.companions.canary(Path(state.run_dir)),
                "helpers": pod.read_supervised(Path(state.run_dir))}
