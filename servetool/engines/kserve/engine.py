"""The KServe engine as an Engine (servetool/engines/base.py). It serves the same archives and
answers the same management paths as TorchServe (registry.py, app.py), so building and every call
on a running server are TorchServe's adapter's; only the server's start differs (process.py).
Stopping is the same too: one process group, recorded in the run folder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from servetool.engines.torchserve.engine import TorchServeEngine


class KServeEngine(TorchServeEngine):
    name = "kserve"

    def start(self, options: Any, progress: Callable[[str], None] = lambda _: None) -> Any:
        from servetool.engines.kserve import process

        return process.start(options, progress)
