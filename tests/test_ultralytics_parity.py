"""servetool's served boxes against ultralytics' own answers, end to end.

tests/fixtures/ultralytics/<model>/ holds tiny detectors ultralytics trained and exported itself
(default ONNX export: a raw YOLOv8 or YOLO11 head; nms=True: NMS inside; dynamic=True: free
height and width, which ultralytics' predictor feeds each image's own "rect" letterbox; RT-DETR)
and what ultralytics' predictor answered on raw image files of several sizes and aspect ratios
(images/), with the model input it built and its raw outputs (stages.npz);
scripts/make_ultralytics_fixtures.py makes them in a separate venv, since ultralytics cannot be
imported in this one.

Each model is packaged from a spec that names only the file and the task (everything else comes
from the file's metadata), every image is answered by the unpacked archive's handler in-process,
and servetool.convert.reference.detection.compare (what `package` runs when ultralytics is importable)
matches the boxes: as many, the same classes, IoU >= 0.9, scores within 0.01. The stage
diagnosis is checked against spec variants that differ in one stage each. Also: the guard that
refuses normalised boxes read as pixels.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from servetool.convert.reference import ReferenceMismatch
from servetool.convert.reference.detection import (
    MAX_SCORE_DIFF,
    MIN_IOU,
    Mismatch,
    Reference,
    applies,
    compare,
    match,
    reference_of,
    stage_of,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ultralytics"
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.onnx").is_file()) \
    if FIXTURES.is_dir() else []
# how package must say each model's outputs are read (from the file's metadata alone); YOLO11's
# raw Detect head is YOLOv8's layout
RAW_HEAD = "layout yolov8 (named in the spec or the model file); boxes cxcywh in pixels"
READING = {"yolov8": RAW_HEAD, "yolov8-dynamic": RAW_HEAD, "yolo11": RAW_HEAD,
           "yolo11-dynamic": RAW_HEAD,
           "yolov8-nms": "layout nms (named in the spec or the model file); boxes xyxy in pixels",
           "rtdetr": "layout nms (named in the spec or the model file); boxes cxcywh in normalized"}
DYNAMIC = {"yolov8-dynamic", "yolo11-dynamic"}  # exported with dynamic=True


def write_spec(folder: Path, model: str, **extra) -> Path:
    """A spec outside the repository naming only the file and the task (plus `extra`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.onnx").exists():
        shutil.copyfile(FIXTURES / model / "model.onnx", folder / "model.onnx")
    spec_file = folder / "servetool.yaml"
    spec_file.write_text(yaml.safe_dump({"name": f"ul-{model}", "source": {"onnx": "model.onnx"},
                                         "task": "object-detection", **extra}))
    return spec_file


def thresholds(model: str) -> dict:
    """The spec lines for thresholds the fixture's answers were made at other than ultralytics'
    defaults (the briefly trained RT-DETR's scores stay under 0.25: its answers are at 0.13)."""
    made_at = json.loads((FIXTURES / model / "answers.json").read_text()).get("thresholds") or {}
    keys = {"conf": "confidence", "iou": "iou", "max_det": "max_detections"}
    return {"detection": {keys[k]: v for k, v in made_at.items()}} if made_at else {}


def references(model: str) -> tuple[list[str], list[bytes], list[Reference]]:
    """The fixture's image names, their bytes, and ultralytics' answers with their stages."""
    answers = json.loads((FIXTURES / model / "answers.json").read_text())["images"]
    stages = np.load(FIXTURES / model / "stages.npz")
    refs = []
    for answer in answers:
        ref = reference_of(answer)
        ref.tensor = stages[f"{ref.name}:input"].astype(np.float32) / 255
        ref.raw = [stages[k] for k in sorted(stages.files) if k.startswith(f"{ref.name}:raw")]
        refs.append(ref)
    names = [a["file"] for a in answers]
    return names, [(FIXTURES / "images" / n).read_bytes() for n in names], refs


@pytest.fixture(scope="module", params=MODELS)
def packaged(request, tmp_path_factory):
    """One fixture model packaged by servetool.operate.package.package, its report, and the unpacked
    archive's handler (reference.served.ServedPath)."""
    from servetool.convert.reference.served import ServedPath
    from servetool.engines.torchserve import archive
    from servetool.model.spec import load_spec
    from servetool.operate.package import package

    model = request.param
    root = tmp_path_factory.mktemp(f"ul-{model}")
    spec = load_spec(write_spec(root / "spec", model, **thresholds(model)))
    lines: list[str] = []
    summary = package(spec, root / "store", progress=lines.append)
    mar = Path(summary["archive"])
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(root / "unpacked")
    served = ServedPath(root / "unpacked", archive.archive_manifest(mar)["config"])
    return model, spec, summary, lines, served


def test_package_reads_the_file_and_says_ultralytics_was_not_checked_here(packaged):
    """The layout, box format, labels and thresholds come from ultralytics' metadata, and package
    says so; ultralytics cannot be imported in this venv, and the report says that (with the
    reason), never nothing."""
    model, spec, summary, lines, _ = packaged
    report = "\n".join(lines)
    assert applies(spec)
    assert READING[model] in report, report
    confidence = thresholds(model).get("detection", {}).get("confidence", 0.25)
    assert "labels: 10" in report and f"confidence {confidence}, iou 0.7, max_detections 300" in report
    assert "opencv-bilinear resizing" in report
    assert ("stretched" if model == "rtdetr" else "letterboxed") in report
    rect = "letterboxed (rect: padded to multiples of 32) within [160, 160]" in report
    assert rect == (model in DYNAMIC), report
    if rect:  # the fit and why, from the metadata
        assert "fit: letterbox-rect, stride 32: the export is dynamic (args dynamic=True" in report
    assert len(summary["reference"]) == 1
    assert summary["reference"][0].startswith(
        "not checked against the library: ultralytics is not importable here (")
    assert "reference: not checked against the library: ultralytics is not importable" in report


def test_served_boxes_match_ultralytics_own_predictions(packaged, capsys):
    """Every fixture image as a raw file through the packaged handler: the same boxes as
    ultralytics' predictor (count, classes, IoU >= 0.9, scores within 0.01)."""
    from servetool.convert import export

    model, spec, _, _, served = packaged
    names, bodies, refs = references(model)
    answers = [served.answer_one(body) for body in bodies]
    task, run = spec.detector(), export.runner_for(export.load_original(spec))
    measured = compare(answers, refs, names, lambda i: stage_of(task, bodies[i], refs[i], run))
    assert measured.images == len(names) >= 6
    assert measured.boxes == sum(len(r.boxes) for r in refs) > 0, "the fixture has no boxes"
    assert measured.min_iou >= MIN_IOU and measured.max_score_diff <= MAX_SCORE_DIFF
    # labels from the metadata: the answers name the digits
    assert {d["label"] for a in answers for d in a} <= {str(i) for i in range(10)}
    with capsys.disabled():
        print(f"\n{model}: {measured.boxes} boxes on {measured.images} images, min IoU "
              f"{measured.min_iou:.4f}, max score diff {measured.max_score_diff:.5f}")


def test_rect_inputs_are_ultralytics_own_and_batches_keep_one_size(packaged):
    """The dynamic export: every image reaches the model at the size ultralytics' predictor fed
    it (wide and tall ones smaller than the square), pixel for pixel; and a batch of requests of
    different sizes through the archive's handler answers each as it answers alone (one model run
    per size, never padded together)."""
    model, spec, _, _, served = packaged
    if model not in DYNAMIC:
        pytest.skip("rect letterbox: the dynamic exports only")
    names, bodies, refs = references(model)
    task = spec.detector()
    shapes = set()
    for body, ref in zip(bodies, refs, strict=True):
        array = task.preprocess(body).examples[0][task.input_name]
        assert array.shape == ref.tensor.shape
        assert np.abs(array - ref.tensor).max() <= 1 / 255 + 1e-6
        shapes.add(array.shape)
    assert len(shapes) >= 3 and (3, 160, 160) in shapes
    alone = [served.answer_one(body) for body in bodies]
    runtime = served.handler.runtime
    run, fed = runtime.run, []
    runtime.run = lambda feeds: fed.append(next(iter(feeds.values())).shape) or run(feeds)
    try:
        together, statuses, _ = served.answer(bodies)
    finally:
        del runtime.run  # the instance attribute shadowed the method
    assert statuses == [200] * len(bodies) and together == alone
    assert len(fed) == len(shapes) and sum(f[0] for f in fed) == len(bodies)


def test_a_fixed_input_refuses_rect_and_the_dynamic_one_takes_the_square(tmp_path):
    """detection.fit letterbox-rect on the fixed 160x160 export is refused, naming the fix; the
    dynamic export set to fit: letterbox letterboxes every image to the full square."""
    from servetool.convert import export
    from servetool.model.spec import SpecError, load_spec

    if not {"yolov8", "yolov8-dynamic"} <= set(MODELS):
        pytest.skip("needs the yolov8 and yolov8-dynamic fixtures")
    with pytest.raises(SpecError, match=r"letterbox-rect feeds each image at its own size, but "
                                        r"model\.onnx takes a fixed \[160, 160\]: use "
                                        r"detection\.fit: letterbox"):
        load_spec(write_spec(tmp_path / "fixed", "yolov8", detection={"fit": "letterbox-rect"}))
    spec = load_spec(write_spec(tmp_path / "dyn", "yolov8-dynamic",
                                detection={"fit": "letterbox"}))
    assert spec.input_shape == (3, 160, 160) and spec.detection.fit == "letterbox"
    task = spec.detector()
    body = (FIXTURES / "images" / "wide.png").read_bytes()
    assert task.preprocess(body).examples[0][task.input_name].shape == (3, 160, 160)
    # ultralytics fed this file's wide image at 96 x 160: the stage diagnosis names the fit
    names, bodies, refs = references("yolov8-dynamic")
    found = stage_of(task, body, refs[names.index("wide.png")],
                     export.runner_for(export.load_original(spec)))
    assert found == ("resize (servetool's model input is [3, 160, 160], ultralytics' [3, 96, 160]: "
                     "detection.fit letterbox | letterbox-rect | stretch)"), found


def test_a_missing_box_is_named_with_its_image(packaged):
    model, _, _, _, served = packaged
    names, bodies, refs = references(model)
    answers = [served.answer_one(body) for body in bodies]
    index = next(i for i, a in enumerate(answers) if a)
    answers[index] = answers[index][1:]
    with pytest.raises(ReferenceMismatch, match=rf"{names[index]}: servetool found "
                                                r".*the stage that differs: not diagnosed"):
        compare(answers, refs, names)
    answers = [served.answer_one(body) for body in bodies]
    answers[index][0]["box"] = [v + 40 for v in answers[index][0]["box"]]
    with pytest.raises(ReferenceMismatch, match=rf"{names[index]}: ultralytics' box \d+ \(class"):
        compare(answers, refs, names)


# --- which stage differs: spec variants that leave ultralytics' path in one stage each ---------
STAGES = [
    ({"preprocess": {"interpolation": "bilinear"}}, "resize (the resized pixels differ"),
    ({"preprocess": {"letterbox": {"fill": 0}}}, "letterbox padding"),
    ({"detection": {"scale": 1.0}}, "normalisation"),
    ({"detection": {"confidence": 0.9}}, "thresholds"),
    ({"detection": {"box_format": "xyxy"}}, "layout/box decoding"),
]


@pytest.mark.parametrize("variant, stage", STAGES, ids=[s for _, s in STAGES])
def test_the_stage_that_differs_is_named(tmp_path, variant, stage):
    """servetool's stages one by one against ultralytics' on the raw YOLOv8 fixture: a spec that
    resizes with Pillow, pads in black, skips the /255, keeps fewer boxes or reads the box
    columns as corners is told apart, on every image where the answers differ."""
    from servetool.convert import export
    from servetool.model.spec import load_spec

    if "yolov8" not in MODELS:
        pytest.skip("no yolov8 fixture")
    names, bodies, refs = references("yolov8")
    spec = load_spec(write_spec(tmp_path, "yolov8", **variant))
    task, run = spec.detector(), export.runner_for(export.load_original(spec))
    found = {stage_of(task, body, ref, run) for body, ref in zip(bodies, refs, strict=True)
             if answers_differ(task, run, body, ref)}
    assert found and all(f.startswith(stage) for f in found), found


def answers_differ(task, run, body: bytes, ref: Reference) -> bool:
    """The detector `task` (what the handler runs) answers this image other than ultralytics."""
    rows = task.preprocess(body)
    outputs = run(rows.examples[0][task.input_name][None])
    boxes, scores, classes = task.detect([o[0] for o in outputs], rows.meta)
    served = [{"box": b.tolist(), "score": float(s), "class_id": int(c)}
              for b, s, c in zip(boxes, scores, classes, strict=True)]
    try:
        match(served, ref)
    except Mismatch:
        return True
    return False


def test_channel_order_is_named(tmp_path):
    from servetool.convert import export
    from servetool.model.spec import load_spec

    if "yolov8" not in MODELS:
        pytest.skip("no yolov8 fixture")
    names, bodies, refs = references("yolov8")
    spec = load_spec(write_spec(tmp_path, "yolov8"))
    ref = refs[0]
    ref.tensor = ref.tensor[::-1]  # a library that fed BGR
    found = stage_of(spec.detector(), bodies[0], ref, export.runner_for(spec.source.path))
    assert found.startswith("layout (channel order"), found


# --- normalised boxes read as pixels are refused at package time ----------------------------------
NORMALISED = '''
import torch
from torch import nn


class Normalised(nn.Module):
    """A YOLOv8-style head [N, 4 + 10, 64] whose boxes are cx cy w h normalised to 0..1."""

    def forward(self, x):
        n = x.shape[0]
        centres = torch.linspace(0.1, 0.9, 64)
        boxes = torch.stack([centres, centres.flip(0), torch.full_like(centres, 0.1),
                             torch.full_like(centres, 0.2)])
        scores = torch.sigmoid(x.mean(dim=(1, 2, 3)))[:, None, None].expand(n, 10, 64)
        return torch.cat([boxes[None].expand(n, -1, -1), scores], 1)
'''


def test_normalised_boxes_under_a_pixel_layout_are_refused(tmp_path):
    """A head whose boxes are all within [0, 1] of a 96x96 input, read as the yolov8 layout's
    pixels, would answer every object as a speck in the corner: package refuses it, naming the
    key that fixes it; with that key set, it is read."""
    from servetool.convert import export
    from servetool.convert.pipeline import TaskMismatch, check_task
    from servetool.model.spec import load_spec

    (tmp_path / "model.py").write_text(NORMALISED)
    (tmp_path / "labels.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")

    def spec_with(**extra):
        (tmp_path / "servetool.yaml").write_text(yaml.safe_dump({
            "name": "normalised", "source": {"random_weights": True, "model_file": "model.py",
                                             "class": "Normalised"},
            "input": {"shape": [3, 96, 96]}, "task": "object-detection",
            "labels": "labels.txt", **extra}))
        return load_spec(tmp_path / "servetool.yaml")

    spec = spec_with()
    with pytest.raises(TaskMismatch, match=r"within \[0, 1\.5\] of its 96x96 input.*"
                                           r"set detection\.box_units: normalized$"):
        check_task(spec, export.load_original(spec))
    fixed = spec_with(detection={"box_units": "normalized"})
    assert "boxes cxcywh in normalized" in check_task(fixed, export.load_original(fixed))[0]
