"""The engines layer: the model servers servetool runs, each behind one interface (base.Engine).

    engines.get("torchserve")   # the default
    engines.get("kserve")       # KServe's protocol stack in-process (servetool/engines/kserve)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servetool.engines.base import Engine

NAMES = ("torchserve", "kserve")


def get(name: str) -> Engine:
    """The engine called `name` (its modules are imported on first use)."""
    if name == "torchserve":
        from servetool.engines.torchserve.engine import TorchServeEngine

        return TorchServeEngine()
    if name == "kserve":
        from servetool.engines.kserve.engine import KServeEngine

        return KServeEngine()
    raise KeyError(f"no engine {name!r} (engines: {', '.join(NAMES)})")
