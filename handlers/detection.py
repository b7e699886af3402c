"""The object-detection task: image bytes in, boxes in the original image's pixels out.

Preprocessing letterboxes the image to the model's input size (aspect kept, centred on a fill
colour; preprocess.py, shared with the gate, validation and the example's training), RGB, scaled
to [0, 1] (configurable). The output layouts people export are decoded, chosen by the spec or
detected from the output's shape:
- "yolov5": [N, anchors, 5 + classes]: box centre x, y, width, height, objectness, class scores
  (a detection's score is objectness x its class score);
- "yolov8": [N, 4 + classes, anchors]: the same without objectness, channels first (YOLOv8, YOLO11);
- "nms": [N, K, 6]: box, score, class, already suppressed (zero rows pad K): end-to-end YOLO
  exports (x1, y1, x2, y2 in pixels) and ultralytics' RT-DETR (cx, cy, w, h normalised to 0..1);
- "detr": [N, queries, 4 + classes]: box and per-class scores, no NMS needed (DETR, RT-DETR);
- "torchvision": three outputs, boxes [N, K, 4] (x1, y1, x2, y2), scores [N, K] and labels [N, K]
  (torchvision's detection heads, exported with a batch axis), already suppressed.
Each layout has a usual box format (BOX_DEFAULTS); the spec's detection.box_format (xyxy, xywh,
cxcywh) and detection.box_units (pixels of the model input, or normalised 0..1) override it.
The image reaches the model letterboxed (aspect kept, padded), stretched, or, for a model whose
input height and width are free (ultralytics' dynamic=True export), letterboxed to its own "rect"
size as ultralytics' predictor does for it (the longer side to the input size, the shorter padded
only up to a multiple of detection.stride) (detection.fit), resized with the kernel the model was
trained with. Rect inputs differ in size from image to image: the handler runs the requests of one
size together (handlers/entry.py groups a batch by its examples' shapes, never pads them).
Then a confidence threshold, boxes that reach into the image only (one wholly in the
letterbox's padding is not an object of this image), class-wise non-maximum suppression
(vectorised numpy, below) up to `max_detections`, and the boxes mapped back through the letterbox and clipped.

Answer: [{"label", "class_id", "score", "box": [x1, y1, x2, y2]}], highest score first, in the
original image's pixels; [] when nothing is found. A multipart request may set "confidence",
"iou" and "max_detections" fields within the spec's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers import preprocess as geometry
from handlers.batching import Rows
from handlers.errors import RequestError
from handlers.imaging import DEFAULT_FORMATS, decode, default_max_pixels
from handlers.payload import request_payload

LAYOUTS = ("yolov5", "yolov8", "nms", "detr", "torchvision")
SUPPRESSED = ("nms", "detr", "torchvision")  # layouts whose model needs no NMS after it
# (format, units) of each layout's boxes unless the spec says otherwise
BOX_DEFAULTS = {"yolov5": ("cxcywh", "pixels"), "yolov8": ("cxcywh", "pixels"),
                "nms": ("xyxy", "pixels"), "detr": ("cxcywh", "normalized"),
                "torchvision": ("xyxy", "pixels")}
OVERRIDES = ("confidence", "iou", "max_detections")


# --- boxes --------------------------------------------------------------------------------------
def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


@dataclass(frozen=True)
class BoxFormat:
    """How a layout's box columns read: corners or sizes, in input pixels or normalised."""

    format: str = "xyxy"
    units: str = "pixels"

    def to_pixels_xyxy(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """x1 y1 x2 y2 in the model input's pixels (width x height)."""
        boxes = np.asarray(boxes, dtype=np.float32)
        if self.format == "cxcywh":
            boxes = xywh_to_xyxy(boxes)
        elif self.format == "xywh":
            boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], axis=1)
        if self.units == "normalized":
            boxes = boxes * np.array([width, height, width, height], np.float32)
        return boxes


