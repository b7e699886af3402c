"""The object-detection task's parts: letterbox geometry and box mapping, each output layout,
NMS against a plain reference, the thresholds a request may set, and the COCO evaluator."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from handlers.detection import (
    BoxFormat,
    ObjectDetection,
    Thresholds,
    batched_nms,
    detect_layout,
    detections,
    nms,
    pairwise_iou,
    to_original,
)
from handlers.errors import RequestError
from servetool.model.coco_eval import Found, Labelled, coco_map
from servetool.operate import lifecycle

LABELS = [str(d) for d in range(10)]


def task(**detection) -> ObjectDetection:
    return ObjectDetection({"input_shape": [3, 128, 128], "preprocess": {"letterbox": {"fill": 114}},
                            "detection": detection}, LABELS)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(200, 100), (100, 300), (128, 128), (37, 251), (640, 480),
                                  (129, 127)])
def test_letterbox_places_the_image_and_boxes_map_back(size):
    """A white rectangle drawn at a known box on a non-square image: in the model input it sits
    where the letterbox says, and a box found there maps back to the original pixels."""
    width, height = size
    image = Image.new("RGB", size, (0, 0, 0))
    box = np.array([width * 0.2, height * 0.3, width * 0.7, height * 0.8], np.float32).round()
    ImageDraw.Draw(image).rectangle([*box[:2], *(box[2:] - 1)], fill=(255, 255, 255))
    rows = task().preprocess(png(image))
    array, meta = rows.examples[0]["input"], rows.meta.box
    assert array.shape == (3, 128, 128) and array.dtype == np.float32
    assert (rows.meta.width, rows.meta.height) == size
    assert meta.scale == pytest.approx(min(128 / width, 128 / height))
    # the padding is the fill (114/255); the image fills one axis entirely
    inner_w, inner_h = round(width * meta.scale), round(height * meta.scale)
    assert (meta.left, meta.top) == ((128 - inner_w) // 2, (128 - inner_h) // 2)
    if meta.left:
        assert np.allclose(array[:, :, : meta.left], 114 / 255)
    if meta.top:
        assert np.allclose(array[:, : meta.top, :], 114 / 255)
    # the bright rectangle in the input, mapped back, is the drawn box (within the resampling)
    ys, xs = np.nonzero(array[0] > 0.75)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = to_original(found, meta, width, height)[0]
    assert np.abs(back - box).max() <= 2 / meta.scale + 1e-3, (back, box)
    # and exact arithmetic: input -> original -> input, each axis by its own scale (the resized
    # size is rounded per side, as ultralytics' scale_boxes maps back)
    assert (meta.scale_x, meta.scale_y) == (inner_w / width, inner_h / height)
    inside = box * np.array([meta.scale_x, meta.scale_y] * 2) + np.array([meta.left, meta.top] * 2)
    assert np.allclose(to_original(inside[None], meta, width, height)[0], box, atol=1e-3)


def test_boxes_outside_the_image_are_clipped_to_it():
    rows = task().preprocess(png(Image.new("RGB", (200, 100))))
    clipped = to_original(np.array([[-10, -10, 500, 500]], np.float32), rows.meta.box, 200, 100)
    assert clipped.tolist() == [[0, 0, 200, 100]]



def test_a_box_wholly_in_the_padding_is_dropped_before_the_max_detections_cut():
    """A wide image leaves grey bands above and below it in the input: a box the model finds in a
    band has nothing of the image under it, so it is not answered and takes no place of a real
    box; a box that reaches into the image is kept, clipped to it."""
    t = task(layout="nms", max_detections=2)
    rows = t.preprocess(png(Image.new("RGB", (200, 100))))  # in the input: rows 32 to 96
    assert (rows.meta.box.top, rows.meta.box.scale) == (32, 0.64)
    out = np.array([[10, 2, 50, 30, 0.95, 1],      # in the top band only
                    [10, 100, 50, 126, 0.9, 2],    # in the bottom band only
                    [10, 20, 50, 40, 0.8, 3],      # reaches 8 pixels into the image
                    [60, 40, 90, 80, 0.7, 4],      # inside
                    [0, 0, 0, 0, 0, 0]], np.float32)
    boxes, scores, classes = t.detect([out], rows.meta)
    assert classes.tolist() == [3, 4] and scores.tolist() == pytest.approx([0.8, 0.7])
    assert boxes[0].tolist() == pytest.approx([10 / 0.64, 0, 50 / 0.64, 8 / 0.64])
    rows.outputs = [[out]]
    assert [d["class_id"] for d in t.postprocess(rows)] == [3, 4]

def reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS written plainly, box by box (what torchvision's does)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        best = order.pop(0)
        keep.append(int(best))
        order = [i for i in order
                 if pairwise_iou(boxes[best][None], boxes[i][None])[0, 0] <= threshold]
    return keep


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32), rng.permutation(n).astype(np.float32)


@pytest.mark.parametrize("seed", range(20))
def test_nms_equals_the_greedy_reference_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, int(rng.integers(0, 300)))
    for threshold in (0.1, 0.45, 0.7):
        assert nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.floats(0.05, 0.95))
def test_nms_property(seed, n, threshold):
    """Also on crowded boxes (long suppression chains): the same as the reference."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 10, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 8, (n, 2))], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32)
    assert nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold)


