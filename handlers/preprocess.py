"""Image geometry shared by every task and by the gate, calibration and validation: resizing as
torchvision does it, torchvision's center crop, and letterboxing for detectors.

torchvision's eval transforms on PIL images are Pillow operations underneath: `Resize` calls
`Image.resize` with the chosen filter (Pillow's filters are antialiased when they shrink, which is
torchvision's default `antialias=True`), `Resize(int)` scales the shorter side and keeps the aspect
ratio, and `CenterCrop` pads with zeros when the image is smaller than the crop. The same Pillow
calls here give the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def pil_filter(name: str):
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "nearest": Image.NEAREST}[name]


def resized_size(width: int, height: int, resize: int | list[int] | tuple[int, int]
                 ) -> tuple[int, int]:
    """(width, height) after `resize`: an int scales the shorter side to it, aspect kept (as
    torchvision's Resize(int)); [height, width] is exact."""
    if isinstance(resize, int):
        if width <= height:
            return resize, int(resize * height / width)
        return int(resize * width / height), resize
    return int(resize[1]), int(resize[0])


def resize(image, size: int | list[int] | tuple[int, int], interpolation: str = "bilinear"):
    target = resized_size(image.width, image.height, size)
    if target == image.size:
        return image
    return image.resize(target, pil_filter(interpolation))


def center_crop(image, height: int, width: int):
    """torchvision's CenterCrop: zero padding where the image is smaller, then the middle."""
    from PIL import Image

    if image.width < width or image.height < height:
        padded = Image.new(image.mode, (max(width, image.width), max(height, image.height)))
        left = (padded.width - image.width) // 2
        top = (padded.height - image.height) // 2
        padded.paste(image, (left, top))
        image = padded
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits in a letterboxed one: boxes found in the letterboxed image
    map back with (x - left) / scale, (y - top) / scale."""

    scale: float
    left: int
    top: int
    width: int  # the letterboxed image's size
    height: int


def letterbox(image, height: int, width: int, *, fill: int = 114, stride: int | None = None,
              interpolation: str = "bilinear"):
    """Fit the image inside height x width with its aspect kept, centred on a `fill` background.
    With `stride`, the canvas shrinks to the smallest multiple of it that holds the image (a
    detector's "rect" mode); without, it is exactly height x width."""
    from PIL import Image

    scale = min(height / image.height, width / image.width)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if inner != image.size:
        image = image.resize(inner, pil_filter(interpolation))
    if stride:
        width = min(width, -(-inner[0] // stride) * stride)
        height = min(height, -(-inner[1] // stride) * stride)
    left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
    canvas = Image.new(image.mode, (width, height), (fill,) * len(image.getbands())
                       if len(image.getbands()) > 1 else fill)
    canvas.paste(image, (left, top))
    return canvas, Letterbox(scale, left, top, width, height)
