"""Reference parity for detectors exported by ultralytics: its own predictor against servetool's
served path, on raw image files of several sizes and aspect ratios.

ultralytics' predictor reads the file with OpenCV, letterboxes (RT-DETR: stretches) it with
OpenCV's INTER_LINEAR, runs the ONNX file, applies its thresholds (and NMS, for a raw head) and
maps the boxes back to the image. servetool answers the same file through the unpacked archive's
handler (reference/served.py), at the spec's thresholds (given to the predictor too). They must
give the same boxes: as many, the same classes, IoU >= MIN_IOU each, scores within MAX_SCORE_DIFF
(both use OpenCV's own resize on the same decoded pixels, so the bounds only absorb float noise).

When they do not, the stage that differs is found by running the stages one by one on that
image (stage_of): servetool's model input against ultralytics' (decoding, layout = channel
order, normalisation, letterbox padding, resize), the model's raw outputs on the same input
(runtime), and servetool's decoding of ultralytics' own raw outputs (thresholds, box decoding).

ultralytics is optional (and needs torchvision); where it cannot be imported, `package` says "not
checked against the library" with the reason. tests/test_ultralytics_parity.py runs `compare`
and `stage_of` on answers ultralytics made (scripts/make_ultralytics_fixtures.py).
"""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servetool.errors import whole_cause
from servetool.model.spec import ModelSpec

MIN_IOU = 0.9
MAX_SCORE_DIFF = 0.01
# generated sample images (width, height): wide, tall, square, small, odd sizes
SAMPLE_SIZES = ((320, 160), (120, 300), (200, 200), (90, 60), (257, 131), (64, 480))
PIXEL = 1.5 / 255  # one grey level and a half: rounding, not a different image


@dataclass
class Reference:
    """What the library answered on one image file, and (when known) its stages: the model input
    it built ([C, H, W] in 0..1) and its model's raw outputs on it."""

    name: str
    boxes: np.ndarray  # [n, 4] x1 y1 x2 y2 in the image's pixels
    scores: np.ndarray
    classes: np.ndarray
    tensor: np.ndarray | None = None
    raw: list[np.ndarray] | None = None


@dataclass
class Measured:
    images: int
    boxes: int
    min_iou: float | None
    max_score_diff: float | None


class Mismatch(Exception):
    """One image's answers differ (message: which box, by how much); compare() adds the stage."""


def applies(spec: ModelSpec) -> bool:
    """An object detector whose ONNX file ultralytics exported (its metadata says so)."""
    if spec.task != "object-detection" or spec.source.kind != "onnx":
        return False
    from servetool.model.exporter_metadata import onnx_metadata

    return onnx_metadata(spec.source.path).get("author", "").lower() == "ultralytics"


def library():
    """ultralytics, or LibraryMissing with the whole reason."""
    from servetool.convert.reference import LibraryMissing

    try:
        import ultralytics
    except Exception as exc:  # noqa: BLE001 - any import failure means "cannot check here"
        raise LibraryMissing(f"ultralytics is not importable here ({whole_cause(exc)})") from None
    return ultralytics


def library_answers(model_path: Path, image_paths: list[Path],
                    thresholds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """ultralytics' own predictor on the ONNX file, one image file at a time (imgsz: the file's
    fixed input; `thresholds`: conf, iou, max_det, else its defaults), with the model input it
    built and its raw outputs (captured from the predictor's own preprocess and inference)."""
    from ultralytics import YOLO

    model = YOLO(str(model_path), task="detect")
    imgsz = _file_imgsz(model_path)
    seen: dict[str, Any] = {}
    answers = []
    for path in image_paths:
        result = model.predict(str(path), imgsz=imgsz, verbose=False, **(thresholds or {}))[0]
        if "hooked" not in seen:  # the predictor exists after the first call: capture its stages
            _hook(model.predictor, seen)
            result = model.predict(str(path), imgsz=imgsz, verbose=False, **(thresholds or {}))[0]
        boxes = result.boxes
        answers.append({
            "file": path.name, "width": int(result.orig_shape[1]), "height": int(result.orig_shape[0]),
            "boxes": [{"box": [float(v) for v in b], "score": float(s), "class_id": int(c),
                       "label": result.names[int(c)]}
                      for b, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(),
                                         boxes.cls.tolist(), strict=True)],
            "tensor": seen["tensor"], "raw": seen["raw"]})
    return answers


