"""Train DigitsDetector on the offline digit canvases (data.py), deterministically, and measure it.

Writes digits-detect.pt (the state_dict), labels.txt, metrics.json (mAP@0.5:0.95 and mAP@0.5 on the
held-out canvases, pycocotools' COCOeval), validation/ (the held-out canvases as JPEG files with a
COCO instances file: the spec's labelled set for the gate) and samples/ (a few non-square canvases).
The inputs come from the serving task's own preprocessing (handlers/detection.py) and the held-out
figures from its own decoding and NMS, so what is measured here is what is served.
Run: .venv/bin/python models/digits-detect/train.py   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
from data import FILL, INPUT, SEED, Canvas, canvases  # noqa: E402
from model import DigitsDetector  # noqa: E402

from handlers.detection import ObjectDetection, Thresholds  # noqa: E402
from servetool.model.coco_eval import SETTINGS, Found, Labelled, coco_map, write_coco  # noqa: E402

TRAIN, HELD_OUT = 4000, 250
EPOCHS, BATCH, LR = 30, 32, 2e-3
LABELS = [str(d) for d in range(10)]
# COCO-style evaluation keeps low-confidence boxes (they only add recall at the tail)
EVAL = Thresholds(confidence=0.001, iou=0.6, max_detections=100)


def task() -> ObjectDetection:
    return ObjectDetection({"input_shape": [3, INPUT, INPUT],
                            "preprocess": {"letterbox": {"fill": FILL}}}, LABELS)


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def inputs(items: list[Canvas], qualities: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Model inputs (through JPEG, as clients send), and each canvas's boxes in input pixels."""
    t = task()
    arrays, boxes = [], []
    for canvas, quality in zip(items, qualities, strict=True):
        rows = t.preprocess(jpeg(canvas.image, quality))
        arrays.append(rows.examples[0]["input"])
        box = rows.meta.box
        boxes.append(canvas.boxes * np.array([box.scale_x, box.scale_y] * 2, np.float32)
                     + np.array([box.left, box.top] * 2, np.float32))
    return np.stack(arrays), boxes


def assign(gt: np.ndarray, centres: torch.Tensor, stride: int) -> torch.Tensor:
    """Per cell, the index of the box it learns (-1: background): cells whose centre is inside a
    box and within 1.5 strides of its centre, the smallest box where several qualify (FCOS's
    centre sampling)."""
    owner = torch.full((len(centres),), -1, dtype=torch.long)
    if len(gt) == 0:
        return owner
    g = torch.from_numpy(gt)
    cx, cy = centres[:, 0:1], centres[:, 1:2]
    inside = (cx > g[:, 0]) & (cx < g[:, 2]) & (cy > g[:, 1]) & (cy < g[:, 3])
    gcx, gcy = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2
    near = ((cx - gcx).abs() < 1.5 * stride) & ((cy - gcy).abs() < 1.5 * stride)
    area = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    cost = torch.where(inside & near, area.expand_as(inside), torch.tensor(float("inf")))
    best, index = cost.min(1)
    owner[torch.isfinite(best)] = index[torch.isfinite(best)]
    return owner


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(1)
    area_t = (target[:, 2:] - target[:, :2]).prod(1)
    union = area_p + area_t - inter
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).prod(1)
    return 1 - inter / union + (hull - union) / hull


def train(model: DigitsDetector, x: np.ndarray, boxes: list[np.ndarray],
          classes: list[np.ndarray]) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    steps = EPOCHS * (len(x) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        centres = model.raw(torch.zeros(1, 3, INPUT, INPUT))[2]
    owners = [assign(b, centres, model.stride) for b in boxes]
    started = time.monotonic()
    for epoch in range(EPOCHS):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen)[:steps // EPOCHS * BATCH].split(BATCH):
            pred_boxes, logits, _ = model.raw(torch.from_numpy(x[idx.numpy()]))
            cls_target = torch.zeros_like(logits)
            box_pred, box_true = [], []
            for row, i in enumerate(idx.tolist()):
                owner = owners[i]
                pos = owner >= 0
                if pos.any():
                    cls_target[row, pos, torch.from_numpy(classes[i])[owner[pos]]] = 1.0
                    box_pred.append(pred_boxes[row, pos])
                    box_true.append(torch.from_numpy(boxes[i])[owner[pos]])
            n_pos = max(sum(len(b) for b in box_pred), 1)
            cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, cls_target, reduction="sum") / n_pos
            box_loss = giou_loss(torch.cat(box_pred), torch.cat(box_true)).sum() / n_pos
            loss = cls_loss + 2.0 * box_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total:.1f} ({time.monotonic() - started:.0f} s)",
              flush=True)


def evaluate(model: DigitsDetector, files: list[bytes], truth: list[Labelled]) -> dict[str, float]:
    """mAP on the held-out JPEG files through the serving task's preprocessing and decoding."""
    t = task()
    found = []
    model.eval()
    with torch.no_grad():
        for data in files:
            rows = t.preprocess(data)
            output = model(torch.from_numpy(rows.examples[0]["input"][None]))[0].numpy()
            found.append(Found(*t.detect([output], rows.meta, EVAL)))
    return coco_map(truth, found, len(LABELS))


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    train_set = canvases("train", TRAIN)
    qualities = np.random.default_rng(SEED).integers(70, 96, TRAIN).tolist()
    x, boxes = inputs(train_set, qualities)
    classes = [c.classes for c in train_set]
    model = DigitsDetector()
    train(model, x, boxes, classes)
    torch.save(model.state_dict(), HERE / "digits-detect.pt")
    (HERE / "labels.txt").write_text("\n".join(LABELS) + "\n")

    held = canvases("held-out", HELD_OUT)
    folder = HERE / "validation"
    folder.mkdir(exist_ok=True)
    truth, files = [], []
    for i, canvas in enumerate(held):
        data = jpeg(canvas.image, 90)
        (folder / f"canvas_{i:04d}.jpg").write_bytes(data)
        files.append(data)
        truth.append(Labelled(folder / f"canvas_{i:04d}.jpg", canvas.image.width,
                              canvas.image.height, canvas.boxes, canvas.classes))
    write_coco(folder / "annotations.json", truth, LABELS)
    scores = evaluate(model, files, truth)
    samples = HERE / "samples"
    samples.mkdir(exist_ok=True)
    for i in range(3):
        (samples / f"canvas_{i}.jpg").write_bytes(files[i])
    metrics = {"held_out_map_50_95": round(scores["map"], 4), "held_out_map_50": round(scores["map50"], 4),
               "evaluator": SETTINGS, "eval_confidence": EVAL.confidence, "eval_iou": EVAL.iou,
               "held_out_images": HELD_OUT,
               "held_out_boxes": int(sum(len(t.boxes) for t in truth)), "train_images": TRAIN,
               "epochs": EPOCHS, "seed": SEED}
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
