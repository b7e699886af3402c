"""Train DigitsNet on scikit-learn's offline 8x8 digits, deterministically.

Writes digits.pt (the state_dict), metrics.json (held-out accuracy and the normalisation used) and
a few held-out digits as PNG files under samples/. Run: python models/digits/train.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import DigitsNet  # noqa: E402

SEED = 0
HELD_OUT = 0.2
EPOCHS = 40


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/held-out split: images in [0, 1] as (N, 1, 8, 8) float32, labels int64."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    cut = int(len(labels) * (1 - HELD_OUT))
    train, held = order[:cut], order[cut:]
    return images[train], labels[train], images[held], labels[held]


def to_png_bytes(image01: np.ndarray) -> Image.Image:
    """One (1, 8, 8) image in [0, 1] as an 8-bit grey picture, white ink on black like MNIST."""
    return Image.fromarray(np.rint(image01[0] * 255).astype(np.uint8), mode="L")


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_held, y_held = split()
    mean, std = float(x_train.mean()), float(x_train.std())
    norm = lambda x: (torch.from_numpy(x) - mean) / std  # noqa: E731

    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = norm(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        held_pred = model(norm(x_held)).argmax(1).numpy()
    accuracy = float((held_pred == y_held).mean())
    torch.save(model.state_dict(), HERE / "digits.pt")

    metrics = {
        "held_out_accuracy": round(accuracy, 4),
        "held_out_count": int(len(y_held)),
        "train_count": int(len(y_train)),
        "mean": round(mean, 6),
        "std": round(std, 6),
        "epochs": EPOCHS,
        "seed": SEED,
    }
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    samples = HERE / "samples"
    samples.mkdir(exist_ok=True)
    for digit in range(10):
        first = int(np.flatnonzero(y_held == digit)[0])
        to_png_bytes(x_held[first]).save(samples / f"digit_{digit}.png")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
