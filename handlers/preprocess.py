"""Image geometry shared by every task and by the gate, calibration and validation: resizing as
torchvision does it, torchvision's center crop, and letterboxing for detectors.

torchvision's eval transforms on PIL images are Pillow operations underneath: `Resize` calls
`Image.resize` with the chosen filter (Pillow's filters are antialiased when they shrink, which is
torchvision's default `antialias=True`), `Resize(int)` scales the shorter side and keeps the aspect
ratio, and `CenterCrop` pads with zeros when the image is smaller than the crop. The same Pillow
calls here give the same pixels.

Detectors exported by ultralytics (and many OpenCV pipelines) were trained on images resized with
OpenCV's `cv2.resize(..., INTER_LINEAR)`, which does not antialias when it shrinks: Pillow's
antialiased bilinear moved a trained detector's scores by up to 0.18. The "opencv-*" kernels call
OpenCV itself (an optional dependency, imported only when a spec names one), so the pixels are
OpenCV's own, not an imitation.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "opencv-bilinear", "opencv-area",
                  "opencv-bicubic", "opencv-nearest")
# a detector's input: aspect kept and padded to the input size, or only up to a multiple of the
# stride on the shorter side (ultralytics' "rect" letterbox, for inputs with free height and
# width), or stretched
FITS = ("letterbox", "letterbox-rect", "stretch")
# how a detector's box columns read (handlers/detection.py); here, beside the geometry, so that
# the spec can check them without importing numpy
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
BOX_UNITS = ("pixels", "normalized")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise RuntimeError("this model's spec resizes with OpenCV (preprocess.interpolation "
                           "opencv-*), and OpenCV is not installed: pip install "
                           "opencv-python-headless") from None
    return cv2


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


def resize_to(image, size: tuple[int, int], interpolation: str = "bilinear"):
    """The image resized to exactly (width, height) with the named kernel (Pillow's, or OpenCV's
    for the "opencv-" ones)."""
    if size == image.size:
        return image
    if not interpolation.startswith("opencv-"):
        return image.resize(size, pil_filter(interpolation))
    import numpy as np
    from PIL import Image

    cv2 = _cv2()
    flag = {"opencv-bilinear": cv2.INTER_LINEAR, "opencv-area": cv2.INTER_AREA,
            "opencv-bicubic": cv2.INTER_CUBIC, "opencv-nearest": cv2.INTER_NEAREST}[interpolation]
    return Image.fromarray(cv2.resize(np.asarray(image), size, interpolation=flag), image.mode)


def resize(image, size: int | list[int] | tuple[int, int], interpolation: str = "bilinear"):
    return resize_to(image, resized_size(image.width, image.height, size), interpolation)


CROP_OFFSETS = ("round", "floor")  # torchvision's CenterCrop | Hugging Face image processors


def center_crop(image, height: int, width: int, offsets: str = "round"):
    """torchvision's CenterCrop: zero padding where the image is smaller, then the middle. With
    offsets "floor", the middle as Hugging Face's image processors take it: (size - crop) // 2,
    where torchvision rounds half to even (they differ by a pixel when size - crop is 3 mod 4)."""
    from PIL import Image

    if image.width < width or image.height < height:
        padded = Image.new(image.mode, (max(width, image.width), max(height, image.height)))
        left = (padded.width - image.width) // 2
        top = (padded.height - image.height) // 2
        padded.paste(image, (left, top))
        image = padded
    if offsets == "floor":
        top, left = (image.height - height) // 2, (image.width - width) // 2
    else:
        top = int(round((image.height - height) / 2.0))
        left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits in a letterboxed (or stretched) one: boxes found in it map
    back with (x - left) / scale_x, (y - top) / scale_y."""

    scale: float  # the aspect-kept scale (min of the two sides')
    left: int
    top: int
    width: int  # the letterboxed image's size
    height: int
    # each side's own scale, from the rounded resized size (as ultralytics' scale_boxes maps
    # back); 0: `scale` (kept so that older callers constructing a Letterbox still work)
    scale_x: float = 0.0
    scale_y: float = 0.0

    def __post_init__(self) -> None:
        if not self.scale_x:
            object.__setattr__(self, "scale_x", self.scale)
        if not self.scale_y:
            object.__setattr__(self, "scale_y", self.scale)


def letterbox(image, height: int, width: int, *, fill: int = 114, stride: int | None = None,
              interpolation: str = "bilinear"):
    """Fit the image inside height x width with its aspect kept, centred on a `fill` background.
    With `stride`, each side is padded only by the remainder of its padding modulo the stride (a
    detector's "rect" mode, ultralytics' LetterBox(auto=True)): the canvas is the image plus less
    than one stride, a multiple of it when the input size is; without, exactly height x width."""
    from PIL import Image

    scale = min(height / image.height, width / image.width)
    original = image.size
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = resize_to(image, inner, interpolation)
    if stride:
        width = inner[0] + (width - inner[0]) % stride
        height = inner[1] + (height - inner[1]) % stride
    left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
    canvas = Image.new(image.mode, (width, height), (fill,) * len(image.getbands())
                       if len(image.getbands()) > 1 else fill)
    canvas.paste(image, (left, top))
    return canvas, Letterbox(scale, left, top, width, height, inner[0] / original[0],
                             inner[1] / original[1])


def stretch(image, height: int, width: int, *, interpolation: str = "bilinear"):
    """Resize to exactly height x width, aspect not kept (RT-DETR's and many DETRs' input)."""
    original = image.size
    canvas = resize_to(image, (width, height), interpolation)
    sx, sy = width / original[0], height / original[1]
    return canvas, Letterbox(min(sx, sy), 0, 0, width, height, sx, sy)
