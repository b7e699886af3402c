"""Where a TorchServe request keeps its payload: every task reads it from here (the image detector
too, which also reads the form fields beside it), so no task module imports another for it."""

from __future__ import annotations

from typing import Any

from handlers.errors import RequestError


def request_payload(request: dict[str, Any]) -> Any:
    """The payload of one TorchServe request: the raw body, or the first multipart field."""
    for key in ("body", "data"):
        if request.get(key) is not None:
            return request[key]
    for value in request.values():
        if isinstance(value, (bytes, bytearray, str, list, dict)) and len(value):
            return value
    # TorchServe also drops a body sent as application/x-www-form-urlencoded (curl -d's default),
    # whose text became a form field's name
    raise RequestError(400, "empty request: send the input as the request body or a form field "
                            "(curl -d/--data-binary sends a form unless given a Content-Type: add "
                            "-H 'Content-Type: text/plain' or application/json, or use -T FILE)")
