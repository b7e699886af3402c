"""Dynamic batching for the in-process engine, as TorchServe's frontend batches: when a worker is
free, it takes the oldest waiting request and waits at most `max_delay_s` for more, up to
`max_size`, then hands the batch to that worker's thread. The event loop never runs a model.

One request never fails another: the handler answers each request of a batch on its own (a 4xx
for the bad one, the rest served), and a batch the handler itself cannot run answers 500 for its
requests only. A full queue answers 503, as TorchServe's does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class QueueFull(Exception):
    pass


class Batcher:
    """Requests of one model version -> batches on its free workers.

    `workers` is an asyncio.Queue of free workers; `run(worker, items)` runs a batch on one (in
    its thread) and returns one Reply per item."""

    def __init__(self, run: Callable[[Any, list[dict[str, Any]]], list[Reply]],
                 max_size: int, max_delay_s: float, queue_limit: int = 100) -> None:
        self.run = run
        self.max_size = max(1, max_size)
        self.max_delay_s = max(0.0, max_delay_s)
        self.queue_limit = queue_limit
        self.waiting: deque[tuple[dict[str, Any], asyncio.Future, float]] = deque()
        self.free: asyncio.Queue = asyncio.Queue()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.busy = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for _, future, _ in self.waiting:
            if not future.done():
                future.set_exception(QueueFull("the model version was unloaded"))
        self.waiting.clear()

    @property
    def pending(self) -> int:
        return len(self.waiting)

    async def submit(self, item: dict[str, Any]) -> Reply:
        if len(self.waiting) >= self.queue_limit:
            raise QueueFull(f"the queue is full ({self.queue_limit} requests waiting)")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future, time.monotonic()))
        self.arrived.set()
        return await future

    async def _loop(self) -> None:
        while True:
            worker = await self.free.get()
            if worker is None:  # a worker slot removed by scaling down
                continue
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = self.waiting[0][2] + self.max_delay_s
            while len(self.waiting) < self.max_size and time.monotonic() < deadline:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
            batch = [self.waiting.popleft() for _ in range(min(self.max_size, len(self.waiting)))]
            batch = [entry for entry in batch if not entry[1].done()]  # a client gone
            if not batch:
                self.free.put_nowait(worker)
                continue
            asyncio.get_running_loop().create_task(self._dispatch(worker, batch))

    async def _dispatch(self, worker: Any, batch: list) -> None:
        self.busy += 1
        try:
            replies = await asyncio.get_running_loop().run_in_executor(
                worker.executor, self.run, worker, [item for item, _, _ in batch])
        except Exception as exc:  # noqa: BLE001 (the handler itself failed: this batch only)
            replies = [Reply(500, {"Content-Type": "application/json"},
                             f'{{"code": 500, "type": "handler_error", "message": '
                             f'"the handler failed ({type(exc).__name__})"}}'.encode())] * len(batch)
        finally:
            self.busy -= 1
            if not worker.retired:
                self.free.put_nowait(worker)
        for (_, future, _), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)