@pytest.mark.parametrize("seed", range(3))
def test_nms_with_a_limit_is_the_first_boxes_of_the_full_result(seed):
    """Crowded boxes over several blocks: stopping at `limit` kept boxes changes nothing before it."""
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 700)
    full = reference_nms(boxes, scores, 0.3)
    assert nms(boxes, scores, 0.3).tolist() == full
    for limit in (1, 17, 64, 65, 200, 10_000):
        assert nms(boxes, scores, 0.3, limit).tolist() == full[:limit]


def test_class_wise_nms_never_suppresses_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, np.array([0, 0, 0]), 0.5).tolist() == [0]


# --- layouts ------------------------------------------------------------------------------------
TRUE = [(10.0, 20.0, 50.0, 60.0, 0.9, 3), (70.0, 5.0, 100.0, 45.0, 0.6, 7)]


def layout_output(layout: str, anchors: int = 50) -> np.ndarray:
    """One image's output in `layout` holding the TRUE detections, plus a duplicate of the first
    (suppressed by NMS) and low-score noise."""
    rng = np.random.default_rng(0)
    if layout == "nms":
        out = np.zeros((20, 6), np.float32)
        for i, (x1, y1, x2, y2, s, c) in enumerate(TRUE):
            out[i] = [x1, y1, x2, y2, s, c]
        return out
    rows = np.zeros((anchors, 4 + 10), np.float32)
    rows[:, :4] = np.concatenate([rng.uniform(0, 100, (anchors, 2)), rng.uniform(5, 20, (anchors, 2))], 1)
    rows[:, 4:] = rng.uniform(0, 0.05, (anchors, 10))
    entries = [*TRUE, (11.0, 21.0, 51.0, 61.0, 0.5, 3)]  # the duplicate
    for i, (x1, y1, x2, y2, s, c) in enumerate(entries):
        rows[i, :4] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        rows[i, 4 + c] = s
    if layout == "yolov8":
        return rows.T.copy()
    objectness = np.ones((anchors, 1), np.float32)  # yolov5: scores = objectness x class score
    objectness[:len(entries)] = 0.5
    scores = rows[:, 4:].copy()
    scores[:len(entries)] *= 2
    return np.concatenate([rows[:, :4], objectness, scores], 1)


