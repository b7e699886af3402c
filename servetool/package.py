"""spec -> export -> parity gate -> archive: the whole of `servetool package` for one model."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servetool import archive, export, validate
from servetool.spec import ModelSpec

PARITY_BATCH_SIZES = (1, 4, 16)  # more than one, so a batch axis frozen at export is caught


def package(spec: ModelSpec, model_store: Path, *, atol: float | None = None,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Export, check and archive one model; returns what was done, for --json."""
    started = time.perf_counter()
    progress(f"{spec.name}: loading the original model ({spec.source.kind})")
    original = export.load_original(spec)
    with tempfile.TemporaryDirectory(prefix=f"servetool-export-{spec.name}-") as tmp:
        progress(f"{spec.name}: exporting to {spec.format}")
        artifact = export.export(spec, original, Path(tmp))
        progress(f"{spec.name}: checking parity of {artifact.name} against the original")
        batches = [export.example_batch(spec, n, seed=n) for n in PARITY_BATCH_SIZES]
        report = validate.check_parity(export.runner_for(original), export.runner_for(artifact, spec.format),
                                       batches, spec.format, atol=atol)
        validate.require_parity(report, spec.name)
        progress(f"{spec.name}: archiving and pre-flighting the handler")
        mar = archive.build_archive(spec, artifact, model_store)
        artifact_bytes = artifact.stat().st_size
    return {
        "name": spec.name,
        "version": spec.version,
        "format": spec.format,
        "task": spec.task,
        "archive": str(mar),
        "archive_bytes": mar.stat().st_size,
        "artifact_bytes": artifact_bytes,
        "parity": report.as_dict(),
        "seconds": round(time.perf_counter() - started, 2),
    }
