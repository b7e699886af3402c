"""Make the timm reference fixtures (tests/fixtures/timm/): run with a Python that has timm.

timm needs torchvision, and PyPI's torchvision does not load beside this project's CPU torch (its
C++ ops fail to register: "operator torchvision::nms does not exist"), so the fixtures are made in
a separate venv and shipped:

    python3.11 -m venv /tmp/timmv
    /tmp/timmv/bin/pip install torch==2.13.0 timm onnx onnxscript
    /tmp/timmv/bin/python scripts/make_timm_fixtures.py

Only torchvision's fake-kernel registrations are skipped (they need the missing C++ ops);
everything timm's preprocessing uses (torchvision.transforms on PIL images) is torchvision's own
Python. For each model this writes what a user of timm has: `model.onnx` (torch.onnx.export of
the model in eval mode), `config.json` as timm's save_for_hf writes it (architecture,
pretrained_cfg, label_names), raw image files of several sizes, aspect ratios and modes, and
`answers.json`: timm's own answer for each file (its resolve_data_config + create_transform on the
decoded file, the model in PyTorch, softmax) as top-5 labels and probabilities.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "timm"
# Two classifiers whose data configs differ in every item servetool must read: input size,
# crop_pct, interpolation, mean and std.
MODELS = {"test_resnet": 0, "mobilenetv3_small_050": 1}
LABELS = ["cat", "dog", "fox", "owl", "eel"]
IMAGES = {  # name: (width, height, mode, format)
    "wide.png": (333, 180, "RGB", "PNG"),
    "tall.jpg": (190, 410, "RGB", "JPEG"),
    "square.png": (256, 256, "RGB", "PNG"),
    "grey.png": (300, 220, "L", "PNG"),
    "alpha.png": (240, 300, "RGBA", "PNG"),
    "small.png": (97, 131, "RGB", "PNG"),
}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Shapes on a gradient, softened: edges and smooth areas, like a photograph's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], -1) * 255
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        size = rng.integers(10, max(width, height) // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size // 2 + 5], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.2))


def write_images(folder: Path) -> list[Path]:
    paths = []
    for i, (name, (width, height, mode, fmt)) in enumerate(IMAGES.items()):
        image = picture(width, height, seed=i)
        if mode == "RGBA":
            alpha = Image.linear_gradient("L").resize((width, height))
            image = image.convert("RGBA")
            image.putalpha(alpha)
        elif mode != "RGB":
            image = image.convert(mode)
        path = folder / name
        image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def build(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=len(LABELS))
    with torch.no_grad():  # random heads answer near-uniformly: spread the logits so the order
        head = model.get_classifier()  # of the labels is decided by the pixels
        head.weight.mul_(25.0)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": LABELS}
    return model.eval()


def answers(model: torch.nn.Module, paths: list[Path]) -> dict:
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    found = {}
    for path in paths:
        with Image.open(path) as image:
            pixels = transform(image.convert("RGB"))[None]
        with torch.no_grad():
            probs = torch.softmax(model(pixels), dim=1)[0]
        top = torch.argsort(probs, descending=True)
        found[path.name] = [{"label": LABELS[i], "probability": float(probs[i])} for i in top]
    return {"timm": timm.__version__, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in config.items()},
            "answers": found}


def main() -> None:
    for name, seed in MODELS.items():
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        model = build(name, seed)
        save_for_hf(model, folder, model_config={"label_names": LABELS})
        for weights in ("model.safetensors", "pytorch_model.bin"):  # the ONNX file is served
            (folder / weights).unlink(missing_ok=True)
        size = model.pretrained_cfg["input_size"]
        torch.onnx.export(model, (torch.zeros(1, *size),), folder / "model.onnx", dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        paths = write_images(folder)
        (folder / "answers.json").write_text(json.dumps(answers(model, paths), indent=1) + "\n")
        print(f"{folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
