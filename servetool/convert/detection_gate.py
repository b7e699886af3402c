"""The gate for detectors: a converted detector is judged on its boxes, not only its raw numbers.

Raw-output parity (gate.py) says whether a format computes the same tensor; a detector's user
cares whether the same objects come out. So, on the spec's validation images, through the serving
task's own letterboxing, decoding and NMS (handlers/detection.py):
- box agreement with the original, at the served thresholds: the share of the original's boxes
  the converted model finds again (same class, IoU >= 0.5), their lowest and mean IoU, and the
  largest score difference; for models without labelled data this is the whole judgement;
- with a COCO file of true boxes, mAP@0.5:0.95 and mAP@0.5 of both (pycocotools,
  servetool/model/coco_eval.py) at evaluation thresholds (confidence 0.001, 100 boxes an image),
  and the drop in points against the format's allowance (model/formats.py, or the spec's
  tolerance.max_map_drop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from handlers.detection import Thresholds, pairwise_iou
from servetool.model.coco_eval import SETTINGS, Found, Labelled, coco_map
from servetool.model.spec import ModelSpec

BATCH = 16
MATCH_IOU = 0.5
# COCO-style evaluation keeps every box down to a low confidence (they only add recall)
EVALUATION = Thresholds(confidence=0.001, iou=0.6, max_detections=100)


@dataclass
class Agreement:
    images: int
    boxes: int  # the original's, at the served thresholds
    matched: float  # share of them the converted model finds again (same class, IoU >= 0.5)
    min_iou: float | None
    mean_iou: float | None
    max_score_diff: float | None


@dataclass
class DetectionReport:
    agreement: Agreement
    map_original: float | None = None  # mAP@0.5:0.95, [0, 1]
    map_converted: float | None = None
    map50_original: float | None = None
    map50_converted: float | None = None
    drop_points: float | None = None
    evaluator: str = SETTINGS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_images(spec: ModelSpec) -> tuple[list[bytes], list[Labelled] | None]:
    """The images the detection gate runs on: the validation set's, with their true boxes when
    the set is a COCO file; without one, the calibration images (samples of what the model will
    serve: box agreement on them, rather than raw numbers alone)."""
    for ref in (spec.validation, spec.calibration):
        if ref is not None:
            images, truth = ref.detector_images()
            if images:
                return images, truth
    return [], None


def outputs(run, task, images: list[bytes]) -> tuple[list[list[np.ndarray]], list[Any]]:
    """Each image's raw model outputs (by `run`, a runner: feeds -> outputs) and its letterbox
    geometry, through `task` (the spec's detector); decoded afterwards at whichever thresholds a
    check needs."""
    prepared = [task.preprocess(data) for data in images]
    arrays = [r.examples[0][task.input_name] for r in prepared]
    raw: list[list[np.ndarray]] = [[] for _ in arrays]
    # batches of one size: a letterbox-rect detector feeds each image at its own height and width
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(arrays):
        by_shape.setdefault(array.shape, []).append(index)
    for members in by_shape.values():
        for start in range(0, len(members), BATCH):
            chunk = members[start:start + BATCH]
            results = [np.asarray(o) for o in run(np.stack([arrays[i] for i in chunk]))]
            for row, index in enumerate(chunk):
                raw[index] = [o[row] for o in results]
    return raw, [r.meta for r in prepared]


def decode(task, raw: list[list[np.ndarray]], metas: list[Any],
           thresholds: Thresholds) -> list[Found]:
    """Each image's detections in its own pixels, as the handler decodes them."""
    found = []
    for image_outputs, meta in zip(raw, metas, strict=True):
        found.append(Found(*task.detect(image_outputs, meta, thresholds)))
    return found


def agreement(reference: list[Found], other: list[Found]) -> Agreement:
    """How many of the reference's boxes the other finds again, greedily matched by IoU within
    a class, and how closely."""
    total = matched = 0
    ious: list[float] = []
    score_diffs: list[float] = []
    for ref, got in zip(reference, other, strict=True):
        total += len(ref.boxes)
        if not len(ref.boxes) or not len(got.boxes):
            continue
        iou = pairwise_iou(ref.boxes, got.boxes)
        iou[ref.classes[:, None] != got.classes[None, :]] = 0.0
        for _ in range(min(iou.shape)):  # one pair per round: the best remaining overlap
            i, j = np.unravel_index(int(iou.argmax()), iou.shape)
            if iou[i, j] < MATCH_IOU:
                break
            matched += 1
            ious.append(float(iou[i, j]))
            score_diffs.append(abs(float(ref.scores[i]) - float(got.scores[j])))
            iou[i, :] = 0.0
            iou[:, j] = 0.0
    return Agreement(len(reference), total, matched / total if total else 1.0,
                     min(ious) if ious else None, float(np.mean(ious)) if ious else None,
                     max(score_diffs) if score_diffs else None)


def check(spec: ModelSpec, original, artifact, fmt: str, max_map_drop: float,
          min_matched: float, problems: list[str]) -> DetectionReport | None:
    """Box agreement and, with labels, mAP of both; a problem per bound broken."""
    images, truth = gate_images(spec)
    if not images:
        return None
    task = spec.detector()
    served = task.defaults
    # one run of each model over the images; decoded at the served and the evaluation thresholds
    before_raw, metas = outputs(original, task, images)
    after_raw, _ = outputs(artifact, task, images)
    agree = agreement(decode(task, before_raw, metas, served), decode(task, after_raw, metas, served))
    report = DetectionReport(agree)
    if agree.matched < min_matched:
        problems.append(f"the {fmt} detector finds {agree.matched:.1%} of the original's "
                        f"{agree.boxes} boxes again on {agree.images} images (same class, IoU >= "
                        f"{MATCH_IOU}), under the required {min_matched:.1%}")
    if truth is not None:
        evaluation = replace(EVALUATION, max_candidates=served.max_candidates)
        classes = _classes(spec, truth)
        before = coco_map(truth, decode(task, before_raw, metas, evaluation), classes)
        after = coco_map(truth, decode(task, after_raw, metas, evaluation), classes)
        report.map_original, report.map_converted = before["map"], after["map"]
        report.map50_original, report.map50_converted = before["map50"], after["map50"]
        report.drop_points = (before["map"] - after["map"]) * 100
        if report.drop_points > max_map_drop:
            problems.append(f"mAP@0.5:0.95 fell from {before['map']:.4f} to {after['map']:.4f} on "
                            f"{len(truth)} labelled images: {report.drop_points:.2f} points > "
                            f"allowed {max_map_drop:.2f} ({SETTINGS})")
    return report


def original_map(spec: ModelSpec, original) -> dict[str, float] | None:
    """The original's mAP on the spec's COCO set (the eager row of `bench formats`)."""
    images, truth = gate_images(spec)
    if truth is None:
        return None
    task = spec.detector()
    evaluation = replace(EVALUATION, max_candidates=task.defaults.max_candidates)
    return coco_map(truth, decode(task, *outputs(original, task, images), evaluation),
                    _classes(spec, truth))


def _classes(spec: ModelSpec, truth: list[Labelled]) -> int:
    return len(spec.label_names() or []) or 1 + max(
        (int(t.classes.max()) for t in truth if len(t.classes)), default=0)