@pytest.mark.parametrize("layout", ["yolov5", "yolov8", "nms"])
def test_each_layout_decodes_to_the_same_detections(layout):
    out = layout_output(layout)
    if layout == "nms":  # [K, 6] is RT-DETR's shape too: auto refuses to choose
        with pytest.raises(ValueError, match="nms with cx cy w h normalised"):
            detect_layout(out.shape, 10)
    else:
        assert detect_layout(out.shape, 10) == layout
    boxes, scores, classes = detections(out, layout, Thresholds(confidence=0.25, iou=0.45))
    assert classes.tolist() == [3, 7]
    assert np.allclose(scores, [0.9, 0.6], atol=1e-6)
    assert np.allclose(boxes, [t[:4] for t in TRUE], atol=1e-4)


def test_layout_detection_refuses_what_it_cannot_tell():
    assert detect_layout((84, 8400), 80) == "yolov8"
    assert detect_layout((25200, 85), 80) == "yolov5"
    assert detect_layout((300, 84), 80) == "detr"
    assert detect_layout((84, 8400), None) == "yolov8"  # no labels: the long axis is anchors
    with pytest.raises(ValueError, match="nms with x1 y1 x2 y2 .*nms with cx cy w h normalised"):
        detect_layout((300, 6), 80)  # end-to-end YOLO or ultralytics' RT-DETR
    with pytest.raises(ValueError, match="yolov5 .*detr .*box_units"):
        detect_layout((300, 85), None)  # without labels, 5 + 80 or 4 + 81 classes
    with pytest.raises(ValueError, match="fits several layouts.*name it in the spec"):
        detect_layout((300, 6), 1)  # yolov5 with one class is [anchors, 6] too
    with pytest.raises(ValueError, match="fits no known layout"):
        detect_layout((84, 8400), 10)


def test_box_formats_and_units_read_as_said():
    """The same two boxes written as corners, corner + size and centre + size, in pixels and
    normalised to a 200 x 100 input, all read back as the same pixels."""
    xyxy = np.array([[10, 20, 50, 60], [100, 5, 190, 45]], np.float32)
    as_written = {"xyxy": xyxy, "xywh": np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]],
                  "cxcywh": np.c_[(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]]}
    for fmt, boxes in as_written.items():
        assert np.allclose(BoxFormat(fmt, "pixels").to_pixels_xyxy(boxes, 200, 100), xyxy)
        normalised = boxes / np.array([200, 100, 200, 100], np.float32)
        assert np.allclose(BoxFormat(fmt, "normalized").to_pixels_xyxy(normalised, 200, 100), xyxy)


def test_max_detections_keeps_the_best():
    boxes, scores, _ = detections(layout_output("yolov8"), "yolov8",
                                  Thresholds(confidence=0.25, max_detections=1))
    assert scores.tolist() == pytest.approx([0.9])


# --- a request's thresholds -----------------------------------------------------------------------
def test_a_request_may_move_thresholds_within_the_spec_limits():
    t = task(confidence=0.25, max_detections_limit=50)
    assert t.thresholds({}) == t.defaults
    chosen = t.thresholds({"confidence": b"0.5", "iou": "0.3", "max_detections": b"7"})
    assert (chosen.confidence, chosen.iou, chosen.max_detections) == (0.5, 0.3, 7)
    for fields, said in (({"confidence": b"0"}, "confidence 0.0 is outside"),
                         ({"confidence": b"nan"}, "confidence nan is outside"),
                         ({"max_detections": b"51"}, "max_detections 51 is outside"),
                         ({"iou": b"high"}, "iou must be a number"),
                         ({"max_detections": b"2.5"}, "max_detections must be a whole number")):
        with pytest.raises(RequestError, match=said) as caught:
            t.thresholds(fields)
        assert caught.value.status == 400
    # the image is the field that is not a threshold, whatever the order of the form
    image = png(Image.new("RGB", (60, 40)))
    rows = t.preprocess_request({"confidence": b"0.5", "photo": image})
    assert rows.meta.thresholds.confidence == 0.5 and rows.meta.width == 60


