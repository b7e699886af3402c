"""The engines layer: the model servers servetool runs, each behind one interface (base.Engine).

    engines.get("torchserve")   # the only one today; KServe comes next, behind the same interface
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servetool.engines.base import Engine

NAMES = ("torchserve",)


def get(name: str) -> Engine:
    """The engine called `name` (its modules are imported on first use)."""
    if name == "torchserve":
        from servetool.engines.torchserve.engine import TorchServeEngine

        return TorchServeEngine()
    raise KeyError(f"no engine {name!r} (engines: {', '.join(NAMES)})")
