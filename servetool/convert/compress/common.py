"""What every step of `servetool compress` shares: its error and its progress callback."""

from __future__ import annotations

from collections.abc import Callable

from servetool.errors import ServetoolError

Progress = Callable[[str], None]

# The only task whose compression gate exists so far: top-1 accuracy against the original.
SUPPORTED_TASKS = ("image-classification",)


class CompressError(ServetoolError):
    """A compression that cannot start or was refused; one line for the user."""


def quiet(_: str) -> None:
    pass
