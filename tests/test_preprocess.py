"""Preprocessing that matches training: torchvision's eval transforms, written out here step by
step as torchvision 0.2x applies them to PIL images, against servetool's shared image code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from handlers.preprocess import letterbox
from handlers.tasks import ImageClassification
from servetool.spec import SpecError, load_spec
from tests.conftest import write_spec

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def torchvision_reference(image: Image.Image, resize: int, crop: int, interpolation: str) -> np.ndarray:
    """Resize(resize) + CenterCrop(crop) + ToTensor() + Normalize(MEAN, STD), as torchvision does."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), FILTERS[interpolation])
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]


def photo(width: int, height: int) -> Image.Image:
    """A smooth, non-symmetric picture, so a crop or a stretch in the wrong place shows."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(640, 240), (480, 640), (300, 300), (225, 801)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_shorter_side_resize_and_crop_match_torchvision(size, interpolation):
    task = ImageClassification({"input_shape": [3, 224, 224], "preprocess": {
        "resize": 256, "center_crop": [224, 224], "interpolation": interpolation,
        "mean": MEAN, "std": STD}}, None)
    image = photo(*size)
    np.testing.assert_allclose(task.preprocess(png(image)),
                               torchvision_reference(image, 256, 224, interpolation), atol=1e-6)


def test_a_stretching_resize_would_not_match():
    """What servetool did before `resize: 256` existed: the check above can fail."""
    task = ImageClassification({"input_shape": [3, 224, 224], "preprocess": {
        "resize": [256, 256], "center_crop": [224, 224], "mean": MEAN, "std": STD}}, None)
    image = photo(640, 240)
    assert np.abs(task.preprocess(png(image)) - torchvision_reference(image, 256, 224, "bilinear")
                  ).max() > 0.1


def test_a_crop_larger_than_the_image_pads_with_zeros_as_torchvision():
    task = ImageClassification({"input_shape": [3, 8, 8], "preprocess": {"center_crop": [8, 8]}},
                               None)
    out = task.preprocess(png(Image.new("RGB", (4, 6), (255, 255, 255))))
    assert out.shape == (3, 8, 8)
    assert out[:, 1:7, 2:6].min() == 1.0 and out[:, 0, :].max() == 0.0 and out[:, :, 0].max() == 0.0


def test_letterbox_fits_inside_keeps_the_aspect_and_says_where_the_image_went():
    boxed, geometry = letterbox(Image.new("RGB", (640, 240), (255, 0, 0)), 320, 320, fill=114)
    assert boxed.size == (320, 320) and geometry.scale == 0.5
    assert (geometry.left, geometry.top) == (0, 100)
    assert boxed.getpixel((0, 0)) == (114, 114, 114) and boxed.getpixel((160, 160)) == (255, 0, 0)
    assert boxed.getpixel((160, 99)) == (114, 114, 114) and boxed.getpixel((160, 219)) == (255, 0, 0)
    rect, geometry = letterbox(Image.new("RGB", (640, 240)), 320, 320, stride=32)
    assert rect.size == (320, 128) and geometry.top == 4  # 120 rows padded to a multiple of 32


def test_letterbox_in_a_spec_serves_any_aspect_at_the_input_size():
    task = ImageClassification({"input_shape": [3, 32, 32], "preprocess": {
        "letterbox": {"fill": 0}}}, None)
    for size in [(640, 240), (100, 400), (32, 32)]:
        assert task.preprocess(png(photo(*size))).shape == (3, 32, 32)


@pytest.mark.parametrize("preprocess, key, words", [
    ({"grayscale": True, "resize": 10}, "preprocess.resize",
     "is 10: the shorter side, aspect kept, so images of other shapes come out in other sizes; "
     "add center_crop: [8, 8]"),
    ({"grayscale": True, "resize": 10, "center_crop": [6, 6]}, "preprocess.center_crop",
     "is [6, 6], but input.shape takes 8x8 images"),
    ({"grayscale": True, "resize": [10, 12]}, "preprocess.resize", "but input.shape takes [8, 8]"),
    ({"grayscale": True, "letterbox": True, "resize": 8}, "preprocess.letterbox",
     "drop resize and center_crop"),
    ({"grayscale": True, "interpolation": "lanczos3"}, "preprocess.interpolation",
     "must be one of bilinear, bicubic, nearest"),
    ({"grayscale": True, "letterbox": {"fill": 300}}, "preprocess.letterbox.fill",
     "must be a pixel value 0-255"),
])
def test_geometry_that_cannot_give_the_input_size_is_refused(tmp_path, preprocess, key, words):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path / "m", preprocess=preprocess))
    assert f"key '{key}'" in str(err.value) and words in str(err.value), str(err.value)