# --- the evaluator ----------------------------------------------------------------------------------
def test_coco_map_is_one_for_the_truth_and_falls_with_misplaced_boxes(tmp_path):
    truth = [Labelled(tmp_path / f"{i}.jpg", 100, 80, np.array([[10, 10, 40, 50], [50, 20, 90, 70]],
                                                                np.float32), np.array([1, 2]))
             for i in range(5)]
    perfect = [Found(t.boxes, np.array([0.9, 0.8]), t.classes) for t in truth]
    assert coco_map(truth, perfect, 3) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    shifted = [Found(t.boxes + 6, np.array([0.9, 0.8]), t.classes) for t in truth]
    worse = coco_map(truth, shifted, 3)
    assert worse["map"] < 0.7 and worse["map50"] == pytest.approx(1.0)  # IoU 0.5-0.7: only low thresholds
    wrong = [Found(t.boxes, np.array([0.9, 0.8]), t.classes[::-1].copy()) for t in truth]
    assert coco_map(truth, wrong, 3)["map"] == 0.0


# --- a model per layout, through the real export and the handler ---------------------------------
LAYOUT_MODEL = '''
import torch
from torch import nn

TRUE = {true!r}


class Layout(nn.Module):
    """Emits TRUE (in input pixels) in one layout, whatever the image: a stand-in for a detector
    exported by another tool. The scores lean on the input, so the graph depends on it."""

    def __init__(self, layout: str, anchors: int = 64, classes: int = 10):
        super().__init__()
        self.layout = layout
        rows = torch.zeros(anchors, 4 + classes)
        rows[:, :4] = torch.tensor([5.0, 5.0, 4.0, 4.0])
        for i, (x1, y1, x2, y2, s, c) in enumerate(TRUE):
            rows[i, :4] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
            rows[i, 4 + c] = s
        self.register_buffer("rows", rows)
        nms = torch.zeros(20, 6)
        for i, t in enumerate(TRUE):
            nms[i] = torch.tensor(t)
        self.register_buffer("nms", nms)

    def forward(self, x):
        keep = 1.0 + 0.0 * x.mean(dim=(1, 2, 3))[:, None, None]
        if self.layout == "nms":
            return self.nms[None] * keep
        if self.layout == "yolov8":
            return self.rows.T[None] * keep
        if self.layout == "detr":  # per-class scores, boxes cx cy w h normalised to the input
            return torch.cat([self.rows[:, :4] / 128, self.rows[:, 4:]], 1)[None] * keep
        if self.layout == "rtdetr":  # ultralytics' RT-DETR: [K, 6], cx cy w h normalised
            cxcywh = self.rows[:20, :4] / 128
            score, cls = self.rows[:20, 4:].max(dim=1)
            return torch.cat([cxcywh, score[:, None], cls[:, None].float()], 1)[None] * keep
        objectness = torch.ones(self.rows.shape[0], 1)
        return torch.cat([self.rows[:, :4], objectness, self.rows[:, 4:]], 1)[None] * keep
'''


@pytest.mark.parametrize("layout, said", [
    ("yolov5", {}), ("yolov8", {}), ("detr", {}),
    # [K, 6] is both end-to-end YOLO and RT-DETR: the spec says which
    ("nms", {"layout": "nms"}),
    ("rtdetr", {"layout": "nms", "box_format": "cxcywh", "box_units": "normalized"})])
