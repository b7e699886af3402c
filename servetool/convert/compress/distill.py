"""Knowledge distillation: the model being trained (a pruned copy of the original, or the user's
student) learns the original's answers: soft targets and labels for a classifier, the outputs
themselves for other models (metric.py says which loss). The teacher's outputs are computed once
for the whole training set: nothing augments the data, so they are the same every epoch.

Each epoch ends with the task's score on the held-out part of the training data (early stopping
keeps the best weights; the spec's validation set is left for the gate) and a checkpoint; a rerun
resumes from the epoch after the last one saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from servetool.convert.compress.common import Progress, quiet
from servetool.convert.compress.data import Samples
from servetool.convert.compress.metric import TOP1, Metric
from servetool.model.spec import DistillOptions

EVAL_BATCH = 256
PROGRESS_EVERY_S = 10.0


@dataclass
class Loop:
    """One stage of training and where it stands: what a checkpoint holds for it (plain data
    and tensors only, loadable with weights_only=True)."""

    stage: str
    epochs: int
    epochs_done: int = 0
    stopped: str = ""  # "early" (patience ran out) or "" (not stopped before its epochs)
    best_accuracy: float = -1.0
    stale: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.stopped == "early" or self.epochs_done >= self.epochs

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """The learning rate of a 1-based epoch on a cosine from `base` down, in closed form: a rerun
    that asks for more epochs goes on along the longer schedule."""
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def score(model: nn.Module, x: np.ndarray, target: np.ndarray, metric: Metric) -> float:
    """The task's score of a PyTorch module in eval mode (its training mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        outputs = np.concatenate([
            model(torch.from_numpy(np.ascontiguousarray(x[start:start + EVAL_BATCH]))).numpy()
            for start in range(0, len(x), EVAL_BATCH)])
    model.train(was_training)
    return metric.score(outputs, target)


def train(model: nn.Module, samples: Samples, teacher: np.ndarray,
          early_stop: tuple[np.ndarray, np.ndarray], options: DistillOptions, loop: Loop, *,
          save: Callable[[Loop], None], metric: Metric = Metric(TOP1),
          deadline: float | None = None, progress: Progress = quiet) -> Loop:
    """Run `loop` on to its epochs (or early stopping, or the deadline), then leave the best
    weights on the model. `save` is called after every epoch with the loop's state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    if loop.optimizer is not None:
        optimizer.load_state_dict(loop.optimizer)
    if loop.best is None:  # the starting point is the one to beat
        loop.best_accuracy = score(model, *early_stop, metric)
        loop.best = _copy_state(model)
    ran = 0  # every run trains at least one epoch, so that reruns on a tight budget go on
    while not loop.complete:
        if deadline is not None and ran and time.monotonic() > deadline:
            progress(f"{loop.stage}: the time budget (distill.max_minutes) is spent after "
                     f"{loop.epochs_done} epoch(s); a rerun goes on from there")
            break
        epoch = loop.epochs_done + 1
        started = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(options.lr, epoch, loop.epochs)
        loss = _epoch(model, samples, teacher, options, optimizer, epoch, loop, metric, progress)
        ran += 1
        improved = _record(loop, model, score(model, *early_stop, metric), loss, started,
                           options.patience)
        loop.optimizer = optimizer.state_dict()
        save(loop)
        progress(f"{loop.stage}: epoch {epoch}/{loop.epochs} loss {loss:.4f}, held-out "
                 f"{metric.name} {loop.log[-1]['holdout_accuracy']:.2%}" + (" (best)" if improved else "")
                 + (f"; no better for {loop.stale} epochs: stopping early" if loop.stopped else ""))
    model.load_state_dict(loop.best)
    return loop


def _record(loop: Loop, model: nn.Module, score: float, loss: float, started: float,
            patience: int) -> bool:
    """An epoch's outcome into the loop: the best weights so far, and early stopping once
    `patience` epochs in a row did not beat them. True when this epoch did."""
    improved = score > loop.best_accuracy
    if improved:
        loop.best_accuracy, loop.best, loop.stale = score, _copy_state(model), 0
    else:
        loop.stale += 1
    loop.epochs_done += 1
    loop.log.append({"epoch": loop.epochs_done, "loss": round(loss, 6), "holdout_accuracy": score,
                     "seconds": round(time.monotonic() - started, 2)})
    if loop.stale >= patience:
        loop.stopped = "early"
    return improved


def _epoch(model: nn.Module, samples: Samples, teacher: np.ndarray, options: DistillOptions,
           optimizer: torch.optim.Optimizer, epoch: int, loop: Loop, metric: Metric,
           progress: Progress) -> float:
    """One pass over the training set in a shuffled order fixed by the seed and the epoch (a
    resumed run sees the same order); returns the mean loss."""
    model.train()
    torch.manual_seed(options.seed + epoch)
    order = np.random.default_rng(options.seed + epoch).permutation(samples.count)
    batches = range(0, samples.count, options.batch)
    total, seen, shown = 0.0, 0, time.monotonic()
    for number, start in enumerate(batches, 1):
        index = np.sort(order[start:start + options.batch])
        if len(index) < 2 and samples.count > 1:
            continue  # a batch of one breaks batch norm's statistics
        x = torch.from_numpy(np.ascontiguousarray(samples.rows(index)))
        labels = torch.from_numpy(samples.y[index]) if samples.y is not None else None
        loss = metric.loss(model(x), torch.from_numpy(teacher[index]), labels,
                           options.temperature, options.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(index)
        seen += len(index)
        if time.monotonic() - shown > PROGRESS_EVERY_S:
            shown = time.monotonic()
            progress(f"{loop.stage}: epoch {epoch}/{loop.epochs} batch {number}/{len(batches)} "
                     f"loss {total / seen:.4f}")
    return total / max(seen, 1)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gradients_for_taylor(samples: Samples, teacher: np.ndarray, options: DistillOptions,
                         metric: Metric, batches: int = 4) -> Callable[[nn.Module], None]:
    """Accumulates the distillation loss's gradients on a few training batches, which Taylor
    importance (weight x gradient) ranks channels by."""

    def run(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        order = np.random.default_rng(options.seed).permutation(samples.count)
        for start in range(0, min(samples.count, batches * options.batch), options.batch):
            index = np.sort(order[start:start + options.batch])
            labels = torch.from_numpy(samples.y[index]) if samples.y is not None else None
            x = torch.from_numpy(np.ascontiguousarray(samples.rows(index)))
            metric.loss(model(x), torch.from_numpy(teacher[index]), labels,
                        options.temperature, options.alpha).backward()

    return run
