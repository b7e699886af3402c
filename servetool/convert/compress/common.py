"""What every step of `servetool compress` shares: its error and its progress callback."""

from __future__ import annotations

from collections.abc import Callable

from servetool.errors import ServetoolError

Progress = Callable[[str], None]

# The tasks whose compression gate exists (metric.py): top-1 for classifiers, cosine to the
# original's outputs for other tensor models. Detectors (mAP, box losses) and text models are not.
SUPPORTED_TASKS = ("image-classification", "tensor")


class CompressError(ServetoolError):
    """A compression that cannot start or was refused; one line for the user."""


def quiet(_: str) -> None:
    pass