def test_a_model_of_each_layout_is_exported_and_served_with_boxes_in_image_pixels(tmp_path, layout,
                                                                                  said):
    """Each layout from a real model file through servetool's spec, ONNX export, gate and the
    handler as TorchServe runs it, on a 256x200 image (letterbox scale 0.5, 14 pixels of padding
    on top): the boxes come back at twice the size, shifted by the padding and clipped to the
    image; a bad image in the same batch fails alone."""
    import yaml

    from servetool.convert import export
    from servetool.convert.pipeline import check_task
    from servetool.engines.torchserve import archive
    from servetool.model.spec import load_spec
    from tests.conftest import serve_in_process

    (tmp_path / "model.py").write_text(LAYOUT_MODEL.format(true=TRUE))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    spec_file = tmp_path / "servetool.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "layout", "source": {"random_weights": True, "model_file": "model.py",
                                     "class": "Layout", "init_args": {"layout": layout}},
        "input": {"shape": [3, 128, 128]}, "format": "onnx", "task": "object-detection",
        "labels": "labels.txt", **({"detection": said} if said else {})}))
    spec = load_spec(spec_file)
    original = export.load_original(spec)
    # the layout is found from the output's shape and the labels, or named; package says which
    reading = check_task(spec, original)
    assert f"layout {said.get('layout', layout)} (" in reading[0], reading
    artifact = export.export(spec, original, tmp_path)
    image = png(Image.new("RGB", (256, 200), (30, 30, 30)))
    replies, statuses, _ = serve_in_process(tmp_path, archive.model_config(spec, artifact),
                                            [image, b"not an image", image])
    assert statuses == [200, 400, 200]
    # twice the size, up by the padding, clipped to the image (the second box starts above it)
    expected = [[x1 * 2, max(0, (y1 - 14) * 2), x2 * 2, (y2 - 14) * 2] for x1, y1, x2, y2, *_ in TRUE]
    for reply in (replies[0], replies[2]):
        assert [d["class_id"] for d in reply] == [3, 7]
        assert [d["label"] for d in reply] == ["3", "7"]
        assert [d["score"] for d in reply] == pytest.approx([0.9, 0.6])
        assert np.allclose([d["box"] for d in reply], expected, atol=0.02), reply
    assert "not an image" in replies[1]["error"]


# --- the example detector, end to end -------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "digits-detect"


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """models/digits-detect packaged (ONNX, gated on the held-out canvases' mAP) and deployed."""
    from servetool.model.spec import load_spec
    from servetool.operate.package import package
    from servetool.targets.local import LocalTarget
    from tests.conftest import server_options

    spec = load_spec(EXAMPLE / "servetool.yaml")
    store = tmp_path_factory.mktemp("detect-store")
    summary = package(spec, store)
    target = LocalTarget(server_options(tmp_path_factory.mktemp("detect-run"), store))
    try:
        lifecycle.deploy(target, ["digits-detect"])
        yield spec, summary, target
    finally:
        target.down()


def in_process_boxes(spec, data: bytes):
    """What the original PyTorch model finds on an image, decoded by the same task code."""
    from servetool.convert import export

    task = spec.detector()
    rows = task.preprocess(data)
    run = export.runner_for(_original(spec))
    output = np.asarray(run(rows.examples[0]["input"][None])[0])[0]
    boxes, scores, classes = detections(output, "yolov8", task.defaults)
    return to_original(boxes, rows.meta.box, rows.meta.width, rows.meta.height), scores, classes


_ORIGINALS: dict = {}


def _original(spec):
    from servetool.convert import export

    if spec.name not in _ORIGINALS:
        _ORIGINALS[spec.name] = export.load_original(spec)
    return _ORIGINALS[spec.name]


def test_the_example_passes_the_gate_on_map(detector):
    spec, summary, _ = detector
    gate = summary["parity"]
    assert gate["ok"], gate["problems"]
    found = gate["detection"]
    assert found["map_original"] > 0.5 and abs(found["drop_points"]) <= 0.2, found
    assert found["agreement"]["matched"] >= 0.99 and found["agreement"]["boxes"] > 250
    # what `package` prints says so
    from servetool.cli.build import gate_summary

    said = gate_summary(gate)
    assert f"mAP@0.5:0.95 {found['map_original']:.4f} -> {found['map_converted']:.4f}" in said
    assert f"of the original's {found['agreement']['boxes']} boxes found again on 250 images" in said


