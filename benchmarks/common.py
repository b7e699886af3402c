"""What the benchmarks that drive the CLI as a user would share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVETOOL = str(Path(sys.executable).with_name("servetool"))


def cli(*args: str, cwd: Path, env: dict | None = None, timeout_s: float = 900) -> str:
    """`servetool ARGS` in `cwd`; its stdout, or the end of its stderr as the reason to stop."""
    proc = subprocess.run([SERVETOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"servetool {' '.join(args)} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout
