"""The TorchServe handler servetool puts in every archive: one runtime (format) composed with one task.

TorchServe's contract (initialize, preprocess, inference, postprocess), with one difference from
BaseHandler: every request of a batch carries its own outcome, so a corrupt image answers 4xx for
that request alone while the rest of the batch is served and the worker lives.

Its settings come from the archive's model-config.yaml, section `handler:` (written by servetool).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from handlers.runtimes import load_runtime, threads_per_worker
from handlers.tasks import RequestError, make_task, request_payload

logger = logging.getLogger(__name__)
JSON = "application/json"


class ServeHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.context = None

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        model_config = context.model_yaml_config or {}
        config = model_config.get("handler") or {}
        missing = [k for k in ("runtime", "artifact", "task", "input_shape") if k not in config]
        if missing:
            raise ValueError(f"model-config.yaml handler section lacks {', '.join(missing)}")
        options = config.get("runtime_options") or {}
        threads = int(options.get("intra_op_threads")
                      or threads_per_worker(model_config.get("maxWorkers")))
        self.runtime = load_runtime(config["runtime"], os.path.join(model_dir, config["artifact"]),
                                    threads, options)
        self.task = make_task(config, self._labels(model_dir, config))
        logger.info("servetool handler ready: %s, %s on %s, %d intra-op thread(s)",
                    config["task"], config.get("format"), config["runtime"], threads)
        self.initialized = True

    def _labels(self, model_dir: str, config: dict[str, Any]) -> list[str] | None:
        """The archive's labels file, else the labels the model file carries in its metadata."""
        if config.get("labels"):
            with open(os.path.join(model_dir, config["labels"]), encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        from_model = self.runtime.metadata.get("labels")
        return (json.loads(from_model) or None) if from_model else None

    def preprocess(self, requests: list[dict[str, Any]]) -> list[np.ndarray | RequestError]:
        items: list[np.ndarray | RequestError] = []
        for request in requests:
            try:
                items.append(self.task.preprocess(request_payload(request)))
            except RequestError as error:
                items.append(error)
        return items

    def inference(self, items: list[np.ndarray | RequestError]) -> list[Any]:
        """Runs the good requests as one batch; bad ones pass through untouched."""
        good = [i for i, item in enumerate(items) if not isinstance(item, RequestError)]
        results: list[Any] = list(items)
        if good:
            outputs = self.runtime.run(np.stack([items[i] for i in good]))
            for row, i in enumerate(good):
                results[i] = [out[row] for out in outputs]
        return results

    def postprocess(self, results: list[Any]) -> list[Any]:
        return [r if isinstance(r, RequestError) else self.task.postprocess(r) for r in results]

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        self.context = context
        answers = self.postprocess(self.inference(self.preprocess(data)))
        replies = []
        for idx, answer in enumerate(answers):
            context.set_response_content_type(idx, JSON)
            if isinstance(answer, RequestError):
                context.set_response_status(answer.status, answer.message, idx)
                answer = answer.body()
            replies.append(answer)
        return replies


_service = ServeHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; it calls handle(None, context) once at load time."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