def test_served_boxes_equal_the_original_model_on_non_square_images(detector):
    """Held-out canvases of several sizes, and one rescaled to a tall and a wide shape: HTTP's
    boxes match the in-process original's, same classes, IoU >= 0.99."""
    import requests

    from servetool.model.coco_eval import read_coco

    spec, _, target = detector
    url = f"{target.running().url('inference')}/predictions/digits-detect"
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    labelled, _ = read_coco(EXAMPLE / "validation" / "annotations.json")
    bodies = [t.file.read_bytes() for t in labelled[:12]]
    first = Image.open(io.BytesIO(bodies[0])).convert("RGB")
    bodies += [png(first.resize((first.width, first.height * 3))),
               png(first.resize((first.width * 3, first.height)))]
    sizes = {Image.open(io.BytesIO(b)).size for b in bodies}
    assert len(sizes) > 5 and any(w != h for w, h in sizes)
    total = 0
    for body in bodies:
        reply = requests.post(url, data=body, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        served = reply.json()
        boxes, scores, classes = in_process_boxes(spec, body)
        assert [d["class_id"] for d in served] == classes.tolist()
        assert [d["label"] for d in served] == [str(c) for c in classes]
        assert [d["score"] for d in served] == pytest.approx(scores.tolist(), abs=1e-3)
        if served:
            iou = pairwise_iou(np.array([d["box"] for d in served], np.float32), boxes)
            assert np.diag(iou).min() >= 0.99, iou
        total += len(served)
    assert total >= 20  # the canvases hold 1-4 digits each: the model finds them


def test_a_bad_and_an_empty_image_in_one_batch_with_good_ones(detector, tmp_path):
    """In one batch, as the worker gets it from the archive's own handler and config: a good
    canvas, bytes that are no image, an empty canvas (nothing on it: []), another good one."""
    import zipfile

    import yaml

    from tests.conftest import serve_in_process

    _, summary, _ = detector
    with zipfile.ZipFile(summary["archive"]) as mar:
        mar.extractall(tmp_path)
    config = yaml.safe_load((tmp_path / "model-config.yaml").read_text())
    good = (EXAMPLE / "samples" / "canvas_0.jpg").read_bytes()
    empty = png(Image.new("RGB", (150, 90), (60, 60, 60)))
    replies, statuses, _ = serve_in_process(tmp_path, config, [good, b"\x89PNG broken", empty, good])
    assert statuses == [200, 400, 200, 200]
    assert replies[2] == [] and replies[0] == replies[3] and len(replies[0]) >= 1
    assert "not an image" in replies[1]["error"]


def test_a_request_sets_its_own_thresholds_within_limits(detector):
    import requests

    _, _, target = detector
    url = f"{target.running().url('inference')}/predictions/digits-detect"
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    # a held-out canvas where the model also sees a doubtful digit (0.21) and faint ones
    image = (EXAMPLE / "validation" / "canvas_0009.jpg").read_bytes()
    default = requests.post(url, data=image, headers=headers, timeout=30).json()
    loose = requests.post(url, files={"data": image}, data={"confidence": "0.001"},
                          headers=headers, timeout=30).json()
    lower = requests.post(url, files={"data": image}, data={"confidence": "0.1"},
                          headers=headers, timeout=30).json()
    assert len(loose) > len(lower) > len(default) >= 1
    assert all(d["score"] > 0.1 for d in lower) and all(d["score"] > 0.25 for d in default)
    assert loose[:len(default)] == default  # the same boxes, best first, until the threshold
    one = requests.post(url, files={"data": image}, data={"max_detections": "1",
                                                          "confidence": "0.001"},
                        headers=headers, timeout=30).json()
    assert one == loose[:1]
    refused = requests.post(url, files={"data": image}, data={"confidence": "2"}, headers=headers,
                            timeout=30)
    assert refused.status_code == 400 and "confidence 2.0 is outside" in refused.json()["error"]


def test_int8_keeps_the_detectors_map_within_a_point(tmp_path):
    """Static int8 of the example (its convolutions; the decoding stays fp32) loses at most one
    point of mAP@0.5:0.95 in the gate; dynamic int8, which only quantizes MatMul/Gemm, refuses a
    model that has none rather than ship fp32 called int8."""
    from servetool.convert.export import ExportError
    from servetool.convert.pipeline import convert
    from servetool.model.spec import load_spec

    spec = load_spec(EXAMPLE / "servetool.yaml")
    artifact, report = convert(spec, "onnx-int8-static", tmp_path / "static")
    assert report.ok and 0 <= report.detection["drop_points"] <= 1.0, report.detection
    assert "Conv/MatMul/Gemm only" in artifact.notes["quantization"]
    assert artifact.size_bytes < (EXAMPLE / "digits-detect.pt").stat().st_size / 3
    with pytest.raises(ExportError, match="has none .*Conv.*use onnx-int8-static"):
        convert(spec, "onnx-int8", tmp_path / "dynamic")


def test_a_torchvision_style_head_with_three_outputs(tmp_path):
    """boxes [N, K, 4], scores [N, K] and labels [N, K] (in another order here), already
    suppressed: found as such from the three outputs, thresholded, mapped back."""
    import yaml

    from servetool.convert import export
    from servetool.convert.pipeline import check_task
    from servetool.engines.torchserve import archive
    from servetool.model.spec import load_spec
    from tests.conftest import serve_in_process

    (tmp_path / "model.py").write_text(f'''
import torch
from torch import nn

TRUE = {TRUE!r}


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("boxes", torch.tensor([t[:4] for t in TRUE] + [[0.0, 0, 1, 1]] * 8))
        self.register_buffer("scores", torch.tensor([t[4] for t in TRUE] + [0.01] * 8))
        self.register_buffer("labels", torch.tensor([float(t[5]) for t in TRUE] + [0.0] * 8))

    def forward(self, x):
        one = 1.0 + 0.0 * x.mean(dim=(1, 2, 3))
        return (self.labels[None] * one[:, None], self.boxes[None] * one[:, None, None],
                self.scores[None] * one[:, None])
''')
    spec_file = tmp_path / "servetool.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "heads", "source": {"random_weights": True, "model_file": "model.py",
                                    "class": "Heads"},
        "input": {"shape": [3, 128, 128]}, "format": "onnx", "task": "object-detection"}))
    spec = load_spec(spec_file)
    original = export.load_original(spec)
    check_task(spec, original)
    artifact = export.export(spec, original, tmp_path)
    image = png(Image.new("RGB", (128, 128)))
    replies, statuses, _ = serve_in_process(tmp_path, archive.model_config(spec, artifact), [image])
    assert statuses == [200]
    assert [(d["class_id"], d["score"]) for d in replies[0]] == [(3, 0.9), (7, 0.6)]
    assert np.allclose([d["box"] for d in replies[0]], [t[:4] for t in TRUE], atol=0.02)


