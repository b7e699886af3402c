"""Training and validation data for compress, read through the spec's own loaders: an .npz of
model inputs, or an image folder decoded and preprocessed exactly as the served handler does
(handlers/preprocess.py via ModelSpec), so the model learns on the pixels it will be served."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from servetool.convert import export
from servetool.convert.compress.common import CompressError
from servetool.convert.compress.metric import TOP1, Metric
from servetool.model.samples import load_data
from servetool.model.spec import DataRef, ModelSpec

# Image folders whose decoded inputs fit this are decoded once; larger ones batch by batch.
DECODED_LIMIT_BYTES = 1 << 30


@dataclass
class Samples:
    """Inputs (decoded, or decoded on demand from image files) and their labels, if any."""

    count: int
    y: np.ndarray | None
    arrays: np.ndarray | None = None
    files: list[Path] | None = None
    spec: ModelSpec | None = None

    def rows(self, index: np.ndarray) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[index]
        task = self.spec.image_task()
        return np.stack([task.preprocess(self.files[i].read_bytes()) for i in index])

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(len(index), None if self.y is None else self.y[index],
                       arrays=None if self.arrays is None else self.arrays[index],
                       files=None if self.files is None else [self.files[i] for i in index],
                       spec=self.spec)


@dataclass
class Split:
    """The training data cut in two: what the model learns on, and the held-out part that early
    stopping and recovery judge, so that the spec's validation set stays unseen until the gate.
    Where the training data has no labels, the held-out part's labels are the original's top-1."""

    train: Samples
    teacher: np.ndarray  # the original's outputs for each training example
    early_stop: tuple[np.ndarray, np.ndarray]  # inputs, and what the metric scores them against
    labelled: bool


def split(samples: Samples, teacher: np.ndarray, share: float, seed: int,
          metric: Metric) -> Split:
    """A seeded random `share` of the examples held out (at least one)."""
    if samples.count < 2:
        raise CompressError(f"no training data to hold out for early stopping: "
                            f"{samples.count} example(s)")
    order = np.random.default_rng(seed).permutation(samples.count)
    held = np.sort(order[:max(1, round(samples.count * share))])
    kept = np.sort(order[len(held):])
    target = metric.targets(teacher[held], None if samples.y is None else samples.y[held])
    return Split(samples.subset(kept), teacher[kept], (samples.rows(held), target),
                 samples.y is not None and metric.name == TOP1)


def training_set(spec: ModelSpec, ref: DataRef) -> Samples:
    """compress.distill.train: every example, labels where the data has them."""
    if ref.images and _decoded_bytes(spec, ref) > DECODED_LIMIT_BYTES:
        return _lazy_images(spec, ref)
    x, y = load_data(spec, ref)
    x = np.asarray(export.as_input_dtypes(spec, x))
    if len(x) == 0:
        raise CompressError(f"no training data: {ref.path} holds no examples")
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise CompressError(f"{ref.path}: training inputs are {list(x.shape[1:])}, the model "
                            f"takes {list(spec.input_shape)}")
    return Samples(len(x), _labels(spec, ref, y, len(x)), arrays=x)


def validation_set(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """The spec's validation set, with its labels where it has them: what the compression gate
    and the report judge (never seen by training: early stopping judges a part of the training
    data, see `split`)."""
    if spec.validation is None:
        raise CompressError(f"{spec.spec_file}: the compression gate needs a validation set: add "
                            "validation: {images: FOLDER} (one sub-folder per label) or "
                            "{data: FILE.npz} (x, and y for a classifier)")
    x, y = load_data(spec, spec.validation)
    x = np.asarray(export.as_input_dtypes(spec, x))
    if len(x) == 0:
        raise CompressError(f"{spec.validation.path}: the validation set holds no examples")
    return x, None if y is None else np.asarray(y, np.int64)


def require_labels(spec: ModelSpec, y: np.ndarray | None) -> np.ndarray:
    if y is None:
        raise CompressError(f"{spec.validation.path}: the compression gate of a classifier needs "
                            "labels (y in the .npz, or one sub-folder per label)")
    return y


def _labels(spec: ModelSpec, ref: DataRef, y, count: int) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    classes = len(spec.label_names() or ()) or None
    if y.shape != (count,) or not np.issubdtype(y.dtype, np.integer) or (
            classes and (y.min() < 0 or y.max() >= classes)):
        raise CompressError(f"{ref.path}: y must hold one class index per example"
                            + (f" (0 to {classes - 1})" if classes else ""))
    return y.astype(np.int64)


def _decoded_bytes(spec: ModelSpec, ref: DataRef) -> int:
    return len(ref.image_files()) * int(np.prod(spec.input_shape)) * 4


def _lazy_images(spec: ModelSpec, ref: DataRef) -> Samples:
    names = spec.label_names() or []
    files, labels = [], []
    for path, label in ref.image_files():
        files.append(path)
        labels.append(names.index(label) if label in names else -1)
    y = np.array(labels, np.int64) if labels and min(labels) >= 0 else None
    return Samples(len(files), y, files=files, spec=spec)
