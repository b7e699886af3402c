"""Per-request errors: what a caller is told when one request of a batch cannot be answered.

Messages go back to the client, so they carry no traceback and no server paths; the full trace
stays in the worker's log (model_log.log).
"""

from __future__ import annotations

import json
import re
from typing import Any

# The reason phrase of the HTTP status line is a fixed standard one: a request-controlled message
# there could carry bytes no status line may hold.
REASONS = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Entity", 500: "Internal Server Error", 507: "Insufficient Storage"}
MAX_DETAIL = 300
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.+@-]+){2,}/?")
_OBJECT = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class RequestError(Exception):
    """A request the handler cannot answer: `status` and a JSON body naming the problem."""

    def __init__(self, status: int, message: str, kind: str = "invalid_input") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "Error")

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status, "type": self.kind}


def describe(exc: BaseException) -> str:
    """`ClassName: first line of the message`, scrubbed of paths and object addresses."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    first = _OBJECT.sub("the input", _PATH.sub("<path>", first))
    if len(first) > MAX_DETAIL:
        first = first[:MAX_DETAIL] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def model_failure(exc: BaseException) -> RequestError:
    """The model raised on this input alone (the rest of its batch was answered)."""
    if isinstance(exc, MemoryError):
        return RequestError(507, f"the model ran out of memory on this input ({describe(exc)})",
                            "model_error")
    return RequestError(422, f"the model could not process this input ({describe(exc)})",
                        "model_error")


def to_json_bytes(answer: Any) -> bytes:
    """One answer as compact JSON; NaN or infinity in an output is refused, not sent as invalid
    JSON (json.dumps would write the bare token NaN, which JSON parsers reject)."""
    return json.dumps(answer, allow_nan=False, separators=(",", ":")).encode("utf-8")
