"""TorchServe as an Engine (servetool/engines/base.py): a thin adapter over its archive builder
(archive.py), its process (process.py) and its management API client (management.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from servetool.engines.torchserve import archive, process
from servetool.engines.torchserve.management import Client, model_path
from servetool.engines.torchserve.state import ServerState


class TorchServeEngine:
    name = "torchserve"

    def build(self, spec: Any, artifact: Any, store: Path, *,
              verify: Callable[[Path, dict[str, Any]], None] | None = None) -> Path:
        """model_store/NAME.mar, pre-flighted (its handler loaded in a fresh interpreter)."""
        return archive.build_archive(spec, artifact, store, verify=verify)

    def start(self, options: process.ServerOptions,
              progress: Callable[[str], None] = lambda _: None) -> ServerState:
        return process.start(options, progress)

    def stop(self, run_dir: Path) -> bool:
        return process.stop(run_dir)

    def register(self, client: Client, artifact: str, name: str, version: str, workers: int,
                 timeout_s: float) -> None:
        # the version is the archive's own (its MANIFEST): TorchServe reads it from there
        client.register(artifact, name, workers, timeout=timeout_s)

    def unregister(self, client: Client, name: str, version: str | None = None) -> None:
        client.unregister(name, version)

    def set_default(self, client: Client, name: str, version: str) -> None:
        client.set_default(name, version)

    def scale(self, client: Client, name: str, workers: int, version: str | None = None) -> Any:
        return client.scale(name, workers, workers, version)

    def describe(self, client: Client, name: str,
                 version: str | None = "all") -> list[dict[str, Any]]:
        return client.describe(name, version)

    def predictions_url(self, state: ServerState, name: str, version: str | None = None) -> str:
        return f"{state.url('inference')}/predictions{model_path(name, version, checked=False)}"

    def metrics_url(self, state: ServerState) -> str:
        return f"{state.url('metrics')}/metrics"
