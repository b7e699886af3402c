"""What an image classifier's own library wrote about its preprocessing, read so that users need
not translate it into the spec by hand.

Two kinds of file are read, beside the model file the spec serves (or in its Hugging Face folder):
- timm's `config.json` (what `push_to_hub` / `save_pretrained` write): `architecture`,
  `label_names` and `pretrained_cfg` {input_size, interpolation, crop_pct, crop_mode, mean, std}.
  timm's eval transform is Resize(floor(size / crop_pct)) on the shorter side, CenterCrop(size),
  ToTensor, Normalize: servetool's resize (int) + center_crop, pixel for pixel.
- Hugging Face's `preprocessor_config.json` (an image processor's settings) with `config.json`'s
  `id2label`. Keys the file leaves out take the processor class's defaults (PROCESSOR_DEFAULTS,
  read from transformers 5's classes); a processor type servetool cannot reproduce is refused.

Every item read is one line of `notes` (what `package` prints), naming the spec key that overrides
it. What cannot be reproduced exactly is a `problem`: an error unless the spec sets those keys.
No transformers or timm import here: reference parity (servetool/convert/reference/classification.py)
runs the libraries themselves and catches what this reading gets wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servetool.model.exporter_metadata import Hints

PROCESSOR_FILE = "preprocessor_config.json"
TIMM_FILE = "config.json"
# PIL's resampling numbers (what HF configs store) -> servetool's kernels
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
RESAMPLE_NAMES = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}
TIMM_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
HALF = [0.5, 0.5, 0.5]
OPENAI = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_COMMON = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": HALF, "image_std": HALF, "do_center_crop": False}
# The class defaults of the processors whose resize and crop are the generic ones (plus ConvNext's
# crop_pct rule); ResNet, RegNet and others save a ConvNextImageProcessor, Swin and DINO a ViT one.
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {**_COMMON, "size": {"height": 224, "width": 224}, "resample": 2,
                          "default_to_square": True},
    "DeiTImageProcessor": {**_COMMON, "size": {"height": 256, "width": 256}, "resample": 3,
                           "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                           "default_to_square": True},
    "ConvNextImageProcessor": {**_COMMON, "size": {"shortest_edge": 384}, "resample": 3,
                               "crop_pct": 224 / 256, "default_to_square": False},
    "BitImageProcessor": {**_COMMON, "size": {"shortest_edge": 224}, "resample": 3,
                          "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                          "image_mean": OPENAI[0], "image_std": OPENAI[1],
                          "default_to_square": False},
    "CLIPImageProcessor": {**_COMMON, "size": {"shortest_edge": 224}, "resample": 3,
                           "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                           "image_mean": OPENAI[0], "image_std": OPENAI[1],
                           "default_to_square": False},
    "MobileNetV1ImageProcessor": {**_COMMON, "size": {"shortest_edge": 256}, "resample": 2,
                                  "do_center_crop": True,
                                  "crop_size": {"height": 224, "width": 224},
                                  "default_to_square": False},
}
# processor switches servetool reproduces (or that do not touch a classifier's pixels)
HANDLED = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb",
           "do_reduce_labels"}


@dataclass
class ImageConfig(Hints):
    """Hints from a timm or Hugging Face config; `library` names it ("timm", "transformers"),
    `problems` are (spec preprocess keys, message): refused unless the spec sets every key."""

    library: str = ""
    file: Path | None = None
    input_shape: tuple[int, int, int] | None = None
    problems: list[tuple[tuple[str, ...], str]] = field(default_factory=list)


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_timm_config(path: Path) -> bool:
    raw = _read(path) if path.is_file() else {}
    return isinstance(raw.get("pretrained_cfg"), dict) and "architecture" in raw


def find_config(kind: str, path: Path | None) -> tuple[str, Path] | None:
    """(library, file) of the config that describes the model at `path` (a Hugging Face folder,
    or a model file with its library's config beside it), or None."""
    if path is None:
        return None
    folder = path if kind == "transformers" else path.parent
    if kind != "transformers" and is_timm_config(folder / TIMM_FILE):
        return "timm", folder / TIMM_FILE
    if (folder / PROCESSOR_FILE).is_file():
        return "transformers", folder / PROCESSOR_FILE
    return None


def read(kind: str, path: Path | None) -> ImageConfig:
    """What the model's library config says (empty when there is none)."""
    found = find_config(kind, path)
    if found is None:
        return ImageConfig()
    library, file = found
    if library == "timm":
        return timm_config(file)
    return processor_config(file)


def _labels_note(hints: ImageConfig, labels: list[str] | None, where: str) -> None:
    if labels:
        hints.labels = labels
        hints.notes.append(f"labels: {len(labels)} class names from {where} "
                           f"({', '.join(labels[:3])}{', ...' if len(labels) > 3 else ''}); "
                           "a labels file overrides them")


def timm_config(file: Path) -> ImageConfig:
    """timm's data config (timm.data.resolve_data_config's defaults where a key is absent)."""
    raw = _read(file)
    cfg = raw["pretrained_cfg"]
    hints = ImageConfig(exporter=f"timm {raw.get('architecture')}", library="timm", file=file)
    where = f"timm's {file.name} ({raw.get('architecture')})"
    names = raw.get("label_names")
    _labels_note(hints, [str(n) for n in names] if isinstance(names, list) else None, where)
    size = cfg.get("input_size") or [3, 224, 224]
    channels, height, width = (int(v) for v in size)
    hints.input_shape = (channels, height, width)
    interpolation = cfg.get("interpolation") or "bicubic"
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    mean = list(cfg.get("mean") or (0.485, 0.456, 0.406))
    std = list(cfg.get("std") or (0.229, 0.224, 0.225))
    pre = hints.preprocess
    if interpolation in TIMM_INTERPOLATIONS:
        pre["interpolation"] = interpolation
    else:
        hints.problems.append((("interpolation",), f"{where} resizes with {interpolation!r}, "
                               "which servetool does not reproduce: set preprocess.interpolation"))
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if cfg.get("crop_border_pixels"):
        hints.problems.append((("resize",), f"{where} trims {cfg['crop_border_pixels']} border "
                               "pixels first (crop_border_pixels), which servetool does not: set "
                               "preprocess.resize and center_crop"))
    elif mode == "squash":
        pre.update(resize=scaled, center_crop=(height, width))
        geometry = f"squash: resized to {list(scaled)}, aspect not kept, then center-cropped"
    elif mode == "center" and height == width:
        pre.update(resize=scaled[0], center_crop=(height, width))
        geometry = f"shorter side resized to {scaled[0]} (= floor({height} / crop_pct {crop_pct}))"
    else:
        hints.problems.append((("resize",), f"{where} has crop_mode {mode!r}"
                               + (f" on a non-square {height}x{width} input" if mode == "center"
                                  else "") + ", which servetool's resize and center_crop do not "
                               "reproduce: set preprocess.resize and center_crop yourself"))
    pre.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    if "resize" in pre:
        hints.notes.append(f"preprocessing: {geometry}, center crop {height}x{width}, "
                           f"{pre.get('interpolation', interpolation)}, mean {_short(mean)}, std "
                           f"{_short(std)} from {where} (preprocess.resize, center_crop, "
                           "interpolation, mean, std)")
    return hints


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _size(value: Any, square: bool) -> dict[str, int] | None:
    """A processor's size as a dict, legacy ints as transformers' get_size_dict reads them."""
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if isinstance(v, int)}
    return None


