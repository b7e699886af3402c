"""Train DigitsResNet on scikit-learn's offline digits, upscaled to 80x80, deterministically.

The 8x8 digits become 8-bit pictures and are upscaled with Pillow's bilinear filter: exactly what
the handler does to an 8x8 PNG (preprocess.resize), so a served 8x8 or 80x80 PNG of a digit gives the
model the input it was trained on. Training adds small random shifts, scales and rotations.
Writes digits_resnet.pt (the state_dict), metrics.json (held-out accuracy, the split and the
normalisation used) and one held-out picture per digit under samples/.
Run: OMP_NUM_THREADS=1 python models/digits-resnet/train.py   (then make_data.py)
Deterministic for a given thread count and precision (the committed weights: one thread, bf16
autocast, about 2 minutes on this machine; two idle cores take about 80 s, to other weights of
the same accuracy, give or take a digit). On cores shared with other work, one thread beats two
that keep waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import DigitsResNet  # noqa: E402

SEED = 0
HELD_OUT = 0.2  # the same split as models/digits: 1437 training and 360 held-out digits
SIZE = 80  # the model's input: SIZE x SIZE grey
EPOCHS = 8
BATCH = 32
LR = 3e-3
ROTATE, SCALE, SHIFT = 8, 0.08, 0.06  # augmentation: the digits fill their frame, keep it mild


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16): there, autocast to bf16
    trains about 2.5x as fast; elsewhere bf16 is emulated and slower than float32."""
    check = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
    return bool(check and check())


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of load_digits(): training and held-out indices."""
    count = len(load_digits().target)
    order = np.random.default_rng(SEED).permutation(count)
    cut = int(count * (1 - HELD_OUT))
    return order[:cut], order[cut:]


def pictures(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Every digit as a size x size 8-bit grey picture (N, size, size) uint8, and the labels:
    the 8x8 image through 8-bit pixels, upscaled with Pillow's bilinear filter."""
    digits = load_digits()
    small = np.rint(digits.images / 16.0 * 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(image).resize((size, size),
                                                                         Image.BILINEAR))
                    for image in small])
    return big, digits.target.astype(np.int64)


def split(size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/held-out split: images in [0, 1] as (N, 1, size, size) float32, labels."""
    images, labels = pictures(size)
    x = images.astype(np.float32)[:, None] * np.float32(1 / 255)  # as the handler scales pixels
    train, held = split_indices()
    return x[train], labels[train], x[held], labels[held]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine changes of a batch of [0, 1] images: rotation up to ROTATE degrees,
    scale by 1 +- SCALE, shift up to SHIFT of the side; the background stays black."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(ROTATE)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * SCALE
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * SHIFT)  # grid units: [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def evaluate(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)]).numpy()
    return float((pred == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic (evaluation and export are float32); auto: "
                             "bf16 autocast where the CPU has native bf16, else fp32")
    args = parser.parse_args()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16())

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    x_train, y_train, x_held, y_held = split()
    mean, std = float(x_train.mean()), float(x_train.std())

    model = DigitsResNet().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    steps = math.ceil(len(y_train) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, epochs=args.epochs, steps_per_epoch=steps,
                                                pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xh = ((torch.from_numpy(x_held) - mean) / std).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(args.epochs):
        model.train()
        total, right = 0.0, 0
        for idx in torch.randperm(len(yt), generator=gen).split(BATCH):
            batch = (augment(xt[idx], gen) - mean) / std
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(batch.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(out.float(), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            right += int((out.argmax(1) == yt[idx]).sum())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(yt):.4f}, training top-1 "
              f"{right / len(yt):.4f}, {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    accuracy = evaluate(model, xh, y_held)
    model = model.to(memory_format=torch.contiguous_format)
    torch.save(model.state_dict(), HERE / "digits_resnet.pt")

    metrics = {
        "held_out_accuracy": round(accuracy, 4),
        "held_out_count": int(len(y_held)),
        "train_count": int(len(y_train)),
        "split": f"load_digits(), numpy default_rng({SEED}).permutation, last {HELD_OUT:.0%} held out",
        "input_size": SIZE,
        "mean": round(mean, 6),
        "std": round(std, 6),
        "epochs": args.epochs,
        "training_precision": "bf16 autocast" if bf16 else "fp32",
        "seed": SEED,
        "train_seconds": round(time.perf_counter() - start),
        "threads": torch.get_num_threads(),
        "command": " ".join([*([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"]
                               if "OMP_NUM_THREADS" in os.environ else []),
                             "python models/digits-resnet/train.py", *sys.argv[1:]]),
    }
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    samples = HERE / "samples"
    samples.mkdir(exist_ok=True)
    images, _ = pictures()
    _, held = split_indices()
    for digit in range(10):
        first = int(held[np.flatnonzero(y_held == digit)[0]])
        Image.fromarray(images[first]).save(samples / f"digit_{digit}.png")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
