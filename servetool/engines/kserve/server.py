"""The KServe engine's server process: `python -m servetool.engines.kserve.server CONFIG.json`.

CONFIG: {"host", "ports": {"inference", "management", "metrics"}, "model_store", "run_dir",
"token_auth", "max_request_size"}. It writes RUN_DIR/key_file.json (0600; TorchServe's layout, so
one client reads either engine's keys), serves the three apps on `host` (loopback unless the
config says otherwise: KServe's own ModelServer would bind 0.0.0.0) and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn

from servetool.engines.kserve.app import inference_app, management_app, metrics_app
from servetool.engines.kserve.metrics import HandlerMetrics
from servetool.engines.kserve.protocol import ArchiveModel
from servetool.engines.kserve.registry import Registry
from servetool.runfiles import write_private

logger = logging.getLogger("servetool.kserve")
DEFAULT_MAX_REQUEST_SIZE = 6553500  # TorchServe's default, so both engines refuse alike


def write_keys(run_dir: Path, shared: str | None = None) -> dict[str, str]:
    """Fresh keys; or one `shared` key for every API (a Kubernetes Secret's, the same in every
    pod, so that clients reach any replica)."""
    now = datetime.now().isoformat()
    keys = {kind: shared or secrets.token_urlsafe(32) for kind in ("management", "inference", "API")}
    write_private(run_dir / "key_file.json", json.dumps(
        {kind: {"key": key, "created": now} for kind, key in keys.items()}, indent=2) + "\n")
    return keys


async def serve(config: dict[str, Any]) -> None:
    run_dir = Path(config["run_dir"])
    keys = write_keys(run_dir, config.get("token")) if config.get("token_auth", True) else {}
    metrics = HandlerMetrics()
    registry = Registry(Path(config["model_store"]), run_dir / "kserve-models", metrics)
    if config.get("load_models") == "all":  # a pod: every archive before the port opens
        await load_all(registry)

    def sync() -> None:  # KServe's repository answers v1/v2 for each model's default version
        repository = registry.kserve_models
        for name in list(repository.get_models()):
            if name not in registry.models:
                repository.unload(name)
        for name in registry.models:
            if repository.get_model(name) is None:
                repository.update(ArchiveModel(name, registry))

    apps = {"inference": inference_app(registry, keys.get("inference"),
                                       int(config.get("max_request_size")
                                           or DEFAULT_MAX_REQUEST_SIZE)),
            "management": management_app(registry, keys.get("management"), sync),
            "metrics": metrics_app(metrics.exposition)}
    servers = [uvicorn.Server(uvicorn.Config(app, host=config["host"],
                                             port=int(config["ports"][api]), log_level="warning",
                                             access_log=False, lifespan="off", loop="uvloop",
                                             http="httptools"))
               for api, app in apps.items()]
    for server in servers:
        server.install_signal_handlers = lambda: None  # noqa: E731 (ours below, for all three)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    tasks = [loop.create_task(server.serve()) for server in servers]
    logger.info("servetool KServe engine on %s: %s", config["host"], config["ports"])
    await stopping.wait()
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await registry.close()


async def load_all(registry: Registry) -> None:
    """Every archive of the store; of several versions of a model, the highest is the default
    (as `servetool deploy` makes it)."""
    for path in sorted(registry.store.glob("*.mar")):
        message = await registry.register(path.name, None, None)
        logger.info("%s", message)
    for name, versions in registry.models.items():
        registry.defaults[name] = max(versions, key=lambda v: archive_version_key(v))


def archive_version_key(version: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.replace("-", ".").split("."))


def from_environment(config: dict[str, Any]) -> dict[str, Any]:
    """SERVETOOL_KSERVE_HOST and SERVETOOL_KSERVE_{INFERENCE,MANAGEMENT,METRICS}_PORT override the
    file: a container on the host's network binds loopback and the ports servetool chose."""
    import os

    host = os.environ.get("SERVETOOL_KSERVE_HOST", config["host"])
    ports = {api: int(os.environ.get(f"SERVETOOL_KSERVE_{api.upper()}_PORT", port))
             for api, port in config["ports"].items()}
    extra = {"load_models": os.environ.get("SERVETOOL_KSERVE_LOAD_MODELS",
                                           config.get("load_models")),
             "token": os.environ.get("SERVETOOL_KSERVE_TOKEN") or config.get("token")}
    return {**config, "host": host, "ports": ports, **extra}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = from_environment(json.loads(Path(argv[0]).read_text()))
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
