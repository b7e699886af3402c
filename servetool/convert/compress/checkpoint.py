"""The compress checkpoint, OUT/.compress/checkpoint.pt: what a rerun resumes from.

It holds only plain data and tensors (torch.load(..., weights_only=True) reads it, nothing is
unpickled into code): the pruning steps as torch-pruning's pruning histories (module names and
channel indices), the model's state_dict, each training stage's progress (epochs, best weights,
optimizer and scheduler state) and the report rows made so far. A fingerprint of the original's
files and of the settings that shape the model tells a checkpoint of another compression apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from servetool.convert.compress.common import Progress
from servetool.model.spec import ModelSpec

WORK_DIR = ".compress"
FILE = "checkpoint.pt"
FORMAT = 1


def work_dir(out: Path) -> Path:
    return out / WORK_DIR


def fingerprint(spec: ModelSpec) -> str:
    """The original's files and the settings a checkpoint's model depends on. Epochs, the time
    budget and patience are left out: a rerun may train longer, and goes on from the epoch saved."""
    options = spec.compress
    digest = hashlib.sha256()
    for path in (spec.source.path, spec.source.model_file):
        if path is not None and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    shape = {"prune": asdict(options.prune) if options.prune else None,
             "student": asdict(options.student) if options.student else None,
             "train": str(options.distill.train.path) if options.distill else None,
             "distill": {k: v for k, v in asdict(options.distill).items()
                         if k in ("lr", "batch", "temperature", "alpha", "seed", "holdout")}
             if options.distill else None}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def load(out: Path, expected: str, progress: Progress) -> dict[str, Any] | None:
    """The saved state, if there is one for this compression (else None: start over)."""
    path = work_dir(out) / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        progress(f"ignoring the unreadable checkpoint {path} ({type(exc).__name__}): starting over")
        return None
    if state.get("format") != FORMAT or state.get("fingerprint") != expected:
        progress(f"the checkpoint in {path} is of another original or other compress settings: "
                 "starting over")
        return None
    progress(f"resuming from {path}")
    return state


def save(out: Path, state: dict[str, Any]) -> None:
    """Written whole to a temporary file, then renamed: an interrupted save leaves the last one."""
    folder = work_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / (FILE + ".partial")
    torch.save({**state, "format": FORMAT}, scratch)
    os.replace(scratch, folder / FILE)


def clear(out: Path) -> None:
    shutil.rmtree(work_dir(out), ignore_errors=True)
