"""mAP of detections against labelled boxes, with pycocotools' COCOeval: the COCO reference
evaluator (what published mAPs are computed with; faster-coco-eval re-implements the same in C++,
which only matters for data sets far larger than a validation set). Settings, stated beside every
figure as the evaluators disagree otherwise: IoU thresholds 0.50:0.05:0.95, 101 recall points,
at most 100 detections per image, areas "all", no crowd boxes.

Ground truth and detections are in the original images' pixels, boxes as x1, y1, x2, y2.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = "pycocotools COCOeval, IoU 0.50:0.95, 101 recall points, maxDets 100"


@dataclass
class Labelled:
    """One image's true boxes."""

    file: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2
    classes: np.ndarray  # (n,)


@dataclass
class Found:
    """One image's detections."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def _xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _instances(labelled: list[Labelled]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO's images and annotations for labelled images (ids from 1; category = class id + 1)."""
    images, annotations = [], []
    for image_id, t in enumerate(labelled, start=1):
        images.append({"id": image_id, "width": t.width, "height": t.height})
        for box, cls in zip(t.boxes, t.classes, strict=True):
            x, y, w, h = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(cls) + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    return images, annotations


def coco_map(truth: list[Labelled], found: list[Found], num_classes: int) -> dict[str, float]:
    """{"map": mAP@0.5:0.95, "map50": mAP@0.5} over the images, both in [0, 1]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(found) != len(truth):
        raise ValueError(f"detections for {len(found)} images, true boxes for {len(truth)}")
    images, annotations = _instances(truth)
    results = []
    for image_id, f in enumerate(found, start=1):
        for box, score, cls in zip(f.boxes, f.scores, f.classes, strict=True):
            results.append({"image_id": image_id, "category_id": int(cls) + 1,
                            "bbox": _xywh(box), "score": float(score)})
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c + 1} for c in range(num_classes)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": max(float(evaluation.stats[0]), 0.0), "map50": max(float(evaluation.stats[1]), 0.0)}


def read_coco(annotations: Path, images: Path | None = None) -> tuple[list[Labelled], list[str]]:
    """A COCO instances file (and the folder its file_names are in: default, its own folder):
    the labelled images, and the category names in category-id order (class ids 0..n-1)."""
    data = json.loads(annotations.read_text())
    folder = images or annotations.parent
    categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data.get("annotations", []):
        if not ann.get("iscrowd"):
            by_image.setdefault(ann["image_id"], []).append(ann)
    labelled = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        anns = by_image.get(image["id"], [])
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                             a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
        classes = np.asarray([index[a["category_id"]] for a in anns], np.int64)
        labelled.append(Labelled(folder / image["file_name"], int(image["width"]),
                                 int(image["height"]), boxes, classes))
    return labelled, [str(c.get("name", c["id"])) for c in categories]


def write_coco(path: Path, labelled: list[Labelled], names: list[str]) -> None:
    """A COCO instances file for labelled images (file names relative to its folder)."""
    instances, annotations = _instances(labelled)
    images = [{"id": image["id"], "file_name": t.file.name, "width": t.width, "height": t.height}
              for image, t in zip(instances, labelled, strict=True)]
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}) + "\n")
