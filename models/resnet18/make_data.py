"""Real photographs for the ResNet-18 example, cut from the two that scikit-learn ships offline.

calibration/: 16 random 320x320 crops (JPEG), for static int8 calibration.
samples/: both photos at 640x480 (JPEG), for predictions and load tests.
Run: python models/resnet18/make_data.py   (deterministic; the files are committed)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

HERE = Path(__file__).resolve().parent


def main() -> None:
    photos = load_sample_images()
    rng = np.random.default_rng(0)
    (HERE / "calibration").mkdir(exist_ok=True)
    (HERE / "samples").mkdir(exist_ok=True)
    for name, photo in zip(photos.filenames, photos.images, strict=True):
        stem = Path(name).stem
        Image.fromarray(photo).resize((640, 480), Image.BILINEAR).save(
            HERE / "samples" / f"{stem}.jpg", quality=90)
        height, width, _ = photo.shape
        for i in range(8):
            top, left = rng.integers(0, height - 320), rng.integers(0, width - 320)
            crop = photo[top:top + 320, left:left + 320]
            Image.fromarray(crop).save(HERE / "calibration" / f"{stem}_{i}.jpg", quality=85)
    print("wrote", len(list((HERE / "calibration").glob("*.jpg"))), "calibration crops")


if __name__ == "__main__":
    main()
