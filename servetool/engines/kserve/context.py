"""What handlers/entry.py reads of TorchServe's `context`, for one batch, and the request items
as TorchServe's worker would hand them over (so the handler answers byte for byte alike)."""

from __future__ import annotations

import json
from typing import Any


class BatchContext:
    """One batch's context: the model's static properties, and each request's reply status and
    headers as the handler sets them."""

    def __init__(self, model_dir: str, manifest: dict[str, Any], config: dict[str, Any],
                 metrics: Any, size: int) -> None:
        self.system_properties = {"model_dir": model_dir, "gpu_id": None,
                                  "batch_size": config.get("batchSize", 1)}
        self.model_yaml_config = config
        self.manifest = manifest
        self.model_name = manifest.get("model", {}).get("modelName", "")
        self.metrics = metrics
        self.statuses: list[tuple[int, str]] = [(200, "OK")] * size
        self.headers: list[dict[str, str]] = [{} for _ in range(size)]

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.headers[idx]["Content-Type"] = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.headers[idx][key] = value

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def decoded(value: bytes, content_type: str) -> Any:
    """A request part as TorchServe's worker decodes it (ts/protocol/otf_message_handler.py):
    JSON parsed, text as str, anything else as bytes; what fails to decode stays bytes."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return bytearray(value)
    if kind.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return bytearray(value)
    return bytearray(value)
