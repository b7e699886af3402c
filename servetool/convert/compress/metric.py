"""What "accuracy" means for a compressed model, by task, and how the student learns it.

- top-1: a classifier (an image classifier; a tensor model whose validation .npz has labels y and
  whose output is [batch, classes]) is scored on the labels; it learns the original's soft targets
  (KL divergence at a temperature) plus cross-entropy on the labels.
- cosine: any other tensor model (embeddings, features, regression) is scored by the mean cosine
  similarity of its outputs to the ORIGINAL's on the same inputs (the original scores 1.0); it
  learns the original's outputs themselves (mean squared error, scaled by their mean square, plus
  1 - cosine).

Both scores are shares (0 to 1) and a drop is counted in points (x100), so compress.max_accuracy_drop
reads the same for both: 1.0 point is one percent of top-1, or a mean cosine of 0.99.
Detectors (mAP) and text models are refused by compress before any work (see SUPPORTED_TASKS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TOP1, COSINE = "top-1", "cosine"


@dataclass(frozen=True)
class Metric:
    name: str  # TOP1 or COSINE

    @property
    def label(self) -> str:
        return "top-1 accuracy" if self.name == TOP1 else "mean cosine to the original's outputs"

    def score(self, outputs: np.ndarray, target: np.ndarray) -> float:
        """`target`: class indices (top-1), or the original's outputs on the same inputs."""
        if self.name == TOP1:
            return float((outputs.argmax(1) == target).mean())
        return float(cosines(outputs, target).mean())

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
             temperature: float, alpha: float) -> torch.Tensor:
        if self.name == TOP1:
            return kd_loss(student, teacher, labels, temperature, alpha)
        return feature_loss(student, teacher)

    def targets(self, teacher: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """What a held-out part of the training data is scored against: its labels, else the
        original's answers (its top-1 class, or its outputs)."""
        if labels is not None and self.name == TOP1:
            return labels
        return teacher.argmax(1) if self.name == TOP1 else teacher


def for_task(task: str, has_labels: bool, output_shape: tuple[int, ...]) -> Metric:
    """top-1 for an image classifier, and for a tensor model with labels and [batch, classes]
    outputs; cosine for other tensor models."""
    if task == "image-classification" or (has_labels and len(output_shape) == 2):
        return Metric(TOP1)
    return Metric(COSINE)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.: KL between softened distributions, scaled by T^2 (the gradients of soft
    targets shrink as 1/T^2), plus cross-entropy on the labels (weight alpha) where there are."""
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature ** 2
    if labels is None:
        return soft
    return (1 - alpha) * soft + alpha * F.cross_entropy(student, labels)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Outputs matched in value (MSE relative to their scale, so that the loss reads alike for
    any output size) and in direction (what the cosine score judges)."""
    s, t = student.flatten(1), teacher.flatten(1)
    scale = t.pow(2).mean().clamp_min(1e-12)
    return F.mse_loss(s, t) / scale + (1 - F.cosine_similarity(s, t, dim=1)).mean()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row cosine similarity of two batches of outputs (any shape past the batch axis);
    two zero rows count as equal."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(1)
    same = (norms == 0) & np.all(a == b, axis=1)
    return np.where(same, 1.0, dots / np.where(norms == 0, 1.0, norms))
