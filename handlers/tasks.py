"""The task part of the handler: turn one request into one model input, one output into JSON.

A task never sees the runtime; it raises RequestError for a request it cannot use, and the handler
answers that request alone with a 4xx while the rest of the batch goes on. Decoding lives in
imaging.py (image bytes) and tensors.py (JSON arrays), shared with the gate and calibration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlers import preprocess as geometry
from handlers.batching import dynamic_lengths
from handlers.errors import RequestError
from handlers.imaging import DEFAULT_FORMATS, decode, default_max_pixels
from handlers.payload import request_payload
from handlers.tensors import DTYPES, parse_json, to_array

__all__ = ["RequestError", "ImageClassification", "Tensor", "make_task", "output_problem",
           "request_payload"]


class ImageClassification:
    """Image bytes in (the spec's accepted formats), top-k {label: probability} out."""

    def __init__(self, config: dict[str, Any], labels: list[str] | None) -> None:
        self.channels, self.height, self.width = config["input_shape"]
        pre = config.get("preprocess") or {}
        self.resize = pre.get("resize")  # int: shorter side (aspect kept); [h, w]: exact
        self.interpolation = pre.get("interpolation") or "bilinear"
        self.crop = pre.get("center_crop")
        self.crop_offsets = pre.get("crop_offsets") or "round"
        self.letterbox = pre.get("letterbox")  # {fill, stride}: fit inside the input size
        self.invert = bool(pre.get("invert"))
        # draft decoding gives other pixels than the full decode the model was trained on: only
        # when the spec asks for it (an archive without the key decodes fully too)
        self.jpeg_draft = pre.get("jpeg_draft") is True
        self.formats = tuple(pre.get("formats") or DEFAULT_FORMATS)
        # The decode cost is bounded by what the model sees, unless the spec sets its own limit.
        seen = ((self.resize, self.resize) if isinstance(self.resize, int)
                else self.resize or (self.height, self.width))
        self.max_pixels = int(pre.get("max_pixels") or default_max_pixels(*seen))
        self.mean = np.asarray(pre.get("mean") or [0.0], np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(pre.get("std") or [1.0], np.float32).reshape(-1, 1, 1)
        self.dtype = DTYPES[config.get("input_dtype", "float32")]
        self.labels = labels
        self.top_k = int(config.get("top_k", 5))

    def _draft_size(self) -> tuple[int, int] | None:
        """The (width, height) the image is scaled towards, where it is (for JPEG draft mode)."""
        if not self.jpeg_draft:
            return None
        if self.letterbox:
            return self.width, self.height
        if isinstance(self.resize, int):
            return self.resize, self.resize  # both sides at least: the shorter one too
        return (self.resize[1], self.resize[0]) if self.resize else None

    def preprocess(self, payload: Any) -> np.ndarray:
        image = decode(payload, mode="L" if self.channels == 1 else "RGB", formats=self.formats,
                       max_pixels=self.max_pixels, draft_size=self._draft_size())
        width, height = image.size
        if self.letterbox:
            image, _ = geometry.letterbox(image, self.height, self.width,
                                          fill=int(self.letterbox.get("fill", 114)),
                                          interpolation=self.interpolation)
        elif self.resize:
            image = geometry.resize(image, self.resize, self.interpolation)
        if self.crop:
            image = geometry.center_crop(image, self.crop[0], self.crop[1], self.crop_offsets)
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
        if not np.isfinite(scores).all():
            raise ValueError("the model's output holds NaN or infinity")
        probs = scores if _is_distribution(scores) else _softmax(scores)
        k = min(self.top_k, probs.size)
        top = np.argsort(-probs, kind="stable")[:k]
        names = self.labels or []
        return {(names[i] if i < len(names) else str(i)): round(float(probs[i]), 6) for i in top}


class Tensor:
    """JSON in: for one input, an array of its shape (or {"data": array}); for several, an object
    with an array per input name. Out: the outputs as JSON lists (an object by output name when
    there are several)."""

    output_names: list[str] = []

    def __init__(self, config: dict[str, Any], labels: list[str] | None) -> None:
        self.inputs = config.get("inputs") or [{
            "name": "input", "shape": config["input_shape"],
            "dtype": config.get("input_dtype", "float32"),
            "allow_nonfinite": config.get("allow_nonfinite", False)}]
        self.allow_nonfinite = any(i.get("allow_nonfinite") for i in self.inputs)

    def preprocess(self, payload: Any) -> np.ndarray | dict[str, np.ndarray]:
        value = parse_json(payload, allow_nonfinite=self.allow_nonfinite)
        if len(self.inputs) == 1:
            if isinstance(value, dict):
                if "data" not in value:
                    raise RequestError(400, "a JSON object must carry the input under \"data\"")
                value = value["data"]
            return self._array(self.inputs[0], value)
        if not isinstance(value, dict):
            raise RequestError(400, "this model takes several inputs: send a JSON object with "
                                    f"{', '.join(repr(i['name']) for i in self.inputs)}")
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in value]
        unknown = [k for k in value if k not in names]
        if missing or unknown:
            raise RequestError(400, "the JSON object must hold exactly the inputs "
                                    f"{', '.join(map(repr, names))}"
                                    + (f"; missing {', '.join(map(repr, missing))}" if missing else "")
                                    + (f"; unknown {', '.join(map(repr, unknown))}" if unknown
                                       else ""))
        feeds = {i["name"]: self._array(i, value[i["name"]]) for i in self.inputs}
        try:
            dynamic_lengths(feeds, self.inputs)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        return feeds

    def _array(self, spec: dict[str, Any], value: Any) -> np.ndarray:
        return to_array(value, tuple(spec["shape"]), spec.get("dtype", "float32"),
                        allow_nonfinite=bool(spec.get("allow_nonfinite")), name=spec["name"])

    def postprocess(self, outputs: list[np.ndarray]) -> Any:
        if len(outputs) == 1:
            return np.asarray(outputs[0]).tolist()
        names = self.output_names if len(self.output_names) == len(outputs) else [
            f"output_{i}" for i in range(len(outputs))]
        return {name: np.asarray(o).tolist() for name, o in zip(names, outputs, strict=True)}


TASKS = {"image-classification": ImageClassification, "tensor": Tensor}


TEXT_OUTPUT_RANKS = {"feature-extraction": 2, "text-classification": 2, "token-classification": 3,
                     "text-reranking": 2}


def output_problem(task: str, shapes: list[tuple[int, ...]], names: list[str],
                   batch: int, layout: str = "auto", num_classes: int | None = None) -> str | None:
    """Why a model's outputs (for a batch of `batch` examples) cannot serve `task`, or None.
    Checked at package time, so a model never answers plausible-looking nonsense. A detector's
    `layout` and `num_classes` (its labels) say how its output is read."""
    described = ", ".join(f"{n} {list(s)}" for n, s in zip(names, shapes, strict=True))
    if any(not s or s[0] != batch for s in shapes):
        return (f"the model's outputs ({described}) do not all start with the batch axis (a batch "
                f"of {batch} went in)")
    if task == "object-detection":
        return _detection_problem(shapes, described, layout, num_classes)
    if task in TEXT_OUTPUT_RANKS:
        rank = TEXT_OUTPUT_RANKS[task]
        if len(shapes) != 1 or len(shapes[0]) != rank:
            axes = "[batch, hidden]" if task == "feature-extraction" else (
                "[batch, labels]" if rank == 2 else "[batch, sequence, labels]")
            return f"{task} needs one output of shape {axes}; the model gives {described}"
        if task == "text-reranking" and shapes[0][1] != 1:  # one relevance score per pair
            return (f"text-reranking needs one score per pair, an output of shape [batch, 1]; "
                    f"the model gives {described}: use task: text-classification")
        return None
    if task != "image-classification":
        return None
    if len(shapes) != 1:
        return (f"image-classification needs one output of shape [batch, classes]; the model has "
                f"{len(shapes)} ({described}): use task: tensor for its raw outputs")
    shape = shapes[0]
    if len(shape) >= 2 and all(d == 1 for d in shape[2:]) and shape[1] >= 2:
        return None
    hint = ("it looks like a detector's output (boxes and class scores per anchor)"
            if len(shape) == 3 and max(shape[1:]) >= 100 and min(shape[1:]) >= 5
            else "it is not one score per class")
    return (f"image-classification needs one output of shape [batch, classes]; the model's output "
            f"{names[0]} has shape {list(shape)} ({hint}): use task: tensor for its raw output")


def _detection_problem(shapes: list[tuple[int, ...]], described: str, layout: str,
                       num_classes: int | None) -> str | None:
    from handlers.detection import detect_layout

    if layout == "torchvision" or (len(shapes) == 3 and layout == "auto"):
        ranks = sorted(len(s) for s in shapes)
        if len(shapes) == 3 and ranks == [2, 2, 3] and any(len(s) == 3 and s[2] == 4 for s in shapes) and \
                len({s[1] for s in shapes}) == 1:
            return None
        return (f"a torchvision-style head gives boxes [batch, K, 4], scores [batch, K] and "
                f"labels [batch, K]; the model gives {described}")
    if len(shapes) != 1 or len(shapes[0]) != 3:
        return (f"object-detection reads one output of shape [batch, anchors, 5 + classes] "
                f"(yolov5), [batch, 4 + classes, anchors] (yolov8), [batch, K, 6] (nms) or "
                f"[batch, queries, 4 + classes] (detr), or three (torchvision: boxes, scores, "
                f"labels); the model gives {described}")
    rows, cols = shapes[0][1:]
    if layout == "auto":
        try:
            layout = detect_layout((rows, cols), num_classes)
        except ValueError as exc:
            return str(exc)
    expected = {"yolov5": cols - 5, "yolov8": rows - 4, "nms": None, "detr": cols - 4}[layout]
    if layout == "nms" and cols != 6:
        return f"layout nms reads [batch, K, 6]; the model gives {described}"
    if expected is not None and expected < 1:
        return f"layout {layout} leaves no class scores in {described}"
    if expected is not None and num_classes and expected != num_classes:
        return (f"layout {layout} reads {expected} class scores from {described}, but the labels "
                f"name {num_classes} classes")
    return None


def make_task(config: dict[str, Any], labels: list[str] | None, model_dir: str = "."):
    """The task the archive's config names; text tasks load their tokenizer from model_dir."""
    from handlers.text_tasks import TEXT_TASKS  # late: the tokenizers library, for text only

    if config.get("task") in TEXT_TASKS:
        return TEXT_TASKS[config["task"]](config, labels, model_dir)
    if config.get("task") == "object-detection":
        from handlers.detection import ObjectDetection

        return ObjectDetection(config, labels)
    try:
        task_class = TASKS[config["task"]]
    except KeyError:
        raise ValueError(f"unknown task {config.get('task')!r}; known: "
                         f"{', '.join([*TASKS, 'object-detection', *TEXT_TASKS])}") from None
    return task_class(config, labels)


def _is_distribution(scores: np.ndarray) -> bool:
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and abs(scores.sum() - 1.0) < 1e-3)


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()
