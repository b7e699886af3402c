"""What servetool records about a TorchServe it started (RUN_DIR/server.json), and what both the
process (process.py) and its API client (management.py) take from it: the record, its URLs, and
TorchServe's default size limit. The arrows go one way: process -> management -> state."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from servetool.engines.torchserve import pod

STATE_FILE = "server.json"
DEFAULT_MAX_REQUEST_SIZE = 6553500  # TorchServe's (and max_response_size's), when unset


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class ServerState:
    """What servetool records about a server it started (run_dir/server.json)."""

    run_dir: str
    pid: int  # the launcher, leader of the process group that holds the JVM and its workers
    host: str
    ports: dict[str, int]
    model_store: str
    token_auth: bool = True
    started_at: float = field(default_factory=time.time)
    front: bool = False  # management through servetool's front (front_key.json beside the keys)
    jvm_pid: int | None = None  # recorded once the server is healthy
    split_metrics_port: int | None = None  # HAProxy's exporter, when the split fronts inference
    clients_port: int | None = None  # the OpenAI/TEI clients' front (clients.py)
    engine: str = "torchserve"  # or "kserve" (servetool/engines/kserve): the same APIs

    def url(self, api: str) -> str:
        return f"http://{url_host(self.host)}:{self.ports[api]}"

    @property
    def key_file(self) -> Path:
        return Path(self.run_dir) / "key_file.json"

    @property
    def front_key_file(self) -> Path | None:
        return Path(self.run_dir) / pod.FRONT_KEY_FILE if self.front else None

    @property
    def log_dir(self) -> Path:
        return Path(self.run_dir) / "logs"


def load_state(run_dir: Path) -> ServerState | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return ServerState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