def _file_imgsz(model_path: Path) -> list[int]:
    from servetool.model.exporter_metadata import onnx_metadata

    return list(ast.literal_eval(onnx_metadata(model_path).get("imgsz", "[640, 640]")))


def _hook(predictor, seen: dict[str, Any]) -> None:
    """Record the predictor's model input and raw outputs of each call (instance attributes
    shadow its methods; they still run unchanged)."""
    preprocess, inference = predictor.preprocess, predictor.inference

    def record_input(im):
        tensor = preprocess(im)
        seen["tensor"] = tensor[0].detach().float().cpu().numpy()
        return tensor

    def record_output(im, *args, **kwargs):
        out = inference(im, *args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        seen["raw"] = [np.asarray(o.detach().cpu().numpy() if hasattr(o, "detach") else o)
                       for o in outs]
        return out

    predictor.preprocess, predictor.inference = record_input, record_output
    seen["hooked"] = True


def reference_of(answer: dict[str, Any]) -> Reference:
    """One image's library answer (library_answers' form) as arrays. Its boxes are clipped to
    the image, as servetool's are: ultralytics' YOLO postprocess clips, its RT-DETR's does not."""
    boxes = answer["boxes"]
    limit = [answer["width"], answer["height"]] * 2
    xyxy = np.clip(np.array([b["box"] for b in boxes], np.float32).reshape(-1, 4), 0, limit)
    return Reference(answer["file"], xyxy,
                     np.array([b["score"] for b in boxes], np.float32),
                     np.array([b["class_id"] for b in boxes], np.int64),
                     answer.get("tensor"), answer.get("raw"))


# --- comparing --------------------------------------------------------------------------------
def match(served: list[dict[str, Any]], ref: Reference) -> tuple[list[float], list[float]]:
    """Pair each of the library's boxes with one of servetool's (same class, best IoU first);
    Mismatch when the counts differ or a pair is past the bounds. Returns (IoUs, score diffs)."""
    from handlers.detection import pairwise_iou

    got = np.array([d["box"] for d in served], np.float32).reshape(-1, 4)
    got_classes = np.array([d["class_id"] for d in served], np.int64)
    got_scores = np.array([d["score"] for d in served], np.float32)
    if len(got) != len(ref.boxes):
        raise Mismatch(f"servetool found {len(got)} boxes, ultralytics {len(ref.boxes)} "
                       f"(classes {sorted(got_classes.tolist())} vs {sorted(ref.classes.tolist())})")
    iou = pairwise_iou(ref.boxes, got) if len(got) else np.zeros((0, 0))
    iou[ref.classes[:, None] != got_classes[None, :]] = -1.0
    ious, diffs = [], []
    for _ in range(len(got)):
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        where = f"ultralytics' box {i} (class {int(ref.classes[i])}, {_fmt(ref.boxes[i])})"
        if iou[i, j] < MIN_IOU:
            raise Mismatch(f"{where} has no servetool box of its class with IoU >= {MIN_IOU} "
                           f"(best {max(float(iou[i].max()), 0.0):.3f})")
        diff = abs(float(ref.scores[i]) - float(got_scores[j]))
        if diff > MAX_SCORE_DIFF:
            raise Mismatch(f"{where}: score {ref.scores[i]:.4f} vs servetool's {got_scores[j]:.4f} "
                           f"(> {MAX_SCORE_DIFF} apart)")
        ious.append(float(iou[i, j]))
        diffs.append(diff)
        iou[i, :] = iou[:, j] = -1.0
    return ious, diffs


def compare(served_answers: list[list[dict[str, Any]]], references: list[Reference],
            images: list[str], stages: Callable[[int], str] | None = None) -> Measured:
    """Every image's served answer against the library's; ReferenceMismatch naming the image,
    the box and (with `stages`, image index -> stage) the stage that differs."""
    from servetool.convert.reference import ReferenceMismatch

    ious: list[float] = []
    diffs: list[float] = []
    for index, (served, ref) in enumerate(zip(served_answers, references, strict=True)):
        try:
            got_ious, got_diffs = match(served, ref)
        except Mismatch as why:
            stage = stages(index) if stages else "not diagnosed"
            raise ReferenceMismatch(f"{images[index]}: {why}; the stage that differs: {stage}") \
                from None
        ious += got_ious
        diffs += got_diffs
    return Measured(len(references), len(ious), min(ious) if ious else None,
                    max(diffs) if diffs else None)


def _fmt(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


# --- which stage differs ----------------------------------------------------------------------
def stage_of(task, body: bytes, ref: Reference, run: Callable[[np.ndarray], list[np.ndarray]]
             ) -> str:
    """The first stage where servetool's path (the spec's detector `task`, the model runner
    `run`) leaves the library's on this image, as a phrase naming it and the spec key to look at."""
    rows = task.preprocess(body)
    ours, prepared = rows.examples[0][task.input_name], rows.meta
    if ref.tensor is not None:
        theirs = np.asarray(ref.tensor, np.float32)
        if ours.shape != theirs.shape:
            return (f"resize (servetool's model input is {list(ours.shape)}, ultralytics' "
                    f"{list(theirs.shape)}: detection.fit letterbox | letterbox-rect | stretch)")
        if np.abs(ours - theirs).max() > PIXEL:
            return _input_stage(task, body, ours, theirs, prepared)
    if ref.raw is None:
        return "after preprocessing (the model inputs agree; no raw outputs to compare)"
    raw = run(ours[None])
    theirs_raw = [np.asarray(r, np.float32) for r in ref.raw]
    if len(raw) != len(theirs_raw) or any(
            a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(b).max()))
            for a, b in zip(raw, theirs_raw, strict=False)):
        return "runtime (the same model input gives other raw outputs: another model file or format)"
    return _decoding_stage(task, theirs_raw, prepared, ref)


