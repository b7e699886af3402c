"""The watcher of one Kubernetes pod: its `watcher` container runs `servetool_pod.py watch`.

Every replica follows the same source with a watcher of its own, so a pod the autoscaler adds
converges on what the others serve (its readiness waits for the first check). It is the same
Watcher as `servetool watch` (servetool/operate/watch.py), over this pod's TorchServe: management through
the pod's management front on 127.0.0.1 (registration of model-store archives only), inference on
TorchServe's loopback port, the keys read from the work volume the containers share; versions are
pinned in the pod's writable model store (an emptyDir seeded with the image's archives).

Configured by the environment the manifests set: SERVETOOL_WATCH_SOURCE, SERVETOOL_S3_ENDPOINT_URL,
SERVETOOL_WATCH_INTERVAL, SERVETOOL_WATCH_KEEP, SERVETOOL_WATCH_METRICS_PORT; credentials as boto3
reads them (AWS_* from the Secret the deployment names).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from servetool import engines
from servetool.engines.torchserve.management import Client
from servetool.engines.torchserve.state import ServerState
from servetool.targets.common import DeployError

HEALTH_WAIT_S = 600.0


def pod_helper() -> Any:
    """servetool_pod.py of this image (its config, addresses and keys)."""
    path = os.environ.get("SERVETOOL_POD_HELPER", "/opt/servetool/servetool_pod.py")
    spec = importlib.util.spec_from_file_location("servetool_pod", path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules["servetool_pod"] = module
    spec.loader.exec_module(module)
    return module


class PodTarget:
    """The lifecycle's view of this pod's TorchServe (see servetool.operate.lifecycle.Target)."""

    name = "pod"
    pins_archives = True

    def __init__(self, say: Any, helper: Any | None = None) -> None:
        self.pod = helper or pod_helper()
        self.progress = say
        self.engine = engines.get("torchserve")
        config = self.pod.config()
        store = config.get("model_store", "/home/model-server/model-store")
        front = os.environ.get("SERVETOOL_FRONT_LISTEN", "127.0.0.1:8081").rpartition(":")[2]
        ports = {"inference": self.pod.address("inference", config)[1],
                 "metrics": self.pod.address("metrics", config)[1], "management": int(front)}
        self.opts = SimpleNamespace(run_dir=self.pod.WORK, model_store=Path(store), ports=ports,
                                    host="127.0.0.1")
        self.state = ServerState(run_dir=str(self.pod.WORK), pid=0, host="127.0.0.1", ports=ports,
                                 model_store=store, token_auth=self.pod.token_auth(config))

    def running(self) -> ServerState | None:
        return self.state if self.pod.health()[0] else None

    def require_running(self) -> ServerState:
        if self.running() is None:
            raise DeployError("this pod's TorchServe is not healthy")
        return self.state

    def make_client(self, state: ServerState) -> Client:
        return Client(state, keys=self.pod.client_keys, keys_where="the pod's work volume")

    def default_workers(self) -> int:
        return int(os.environ.get("SERVETOOL_CPUS") or os.cpu_count() or 1)

    def failure_logs(self, state: ServerState) -> str:
        return "The torchserve container's log says why: kubectl logs POD -c torchserve"


def main() -> int:
    from servetool.operate.watch import Watcher, open_source

    def say(message: str) -> None:
        print(f"watcher: {message}", flush=True)

    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    source = os.environ.get("SERVETOOL_WATCH_SOURCE")
    if not source:
        say("SERVETOOL_WATCH_SOURCE is not set: nothing to watch")
        return 2
    target = PodTarget(say)
    deadline = time.monotonic() + HEALTH_WAIT_S
    while target.running() is None and not stop:  # the startup models load first
        if time.monotonic() > deadline:
            say(f"TorchServe was not healthy within {HEALTH_WAIT_S:.0f} s")
            return 1
        time.sleep(1)
    interval = os.environ.get("SERVETOOL_WATCH_INTERVAL")
    keep = os.environ.get("SERVETOOL_WATCH_KEEP")
    watcher = Watcher(target, open_source(source, os.environ.get("SERVETOOL_S3_ENDPOINT_URL")),
                      interval_s=float(interval) if interval else None,
                      keep=int(keep) if keep else None,
                      metrics_port=int(os.environ.get("SERVETOOL_WATCH_METRICS_PORT") or 0),
                      say=say)
    watcher.run(lambda: bool(stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
