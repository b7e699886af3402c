"""spec -> export -> gate -> archive: `servetool package` for one model (the convert layer's
pipeline.convert, then the engine's archive with its pre-flight and reference parity)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from servetool import engines
from servetool.convert import reference
from servetool.convert.pipeline import Progress, convert, describe, quiet
from servetool.model.spec import ModelSpec


def package(spec: ModelSpec, model_store: Path, *, atol: float | None = None,
            accept_drift: bool = False, engine: str = "torchserve",
            progress: Progress = quiet) -> dict[str, Any]:
    """Convert to the spec's format, gate, archive and pre-flight one model; returns a summary."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"servetool-export-{spec.name}-") as tmp:
        artifact, report = convert(spec, spec.format, Path(tmp), atol=atol,
                                   accept_drift=accept_drift, progress=progress)
        progress(f"{spec.name}: archiving and pre-flighting the handler")
        checked: list[str] = []

        def against_library(folder: Path, config: dict[str, Any]) -> None:
            checked.extend(reference.check(spec, folder, config, progress))

        mar = engines.get(engine).build(spec, artifact, model_store, verify=against_library)
        converted = describe(artifact, report)
    return {
        "name": spec.name,
        "version": spec.version,
        "format": spec.format,
        "task": spec.task,
        "engine": engine,
        "archive": str(mar),
        "archive_bytes": mar.stat().st_size,
        "artifact_bytes": converted["size_bytes"],
        "notes": converted["notes"],
        "parity": converted["gate"],
        "reference": checked,
        "seconds": round(time.perf_counter() - started, 2),
    }
