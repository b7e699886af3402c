"""Fixtures made by ultralytics itself: tiny detectors it trained and exported, the raw image files
it was run on, and what ultralytics' own predictor answered (tests/fixtures/ultralytics/<model>/).

tests/test_ultralytics_parity.py serves the same files through servetool and compares the boxes;
ultralytics cannot be imported in the project's .venv (it needs torchvision, whose PyPI build
does not load beside the pinned torch), so the answers are made here, in a separate venv:

    python3.11 -m venv /tmp/ulv
    /tmp/ulv/bin/pip install torch==2.13.0 ultralytics onnx onnxruntime onnxslim scikit-learn
    /tmp/ulv/bin/python scripts/make_ultralytics_fixtures.py        # ~5 minutes on 2 CPU cores
    /tmp/ulv/bin/python scripts/make_ultralytics_fixtures.py --models yolo11 yolo11-dynamic \
        --work /tmp/ul11                                            # ~6 minutes, 40 epochs
    cp /tmp/ul11/runs/yolo11/weights/best.pt /tmp/ul11/yolo11-40ep.pt
    /tmp/ulv/bin/python scripts/make_ultralytics_fixtures.py --models yolo11 yolo11-dynamic \
        --work /tmp/ul11 --yolo11-init /tmp/ul11/yolo11-40ep.pt     # 40 more: the fixtures

(torch==2.13.0 resolves to the CPU wheel this machine's pip finds locally; elsewhere add
`--index-url https://download.pytorch.org/whl/cpu` so pip does not pull the CUDA build.)
`--models` makes only the fixtures named and leaves the others as they are; the shared images/
are written only when missing, so every fixture's answers stay on the same files.

torchvision shim (this script only): PyPI's torchvision wheel has no C++ ops for this torch, so
`import torchvision` fails registering a fake kernel for `torchvision::nms`. Before importing it,
the script defines the `torchvision::nms` op schema itself with a pure-torch greedy NMS kernel of
torchvision's semantics (boxes in descending score order; a box is kept when no kept box overlaps
it by IoU > threshold), and points torchvision.ops.nms at that op (skipping its "C++ ops loaded"
assertion). ultralytics' predict-time NMS then runs this greedy NMS, and an `nms=True` export
traces the op into ONNX's NonMaxSuppression through torchvision's own ONNX symbolic, as it would
with the real wheel.

Models (digits pasted on cluttered canvases: models/digits-detect/data.py, written as a YOLO
dataset in a scratch folder; 10 classes):
- yolov8: a YOLOv8 from ultralytics' own yolov8.yaml at a tiny width/depth, trained briefly at
  imgsz 160, exported with the default `model.export(format="onnx", imgsz=160)` (fixed batch 1,
  metadata, raw Detect head [1, 14, anchors]);
- yolov8-nms: the same weights exported with `nms=True` (NMS inside the graph, [1, 300, 6]);
- yolov8-dynamic: the same weights exported with `dynamic=True` (batch, height and width dynamic;
  ultralytics' predictor then letterboxes each image to its "rect" shape: the longer side to
  imgsz, the shorter padded only up to a multiple of the stride); `--yolo-from` exports it from
  an earlier run's weights without training;
- yolo11: a YOLO11 from ultralytics' own yolo11.yaml (C3k2 blocks, C2PSA attention, a Detect
  head with depthwise class branches), scaled tiny the same way (width 0.125, max 128 channels,
  yolo11n's depth 0.50), trained on the same canvases with the same settings and exported with
  the default export: the same raw [1, 14, anchors] head and metadata as the YOLOv8 (head
  'Detect'), so servetool reads it as the yolov8 layout. 40 epochs from scratch left every
  score under 0.19 (no box at conf 0.25); the fixture is 40 more from those weights
  (`--yolo11-init`, commands above: 11 boxes on the six images);
- yolo11-dynamic: the same weights exported with `dynamic=True` (`--yolo11-from` as
  `--yolo-from`);
- rtdetr: a tiny RT-DETR (ultralytics' RTDETRDecoder on a small conv backbone), trained briefly
  and exported the same way ([1, 300, 6], cx cy w h normalised); skipped when its file is over
  MAX_BYTES or its export fails.
Each is then run by ultralytics' own predictor on the ONNX file (`YOLO(onnx).predict(path,
imgsz=<the file's>)`, every other argument at its default) over IMAGE_NAMES, raw files of several
sizes and aspect ratios (wide, tall, square, small, greyscale PNG, JPEG); servetool's
reference.detection.library_answers is that call, shared with `package`'s live check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "ultralytics"
IMGSZ = 160
MAX_BYTES = 3_000_000  # one model file; the fixtures together stay under 4 MB


def install_torchvision_shim() -> None:
    """Make `import torchvision` and torchvision.ops.nms work without torchvision's C++ ops."""
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", greedy_nms, "CPU")
    install_torchvision_shim.lib = lib  # the op lives as long as its Library object

    import torchvision.ops
    import torchvision.ops.boxes

    def nms(boxes, scores, iou_threshold):
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)

    torchvision.ops.nms = torchvision.ops.boxes.nms = nms