def _input_stage(task, body: bytes, ours: np.ndarray, theirs: np.ndarray, prepared) -> str:
    if np.abs(ours - theirs[::-1]).max() <= PIXEL:
        return "layout (channel order: the library feeds the other of RGB / BGR)"
    for factor in (255.0, 1 / 255.0):
        if np.abs(ours * factor - theirs).max() <= PIXEL:
            return "normalisation (pixel scale differs: detection.scale)"
    if not _same_decoding(body):
        return "decoding (Pillow and OpenCV read this file to other pixels)"
    box = prepared.box
    inside = np.zeros(ours.shape[1:], bool)
    inside[box.top:box.top + round(prepared.height * box.scale_y),
           box.left:box.left + round(prepared.width * box.scale_x)] = True
    diff = np.abs(ours - theirs).max(axis=0)
    if (diff[~inside] > PIXEL).any() and not (diff[inside] > PIXEL).any():
        return "letterbox padding (fill colour or placement: preprocess.letterbox.fill, detection.fit)"
    if (diff[~inside] > PIXEL).any():
        return ("resize (the image is placed or fitted differently: detection.fit letterbox | "
                "stretch)")
    return (f"resize (the resized pixels differ by up to {diff.max() * 255:.0f} grey levels: "
            f"servetool resizes with {task.interpolation}; ultralytics with OpenCV INTER_LINEAR = "
            "preprocess.interpolation: opencv-bilinear)")


def _same_decoding(body: bytes) -> bool:
    """Pillow (servetool) and OpenCV (ultralytics' imread) decode the file to the same RGB."""
    import io

    import cv2
    from PIL import Image

    ours = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.int16)
    bgr = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    return bgr is not None and bgr.shape == ours.shape and \
        np.abs(ours - bgr[..., ::-1].astype(np.int16)).max() <= 1