def looks_normalised(boxes: np.ndarray, width: int, height: int) -> bool:
    """Boxes read as input pixels (x1 y1 x2 y2) that all lie within [0, 1.5] of an input of at
    least 32 pixels a side: normalised coordinates read as pixels (every object a speck in the
    top-left corner). Boxes without area (a padded [K, 6]'s zero rows) say nothing."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    real = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    return min(width, height) >= 32 and len(real) > 0 and bool(np.abs(real).max() <= 1.5)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b` (x1, y1, x2, y2)."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


NMS_BLOCK = 64  # boxes settled together (see nms)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression, as torchvision's: the indices kept, highest score first
    (the first `limit` of them).

    In score order, a box is kept when no kept box before it overlaps it by more than the
    threshold. The boxes go in blocks of NMS_BLOCK: within a block the rule is settled all at once
    (_settle), then the block's kept boxes remove every later box they overlap in one matrix
    operation, and it stops once `limit` boxes are kept. So the work is about candidates x kept
    IoUs, however crowded the image: settling all candidates at once took 0.9 s for 3,000
    crowded ones (one n x n pass per link of the longest suppression chain); this takes
    milliseconds."""
    order = np.argsort(-scores, kind="stable")
    kept: list[np.ndarray] = []
    count = 0
    while order.size and (limit is None or count < limit):
        block, order = order[:NMS_BLOCK], order[NMS_BLOCK:]
        chosen = block[_settle(boxes[block], iou_threshold)]
        kept.append(chosen)
        count += len(chosen)
        if order.size:
            order = order[~(pairwise_iou(boxes[chosen], boxes[order]) > iou_threshold).any(axis=0)]
    result = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return result if limit is None else result[:limit]


