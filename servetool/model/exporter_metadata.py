"""What an exported model file says about itself, read so that users need not retype it.

ultralytics writes its export's facts into the ONNX file's metadata (`metadata_props`): the class
`names` (a Python dict literal), `task`, `imgsz`, `stride`, `batch`, the `head` module, an
`end2end` flag (NMS inside the graph) and the export's `args` (`dynamic`, `nms`). From them follow
the output layout, the box format, how the image was fitted (RT-DETR stretches, YOLO letterboxes;
a dynamic=True export, whose input height and width are free, is letterboxed to each image's own
"rect" size, as ultralytics' predictor does for it) and resized (OpenCV's INTER_LINEAR, which
servetool's "opencv-bilinear" calls), the letterbox fill and ultralytics' own predict defaults
(conf 0.25, iou 0.7, max_det 300). Other exporters (the YOLOv5 repository among them) write
`names` alone; it is read from any ONNX file.

Every item read is described in `Hints.notes`, which `package` prints: nothing is guessed silently,
and every item can be overridden by the spec key named beside it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ultralytics' DetectionPredictor defaults (ultralytics/cfg/default.yaml)
ULTRALYTICS_THRESHOLDS = {"confidence": 0.25, "iou": 0.7, "max_detections": 300}
ULTRALYTICS_TASKS = {"detect": "object-detection", "classify": "image-classification"}


@dataclass
class Hints:
    """Spec defaults found in the file; `notes`: one line per item, naming where it came from."""

    exporter: str = ""
    labels: list[str] | None = None
    task: str | None = None  # ultralytics' own task name (detect, segment, pose, ...)
    detection: dict[str, Any] = field(default_factory=dict)  # DetectionOptions fields
    # [height, width] the export was made at (ultralytics' `imgsz`): the largest input of a
    # model whose input height and width are dynamic
    imgsz: list[int] | None = None
    dynamic_hw: bool = False  # the file's first input has free height and width axes
    preprocess: dict[str, Any] = field(default_factory=dict)  # Preprocess fields
    notes: list[str] = field(default_factory=list)


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def dynamic_image_axes(path: Path) -> bool:
    """The ONNX file's first input is [batch, channels, height, width] with height and width
    free (named or unset dimensions)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    first = next((i for i in graph.input if i.name not in initializers), None)
    dims = list(first.type.tensor_type.shape.dim) if first is not None else []
    return len(dims) == 4 and all(not d.HasField("dim_value") for d in dims[2:])


def parse_names(text: str) -> list[str] | None:
    """`names` as exporters write it: {0: 'person', 1: 'bicycle'} or ['person', 'bicycle'] (a
    Python literal, never evaluated as code), as a list in class-id order."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
        if sorted(value) != list(range(len(value))):
            return None
        return [str(value[i]) for i in range(len(value))]
    if isinstance(value, (list, tuple)) and value:
        return [str(v) for v in value]
    return None


def onnx_hints(path: Path) -> Hints:
    """What the ONNX file's metadata says (empty Hints when it says nothing servetool uses)."""
    meta = onnx_metadata(path)
    hints = Hints()
    names = parse_names(meta["names"]) if "names" in meta else None
    is_ultralytics = meta.get("author", "").lower() == "ultralytics"
    where = "ultralytics' ONNX metadata" if is_ultralytics else "the ONNX metadata"
    if names:
        hints.labels = names
        hints.notes.append(f"labels: {len(names)} class names from {where} "
                           f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                           "a labels file overrides them")
    if not is_ultralytics:
        return hints
    hints.exporter = f"ultralytics {meta.get('version', '')}".strip()
    hints.task = meta.get("task")
    hints.dynamic_hw = dynamic_image_axes(path)
    hints.imgsz = _imgsz(meta)
    if hints.task == "detect":
        _ultralytics_detector(meta, hints)
    return hints


def _imgsz(meta: dict[str, str]) -> list[int] | None:
    """`imgsz` as [height, width] (ultralytics writes [h, w]; an int is square)."""
    try:
        value = ast.literal_eval(meta.get("imgsz", "None"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    value = [value, value] if isinstance(value, int) else value
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and v > 0 for v in value)
    return [int(v) for v in value] if ok else None


def _export_args(meta: dict[str, str]) -> dict[str, Any]:
    """The export call's arguments ultralytics writes under `args` (a Python dict literal)."""
    try:
        value = ast.literal_eval(meta.get("args", "{}"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _ultralytics_detector(meta: dict[str, str], hints: Hints) -> None:
    head = meta.get("head", "")
    # an end-to-end head (YOLOv10/YOLO26) says end2end; YOLOv8/11 exported with nms=True keep
    # end2end False and say it in the export arguments only ({'nms': True, ...})
    end2end = (meta.get("end2end", "False") == "True" or meta.get("nms", "False") == "True"
               or _export_args(meta).get("nms") is True)
    det, notes = hints.detection, hints.notes
    if "RTDETR" in head:
        det.update(layout="nms", box_format="cxcywh", box_units="normalized", fit="stretch")
        notes.append(f"layout: {head} -> [queries, 6] = cx cy w h normalised, score, class; no "
                     "NMS (detection.layout, box_format, box_units)")
        notes.append("fit: stretched to the input, aspect not kept, as ultralytics' RT-DETR "
                     "predictor does (detection.fit)")
    elif end2end:
        det.update(layout="nms", box_format="xyxy", box_units="pixels", fit="letterbox")
        notes.append("layout: end-to-end export (NMS inside) -> [K, 6] = x1 y1 x2 y2 pixels, "
                     "score, class (detection.layout)")
    else:
        det.update(layout="yolov8", fit="letterbox")
        notes.append(f"layout: {head or 'Detect'} head -> yolov8 [4 + classes, anchors], "
                     "cx cy w h pixels, NMS in the handler (detection.layout)")
    _rect_fit(meta, hints)
    det.update(ULTRALYTICS_THRESHOLDS)
    notes.append("thresholds: ultralytics' predict defaults, confidence 0.25, iou 0.7, "
                 "max_detections 300 (detection.confidence, iou, max_detections)")
    hints.preprocess.update(interpolation="opencv-bilinear", letterbox={"fill": 114})
    notes.append("pixels: resized with OpenCV INTER_LINEAR (not antialiased) as ultralytics does, "
                 "grey 114 around, RGB / 255 (preprocess.interpolation)")


def _rect_fit(meta: dict[str, str], hints: Hints) -> None:
    """A YOLO exported with dynamic=True: ultralytics' predictor (pre_transform's LetterBox with
    auto=True for a dynamic model) scales the longer side to imgsz and pads the shorter only up
    to a multiple of the stride, so each image reaches the model at its own "rect" size."""
    if hints.detection.get("fit") != "letterbox" or not hints.dynamic_hw or not hints.imgsz:
        return
    if _export_args(meta).get("dynamic") is not True:
        return
    try:
        stride = int(ast.literal_eval(meta.get("stride", "32")))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        stride = 32
    hints.detection.update(fit="letterbox-rect", stride=stride)
    height, width = hints.imgsz
    hints.notes.append(
        f"fit: letterbox-rect, stride {stride}: the export is dynamic (args dynamic=True, input "
        f"height and width free), so ultralytics' predictor letterboxes each image to its own "
        f"size, the longer side to {max(height, width)} and the shorter padded up to a multiple "
        f"of {stride}; requests of one size share a batch, calibration uses the full "
        f"{height}x{width} (detection.fit: letterbox for that canvas always)")
