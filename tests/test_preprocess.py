"""Preprocessing that matches training: torchvision's eval transforms, written out here step by
step as torchvision 0.2x applies them to PIL images, against servetool's shared image code."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from handlers.errors import RequestError
from handlers.imaging import decode
from handlers.preprocess import letterbox
from handlers.tasks import ImageClassification
from servetool.model.spec import SpecError, load_spec
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


# --- Decoding: every Pillow mode becomes the pixels the model's library would have trained on ---

def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient8(width: int = 256, height: int = 6) -> np.ndarray:
    """Every 8-bit grey level left to right, so a clipped or mis-scaled level shows."""
    return np.tile(np.arange(width, dtype=np.int64) * 255 // (width - 1), (height, 1)).astype(np.uint8)


def test_a_16_bit_png_decodes_to_its_8_bit_reference_not_white():
    levels = gradient8()
    # the low byte carries sub-8-bit detail a real 16-bit scan has: it must not move the level
    noise = np.random.default_rng(0).integers(0, 256, levels.shape)
    deep = Image.fromarray((levels.astype(np.uint16) << 8) | noise.astype(np.uint16))
    data = encode(deep, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # what a 16-bit greyscale PNG opens as
    decoded = np.asarray(decode(data, mode="L"))
    np.testing.assert_array_equal(decoded, levels)
    assert decoded.mean() < 200  # Pillow's convert("L") served this as (nearly) white
    # the same through a model's whole preprocessing, grey and RGB, and a 257-times twin
    twin = encode(Image.fromarray(levels.astype(np.uint16) * 257), "PNG")
    for channels in (1, 3):
        task = ImageClassification({"input_shape": [channels, 6, 256]}, None)
        reference = task.preprocess(encode(Image.fromarray(levels), "PNG"))
        np.testing.assert_array_equal(task.preprocess(data), reference)
        np.testing.assert_array_equal(task.preprocess(twin), reference)


def test_deep_tiffs_scale_by_their_declared_bit_depth():
    levels = gradient8()
    sixteen = encode(Image.fromarray(levels.astype(np.uint16) * 257), "TIFF")
    np.testing.assert_array_equal(np.asarray(decode(sixteen, mode="L")), levels)
    # a signed 32-bit TIFF: 31 bits of magnitude, so a level k is stored as k << 23
    signed = encode(Image.fromarray(levels.astype(np.int32) << 23), "TIFF")
    assert Image.open(io.BytesIO(signed)).mode == "I"
    np.testing.assert_array_equal(np.asarray(decode(signed, mode="L")), levels)
    # float: 0..1, level k stored as k / 255, back to k (rounded, not truncated)
    floats = encode(Image.fromarray(levels.astype(np.float32) / 255), "TIFF")
    assert Image.open(io.BytesIO(floats)).mode == "F"
    np.testing.assert_array_equal(np.asarray(decode(floats, mode="RGB"))[..., 1], levels)


@pytest.mark.parametrize("values, words", [
    (np.full((4, 4), 2.5, np.float32), "must hold values in 0..1"),
    (np.full((4, 4), np.nan, np.float32), "NaN or infinity"),
    (np.full((4, 4), -7, np.int32), "negative values (-7)"),
])
def test_deep_images_that_have_no_8_bit_pixels_are_refused_not_clipped(values, words):
    with pytest.raises(RequestError) as err:
        decode(encode(Image.fromarray(values), "TIFF"), mode="L")
    assert err.value.status == 400 and words in err.value.message, err.value.message


def rgba_picture() -> Image.Image:
    """Colours under every alpha from opaque to fully transparent."""
    rgb = np.asarray(photo(40, 30))
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def test_alpha_is_dropped_as_pillows_convert_rgb_drops_it():
    data = encode(rgba_picture(), "PNG")
    opened = Image.open(io.BytesIO(data))
    for mode in ("RGB", "L"):
        np.testing.assert_array_equal(np.asarray(decode(data, mode=mode)),
                                      np.asarray(opened.convert(mode)))
    # the colour under a fully transparent pixel is served, not a background
    assert decode(data, mode="RGB").getpixel((0, 29)) == rgba_picture().getpixel((0, 29))[:3]
    grey_alpha = encode(rgba_picture().convert("LA"), "PNG")
    np.testing.assert_array_equal(np.asarray(decode(grey_alpha, mode="RGB")),
                                  np.asarray(Image.open(io.BytesIO(grey_alpha)).convert("RGB")))


@pytest.mark.parametrize("fmt, transparency", [("PNG", 0), ("PNG", bytes([0, 128, 255])),
                                               ("GIF", 1)])
def test_a_palette_with_transparency_decodes_as_pillows_convert_rgb(fmt, transparency):
    palette = photo(40, 30).quantize(16)
    data = encode(palette, fmt, transparency=transparency)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    with warnings.catch_warnings():  # Pillow's advice to go through RGBA: the reference as is
        warnings.simplefilter("ignore")
        reference = {mode: np.asarray(opened.convert(mode)) for mode in ("RGB", "L")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the served path says nothing in the worker's log
        for mode in ("RGB", "L"):
            np.testing.assert_array_equal(np.asarray(decode(data, mode=mode)), reference[mode])


def test_exif_orientation_is_applied_before_anything_else():
    picture = photo(64, 32)  # wide and not symmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show the image rotated 90 degrees clockwise
    rotated = encode(picture, "JPEG", quality=95, exif=exif.tobytes())
    plain = encode(picture, "JPEG", quality=95)  # the same compressed pixels, no orientation
    decoded = decode(rotated, mode="RGB")
    assert decoded.size == (32, 64)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(
        decode(plain, mode="RGB").transpose(Image.Transpose.ROTATE_270)))
    task = ImageClassification({"input_shape": [3, 64, 32]}, None)  # a tall model input
    assert task.preprocess(rotated).shape == (3, 64, 32)


def test_jpeg_draft_is_off_unless_the_spec_asks(tmp_path):
    spec = load_spec(write_spec(tmp_path / "m"))
    assert spec.preprocess.jpeg_draft is False
    assert load_spec(write_spec(tmp_path / "d", preprocess={
        **spec.preprocess.as_dict(), "jpeg_draft": True})).preprocess.jpeg_draft is True
    large = encode(photo(1600, 1200), "JPEG", quality=90)
    config = {"input_shape": [3, 32, 32], "preprocess": {"resize": [32, 32]}}
    full = np.asarray(Image.open(io.BytesIO(large)).convert("RGB").resize((32, 32), Image.BILINEAR),
                      np.float32) / 255
    served = ImageClassification(config, None).preprocess(large)  # an archive without the key
    np.testing.assert_allclose(served, full.transpose(2, 0, 1), atol=1e-6)
    spec_default = {**config, "preprocess": {**config["preprocess"], "jpeg_draft": False}}
    np.testing.assert_array_equal(ImageClassification(spec_default, None).preprocess(large), served)
    drafting = ImageClassification({**config, "preprocess": {**config["preprocess"],
                                                              "jpeg_draft": True}}, None)
    assert drafting._draft_size() == (32, 32)
    assert decode(large, mode="RGB", draft_size=drafting._draft_size()).size == (200, 150)
