"""The task part of the handler: turn one request into one model input, one output into JSON.

A task never sees the runtime; it raises RequestError for a request it cannot use, and the handler
answers that request alone with a 4xx while the rest of the batch goes on.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

# Pillow is imported lazily by the image task: tensor-only archives do not need it.

DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


class RequestError(Exception):
    """A bad request: answered with `status` and a JSON body naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def request_payload(request: dict[str, Any]) -> Any:
    """The payload of one TorchServe request: the raw body, or the first multipart field."""
    for key in ("body", "data"):
        if request.get(key) is not None:
            return request[key]
    for value in request.values():
        if isinstance(value, (bytes, bytearray, str, list, dict)):
            return value
    raise RequestError(400, "empty request: send the input as the request body or a form field")


class ImageClassification:
    """Image bytes in (any format Pillow reads), top-k {label: probability} out."""

    def __init__(self, config: dict[str, Any], labels: list[str] | None) -> None:
        self.channels, self.height, self.width = config["input_shape"]
        pre = config.get("preprocess") or {}
        self.resize = pre.get("resize")
        self.crop = pre.get("center_crop")
        self.invert = bool(pre.get("invert"))
        self.max_pixels = int(pre.get("max_pixels") or 25_000_000)
        self.mean = np.asarray(pre.get("mean") or [0.0], np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(pre.get("std") or [1.0], np.float32).reshape(-1, 1, 1)
        self.dtype = DTYPES[config.get("input_dtype", "float32")]
        self.labels = labels
        self.top_k = int(config.get("top_k", 5))

    def preprocess(self, payload: Any) -> np.ndarray:
        from PIL import Image, ImageOps

        if isinstance(payload, str):
            payload = payload.encode("latin-1", "replace")
        if isinstance(payload, (dict, list)):
            raise RequestError(415, "expected image bytes, got JSON: send the image file itself")
        if not payload:
            raise RequestError(400, "empty request body: send the bytes of an image")
        try:
            image = Image.open(io.BytesIO(payload))
        except Image.DecompressionBombError as exc:
            raise RequestError(413, f"image rejected as too large: {exc}") from None
        except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
            raise RequestError(400, "request body is not a readable image "
                                    "(corrupt, or a format Pillow does not know)") from None
        width, height = image.size
        # Checked from the header, before decoding, so a huge image costs nothing.
        if width * height > self.max_pixels:
            raise RequestError(413, f"image is {width}x{height} = {width * height} pixels, over "
                                    f"the limit of {self.max_pixels}")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(400, f"image could not be decoded: {exc}") from None
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.resize:
            image = image.resize((self.resize[1], self.resize[0]), Image.BILINEAR)
        if self.crop:
            image = _center_crop(image, self.crop[0], self.crop[1])
        array = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
        if self.invert:
            array = 1.0 - array
        array = array[None, :, :] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape != (self.channels, self.height, self.width):
            raise RequestError(400, f"image is {width}x{height} and preprocesses to "
                                    f"{array.shape[2]}x{array.shape[1]}, but the model takes "
                                    f"{self.width}x{self.height}")
        return ((array - self.mean) / self.std).astype(self.dtype, copy=False)

    def postprocess(self, outputs: list[np.ndarray]) -> dict[str, float]:
        scores = np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        probs = scores if _is_distribution(scores) else _softmax(scores)
        k = min(self.top_k, probs.size)
        top = np.argsort(-probs, kind="stable")[:k]
        names = self.labels or []
        return {(names[i] if i < len(names) else str(i)): round(float(probs[i]), 6) for i in top}


class Tensor:
    """A JSON array (or {"data": array}) of the spec's shape in, the outputs as JSON lists out."""

    def __init__(self, config: dict[str, Any], labels: list[str] | None) -> None:
        self.shape = tuple(config["input_shape"])
        self.dtype = DTYPES[config.get("input_dtype", "float32")]

    def preprocess(self, payload: Any) -> np.ndarray:
        if isinstance(payload, (bytes, bytearray)):
            if not payload:
                raise RequestError(400, "empty request body: send a JSON array")
            try:
                payload = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(400, f"request body is not valid JSON: {exc}") from None
        elif isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError as exc:
                raise RequestError(400, f"request body is not valid JSON: {exc}") from None
        if isinstance(payload, dict):
            if "data" not in payload:
                raise RequestError(400, "a JSON object must carry the input under \"data\"")
            payload = payload["data"]
        if not isinstance(payload, list):
            raise RequestError(400, f"expected a JSON array of shape {list(self.shape)}")
        try:
            array = np.array(payload, dtype=self.dtype)
        except (ValueError, TypeError):
            raise RequestError(400, f"input must be a rectangular array of numbers of shape "
                                    f"{list(self.shape)}") from None
        if array.shape != self.shape:
            raise RequestError(400, f"input has shape {list(array.shape)}, the model takes "
                                    f"{list(self.shape)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(400, "input contains NaN or infinity")
        return array

    def postprocess(self, outputs: list[np.ndarray]) -> Any:
        if len(outputs) == 1:
            return np.asarray(outputs[0]).tolist()
        return [np.asarray(o).tolist() for o in outputs]


TASKS = {"image-classification": ImageClassification, "tensor": Tensor}


def make_task(config: dict[str, Any], labels: list[str] | None):
    try:
        task_class = TASKS[config["task"]]
    except KeyError:
        raise ValueError(f"unknown task {config.get('task')!r}; known: {', '.join(TASKS)}") from None
    return task_class(config, labels)


def _center_crop(image, height: int, width: int):
    if image.width < width or image.height < height:
        raise RequestError(400, f"image is {image.width}x{image.height} after resizing, smaller "
                                f"than the {width}x{height} crop")
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _is_distribution(scores: np.ndarray) -> bool:
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and abs(scores.sum() - 1.0) < 1e-3)


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()