def test_without_labels_the_gate_compares_boxes_with_the_original(tmp_path):
    """Unlabelled images as the validation set: the gate judges box agreement alone."""
    import yaml

    from servetool.convert.pipeline import convert
    from servetool.model.spec import load_spec

    raw = yaml.safe_load((EXAMPLE / "servetool.yaml").read_text())
    raw["source"] = {k: str(EXAMPLE / v) if k != "class" else v for k, v in raw["source"].items()}
    raw["labels"] = str(EXAMPLE / "labels.txt")
    raw["validation"] = {"images": str(EXAMPLE / "samples")}
    (tmp_path / "servetool.yaml").write_text(yaml.safe_dump(raw))
    _, report = convert(load_spec(tmp_path / "servetool.yaml"), "openvino", tmp_path / "out")
    found = report.detection
    assert report.ok and found["map_original"] is None and found["agreement"]["images"] == 3
    assert found["agreement"]["boxes"] >= 9 and found["agreement"]["matched"] == 1.0
    assert found["agreement"]["min_iou"] > 0.99
    # no validation set, only calibration images: int8 is judged on its boxes there
    raw["calibration"] = raw.pop("validation")
    (tmp_path / "servetool.yaml").write_text(yaml.safe_dump(raw))
    _, report = convert(load_spec(tmp_path / "servetool.yaml"), "onnx-int8-static", tmp_path / "q")
    agreement = report.detection["agreement"]
    assert report.ok and agreement["images"] == 3 and agreement["matched"] >= 0.9