def greedy_nms(boxes, scores, iou_threshold: float):
    """torchvision.ops.nms's result: indices kept, highest score first."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = torch.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = torch.minimum(boxes[best, 2:], boxes[rest, 2:])
        wh = (bottom_right - top_left).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        order = rest[inter / (area[best] + area[rest] - inter) <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def digits_data():
    spec = importlib.util.spec_from_file_location("digits_data",
                                                  ROOT / "models" / "digits-detect" / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_data"] = module
    spec.loader.exec_module(module)
    return module


def write_dataset(root: Path, train: int, val: int) -> Path:
    """A YOLO-format dataset (images/, labels/ with class cx cy w h normalised) and its yaml."""
    data = digits_data()
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, canvas in enumerate(data.canvases("train" if split == "train" else "held", count)):
            canvas.image.save(root / "images" / split / f"{i}.png")
            w, h = canvas.image.size
            lines = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                     f"{(y2 - y1) / h:.6f}"
                     for (x1, y1, x2, y2), c in zip(canvas.boxes, canvas.classes, strict=True)]
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    names = {i: str(i) for i in range(10)}
    (root / "data.yaml").write_text(json.dumps({"path": str(root), "train": "images/train",
                                                "val": "images/val", "names": names}))
    return root / "data.yaml"


# family: (ultralytics' own yaml under cfg/models, the tiny scale [depth, width, max_channels])
YOLO_FAMILIES = {"yolov8": ("v8/yolov8.yaml", [0.33, 0.125, 128]),
                 "yolo11": ("11/yolo11.yaml", [0.50, 0.125, 128])}


def tiny_yolo_yaml(root: Path, family: str = "yolov8") -> Path:
    """ultralytics' yolov8.yaml (yolo11.yaml) with one tiny scale ("t", the only one, so
    ultralytics takes it)."""
    import ultralytics
    import yaml

    source, scale = YOLO_FAMILIES[family]
    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "models" / source)
                         .read_text())
    cfg["nc"], cfg["scales"] = 10, {"t": scale}
    path = root / f"{family}t.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_rtdetr_yaml(root: Path) -> Path:
    """RT-DETR's decoder (hidden 64, 300 queries, 1 layer) on a small strided conv backbone."""
    import yaml

    cfg = {"nc": 10, "backbone": [
        [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],  # 2: P3
        [-1, 1, "Conv", [64, 3, 2]],  # 3: P4
        [-1, 1, "Conv", [64, 3, 2]],  # 4: P5
    ], "head": [[[2, 3, 4], 1, "RTDETRDecoder", ["nc", 64, 300, 4, 4, 1, 128]]]}
    path = root / "rtdetr-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


IMAGE_NAMES = ("wide.png", "tall.png", "square.png", "small.png", "grey.png", "photo.jpg")


