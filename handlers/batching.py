"""The contract between tasks and runtimes: named arrays.

A task turns one request into {input name: array of one example}; `collate` stacks the examples of
a batch into {input name: batch array}, padding each dynamic axis to the longest example of this
batch (never to a global maximum) with the input's pad value; a runtime takes those feeds and
returns its outputs; `example_outputs` cuts one example's answer back out, cropping the output
axes that share a name with a dynamic input axis to that example's own length.

Inputs are described as in the archive's config: {"name", "shape", "dtype", "pad"}, where a string
in "shape" names a dynamic axis. A plain numpy array stands for the feeds of a one-input model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Rows:
    """Several examples from one request (a text task's several texts): each is one row of the
    batch; the request is answered from all of its rows' outputs together."""

    examples: list[dict[str, np.ndarray]]
    meta: Any = None
    outputs: list[list[np.ndarray]] | None = None  # per example, filled in by the handler


def as_feeds(batch: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(batch, dict):
        return batch
    return {names[0]: batch}


def batch_size(batch: Any) -> int:
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def take(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def apply(batch: Any, fn) -> Any:
    """fn on every array of the feeds (or on the array)."""
    return {k: fn(v) for k, v in batch.items()} if isinstance(batch, dict) else fn(batch)


def dynamic_lengths(example: dict[str, np.ndarray], inputs: list[dict[str, Any]]) -> dict[str, int]:
    """{axis name: length} of one example (no batch axis); ValueError when two inputs disagree on
    the length of an axis they share."""
    lengths: dict[str, int] = {}
    for spec in inputs:
        for axis, dim in enumerate(spec["shape"]):
            if isinstance(dim, str):
                length = int(example[spec["name"]].shape[axis])
                if lengths.setdefault(dim, length) != length:
                    raise ValueError(f"axis {dim!r} is {lengths[dim]} long in one input and "
                                     f"{length} in {spec['name']!r}: inputs that share it must "
                                     "agree")
    return lengths


def collate(examples: list[dict[str, np.ndarray]], inputs: list[dict[str, Any]]
            ) -> dict[str, np.ndarray]:
    """One batch of feeds from single examples, dynamic axes padded to this batch's longest."""
    feeds = {}
    for spec in inputs:
        name = spec["name"]
        arrays = [e[name] for e in examples]
        if all(a.shape == arrays[0].shape for a in arrays):
            feeds[name] = np.stack(arrays)
            continue
        longest = tuple(max(sizes) for sizes in zip(*(a.shape for a in arrays), strict=True))
        batch = np.full((len(arrays), *longest), spec.get("pad", 0), dtype=arrays[0].dtype)
        for row, array in enumerate(arrays):
            batch[(row, *(slice(0, n) for n in array.shape))] = array
        feeds[name] = batch
    return feeds


def example_outputs(outputs: list[np.ndarray], row: int, lengths: dict[str, int],
                    output_axes: list[list[Any]] | None) -> list[np.ndarray]:
    """Row `row` of each batched output, with axes named like a dynamic input axis cropped to
    this example's length (the padding of its batch-mates cut off)."""
    result = []
    for i, out in enumerate(outputs):
        one = out[row]
        axes = output_axes[i] if output_axes and i < len(output_axes) else None
        if axes and lengths:
            crop = tuple(slice(0, lengths[name]) if isinstance(name, str) and name in lengths
                         else slice(None) for name in axes[1:1 + one.ndim])
            one = one[crop]
        result.append(one)
    return result