def test_ultralytics_metadata_sets_the_reading_and_package_says_so(tmp_path):
    """An ONNX file carrying the metadata ultralytics writes (names, task, head, end2end) is read
    without spec lines: labels, layout and box format, fit, OpenCV resizing and ultralytics'
    predict thresholds; RT-DETR's [K, 6] is read as normalised cx cy w h, stretched; a task that
    contradicts the file's is refused; the spec overrides any item."""
    import onnx
    import torch
    import yaml

    from servetool.model.spec import SpecError, load_spec

    class Head(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 300, 6)

    def exported(head: str, task: str = "detect", end2end: str = "False") -> Path:
        path = tmp_path / f"{head}-{task}-{end2end}.onnx"
        torch.onnx.export(Head(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False,
                          input_names=["images"], output_names=["output0"])
        model = onnx.load(str(path))
        for key, value in {"author": "Ultralytics", "version": "8.4.190", "task": task,
                           "head": head, "end2end": end2end, "batch": "1", "imgsz": "[64, 64]",
                           "names": "{0: 'cat', 1: 'dog'}"}.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(path))
        return path

    def spec_for(path: Path, **extra):
        (tmp_path / "servetool.yaml").write_text(yaml.safe_dump(
            {"name": "u", "source": {"onnx": path.name}, "task": "object-detection", **extra}))
        return load_spec(tmp_path / "servetool.yaml")

    rtdetr = spec_for(exported("RTDETRDecoder"))
    d = rtdetr.detection
    assert (d.layout, d.box_format, d.box_units, d.fit) == ("nms", "cxcywh", "normalized", "stretch")
    assert (d.confidence, d.iou, d.max_detections) == (0.25, 0.7, 300)
    assert rtdetr.preprocess.interpolation == "opencv-bilinear"
    assert rtdetr.label_names() == ["cat", "dog"]
    assert any("RTDETRDecoder" in line for line in rtdetr.inferred)
    e2e = spec_for(exported("Detect", end2end="True")).detection
    assert (e2e.layout, e2e.box_format, e2e.box_units, e2e.fit) == ("nms", "xyxy", "pixels", "letterbox")
    overridden = spec_for(exported("RTDETRDecoder"), detection={"fit": "letterbox", "iou": 0.5},
                          preprocess={"interpolation": "bilinear"})
    assert (overridden.detection.fit, overridden.detection.iou) == ("letterbox", 0.5)
    assert overridden.preprocess.interpolation == "bilinear"
    with pytest.raises(SpecError, match="'segment' model"):
        spec_for(exported("Segment", task="segment"))


def test_detections_are_the_same_on_the_kserve_engine(detector, tmp_path):
    """The same detector archive on the KServe engine: the same boxes, byte for byte, and the
    same refusals."""
    from tests.test_engines import assert_same_answers, endpoint, kserve_beside

    _, summary, target = detector
    kserve = kserve_beside(Path(summary["archive"]).parent, tmp_path / "run")
    try:
        cases = [("digits-detect", path.read_bytes(), "image/jpeg")
                 for path in sorted((EXAMPLE / "samples").glob("*.jpg"))]
        cases += [("digits-detect", b"not an image", "application/octet-stream"),
                  ("digits-detect", b"", "application/octet-stream")]
        assert_same_answers(endpoint(target.running()), endpoint(kserve.running()), cases)
    finally:
        kserve.down()
