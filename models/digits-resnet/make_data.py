"""Write the model's validation and calibration sets as model inputs (normalised tensors).

validation.npz: the 360 held-out digits (x) and their labels (y), for the accuracy gate.
calibration.npz: 128 training digits (x), for static int8 calibration (never the held-out ones).
Each x is the 80x80 picture preprocessed as the handler does it: pixels / 255, then the spec's
mean and std (metrics.json). Run: python models/digits-resnet/make_data.py   (after train.py;
deterministic; the files are committed)
train.npz (with --train): all 1437 training digits (x, y), the data `servetool compress`
distils on (compress.distill.train); 37 MB, made on demand and not committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train import split  # noqa: E402


def main() -> None:
    metrics = json.loads((HERE / "metrics.json").read_text())
    mean, std = np.float32(metrics["mean"]), np.float32(metrics["std"])
    x_train, _, x_held, y_held = split()  # pixels / 255 in float32, as the handler scales them
    normalise = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    np.savez_compressed(HERE / "validation.npz", x=normalise(x_held), y=y_held)
    pick = np.random.default_rng(1).choice(len(x_train), 128, replace=False)
    np.savez_compressed(HERE / "calibration.npz", x=normalise(x_train[pick]))
    print(f"validation: {len(y_held)} images, calibration: {len(pick)} images")
    if "--train" in sys.argv[1:]:
        _, y_train, _, _ = split()
        np.savez(HERE / "train.npz", x=normalise(x_train), y=y_train)
        print(f"train: {len(y_train)} images")


if __name__ == "__main__":
    main()
