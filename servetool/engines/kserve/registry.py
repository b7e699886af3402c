"""Models, versions and workers of the in-process engine, and the archives they load.

An archive is loaded only from the model store, by file name (as servetool's TorchServe front
allows), unpacked into the run folder, and served by the handler code it was built for
(handlers/entry.py's ServeHandler: one instance per worker, each with its own runtime session and
thread, as TorchServe gives each worker a process). Versions of a model keep a default that
/predictions/NAME answers; /predictions/NAME/VERSION answers that version.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servetool.engines.kserve.batcher import Batcher, Reply
from servetool.engines.kserve.context import BatchContext

ARCHIVE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.mar\Z")
DEFAULT_QUEUE = 100


class NotFound(Exception):
    pass


class Refused(Exception):
    """A management call that cannot be carried out (400/409 for the client)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Worker:
    id: str
    handler: Any
    executor: ThreadPoolExecutor
    started: float = field(default_factory=time.time)
    retired: bool = False


class Version:
    def __init__(self, name: str, version: str, archive: Path, folder: Path,
                 manifest: dict[str, Any], config: dict[str, Any], metrics: Any) -> None:
        self.name, self.version, self.archive, self.folder = name, version, archive, folder
        self.manifest, self.config, self.metrics = manifest, config, metrics
        self.workers: list[Worker] = []
        self.batcher = Batcher(self.run, int(config.get("batchSize") or 1),
                               float(config.get("maxBatchDelay") or 0) / 1000.0,
                               DEFAULT_QUEUE)
        self.loaded_at = time.time()
        self._next_id = 0

    def run(self, worker: Worker, items: list[dict[str, Any]]) -> list[Reply]:
        """One batch through one worker's handler (in that worker's thread)."""
        context = BatchContext(str(self.folder), self.manifest, self.config, self.metrics,
                               len(items))
        bodies = worker.handler.handle(items, context)
        return [Reply(context.statuses[i][0], context.headers[i], bytes(body))
                for i, body in enumerate(bodies)]

    async def add_worker(self) -> Worker:
        """A new handler instance, initialised in its own thread (loading blocks)."""
        from handlers.entry import ServeHandler

        executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-{self.version}")
        handler = ServeHandler()
        context = BatchContext(str(self.folder), self.manifest, self.config, self.metrics, 0)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, handler.initialize,
                                                             context)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._next_id += 1
        worker = Worker(f"{self._next_id:04d}", handler, executor)
        self.workers.append(worker)
        self.batcher.free.put_nowait(worker)
        return worker

    def retire_worker(self) -> None:
        worker = self.workers.pop()
        worker.retired = True  # a busy one finishes its batch, then is not put back
        worker.executor.shutdown(wait=False)

    async def close(self) -> None:
        await self.batcher.stop()
        while self.workers:
            self.retire_worker()

    def describe(self) -> dict[str, Any]:
        """As TorchServe's management API describes a version (the fields servetool reads)."""
        return {
            "modelName": self.name, "modelVersion": self.version, "modelUrl": self.archive.name,
            "runtime": "python", "minWorkers": len(self.workers), "maxWorkers": len(self.workers),
            "batchSize": self.batcher.max_size,
            "maxBatchDelay": int(self.batcher.max_delay_s * 1000),
            "loadedAtStartup": False,
            "workers": [{"id": w.id, "startTime": time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(w.started)), "status": "READY",
                "memoryUsage": 0, "pid": 0, "gpu": False, "gpuUsage": "N/A"}
                for w in self.workers],
            "jobQueueStatus": {"remainingCapacity": self.batcher.queue_limit - self.batcher.pending,
                               "pendingRequests": self.batcher.pending},
        }


