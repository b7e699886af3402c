"""What a deployment should serve, kept in its run folder: `deployed.json` and the lock every change
to it takes, and the pinned names of the archives it points to in the model store.

    {"format": 2, "models": {NAME: {"default": "2.0", "history": ["1.0", "2.0"], "keep": 2,
                                    "versions": {"1.0": {"archive", "digest", "workers",
                                                          "loaded_at", "source"}, ...}}}}

The operations that change it (install, promote, rollback, restore, and the intent an install
leaves while it runs) are the lifecycle's (servetool/operate/lifecycle.py); a target reads it, holds
its lock while it changes the engine (scale), and forgets what a new image no longer holds.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from servetool import runfiles

RECORD_FILE = "deployed.json"
LOCK_FILE = "lifecycle.lock"
FORMAT = 2
DEFAULT_KEEP = 2
PINNED = re.compile(r"^(?P<name>.+)--(?P<version>[A-Za-z0-9_.-]+)--(?P<digest>[0-9a-f]{12})\.mar$")


def pinned_name(name: str, version: str, digest: str) -> str:
    # '+' would reach TorchServe's query decoder as a space
    return f"{name}--{version.replace('+', '_')}--{digest[:12]}.mar"


def is_pinned(path: Path) -> bool:
    return PINNED.match(path.name) is not None


def read_record(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{model: {default, history, keep, versions: {version: {...}}}}, upgraded from the first
    format ({model: {version, digest, archive, workers}}) where an older servetool wrote it."""
    try:
        raw = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    if raw.get("format") == FORMAT:
        return raw.get("models") or {}
    models = {}
    for name, entry in raw.items():
        if isinstance(entry, dict) and entry.get("version"):
            version = str(entry["version"])
            models[name] = {"default": version, "history": [version], "keep": DEFAULT_KEEP,
                            "versions": {version: {k: entry.get(k) for k in
                                                   ("archive", "digest", "workers")}}}
    return models


def write_record(run_dir: Path, models: dict[str, dict[str, Any]]) -> None:
    runfiles.write_private(run_dir / RECORD_FILE,
                           json.dumps({"format": FORMAT, "models": models}, indent=2) + "\n")


def recorded_archives(run_dir: Path, model_store: Path) -> list[Path]:
    """Every recorded version's archive that the store still holds."""
    found = []
    for model in read_record(run_dir).values():
        for entry in model.get("versions", {}).values():
            path = model_store / str(entry.get("archive") or "")
            if path.suffix == ".mar" and path.is_file():
                found.append(path)
    return found


@contextlib.contextmanager
def locked(run_dir: Path, say: Callable[[str], None] | None = None,
           timeout_s: float | None = None) -> Iterator[dict[str, dict[str, Any]]]:
    """The record, under an exclusive lock of the run folder; written back on the way out.
    Take it before changing the engine, and keep it until the record says what was changed. A lock
    held elsewhere is waited for (saying by whom) at most `timeout_s` (runfiles.lock_timeout_s(),
    60 s by default), then runfiles.LockBusy; another user's lock file is refused at once."""
    runfiles.private_folder(run_dir)
    with runfiles.exclusive(run_dir / LOCK_FILE, timeout_s=timeout_s, say=say):
        models = read_record(run_dir)
        try:
            yield models
        finally:
            write_record(run_dir, models)
