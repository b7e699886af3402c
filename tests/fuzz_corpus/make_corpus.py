"""Writes the fuzz test's seed corpus: small images in every default format, in the variants whose
decoders differ (palette, 16-bit, alpha, progressive, compressed TIFF, animation, RLE), and a few
JSON bodies. Run once; the files are committed so the fuzz test is reproducible.

    .venv/bin/python tests/fuzz_corpus/make_corpus.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def picture(mode: str, size=(12, 9)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(8)
    if mode == "I;16":
        return Image.fromarray((rng.integers(0, 65535, (size[1], size[0]))).astype(np.uint16))
    return rgb.convert(mode)


IMAGES = {
    "jpeg-baseline.jpg": ("RGB", "JPEG", {"quality": 80}),
    "jpeg-progressive.jpg": ("RGB", "JPEG", {"progressive": True}),
    "jpeg-gray.jpg": ("L", "JPEG", {}),
    "jpeg-cmyk.jpg": ("CMYK", "JPEG", {}),
    "png-rgba.png": ("RGBA", "PNG", {}),
    "png-palette.png": ("P", "PNG", {}),
    "png-16bit.png": ("I;16", "PNG", {}),
    "png-interlaced.png": ("RGB", "PNG", {"interlace": 1}),
    "gif.gif": ("P", "GIF", {}),
    "bmp-rgb.bmp": ("RGB", "BMP", {}),
    "bmp-palette.bmp": ("P", "BMP", {}),
    "webp-lossy.webp": ("RGB", "WEBP", {"quality": 50}),
    "webp-lossless.webp": ("RGBA", "WEBP", {"lossless": True}),
    "tiff-raw.tif": ("RGB", "TIFF", {}),
    "tiff-lzw.tif": ("RGB", "TIFF", {"compression": "tiff_lzw"}),
    "tiff-deflate.tif": ("L", "TIFF", {"compression": "tiff_adobe_deflate"}),
    "tiff-packbits.tif": ("CMYK", "TIFF", {"compression": "packbits"}),
    "tiff-jpeg.tif": ("RGB", "TIFF", {"compression": "jpeg"}),
}

JSON_BODIES = {
    "tensor.json": [[[0.5] * 8] * 8],
    "tensor-data.json": {"data": [[[1, 2, 3, 4, 5, 6, 7, 8]] * 8]},
}


def main() -> None:
    for name, (mode, fmt, options) in IMAGES.items():
        picture(mode).save(HERE / name, fmt, **options)
    frames = [picture("P"), picture("P").rotate(90)]
    frames[0].save(HERE / "gif-animated.gif", "GIF", save_all=True, append_images=frames[1:],
                   duration=50, loop=0)
    for name, body in JSON_BODIES.items():
        (HERE / name).write_text(json.dumps(body))


if __name__ == "__main__":
    main()