def _settle(ordered: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Which of these boxes (in score order, none overlapped by a box kept before them) greedy
    NMS keeps. From "all kept", a box is kept when no kept box before it overlaps it; iterating
    that rule over all of them at once settles at least one more box of the order per round, so it
    ends at the greedy result, in at most as many rounds as the block has boxes."""
    over = np.triu(pairwise_iou(ordered, ordered) > iou_threshold, k=1)
    keep = np.ones(len(ordered), dtype=bool)
    while True:
        settled = ~(over & keep[:, None]).any(axis=0)
        if np.array_equal(settled, keep):
            return keep
        keep = settled


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Class-wise NMS in one pass: each class's boxes are moved apart from every other class's
    (by more than any box's extent), so boxes of different classes never overlap."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    offset = classes.astype(np.float64)[:, None] * (float(np.abs(boxes).max()) * 2 + 1)
    return nms(boxes + offset, scores, iou_threshold, limit)


# --- output layouts -------------------------------------------------------------------------------
def detect_layout(shape: tuple[int, ...], num_classes: int | None) -> str:
    """The layout of one image's output (no batch axis), or ValueError saying why it is unclear.
    A shape that fits two layouts (or one layout with two box formats) is refused, never
    guessed: a wrong guess answers HTTP 200 with wrong boxes."""
    if len(shape) != 2:
        raise ValueError(f"a detector's output for one image has two axes; this one is {list(shape)}")
    rows, cols = shape
    fits = []
    if num_classes:
        if rows == 4 + num_classes:
            fits.append("yolov8 [4 + classes, anchors]")
        if cols == 5 + num_classes:
            fits.append("yolov5 [anchors, 5 + classes]")
        if cols == 4 + num_classes:
            fits.append("detr [queries, 4 + classes]")
    else:  # no labels: the anchors axis is the long one
        if cols > rows > 4:
            fits.append("yolov8 [4 + classes, anchors]")
        if rows > cols > 6:
            fits.extend(["yolov5 [anchors, 5 + classes]", "detr [queries, 4 + classes]"])
    if cols == 6:
        # end-to-end YOLO (x1 y1 x2 y2 pixels) and ultralytics' RT-DETR (cx cy w h normalised)
        # both write [K, 6]: only the exporter's metadata or the spec can tell them apart
        fits.extend(["nms with x1 y1 x2 y2 in pixels (end-to-end YOLO)",
                     "nms with cx cy w h normalised (RT-DETR)"])
    if len(fits) == 1:
        return fits[0].split()[0]
    classes = f"{num_classes} classes" if num_classes else "no labels"
    raise ValueError(f"the output shape {list(shape)} with {classes} "
                     + (f"fits several layouts ({'; '.join(fits)})" if fits else
                        "fits no known layout (yolov5 [anchors, 5 + classes], yolov8 [4 + classes, "
                        "anchors], nms [K, 6], detr [queries, 4 + classes])")
                     + ": name it in the spec (detection: layout: yolov5 | yolov8 | nms | detr, "
                       "and box_format: xyxy | xywh | cxcywh, box_units: pixels | normalized)")


def resolve_layout(image_shapes: list[tuple[int, ...]], layout: str,
                   num_classes: int | None) -> str:
    """The layout one image's outputs (no batch axis) are read as: the named one, else three
    outputs are torchvision's, else the shape decides (ValueError when it cannot tell)."""
    if layout != "auto":
        return layout
    if len(image_shapes) == 3:
        return "torchvision"
    return detect_layout(tuple(image_shapes[0]), num_classes)


def split_outputs(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A torchvision-style head's (boxes [K, 4], scores [K], labels [K]) from its outputs for one
    image, told apart by shape and values (labels are whole numbers), in whatever order."""
    arrays = [np.asarray(o) for o in outputs]
    boxes = [a for a in arrays if a.ndim == 2 and a.shape[1] == 4]
    flat = [a for a in arrays if a.ndim == 1]
    whole = [a for a in flat if np.issubdtype(a.dtype, np.integer) or
             (np.isfinite(a).all() and np.array_equal(a, np.round(a)) and (a >= 0).all())]
    scores = [a for a in flat if not any(a is w for w in whole)]
    if len(boxes) != 1 or len(flat) != 2 or len(whole) < 1:
        raise ValueError("a torchvision-style head gives boxes [K, 4], scores [K] and labels [K]; "
                         f"this one gives {[list(a.shape) for a in arrays]}")
    labels = whole[0]
    scores = scores[0] if scores else whole[1]  # scores that happen to be whole (all 0 or 1)
    return boxes[0].astype(np.float32), scores.astype(np.float32), labels.astype(np.int64)


def candidates(output: np.ndarray | list[np.ndarray], layout: str, confidence: float,
               boxes_as: BoxFormat | None = None, size: tuple[int, int] = (1, 1)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes x1 y1 x2 y2 in input pixels, scores, class ids) of one image's output above
    `confidence`; `boxes_as`: the box columns' format (default: the layout's usual one), `size`:
    the model input's (width, height), for normalised boxes."""
    boxes_as = boxes_as or BoxFormat(*BOX_DEFAULTS[layout])
    if layout == "torchvision":
        boxes, scores, labels = split_outputs(list(output))
        chosen = scores > confidence
        return boxes_as.to_pixels_xyxy(boxes[chosen], *size), scores[chosen], labels[chosen]
    out = np.asarray(output, dtype=np.float32)
    if layout == "nms":
        scores = out[:, 4]
        chosen = scores > confidence
        return (boxes_as.to_pixels_xyxy(out[chosen, :4], *size), scores[chosen],
                out[chosen, 5].astype(np.int64))
    objectness = None
    if layout == "yolov8":
        out = out.T
        boxes, class_scores = out[:, :4], out[:, 4:]
    elif layout == "detr":
        boxes, class_scores = out[:, :4], out[:, 4:]
    else:
        boxes, objectness, class_scores = out[:, :4], out[:, 4], out[:, 5:]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(classes)), classes]
    if objectness is not None:
        scores = scores * objectness
    chosen = scores > confidence
    return boxes_as.to_pixels_xyxy(boxes[chosen], *size), scores[chosen], classes[chosen]


@dataclass(frozen=True)
class Thresholds:
    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    max_candidates: int = 3000  # the highest-scoring boxes NMS sees (bounds its n x n cost)


