"""Reference parity: servetool's served answer against what the model's own library answers.

`package` runs, for each reference that applies to the spec (a module in this package), the
library's own inference on raw inputs (image files of several sizes, texts) and the unpacked
archive's handler in-process (servetool.convert.reference.served) on the same inputs, and compares the
answers. A difference past the spec's tolerance stops packaging and names the stage that differs;
where the library is not importable the report says "not checked against the library", never
nothing. The libraries are optional: none of them is a dependency of the serving image.

A reference module offers:
    applies(spec) -> bool                  is this the model's library (by source, files, metadata)
    check(spec, served) -> str             compare; return the line `package` prints, or raise
                                           ReferenceMismatch (naming the stage) or LibraryMissing
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from servetool.convert.reference.served import ServedPath
from servetool.errors import ServetoolError
from servetool.model.spec import ModelSpec

# In order; every one that applies runs.
REFERENCES = ("classification", "detection", "text")
NOT_CHECKED = "not checked against the library"


class ReferenceMismatch(ServetoolError):
    """servetool's served answer differs from the library's: the message names the input, the
    stage (decoding, resize, normalisation, layout, thresholds, tokenizer, head) and by how much."""


class LibraryMissing(Exception):
    """The reference library cannot be imported here; the message says which and why."""


def check(spec: ModelSpec, folder: Path, config: dict, progress: Callable[[str], None]) -> list[str]:
    """Compare the unpacked archive in `folder` (model-config `config`) with every reference that
    applies; returns the report lines (also given to progress)."""
    lines: list[str] = []
    served: ServedPath | None = None
    for name in REFERENCES:
        module = importlib.import_module(f"servetool.convert.reference.{name}")
        if not module.applies(spec):
            continue
        if served is None:
            served = ServedPath(folder, config)
        try:
            line = module.check(spec, served)
        except LibraryMissing as missing:
            line = f"{NOT_CHECKED}: {missing}"
        lines.append(line)
    if not lines:
        lines.append(f"{NOT_CHECKED}: no reference library is known for this model "
                     f"({spec.source.kind} source, task {spec.task})")
    for line in lines:
        progress(f"{spec.name}: reference: {line}")
    return lines
