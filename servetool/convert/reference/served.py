"""servetool's served path run in-process: the unpacked archive's own handler, as a TorchServe
worker runs it (TorchServe's Context), on raw request bodies. What reference parity compares with
the model's own library, and what tests call instead of a server when they need one batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ServedPath:
    """The handler of an unpacked archive (its folder holds the artifact, labels, tokenizer and
    the `handlers` package) with its model-config.yaml, ready to answer batches of bodies."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from ts.context import Context

        from handlers.entry import ServeHandler

        self.folder = folder
        self.config = config
        self._context = Context("reference", str(folder), {}, 1, None, "0.12.0",
                                model_yaml_config=config)
        self.handler = ServeHandler()
        self.handler.initialize(self._context)

    def answer(self, bodies: list[bytes]) -> tuple[list[Any], list[int], list[str]]:
        """One batch: each request's JSON answer, status and reason phrase."""
        from ts.context import RequestProcessor

        context = self._context
        context.request_processor = [RequestProcessor({}) for _ in bodies]
        replies = self.handler.handle([{"body": b} for b in bodies], context)
        raw = [context.get_response_status(i) for i in range(len(bodies))]
        return ([json.loads(r) for r in replies], [s[0] or 200 for s in raw],
                [s[1] for s in raw])

    def answer_one(self, body: bytes) -> Any:
        """One request's answer; a 4xx/5xx is raised as ValueError naming the handler's reason."""
        replies, statuses, reasons = self.answer([body])
        if statuses[0] != 200:
            raise ValueError(f"servetool answered {statuses[0]}: {reasons[0] or replies[0]}")
        return replies[0]