def detections(output: np.ndarray | list[np.ndarray], layout: str, t: Thresholds,
               region: tuple[float, float, float, float] | None = None,
               boxes_as: BoxFormat | None = None, size: tuple[int, int] = (1, 1)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's final (boxes, scores, classes) in the model input's pixels, best first.
    With `region` (where the image lies in the input, x1 y1 x2 y2), a box with no area inside it
    (wholly in the letterbox's padding: nothing of the image is there) is no candidate: it
    suppresses nothing and takes no place among `max_detections`."""
    boxes, scores, classes = candidates(output, layout, t.confidence, boxes_as, size)
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise ValueError("the model's output holds NaN or infinity")
    if region is not None and len(boxes):
        x1, y1, x2, y2 = region
        inside = ((np.minimum(boxes[:, 2], x2) > np.maximum(boxes[:, 0], x1))
                  & (np.minimum(boxes[:, 3], y2) > np.maximum(boxes[:, 1], y1)))
        boxes, scores, classes = boxes[inside], scores[inside], classes[inside]
    if len(scores) > t.max_candidates:
        top = np.argsort(-scores, kind="stable")[:t.max_candidates]
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    if layout not in SUPPRESSED:
        keep = batched_nms(boxes, scores, classes, t.iou, t.max_detections)
    else:
        keep = np.argsort(-scores, kind="stable")[:t.max_detections]
    return boxes[keep], scores[keep], classes[keep]


def image_region(box: geometry.Letterbox, width: int, height: int) -> tuple[float, ...]:
    """Where a width x height image lies in its letterboxed input (the inverse of to_original)."""
    return (box.left, box.top, box.left + width * box.scale_x, box.top + height * box.scale_y)


def to_original(boxes: np.ndarray, box: geometry.Letterbox, width: int, height: int) -> np.ndarray:
    """Boxes in the letterboxed input's pixels -> the original image's, clipped to it."""
    mapped = ((boxes - np.array([box.left, box.top, box.left, box.top], np.float32))
              / np.array([box.scale_x, box.scale_y, box.scale_x, box.scale_y], np.float32))
    return np.clip(mapped, 0, [width, height, width, height])


# --- the task -------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """One request's letterbox geometry, original size and thresholds, kept beside its array."""

    box: geometry.Letterbox
    width: int
    height: int
    thresholds: Thresholds


class ObjectDetection:
    output_names: list[str] = []

    def __init__(self, config: dict[str, Any], labels: list[str] | None) -> None:
        self.channels, self.height, self.width = config["input_shape"]
        self.input_name = (config.get("inputs") or [{"name": "input"}])[0]["name"]
        pre = config.get("preprocess") or {}
        det = config.get("detection") or {}
        self.fill = int((pre.get("letterbox") or {}).get("fill", 114))
        self.fit = det.get("fit") or "letterbox"
        self.stride = int(det.get("stride") or 32)  # letterbox-rect's
        self.interpolation = pre.get("interpolation") or "bilinear"
        self.scale = float(det.get("scale", 1 / 255))
        self.formats = tuple(pre.get("formats") or DEFAULT_FORMATS)
        self.max_pixels = int(pre.get("max_pixels") or default_max_pixels(self.height, self.width))
        self.jpeg_draft = pre.get("jpeg_draft") is True  # as the classifier: only when asked
        self.layout = det.get("layout", "auto")
        self.box_format, self.box_units = det.get("box_format"), det.get("box_units")
        base = Thresholds()  # the spec writes every field; these are for a config without them
        self.defaults = Thresholds(float(det.get("confidence", base.confidence)),
                                   float(det.get("iou", base.iou)),
                                   int(det.get("max_detections", base.max_detections)),
                                   int(det.get("max_candidates", base.max_candidates)))
        self.min_confidence = float(det.get("min_confidence", 0.001))
        self.max_detections_limit = int(det.get("max_detections_limit", 300))
        self.labels = labels

    # a request's own thresholds: multipart fields beside the image
    def thresholds(self, request: dict[str, Any]) -> Thresholds:
        given = {k: request[k] for k in OVERRIDES if request.get(k) not in (None, b"", "")}
        if not given:
            return self.defaults
        values = {}
        for key, raw in given.items():
            text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
            try:
                values[key] = int(text) if key == "max_detections" else float(text)
            except ValueError:
                kind = "a whole number" if key == "max_detections" else "a number"
                raise RequestError(400, f"{key} must be {kind}, not {text[:40]!r}") from None
        limits = {"confidence": (self.min_confidence, 1.0), "iou": (0.01, 1.0),
                  "max_detections": (1, self.max_detections_limit)}
        for key, value in values.items():
            low, high = limits[key]
            if not (low <= value <= high):  # also refuses NaN
                raise RequestError(400, f"{key} {value} is outside what this model allows "
                                        f"({low} to {high})")
        return Thresholds(values.get("confidence", self.defaults.confidence),
                          values.get("iou", self.defaults.iou),
                          int(values.get("max_detections", self.defaults.max_detections)),
                          self.defaults.max_candidates)

    def image(self, payload: Any):
        return decode(payload, mode="L" if self.channels == 1 else "RGB", formats=self.formats,
                      max_pixels=self.max_pixels,
                      draft_size=(self.width, self.height) if self.jpeg_draft else None)

    def letterboxed(self, image) -> tuple[np.ndarray, geometry.Letterbox]:
        """The model input for one decoded image, and where the image sits in it."""
        if self.fit == "stretch":
            canvas, box = geometry.stretch(image, self.height, self.width,
                                           interpolation=self.interpolation)
        else:
            stride = self.stride if self.fit == "letterbox-rect" else None
            canvas, box = geometry.letterbox(image, self.height, self.width, fill=self.fill,
                                             stride=stride, interpolation=self.interpolation)
        array = np.asarray(canvas, dtype=np.float32) * self.scale
        array = array[None, :, :] if array.ndim == 2 else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array), box

    def preprocess_request(self, request: dict[str, Any]) -> Rows:
        """The whole TorchServe request: the image (the body, or the multipart field that is not
        a threshold) and the thresholds beside it."""
        fields = {k: v for k, v in request.items() if k not in OVERRIDES}
        return self.preprocess(request_payload(fields), self.thresholds(request))

    def preprocess(self, payload: Any, thresholds: Thresholds | None = None) -> Rows:
        thresholds = thresholds or self.defaults
        image = self.image(payload)
        array, box = self.letterboxed(image)
        return Rows([{self.input_name: array}], Prepared(box, image.width, image.height, thresholds))

    def layout_for(self, outputs: list[np.ndarray]) -> str:
        """The layout of one image's outputs: the spec's, else found from them once."""
        self.layout = resolve_layout([tuple(np.shape(o)) for o in outputs], self.layout,
                                     len(self.labels) if self.labels else None)
        return self.layout

    def decode(self, outputs: list[np.ndarray], thresholds: Thresholds,
               region: tuple[float, ...] | None = None, size: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's detections (in the model input's pixels) from all of its outputs; `size`:
        the (width, height) it was fed at (a rect input's own; default the input size)."""
        layout = self.layout_for(outputs)
        usual = BOX_DEFAULTS[layout]
        boxes_as = BoxFormat(self.box_format or usual[0], self.box_units or usual[1])
        return detections(outputs if layout == "torchvision" else outputs[0], layout, thresholds,
                          region, boxes_as, size or (self.width, self.height))

    def detect(self, outputs: list[np.ndarray], prepared: Prepared,
               thresholds: Thresholds | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's detections in its own pixels: what the handler answers, the gate judges
        and the example's training evaluates."""
        region = image_region(prepared.box, prepared.width, prepared.height)
        boxes, scores, classes = self.decode(outputs, thresholds or prepared.thresholds, region,
                                             (prepared.box.width, prepared.box.height))
        return to_original(boxes, prepared.box, prepared.width, prepared.height), scores, classes

    def postprocess(self, rows: Rows) -> list[dict[str, Any]]:
        boxes, scores, classes = self.detect((rows.outputs or [[]])[0], rows.meta)
        return [{"label": self._label(int(c)), "class_id": int(c), "score": round(float(s), 5),
                 "box": [round(float(v), 2) for v in b]}
                for b, s, c in zip(boxes, scores, classes, strict=True)]

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels and 0 <= index < len(self.labels) else str(index)