class Registry:
    def __init__(self, store: Path, work: Path, metrics: Any) -> None:
        self.store, self.work, self.metrics = store.resolve(), work, metrics
        self.models: dict[str, dict[str, Version]] = {}
        self.defaults: dict[str, str] = {}
        self.lock = asyncio.Lock()  # one management change at a time

    # --- reading ---------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> Version:
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"Model not found: {name}")
        version = version or self.defaults[name]
        if version not in versions:
            raise NotFound(f"Model version: {version} does not exist for model: {name}")
        return versions[version]

    def describe(self, name: str, version: str | None) -> list[dict[str, Any]]:
        """version None: the default; "all": every version."""
        if version == "all":
            self.get(name)
            return [v.describe() for _, v in sorted(self.models[name].items())]
        return [self.get(name, version).describe()]

    def listing(self) -> dict[str, Any]:
        return {"models": [{"modelName": name, "modelUrl": self.get(name).archive.name}
                           for name in sorted(self.models)]}

    # --- changing --------------------------------------------------------------------------------
    async def register(self, url: str, name: str | None, workers: int | None) -> str:
        """`workers` None: the archive's minWorkers, else one per core (as TorchServe's auto)."""
        if not ARCHIVE_NAME.fullmatch(url or ""):
            raise Refused(f"only an archive of the model store, by file name, may be registered "
                          f"(got {url!r})", 403)
        archive = self.store / url
        if not archive.is_file() or archive.is_symlink():
            raise Refused(f"Model not found in model store: {url}", 404)
        async with self.lock:
            folder, manifest, config = self._unpack(archive)
            meta = manifest.get("model", {})
            model = name or meta.get("modelName")
            version = str(meta.get("modelVersion") or "1.0")
            if model != meta.get("modelName"):
                shutil.rmtree(folder, ignore_errors=True)
                raise Refused(f"the archive {url} holds model {meta.get('modelName')!r}, "
                              f"not {model!r}")
            if version in self.models.get(model, {}):
                shutil.rmtree(folder, ignore_errors=True)
                raise Refused(f"Model version {version} is already registered for model "
                              f"{model}", 409)
            entry = Version(model, version, archive, folder, manifest, config, self.metrics)
            if workers is None:
                from handlers.runtimes import available_cores

                workers = int(config.get("minWorkers") or available_cores())
            try:
                for _ in range(max(1, workers)):
                    await entry.add_worker()
            except Exception as exc:
                await entry.close()
                shutil.rmtree(folder, ignore_errors=True)
                raise Refused(f"Failed to load model {model} {version}: "
                              f"{type(exc).__name__}: {exc}", 500) from None
            entry.batcher.start()
            self.models.setdefault(model, {})[version] = entry
            self.defaults.setdefault(model, version)
        return (f'Model "{model}" Version: {version} registered with {len(entry.workers)} '
                "initial workers")

    async def unregister(self, name: str, version: str | None) -> str:
        async with self.lock:
            entry = self.get(name, version)
            if entry.version == self.defaults[name] and len(self.models[name]) > 1:
                raise Refused(f"Cannot remove default version {entry.version} for model {name}",
                              409)
            del self.models[name][entry.version]
            if not self.models[name]:
                del self.models[name], self.defaults[name]
            await entry.close()
            shutil.rmtree(entry.folder, ignore_errors=True)
        return f'Model "{name}" unregistered'

    async def scale(self, name: str, version: str | None, workers: int) -> str:
        async with self.lock:
            entry = self.get(name, version)
            while len(entry.workers) < workers:
                await entry.add_worker()
            while len(entry.workers) > max(workers, 0):
                entry.retire_worker()
        return "Processing worker updates..."

    def set_default(self, name: str, version: str) -> str:
        self.get(name, version)
        self.defaults[name] = version
        return f"Default version successfully updated for model \"{name}\" to \"{version}\""

    async def close(self) -> None:
        for versions in self.models.values():
            for entry in versions.values():
                await entry.close()

    def _unpack(self, archive: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        import json

        folder = self.work / f"{archive.stem}-{time.time_ns()}"
        folder.mkdir(parents=True)
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():  # no path may leave the folder
                target = (folder / member).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise Refused(f"{archive.name}: member {member!r} leaves the archive's folder")
            zf.extractall(folder)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
        config_name = manifest.get("model", {}).get("configFile")
        config = yaml.safe_load((folder / config_name).read_text()) if config_name else {}
        return folder, manifest, config or {}