def sample_images(folder: Path) -> list[Path]:
    """Raw image files of several sizes and aspect ratios, from held-out canvases (never trained
    on): wide, tall, square, small, greyscale, and a JPEG. Files already there are kept (the
    other fixtures' answers were made on them)."""
    from PIL import Image

    if all((folder / name).is_file() for name in IMAGE_NAMES):
        return [folder / name for name in IMAGE_NAMES]
    data = digits_data()
    held = data.canvases("held", 60)[40:]
    folder.mkdir(parents=True, exist_ok=True)

    def pair(a, b, vertical: bool) -> Image.Image:
        w = a.width if vertical else a.width + b.width
        h = a.height + b.height if vertical else max(a.height, b.height)
        w = max(a.width, b.width) if vertical else w
        out = Image.new("RGB", (w, h), (60, 60, 60))
        out.paste(a, (0, 0))
        out.paste(b, (0, a.height) if vertical else (a.width, 0))
        return out

    made = {
        "wide.png": pair(held[0].image, held[1].image, vertical=False),
        "tall.png": pair(held[2].image, held[3].image, vertical=True),
        "square.png": held[4].image.resize((200, 200), Image.BILINEAR),
        "small.png": held[5].image.resize((held[5].image.width * 2 // 3,
                                          held[5].image.height * 2 // 3), Image.BILINEAR),
        "grey.png": held[6].image.convert("L"),
        "photo.jpg": held[7].image.resize((held[7].image.width * 3 // 2,
                                           held[7].image.height * 3 // 2), Image.BILINEAR),
    }
    assert tuple(made) == IMAGE_NAMES
    paths = []
    for name, image in made.items():
        image.save(folder / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        paths.append(folder / name)
    return paths


def train(model, data: Path, epochs: int, project: Path, name: str):
    # AdamW at 0.004: ultralytics' "auto" choice (AdamW ~0.0007 for short runs) left the tiny
    # YOLOv8 with 1 box over 0.25 on the six images after 30 epochs
    model.train(data=str(data), epochs=epochs, imgsz=IMGSZ, batch=16, workers=0, device="cpu",
                plots=False, val=False, amp=False, optimizer="AdamW", lr0=0.004,
                project=str(project), name=name, exist_ok=True, verbose=False, mosaic=0.5)
    return model


def export(model, **extra) -> Path:
    return Path(model.export(format="onnx", imgsz=IMGSZ, **extra))


def write_fixture(name: str, onnx_file: Path, images: list[Path], note: str,
                  thresholds: dict | None = None) -> int | None:
    """tests/fixtures/ultralytics/<name>/: the model, answers.json (on the shared images/) and
    stages.npz. A model that finds no box on the images (trained too briefly) leaves the folder
    as it was: the test needs boxes to compare."""
    sys.path.insert(0, str(ROOT))
    from servetool.convert.reference.detection import library_answers

    if onnx_file.stat().st_size > MAX_BYTES:
        print(f"{name}: skipped, {onnx_file.stat().st_size} bytes > {MAX_BYTES}")
        return None
    answers = library_answers(onnx_file, images, thresholds)
    boxes = sum(len(a["boxes"]) for a in answers)
    if not boxes:
        print(f"{name}: skipped, no box on the {len(answers)} images: train longer")
        return 0
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copyfile(onnx_file, folder / "model.onnx")
    save_stages(folder / "stages.npz", answers)
    import ultralytics

    (folder / "answers.json").write_text(json.dumps(
        {"made_by": f"ultralytics {ultralytics.__version__}", "how": note,
         "predict": "YOLO(model.onnx).predict(image file, imgsz=<the file's>, **thresholds), "
                    "defaults otherwise",
         "thresholds": thresholds or {},
         "images": answers}, indent=1) + "\n")
    print(f"{name}: {onnx_file.stat().st_size} bytes, {boxes} boxes on {len(answers)} images")
    return boxes


def save_stages(path: Path, answers: list[dict]) -> None:
    """Each image's model input as ultralytics built it (uint8: it is the letterboxed image / 255)
    and its raw outputs, for the test's stage diagnosis; taken out of the answers."""
    import numpy as np

    arrays = {}
    for answer in answers:
        tensor, raw = answer.pop("tensor"), answer.pop("raw")
        arrays[f"{answer['file']}:input"] = np.rint(tensor * 255).astype(np.uint8)
        for k, output in enumerate(raw):
            arrays[f"{answer['file']}:raw{k}"] = output.astype(np.float32)
    np.savez_compressed(path, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ultralytics-fixtures"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rtdetr-epochs", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--rtdetr-conf", type=float, default=0.13)
    parser.add_argument("--rtdetr-from", type=Path, help="an earlier run's RT-DETR weights (no "
                        "training)")
    parser.add_argument("--init", type=Path, help="weights the YOLOv8 starts from (a .pt of an "
                        "earlier run: train on from there)")
    parser.add_argument("--yolo-from", type=Path, help="an earlier run's YOLOv8 weights (no "
                        "training) for yolov8-dynamic")
    parser.add_argument("--yolo11-epochs", type=int, default=40)
    parser.add_argument("--yolo11-init", type=Path, help="weights the YOLO11 starts from (as "
                        "--init)")
    parser.add_argument("--yolo11-from", type=Path, help="an earlier run's YOLO11 weights (no "
                        "training) for yolo11-dynamic")
    models = ("yolov8", "yolov8-dynamic", "rtdetr", "yolo11", "yolo11-dynamic")
    parser.add_argument("--models", nargs="+", choices=models, default=list(models),
                        help="yolov8: also yolov8-nms")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(args.work / "settings"))
    install_torchvision_shim()
    args.work.mkdir(parents=True, exist_ok=True)
    trains = ("yolov8" in args.models or "yolo11" in args.models
              or ("rtdetr" in args.models and not args.rtdetr_from))
    data = write_dataset(args.work / "data", args.train_images, 40) if trains else None
    images = sample_images(OUT / "images")  # shared by every model's fixture

    if "yolov8" in args.models:
        make_yolo(args, data, images)
    if "yolov8-dynamic" in args.models:
        make_yolo_dynamic(args, images)
    if "yolo11" in args.models:
        make_yolo(args, data, images, "yolo11")
    if "yolo11-dynamic" in args.models:
        make_yolo_dynamic(args, images, "yolo11")
    if "rtdetr" in args.models:
        make_rtdetr(args, data, images)


# family: (its fixture's title, the run folder under --work/runs)
YOLO_RUNS = {"yolov8": ("YOLOv8", "yolo"), "yolo11": ("YOLO11", "yolo11")}


def make_yolo(args, data: Path, images: list[Path], family: str = "yolov8") -> None:
    """The tiny YOLO of `family` trained here (from --init / --yolo11-init when given) and
    exported by default; the YOLOv8 also with nms=True."""
    from ultralytics import YOLO

    title, run = YOLO_RUNS[family]
    epochs = args.epochs if family == "yolov8" else args.yolo11_epochs
    init = args.init if family == "yolov8" else args.yolo11_init
    yolo = YOLO(str(tiny_yolo_yaml(args.work, family)))
    if init:
        yolo.load(str(init))
    train(yolo, data, epochs, args.work / "runs", run)
    trained = (f"trained {epochs} epochs at imgsz {IMGSZ} on {args.train_images} canvases"
               + (f" from {init.name}" if init else ""))
    write_fixture(family, export(yolo), images, f"tiny {title}, {trained}; default ONNX export")
    if family != "yolov8":
        return
    try:
        e2e = export(YOLO(str(args.work / "runs" / run / "weights" / "best.pt")), nms=True)
        write_fixture("yolov8-nms", e2e, images, "the same weights; export nms=True")
    except Exception as exc:  # noqa: BLE001 - say why, keep the other fixtures
        print(f"yolov8-nms: skipped, the nms=True export failed: {exc}")


def make_yolo_dynamic(args, images: list[Path], family: str = "yolov8") -> None:
    """The YOLO weights of `family` (this run's, or --yolo-from / --yolo11-from) exported with
    dynamic=True: ultralytics' predictor sees a dynamic ONNX input and letterboxes each image to
    its own rect shape."""
    from ultralytics import YOLO

    given = args.yolo_from if family == "yolov8" else args.yolo11_from
    weights = given or args.work / "runs" / YOLO_RUNS[family][1] / "weights" / "best.pt"
    dynamic = export(YOLO(str(weights)), dynamic=True)
    drop_shape_annotations(dynamic)
    write_fixture(f"{family}-dynamic", dynamic, images,
                  f"the {family} fixture's weights ({weights.name}); export dynamic=True (batch, "
                  "height, width dynamic: ultralytics predicts on each image's rect letterbox); "
                  "graph.value_info dropped")


def drop_shape_annotations(path: Path) -> None:
    """Remove graph.value_info: onnxslim annotates every intermediate tensor of a dynamic export
    with its symbolic shape (277 KB of the 1.1 MB file); ONNX makes them optional, and the
    graph, weights and metadata stay ultralytics' own."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def make_rtdetr(args, data: Path, images: list[Path]) -> None:
    """The tiny RT-DETR, trained here (or taken from --rtdetr-from, an earlier run's weights).
    A few CPU epochs leave its scores under ultralytics' default confidence 0.25 (0.14-0.17 at
    best after 10 epochs), so its answers are made at --rtdetr-conf, recorded in answers.json,
    which the test's spec then sets as detection.confidence."""
    import torch
    from ultralytics import RTDETR

    try:
        if args.rtdetr_from:
            rtdetr = RTDETR(str(args.rtdetr_from))
        else:
            rtdetr = RTDETR(str(tiny_rtdetr_yaml(args.work)))
            train(rtdetr, data, args.rtdetr_epochs, args.work / "runs", "rtdetr")
        weights = args.rtdetr_from or args.work / "runs" / "rtdetr" / "weights" / "best.pt"
        epochs = torch.load(weights, weights_only=False)["train_args"]["epochs"]
        write_fixture("rtdetr", export(rtdetr), images,
                      f"tiny RT-DETR, trained {epochs} epochs at imgsz {IMGSZ}; default ONNX "
                      f"export; predicted at conf {args.rtdetr_conf}",
                      {"conf": args.rtdetr_conf})
    except Exception as exc:  # noqa: BLE001
        print(f"rtdetr: skipped, training or export failed: {exc}")


if __name__ == "__main__":
    main()
