"""A labelled detection data set built offline: scikit-learn's 8x8 digits, upscaled, placed at random
positions and scales on larger canvases of random (non-square) sizes over a noisy, cluttered
background, with their true boxes (the ink's tight box) and classes.

Deterministic: the digit images are split once (train / held out, never shared), and each canvas
comes from its own seed. The model input is the canvas letterboxed to 128x128 by the handler's own
code (handlers/preprocess.py), so training sees the pixels serving sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SEED = 0
HELD_OUT = 0.2
INPUT = 128  # the model's input: 128x128 RGB
CANVAS_WIDTH = (96, 224)
CANVAS_HEIGHT = (80, 176)
DIGIT_SIZE = (22, 52)  # pixels of an upscaled 8x8 digit's side
MAX_DIGITS = 4
FILL = 114  # the letterbox's fill, as the handler's default


@dataclass
class Canvas:
    image: Image.Image  # RGB
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 in the canvas's pixels
    classes: np.ndarray  # (n,) digit 0-9


def digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): 8x8 in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(SEED).permutation(len(images))
    cut = int(len(order) * (1 - HELD_OUT))
    train, held = order[:cut], order[cut:]
    return images[train], digits.target[train], images[held], digits.target[held]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A dim coloured gradient, pixel noise, and a few low-contrast strokes and blobs (clutter a
    detector must learn to ignore)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(20, 110, 3).astype(np.float32)
    tilt = rng.uniform(-0.4, 0.4, (2, 3)).astype(np.float32)
    canvas = base + xs[..., None] * tilt[0] + ys[..., None] * tilt[1]
    canvas += rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(3, 30)), int(rng.integers(3, 30))
        canvas[y0:y0 + h, x0:x0 + w] += rng.uniform(-40, 40, 3).astype(np.float32)
    return canvas


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]], size: int,
           width: int, height: int) -> tuple[int, int] | None:
    for _ in range(30):
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        if all(x + size <= a or a + c <= x or y + size <= b or b + d <= y for a, b, c, d in taken):
            return x, y
    return None


def make_canvas(seed: int, images: np.ndarray, labels: np.ndarray) -> Canvas:
    rng = np.random.default_rng(seed)
    width = int(rng.integers(*CANVAS_WIDTH))
    height = int(rng.integers(*CANVAS_HEIGHT))
    canvas = _background(rng, width, height)
    taken: list[tuple[int, int, int, int]] = []
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
        size = int(rng.integers(DIGIT_SIZE[0], min(DIGIT_SIZE[1], width, height) + 1))
        spot = _place(rng, taken, size, width, height)
        if spot is None:
            continue
        index = int(rng.integers(len(images)))
        glyph = Image.fromarray(np.rint(images[index] * 255).astype(np.uint8), mode="L")
        alpha = np.asarray(glyph.resize((size, size), Image.BILINEAR), np.float32) / 255.0
        colour = rng.uniform(150, 255, 3).astype(np.float32)
        x, y = spot
        region = canvas[y:y + size, x:x + size]
        canvas[y:y + size, x:x + size] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        ink_y, ink_x = np.nonzero(alpha > 0.25)
        boxes.append([x + ink_x.min(), y + ink_y.min(), x + ink_x.max() + 1, y + ink_y.max() + 1])
        classes.append(int(labels[index]))
        taken.append((x, y, size, size))
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    return Canvas(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64))


def canvases(split: str, count: int) -> list[Canvas]:
    """`count` canvases of the train or held-out digits (seeds never shared between splits)."""
    x_train, y_train, x_held, y_held = digit_split()
    images, labels, first = (x_train, y_train, 10_000) if split == "train" else (x_held, y_held, 0)
    return [make_canvas(first + i, images, labels) for i in range(count)]