def processor_type(raw: dict[str, Any]) -> str:
    name = str(raw.get("image_processor_type") or str(raw.get("feature_extractor_type") or "")
               .replace("FeatureExtractor", "ImageProcessor"))
    for suffix in ("Fast", "Pil"):
        name = name.removesuffix(suffix)
    return name


def processor_config(file: Path) -> ImageConfig:
    """A Hugging Face image processor's settings as servetool preprocessing."""
    raw = _read(file)
    kind = processor_type(raw)
    hints = ImageConfig(exporter=f"transformers {kind}", library="transformers", file=file)
    config = _read(file.parent / "config.json")
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        from servetool.model import hf

        _labels_note(hints, hf.labels(config), f"{file.parent.name}/config.json's id2label")
    where = f"{file.name} ({kind or 'no image_processor_type'})"
    if kind not in PROCESSOR_DEFAULTS:
        hints.problems.append((("resize", "interpolation", "mean", "std"), (
            f"{where}: servetool reproduces the {', '.join(PROCESSOR_DEFAULTS)} processors' "
            "preprocessing; set preprocess.resize, center_crop, interpolation, mean and std "
            "in the spec to serve this one")))
        return hints
    settings = {**PROCESSOR_DEFAULTS[kind], **raw}
    _processor_switches(settings, where, hints)
    _processor_geometry(settings, kind, where, hints)
    _processor_values(settings, where, hints)
    return hints


