"""Image bytes -> a Pillow image, safely: the one place where request bytes meet an image decoder.

Used by the handler, the gate, calibration and validation alike (through the image task), so the
pixels a model is judged on are the pixels it is served.

- Only the formats a spec allows are tried (default: JPEG, PNG, GIF, BMP, WebP, TIFF); the other
  decoders Pillow carries are attack surface a model server does not need.
- The pixel count is checked from the header, before decoding, against a limit that by default
  follows the model's input size, so a small model cannot be made to decode a huge image.
- JPEGs are decoded at a reduced scale (Pillow's draft mode) when the target is much smaller.
- Whatever a decoder raises on hostile bytes becomes a RequestError for this request alone.
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
        return image.convert(mode)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image rejected as too large: {describe(exc)}") from None
    except Exception as exc:
        raise RequestError(400, f"image could not be decoded ({describe(exc)})") from None


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
