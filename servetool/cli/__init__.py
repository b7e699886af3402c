"""servetool's command line: thin click commands that parse options and call plain functions,
one module per command group (build: package/convert/bench; serve: deploy and operations;
lifecycle: versions/promote/rollback/watch; monitoring: monitor)."""

from servetool.cli import build, lifecycle, monitoring, serve  # noqa: F401  (their commands join the group)
from servetool.cli.common import main

__all__ = ["main"]
