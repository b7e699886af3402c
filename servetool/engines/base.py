"""The engine interface: what a target and the lifecycle need from a model server.

An engine builds the servable artifact of a model version, starts and stops its server, and, on a
running server, registers and unregisters versions, sets a model's default version, scales a
version's workers and describes them; it says where clients send predictions and where its metrics
are. TorchServe implements it (servetool/engines/torchserve/engine.py), and so does the KServe
engine (servetool/engines/kserve/engine.py). The calls on a running server take the engine's API
client for that server (what a target's make_client returns: it knows the server's addresses and
keys).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from servetool.convert.export import Artifact
    from servetool.model.spec import ModelSpec


class Engine(Protocol):
    name: str

    # --- the artifact ------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, artifact: Artifact, store: Path, *,
              verify: Callable[[Path, dict[str, Any]], None] | None = None) -> Path:
        """The servable artifact of one model version (an exported, gated model) in the store;
        `verify` is given it unpacked, and may raise to keep it out of the store."""
        ...

    # --- the server --------------------------------------------------------------------------------
    def start(self, options: Any, progress: Callable[[str], None] = lambda _: None) -> Any:
        """Start the server `options` describe and return once it is healthy: its state (the
        record a target keeps: addresses, ports, process)."""
        ...

    def stop(self, run_dir: Path) -> bool:
        """Stop the server recorded in run_dir and everything it started; whether one ran."""
        ...

    # --- versions on a running server --------------------------------------------------------------
    def register(self, client: Any, artifact: str, name: str, version: str, workers: int,
                 timeout_s: float) -> None:
        """Load `artifact` (a file in the server's store) as NAME VERSION with `workers` workers,
        returning once it is loaded (or raising)."""
        ...

    def unregister(self, client: Any, name: str, version: str | None = None) -> None:
        """Unload one version (None: the default)."""
        ...

    def set_default(self, client: Any, name: str, version: str) -> None:
        """What requests naming no version are answered by."""
        ...

    def scale(self, client: Any, name: str, workers: int, version: str | None = None) -> Any:
        """Set a version's worker count (None: the default version's)."""
        ...

    def describe(self, client: Any, name: str, version: str | None = "all") -> list[dict[str, Any]]:
        """One entry per version ("all"), for one version, or for the default (None): its
        version, workers and their state, queue and batching."""
        ...

    # --- where clients go --------------------------------------------------------------------------
    def predictions_url(self, state: Any, name: str, version: str | None = None) -> str:
        ...

    def metrics_url(self, state: Any) -> str:
        ...
