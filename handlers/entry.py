"""The TorchServe handler servetool puts in every archive: one runtime (format) composed with one task.

TorchServe's contract (initialize, preprocess, inference, postprocess), with one difference from
BaseHandler: every request of a batch carries its own outcome, whatever a step raises. An input the
task cannot decode or use answers 4xx for that request alone; when the model raises on a batch, its
requests are run one by one and only the one the model fails on answers 422; the rest of the batch
is served and the worker lives. Answers are serialized here, as compact JSON.

Its settings come from the archive's model-config.yaml, section `handler:` (written by servetool).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from handlers.batching import Rows, as_feeds, collate, dynamic_lengths, example_outputs
from handlers.errors import RequestError, describe, model_failure, to_json_bytes
from handlers.metrics import STEPS, BatchMetrics
from handlers.runtimes import load_runtime, threads_per_worker
from handlers.tasks import make_task, request_payload

logger = logging.getLogger(__name__)
JSON = "application/json"
VERSION_HEADER = "X-Model-Version"


def _not_request_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Backend received inference")


def quiet_request_lines() -> None:
    """Drop the line TorchServe's worker prints for every batch it receives. It goes to stdout, where
    the frontend reads, parses and then discards it (servetool's log4j2.xml denies it): CPU on both
    sides of the pipe for nothing, which shows on small models (benchmarks/serving.py)."""
    for handler in logging.getLogger().handlers:
        if _not_request_line not in handler.filters:
            handler.addFilter(_not_request_line)


class ServeHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.context = None
        self.version = ""
        self.metrics = BatchMetrics("", "")

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        model_config = context.model_yaml_config or {}
        config = model_config.get("handler") or {}
        missing = [k for k in ("runtime", "artifact", "task") if k not in config]
        if missing or not (config.get("inputs") or config.get("input_shape")):
            raise ValueError("model-config.yaml handler section lacks "
                             f"{', '.join(missing or ['inputs'])}")
        # archives from before named inputs carry input_shape/input_dtype: one input, "input"
        self.inputs = config.get("inputs") or [{"name": "input", "shape": config["input_shape"],
                                                "dtype": config.get("input_dtype", "float32")}]
        options = {**(config.get("runtime_options") or {}),
                   "input_names": [i["name"] for i in self.inputs]}
        threads = int(options.get("intra_op_threads")
                      or threads_per_worker(model_config.get("maxWorkers")))
        self.runtime = load_runtime(config["runtime"], os.path.join(model_dir, config["artifact"]),
                                    threads, options)
        self.task = make_task({**config, "inputs": self.inputs}, self._labels(model_dir, config),
                              model_dir)
        self.task.output_names = list(self.runtime.output_names)
        # Every answer says which version gave it (X-Model-Version), so a client, a canary split
        # or a test sees the switch from one version to the next.
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        self.version = str(model.get("modelVersion") or "")
        self.metrics = BatchMetrics(str(model.get("modelName") or getattr(context, "model_name", "")),
                                    self.version)
        logger.info("servetool handler ready: %s, %s on %s, %d intra-op thread(s)",
                    config["task"], config.get("format"), config["runtime"], threads)
        self.initialized = True
        quiet_request_lines()

    def _labels(self, model_dir: str, config: dict[str, Any]) -> list[str] | None:
        """The archive's labels file, else the labels the model file carries in its metadata."""
        if config.get("labels"):
            with open(os.path.join(model_dir, config["labels"]), encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        from_model = self.runtime.metadata.get("labels")
        return (json.loads(from_model) or None) if from_model else None

    def preprocess(self, requests: list[dict[str, Any]]) -> list[Any]:
        """One model input per request, or the RequestError that answers it."""
        return [self._guard(self._preprocess_one, request, 400, "the input could not be used")
                for request in requests]

    def _preprocess_one(self, request: dict[str, Any]) -> np.ndarray:
        if hasattr(self.task, "preprocess_request"):  # a task that reads fields beside the payload
            return self.task.preprocess_request(request)
        return self.task.preprocess(request_payload(request))

    def inference(self, items: list[Any]) -> list[Any]:
        """Runs the good requests as one batch (dynamic axes padded to this batch's longest; one
        batch per shape where examples differ on a fixed axis); bad ones pass through untouched.
        A request may bring several rows (Rows: a text task's texts). When the batch run raises,
        each request runs alone, so only the one the model cannot process gets an error."""
        good = [i for i, item in enumerate(items) if not isinstance(item, RequestError)]
        results: list[Any] = list(items)
        rows = {i: self._rows(items[i]) for i in good}
        for group in self._same_fixed_shapes(good, rows):
            self._run_batch(group, items, rows, results)
        return results

    def _same_fixed_shapes(self, good: list[int], rows: dict[int, list]) -> list[list[int]]:
        """The requests in groups whose examples agree on every axis the config fixes: padding
        joins examples along dynamic axes only. Examples that differ on a fixed one (a detector's
        rect letterbox, each image at its own height and width) are run in separate batches;
        padding them would feed the model grey-less borders it never saw."""
        groups: dict[tuple, list[int]] = {}
        for i in good:
            key = tuple(tuple(n for n, dim in zip(e[spec["name"]].shape, spec["shape"], strict=False)
                              if not isinstance(dim, str))
                        for e in rows[i] for spec in self.inputs)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run_batch(self, good: list[int], items: list[Any], rows: dict[int, list],
                   results: list[Any]) -> None:
        flat = [example for i in good for example in rows[i]]
        try:
            outputs = self.runtime.run(collate(flat, self.inputs))
            row = 0
            for i in good:
                cut = [self._cut(outputs, row + k, e) for k, e in enumerate(rows[i])]
                results[i] = self._answer(items[i], cut)
                row += len(rows[i])
        except Exception as exc:
            if len(good) == 1:
                logger.warning("the model failed on request %d", good[0], exc_info=True)
                results[good[0]] = model_failure(exc)
                return
            logger.warning("the model failed on a batch of %d; running them one by one (%s)",
                           len(good), describe(exc))
            for i in good:
                results[i] = self._run_alone(items[i], rows[i], i)

    def _rows(self, item: Any) -> list[dict[str, np.ndarray]]:
        names = [spec["name"] for spec in self.inputs]
        return item.examples if isinstance(item, Rows) else [as_feeds(item, names)]

    @staticmethod
    def _answer(item: Any, cut: list[list[np.ndarray]]) -> Any:
        if isinstance(item, Rows):
            return Rows(item.examples, item.meta, cut)
        return cut[0]

    def _cut(self, outputs: list[np.ndarray], row: int, example: dict[str, np.ndarray]) -> list:
        lengths = dynamic_lengths(example, self.inputs)
        return example_outputs(outputs, row, lengths, self.runtime.output_axes)

    def _run_alone(self, item: Any, examples: list[dict[str, np.ndarray]], index: int) -> Any:
        try:
            outputs = self.runtime.run(collate(examples, self.inputs))
            return self._answer(item, [self._cut(outputs, k, e) for k, e in enumerate(examples)])
        except Exception as exc:
            logger.warning("the model failed on request %d", index, exc_info=True)
            return model_failure(exc)

    def postprocess(self, results: list[Any]) -> list[Any]:
        """One answer per request as JSON bytes, or the RequestError that answers it."""
        return [r if isinstance(r, RequestError)
                else self._guard(self._postprocess_one, r, 422,
                                 "the model's output for this input could not be turned into an "
                                 "answer") for r in results]

    def _postprocess_one(self, outputs: list[np.ndarray]) -> bytes:
        return to_json_bytes(self.task.postprocess(outputs))

    def _guard(self, step: Any, value: Any, status: int, what: str) -> Any:
        """step(value), or the RequestError for this request alone, whatever the step raised."""
        try:
            return step(value)
        except RequestError as error:
            return error
        except MemoryError as exc:
            return RequestError(507, f"{what}: out of memory ({describe(exc)})")
        except Exception as exc:
            logger.warning("%s", what, exc_info=True)
            kind = "invalid_input" if status == 400 else "model_error"
            return RequestError(status, f"{what} ({describe(exc)})", kind)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        self.context = context
        marks = [time.perf_counter()]
        items = self.preprocess(data)
        marks.append(time.perf_counter())
        results = self.inference(items)
        marks.append(time.perf_counter())
        answers = self.postprocess(results)
        marks.append(time.perf_counter())
        self.metrics.record(
            getattr(context, "metrics", None),
            {step: marks[i + 1] - marks[i] for i, step in enumerate(STEPS)}, len(data),
            [a.status if isinstance(a, RequestError) else 200 for a in answers],
            [a.kind for a in answers if isinstance(a, RequestError)])
        replies = []
        for idx, answer in enumerate(answers):
            context.set_response_content_type(idx, JSON)
            if self.version:
                context.set_response_header(idx, VERSION_HEADER, self.version)
            if isinstance(answer, RequestError):
                context.set_response_status(answer.status, answer.reason, idx)
                answer = to_json_bytes(answer.body())
            replies.append(answer)
        return replies


_service = ServeHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; it calls handle(None, context) once at load time."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    try:
        return _service.handle(data, context)
    except Exception as exc:  # a defect of the handler itself: still one JSON answer per request
        logger.exception("servetool handler failed on a batch of %d", len(data))
        error = RequestError(500, f"the handler failed ({describe(exc)})", "handler_error")
        for idx in range(len(data)):
            context.set_response_content_type(idx, JSON)
            context.set_response_status(error.status, error.reason, idx)
        return [to_json_bytes(error.body()) for _ in data]