def _processor_switches(settings: dict[str, Any], where: str, hints: ImageConfig) -> None:
    extra = sorted(k for k, v in settings.items() if k.startswith("do_") and v and k not in HANDLED)
    if extra:
        hints.problems.append((("resize", "mean", "std"), (
            f"{where} sets {', '.join(extra)}, a step servetool's preprocessing does not have: "
            "set preprocess.resize, center_crop, mean and std in the spec to serve it anyway")))


def _processor_geometry(s: dict[str, Any], kind: str, where: str, hints: ImageConfig) -> None:
    pre = hints.preprocess
    resample = s.get("resample")
    if resample in RESAMPLE:
        pre["interpolation"] = RESAMPLE[resample]
    else:
        hints.problems.append((("interpolation",), (
            f"{where} resamples with {RESAMPLE_NAMES.get(resample, resample)!r}, which servetool "
            "does not reproduce (nearest, bilinear, bicubic): set preprocess.interpolation")))
    size = _size(s.get("size"), bool(s.get("default_to_square", True)))
    if not s.get("do_resize"):
        hints.problems.append((("resize",), f"{where} has do_resize false (images pass at their "
                               "own size); servetool serves one input size: set preprocess.resize"))
        return
    crop = _size(s.get("crop_size"), True) if s.get("do_center_crop") else None
    if size and {"height", "width"} <= set(size):
        pre["resize"] = (size["height"], size["width"])
        how = f"resized to {size['height']}x{size['width']}, aspect not kept"
    elif size and set(size) == {"shortest_edge"}:
        edge = size["shortest_edge"]
        if kind == "ConvNextImageProcessor" and edge < 384:
            pct = float(s.get("crop_pct") or 224 / 256)
            pre["resize"] = int(edge / pct)
            crop = {"height": edge, "width": edge}
            how = f"shorter side resized to {int(edge / pct)} (= {edge} / crop_pct {pct})"
        elif kind == "ConvNextImageProcessor":
            pre["resize"] = (edge, edge)
            how = f"resized to {edge}x{edge} (ConvNext warps at 384 and above)"
        else:
            pre["resize"] = edge
            how = f"shorter side resized to {edge}"
    else:
        hints.problems.append((("resize",), f"{where} has size {s.get('size')!r}, which servetool "
                               "does not reproduce (height+width, or shortest_edge): set "
                               "preprocess.resize"))
        return
    if crop and {"height", "width"} <= set(crop):
        pre.update(center_crop=(crop["height"], crop["width"]), crop_offsets="floor")
        how += f", center crop {crop['height']}x{crop['width']} (offsets rounded down, as HF does)"
        hints.input_shape = (3, crop["height"], crop["width"])
    elif isinstance(pre["resize"], tuple):
        hints.input_shape = (3, *pre["resize"])
    hints.notes.append(f"preprocessing: {how}, {pre.get('interpolation', '?')} from {where} "
                       "(preprocess.resize, center_crop, crop_offsets, interpolation)")


def _processor_values(s: dict[str, Any], where: str, hints: ImageConfig) -> None:
    """rescale then normalise, (x * factor - mean) / std, as servetool's (x / 255 - m) / s:
    m = mean / (255 factor), s = std / (255 factor), exact for any factor."""
    factor = float(s.get("rescale_factor") or 1 / 255) if s.get("do_rescale") else 1.0
    mean, std = ([0.0], [1.0])
    if s.get("do_normalize"):
        mean = _as_list(s.get("image_mean"))
        std = _as_list(s.get("image_std"))
    scale = 255.0 * factor
    same = abs(scale - 1.0) < 1e-9
    hints.preprocess.update(mean=tuple(m if same else m / scale for m in mean),
                            std=tuple(v if same else v / scale for v in std))
    hints.notes.append(
        f"pixels: x * {factor:.6g}" + (f", minus mean {_short(mean)}, over std {_short(std)}"
                                       if s.get("do_normalize") else ", not normalised")
        + f" from {where}" + ("" if same else " (written as servetool's x / 255 with scaled mean "
                              "and std)") + " (preprocess.mean, std)")


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def folder_input_shape(folder: Path) -> tuple[int, int, int] | None:
    """The [channels, height, width] a Hugging Face image folder's processor produces."""
    hints = processor_config(folder / PROCESSOR_FILE)
    if hints.input_shape is None:
        return None
    channels = _read(folder / "config.json").get("num_channels")
    return (int(channels) if isinstance(channels, int) else 3, *hints.input_shape[1:])
