"""The detection task's NMS on crowded candidates: the blocked greedy NMS the handler runs
(handlers/detection.py::nms, stopping at max_detections), beside settling all candidates in one
n x n fixpoint (the handler's first NMS, still the per-block step), side by side in one run.

Run: .venv/bin/python benchmarks/nms.py [--repeats 5]
Candidates: a dense grid of anchors (8-pixel stride, boxes 20-60 pixels, one class, scores
0.2-0.3), as an untrained or low-threshold YOLO head gives them; 960 and 3,000 (the default
max_candidates) of them; limits 100 (the default max_detections) and 300 (the default limit a
request may ask for). Both results are checked equal before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handlers.detection import _settle, nms  # noqa: E402


def crowded(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xs, ys = np.meshgrid(np.arange(side) * 8 + 4, np.arange(side) * 8 + 4)
    cx, cy = xs.ravel()[:n], ys.ravel()[:n]
    w, h = rng.uniform(20, 60, n), rng.uniform(20, 60, n)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
    return boxes, rng.uniform(0.2, 0.3, n).astype(np.float32)


def one_fixpoint(boxes: np.ndarray, scores: np.ndarray, threshold: float, limit: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    return order[_settle(boxes[order], threshold)][:limit]


def best_ms(fn, args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| candidates | limit | kept | blocked (served) ms | one n x n fixpoint ms | ratio |")
    print("|---|---|---|---|---|---|")
    for n in (960, 3000):
        boxes, scores = crowded(n)
        for limit in (100, 300):
            served = nms(boxes, scores, 0.45, limit)
            assert served.tolist() == one_fixpoint(boxes, scores, 0.45, limit).tolist()
            given = (boxes, scores, 0.45, limit)
            fast = best_ms(nms, given, args.repeats)
            slow = best_ms(one_fixpoint, given, max(1, args.repeats // 2))
            print(f"| {n} | {limit} | {len(served)} | {fast:.1f} | {slow:.1f} | {slow / fast:.0f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
