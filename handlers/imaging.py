"""Image bytes -> a Pillow image, safely: the one place where request bytes meet an image decoder.

Used by the handler, the gate, calibration and validation alike (through the image task), so the
pixels a model is judged on are the pixels it is served.

- Only the formats a spec allows are tried (default: JPEG, PNG, GIF, BMP, WebP, TIFF); the other
  decoders Pillow carries are attack surface a model server does not need.
- The pixel count is checked from the header, before decoding, against a limit that by default
  follows the model's input size, so a small model cannot be made to decode a huge image.
- JPEGs are decoded at full size unless the spec asks for draft mode (`preprocess.jpeg_draft:
  true`): Pillow's reduced-scale decoding is faster on large photos but gives other pixels than a
  full decode + resize (it changed a ConvNeXt's top-5 on a large JPEG), and the model was trained
  on full decodes.
- EXIF orientation is applied (as a phone's photo is seen), before any conversion.
- Whatever a decoder raises on hostile bytes becomes a RequestError for this request alone.

What each decoded mode becomes (`to_mode`), to "L" (grey) or "RGB" as the model takes:
- "L", "RGB", "1", "CMYK", "YCbCr", "HSV": Pillow's `convert(mode)` (as torchvision and timm do to
  PIL images: `convert("RGB")`, and `convert("L")` in torchvision's Grayscale). A mode Pillow
  cannot convert (a CIELab TIFF, say) is refused with 400, naming Pillow's reason.
- Alpha ("RGBA", "LA", "PA", "RGBa", and a PNG's 16-bit grey+alpha, which Pillow opens as
  RGBA): the alpha band is dropped and the colour under it kept, exactly as Pillow's
  `convert("RGB")` does. No compositing on a background: a fully transparent pixel is served as
  whatever colour the file stores there, which is what a model trained through torchvision or timm
  saw for the same file.
- Palette ("P"), with or without a transparency entry: the palette colours, transparency ignored,
  as `convert("RGB")` does (done through RGBA, which gives the same pixels without Pillow's
  warning about byte-string transparency).
- 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N": a 16-bit PNG or TIFF): scaled by the bit depth,
  value >> 8 (floor of value / 256; a TIFF that declares fewer bits, 12 say, by its own depth:
  value >> 4), then converted. This is what Pillow itself does to 16-bit RGB
  and RGBA PNGs (it keeps the high byte) and what torchvision's `to_dtype(uint8)` does to uint16,
  so a 16-bit file and its 8-bit twin (value * 257) give the same pixels. Pillow's own
  `convert("L")` clips every value over 255 to white, which served a 16-bit scan as a white page.
- 32-bit integer ("I", a 32-bit TIFF): scaled by the bit depth the file declares (TIFF
  BitsPerSample; one bit less when its SampleFormat is signed), else as Pillow's signed int32:
  value >> (depth - 8). Negative values have no 8-bit pixel and are refused with 400 (never
  clipped).
- 32-bit float ("F", a float TIFF): values in 0..1 (the convention of float images in torchvision,
  scikit-image and OpenCV), scaled by 255 and rounded to the nearest (so k / 255 gives k back,
  where truncating would give k - 1 for some k). Values outside 0..1, NaN or
  infinity are refused with 400 rather than clipped or guessed at.
"""

from __future__ import annotations

import io
from typing import Any

from handlers.errors import RequestError, describe

DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# The default pixel limit: 256 times the pixels the model sees, within these bounds. A 2048x2048
# floor lets ordinary photos through to small models; 25 M (a 5000x5000 image) is the ceiling.
MIN_DEFAULT_PIXELS = 2048 * 2048
MAX_DEFAULT_PIXELS = 25_000_000
PIXEL_FACTOR = 256
# Draft (reduced-scale JPEG decoding) keeps at least this many times the target size, as Pillow's
# own thumbnail() does, so the final resize still has detail to average.
REDUCING_GAP = 2
# Pillow modes deeper than 8 bits a channel; Pillow's convert() would clip them (see to_mode).
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def default_max_pixels(height: int, width: int) -> int:
    return max(MIN_DEFAULT_PIXELS, min(MAX_DEFAULT_PIXELS, PIXEL_FACTOR * height * width))