def _decoding_stage(task, raw: list[np.ndarray], prepared, ref: Reference) -> str:
    """The raw outputs agree: servetool's decoding of the library's own outputs is what differs.
    Other thresholds keep a subset or a superset of the same boxes (and, where servetool keeps
    none, the library's boxes are among all that servetool reads at no threshold); a different
    reading of the box columns gives other boxes."""
    from dataclasses import replace

    image_outputs = [r[0] for r in raw]
    ours = task.detect(image_outputs, prepared)
    if len(ours[0]):
        same = _within(ours, ref) or _within(_found(ref), ours)
    else:
        loose = replace(prepared.thresholds, confidence=0.0, max_detections=10_000)
        same = _within(_found(ref), task.detect(image_outputs, prepared, loose))
    if not same:
        return ("layout/box decoding (servetool reads the same raw outputs to other boxes: "
                "detection.layout, box_format, box_units, fit)")
    t = prepared.thresholds
    return (f"thresholds (servetool keeps more or fewer of the same boxes at confidence "
            f"{t.confidence}, iou {t.iou}, max_detections {t.max_detections}: "
            "detection.confidence, iou, max_detections)")


def _found(ref: Reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ref.boxes, ref.scores, ref.classes


def _within(a, b) -> bool:
    """Every box of `a` (boxes, scores, classes) has a box of its class in `b` with IoU >=
    MIN_IOU."""
    from handlers.detection import pairwise_iou

    if not len(a[0]):
        return True
    if not len(b[0]):
        return False
    iou = pairwise_iou(np.asarray(a[0]), np.asarray(b[0]))
    iou[np.asarray(a[2])[:, None] != np.asarray(b[2])[None, :]] = 0.0
    return bool((iou.max(axis=1) >= MIN_IOU).all())


# --- the live check (package) -----------------------------------------------------------------
def sample_files(folder: Path) -> list[Path]:
    """Raw image files of several sizes and aspect ratios (a greyscale one, a JPEG): shapes and
    edges enough that a detector answers something, and resizing is exercised both ways."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    paths = []
    for n, (width, height) in enumerate(SAMPLE_SIZES):
        base = rng.integers(40, 120, 3)
        image = Image.fromarray(np.clip(base + rng.normal(0, 15, (height, width, 3)), 0, 255)
                                .astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
            size = int(rng.integers(8, max(9, min(width, height) // 2)))
            draw.ellipse([x, y, x + size, y + size], outline=tuple(int(v) for v in
                         rng.integers(150, 255, 3)), width=3)
        name = f"sample-{n}-{width}x{height}"
        if n == 3:
            image, name = image.convert("L"), name + "-grey"
        path = folder / (name + (".jpg" if n == 4 else ".png"))
        image.save(path)
        paths.append(path)
    return paths


def check(spec: ModelSpec, served) -> str:
    """ultralytics' predictor and servetool's served path on the same files (LibraryMissing when
    ultralytics is not importable; ReferenceMismatch naming the stage when they differ)."""
    from servetool.convert import export

    ultralytics = library()
    d = spec.detection
    thresholds = {"conf": d.confidence, "iou": d.iou, "max_det": d.max_detections}
    with tempfile.TemporaryDirectory(prefix="servetool-reference-") as scratch:
        files = sample_files(Path(scratch))
        answers = library_answers(spec.source.path, files, thresholds)
        bodies = [f.read_bytes() for f in files]
    references = [reference_of(a) for a in answers]
    served_answers = [served.answer_one(b) for b in bodies]
    task = spec.detector()
    run = export.runner_for(export.load_original(spec))
    measured = compare(served_answers, references, [f.name for f in files],
                       lambda i: stage_of(task, bodies[i], references[i], run))
    return (f"matches ultralytics {ultralytics.__version__}'s predictor on {measured.images} "
            f"image files ({measured.boxes} boxes): min IoU {_num(measured.min_iou)}, max score "
            f"difference {_num(measured.max_score_diff)}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
