"""What an exported model file says about itself, read so that users need not retype it.

ultralytics writes its export's facts into the ONNX file's metadata (`metadata_props`): the class
`names` (a Python dict literal), `task`, `imgsz`, `stride`, `batch`, the `head` module and an
`end2end` flag (NMS inside the graph). From them follow the output layout, the box format, how the
image was fitted (RT-DETR stretches, YOLO letterboxes) and resized (OpenCV's INTER_LINEAR, which
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
    preprocess: dict[str, Any] = field(default_factory=dict)  # Preprocess fields
    notes: list[str] = field(default_factory=list)


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


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
    if hints.task == "detect":
        _ultralytics_detector(meta, hints)
    return hints


def _ultralytics_detector(meta: dict[str, str], hints: Hints) -> None:
    head = meta.get("head", "")
    end2end = meta.get("end2end", "False") == "True" or meta.get("nms", "False") == "True"
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
    det.update(ULTRALYTICS_THRESHOLDS)
    notes.append("thresholds: ultralytics' predict defaults, confidence 0.25, iou 0.7, "
                 "max_detections 300 (detection.confidence, iou, max_detections)")
    hints.preprocess.update(interpolation="opencv-bilinear", letterbox={"fill": 114})
    notes.append("pixels: resized with OpenCV INTER_LINEAR (not antialiased) as ultralytics does, "
                 "grey 114 around, RGB / 255 (preprocess.interpolation)")