def known_formats() -> set[str]:
    """Every image format this Pillow can decode (for checking a spec's `formats`)."""
    from PIL import Image

    Image.init()
    return set(Image.OPEN)


def decode(payload: Any, *, mode: str, formats: tuple[str, ...] = DEFAULT_FORMATS,
           max_pixels: int = MAX_DEFAULT_PIXELS, draft_size: tuple[int, int] | None = None):
    """Decode request bytes into a Pillow image of `mode` ("L" or "RGB"), EXIF orientation applied.

    `draft_size` (width, height) is the size the image will be resized to, when it will be.
    """
    from PIL import Image, ImageOps

    data = _as_bytes(payload)
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image rejected as too large: {describe(exc)}") from None
    except Exception:  # Pillow raises many kinds on hostile headers; none may escape
        raise RequestError(400, "request body is not an image in an accepted format "
                                f"({', '.join(formats)})") from None
    width, height = image.size
    if draft_size and image.format == "JPEG":
        try:
            image.draft(mode, (draft_size[0] * REDUCING_GAP, draft_size[1] * REDUCING_GAP))
        except Exception as exc:
            raise RequestError(400, f"image could not be decoded ({describe(exc)})") from None
    decoded = image.size[0] * image.size[1]
    if decoded > max_pixels:  # from the header: a huge image costs nothing
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels, over the "
                                f"limit of {max_pixels} for this model (preprocess.max_pixels)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_mode(image, mode)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image rejected as too large: {describe(exc)}") from None
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(400, f"image could not be decoded ({describe(exc)})") from None


def to_mode(image: Any, mode: str) -> Any:
    """A decoded Pillow image as `mode` ("L" or "RGB"), by the rules in this module's docstring:
    deep images scaled by their bit depth (never clipped), alpha and palettes as Pillow's
    `convert` gives them."""
    if image.mode in DEEP_MODES:
        image = _to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


def _to_8bit(image: Any):
    """A 16/32-bit integer or float greyscale image as an 8-bit "L" image."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise RequestError(400, "a floating-point image with NaN or infinity has no pixels "
                                    "to serve")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise RequestError(400, "a floating-point image must hold values in 0..1 to be served "
                                    f"as pixels; this one holds {float(values.min()):.4g}.."
                                    f"{float(values.max()):.4g}")
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), "L")
    depth = _bit_depth(image, values.dtype)
    if values.size and values.min() < 0:
        raise RequestError(400, f"a signed {values.dtype.itemsize * 8}-bit image with negative "
                                f"values ({int(values.min())}) has no 8-bit pixels to serve")
    shift = max(0, depth - 8)
    # >> on the file's depth: a 12-bit TIFF in a 16-bit container fills 0..255 too
    return Image.fromarray(np.minimum(values.astype(np.int64) >> shift, 255).astype(np.uint8), "L")


def _bit_depth(image: Any, dtype: Any) -> int:
    """Bits of magnitude per value: what the file declares (TIFF), else the container's."""
    declared = None
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # BitsPerSample, one value per sample
        bits = max(bits) if isinstance(bits, tuple) and bits else bits
        if isinstance(bits, int) and 8 < bits <= dtype.itemsize * 8:
            signed = tags.get(339) in (2, (2,))  # SampleFormat 2: two's complement integers
            declared = bits - 1 if signed else bits
    if declared is not None:
        return declared
    return dtype.itemsize * 8 - (1 if dtype.kind == "i" else 0)


def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, (dict, list)):
        raise RequestError(415, "expected image bytes, got JSON: send the image file itself")
    if isinstance(payload, str):  # a form field TorchServe decoded as text
        payload = payload.encode("latin-1", "replace")
    if not isinstance(payload, (bytes, bytearray)):
        raise RequestError(400, f"expected image bytes, got {type(payload).__name__}")
    if not payload:
        raise RequestError(400, "empty request body: send the bytes of an image")
    return bytes(payload)
