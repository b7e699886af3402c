"""Reference parity for image classifiers whose preprocessing came from their library's config
(a Hugging Face image folder or processor file, a timm config.json): the library's own path on
raw image files against servetool's served answer.

The library's path: for Hugging Face, transformers' `load_image` (EXIF, RGB) + the folder's image
processor (PIL backend, as torchvision is optional) + the model in PyTorch (the folder's, or the
spec's original beside a processor file) -> softmax; for timm, `Image.open().convert("RGB")` +
`create_transform(**resolve_data_config(pretrained_cfg))` + the spec's original model -> softmax.
Six images made here (RGB, JPEG, grey, RGBA, tall, wide; sizes around the model's input) go
through both. servetool must give the same top-1 and top-k order where the library's
probabilities are apart, and every probability within the tolerance (`tolerance_for`). On a
difference the stages are compared to name the first that differs: decoding, resize (geometry,
crop included), layout, normalisation, else runtime/head.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from servetool.convert.reference import LibraryMissing, ReferenceMismatch
from servetool.model.image_metadata import find_config
from servetool.model.spec import ModelSpec

# probabilities: fp32 formats differ from the library by float rounding only
FP32_PROBABILITY_ATOL = 1e-3
# (name, format, mode, width and height as multiples of the model's input side)
SAMPLES = (("rgb.png", "PNG", "RGB", 1.5, 1.0), ("photo.jpg", "JPEG", "RGB", 1.0, 1.0),
           ("grey.png", "PNG", "L", 0.8, 1.3), ("alpha.png", "PNG", "RGBA", 1.2, 1.2),
           ("tall.png", "PNG", "RGB", 0.5, 2.1), ("wide.png", "PNG", "RGB", 2.6, 0.7))


@dataclass
class Reading:
    """One image through the library: decoded (H, W, 3 uint8), geometry (C, H, W in 0-255, before
    rescaling), tensor (C, H, W, what the model gets) and the probabilities per class index."""

    decoded: np.ndarray
    geometry: np.ndarray
    tensor: np.ndarray
    probabilities: np.ndarray


def applies(spec: ModelSpec) -> bool:
    return spec.task == "image-classification" and \
        find_config(spec.source.kind, spec.source.path) is not None


def tolerance_for(spec: ModelSpec) -> float:
    """1e-3 for fp32 formats; the format's own atol where it is looser (fp16 1e-2, int8 5e-2),
    or the spec's tolerance.atol where it sets a looser one."""
    from servetool.convert.gate import limits_for

    return max(FP32_PROBABILITY_ATOL, limits_for(spec.format, spec.tolerance).atol)


def sample_images(side: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Encoded files of several sizes, aspect ratios and modes; smooth gradients with some
    texture, so a shifted crop or another kernel changes the pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for name, fmt, mode, fw, fh in SAMPLES:
        width, height = max(8, int(side * fw)), max(8, int(side * fh))
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], -1)
        rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(rgb, "RGB")
        if mode == "L":
            image = image.convert("L")
        elif mode == "RGBA":
            image.putalpha(Image.fromarray((x * 255 // width).astype(np.uint8), "L"))
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files.append((name, buffer.getvalue()))
    return files


def check(spec: ModelSpec, served) -> str:
    library, file = find_config(spec.source.kind, spec.source.path)
    reference = TimmReference(spec, file) if library == "timm" else HuggingFaceReference(spec, file)
    tolerance = tolerance_for(spec)
    names = spec.label_names() or []
    worst = 0.0
    images = sample_images(max(spec.input_shape[1:]))
    for name, body in images:
        ours = served.answer_one(body)
        reading = reference.run(body)
        problem, diff = compare(ours, names, reading.probabilities, tolerance)
        worst = max(worst, diff)
        if problem:
            stage = first_stage(served, body, reading)
            raise ReferenceMismatch(f"{spec.name}: servetool's answer differs from {reference.name}"
                                    f"'s on {name}: {problem}; the first stage that differs: "
                                    f"{stage}")
    return (f"matches {reference.name} on {len(images)} image files (RGB, JPEG, grey, RGBA, tall, "
            f"wide): same top-1 and top-k order, probabilities within {tolerance:g} (largest "
            f"difference {worst:.1e})")


def _index(label: str, names: list[str]) -> int:
    return names.index(label) if label in names else int(label)


def compare(ours: dict[str, float], names: list[str], probabilities: np.ndarray,
            tolerance: float) -> tuple[str | None, float]:
    """(what differs, or None; the largest probability difference) between servetool's top-k
    answer and the library's probabilities."""
    served = [(_index(label, names), p) for label, p in ours.items()]
    diffs = [abs(p - float(probabilities[i])) for i, p in served]
    worst = max(diffs, default=0.0)
    expected = np.argsort(-probabilities, kind="stable")[: len(served)]
    name = lambda i: f"class {i}" + (f" ({names[i]})" if i < len(names) else "")  # noqa: E731
    for rank, ((got, _), want) in enumerate(zip(served, expected, strict=True)):
        apart = abs(float(probabilities[got]) - float(probabilities[want])) > tolerance
        if got != want and apart:
            return (f"servetool's rank {rank + 1} is {name(got)} (library: "
                    f"{probabilities[got]:.4f}), the library's is {name(want)} "
                    f"({probabilities[want]:.4f})"), worst
    if worst > tolerance:
        i, p = served[int(np.argmax(diffs))]
        return (f"{name(i)} has probability {p:.5f}, the library {probabilities[i]:.5f} "
                f"(difference {worst:.2e}, tolerance {tolerance:g})"), worst
    return None, worst


def first_stage(served, body: bytes, reading: Reading) -> str:
    """Which stage of servetool's preprocessing first differs from the library's, and by how
    much; "runtime/head" when the model got the same tensor."""
    from handlers.imaging import decode

    task = served.handler.task
    decoded = np.asarray(decode(body, mode="RGB", formats=task.formats,
                                max_pixels=task.max_pixels))
    if decoded.shape != reading.decoded.shape or not np.array_equal(decoded, reading.decoded):
        diff = (np.abs(decoded.astype(int) - reading.decoded.astype(int)).max()
                if decoded.shape == reading.decoded.shape else None)
        return ("decoding: " + (f"pixels differ by up to {diff} of 255" if diff is not None else
                                f"{decoded.shape} against the library's {reading.decoded.shape}"))
    tensor = np.asarray(task.preprocess(body), np.float64)
    if tensor.shape != reading.tensor.shape:
        if tensor.shape == reading.tensor.shape[::-1] or sorted(tensor.shape) == sorted(
                reading.tensor.shape):
            return f"layout: servetool's tensor is {list(tensor.shape)}, the library's " \
                   f"{list(reading.tensor.shape)}"
        return (f"resize: servetool's image is {list(tensor.shape[1:])}, the library's "
                f"{list(reading.tensor.shape[1:])}")
    pixels = (tensor * task.std + task.mean) * 255.0
    pixels = 255.0 - pixels if task.invert else pixels
    geometry = np.asarray(reading.geometry, np.float64)
    moved = float(np.abs(pixels - geometry).max())
    if moved > 0.5:
        if float(np.abs(pixels[::-1] - geometry).max()) <= 0.5:
            return "layout: the channels are in reverse order (RGB against BGR)"
        return (f"resize: after resizing and cropping, pixels differ by up to {moved:.0f} of 255 "
                f"(mean {float(np.abs(pixels - geometry).mean()):.2f}): check "
                "preprocess.resize, center_crop, crop_offsets, interpolation")
    off = float(np.abs(tensor - reading.tensor).max())
    if off > 1e-3:
        return (f"normalisation: same pixels, but the model inputs differ by up to {off:.3g}: "
                "check preprocess.mean and std")
    return (f"runtime/head: the model inputs agree (within {off:.1e}), its probabilities do not: "
            "the served model or its output reading differs from the library's")


def _softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.min() >= 0 and scores.max() <= 1 and abs(scores.sum() - 1) < 1e-3:
        return scores  # already probabilities, as servetool reads them too
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def _original_runner(spec: ModelSpec):
    from servetool.convert import export

    return export.runner_for(export.load_original(spec))


class HuggingFaceReference:
    """transformers' image processor (PIL backend) + the model in PyTorch."""

    def __init__(self, spec: ModelSpec, file) -> None:
        try:
            import transformers
            from transformers import AutoImageProcessor
        except Exception as exc:
            raise LibraryMissing(f"transformers is not importable here ({exc})") from None
        self.name = f"transformers {transformers.__version__}"
        folder = file.parent
        # transformers 5 names the backend; 4.x took use_fast (its fast ones need torchvision)
        option = ({"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5
                  else {"use_fast": False})
        self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True,
                                                            **option)
        self._load_image = transformers.image_utils.load_image
        if spec.source.kind == "transformers":
            import torch

            from servetool.convert.export.hf_vision import from_pretrained

            model = from_pretrained(transformers, folder, None)[0].eval()

            def run(pixels: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return model(pixel_values=torch.from_numpy(pixels)).logits.numpy()

            self.model = run
        else:
            original = _original_runner(spec)
            self.model = lambda pixels: original(pixels.astype(spec.input_dtype))[0]

    def run(self, body: bytes) -> Reading:
        from PIL import Image

        image = self._load_image(Image.open(io.BytesIO(body)))
        geometry = self.processor(image, do_rescale=False, do_normalize=False,
                                  return_tensors="np")["pixel_values"][0]
        tensor = self.processor(image, return_tensors="np")["pixel_values"]
        return Reading(np.asarray(image), geometry, tensor[0].astype(np.float64),
                       _softmax(self.model(np.ascontiguousarray(tensor, np.float32))))


class TimmReference:
    """timm's eval transform from the config's pretrained_cfg + the spec's original model."""

    def __init__(self, spec: ModelSpec, file) -> None:
        try:
            import timm
            from timm.data import create_transform, resolve_data_config
        except Exception as exc:
            raise LibraryMissing(f"timm is not importable here ({type(exc).__name__}: "
                                 f"{exc})") from None
        from servetool.model.image_metadata import _read

        self.name = f"timm {timm.__version__}"
        config = resolve_data_config(pretrained_cfg=_read(file)["pretrained_cfg"])
        self.transform = create_transform(**config)
        self.original = _original_runner(spec)
        self.dtype = spec.input_dtype

    def run(self, body: bytes) -> Reading:
        from PIL import Image

        image = Image.open(io.BytesIO(body)).convert("RGB")  # timm's ImageDataset loader
        steps = list(self.transform.transforms)
        cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        geometric = image
        for step in steps[:cut]:
            geometric = step(geometric)
        geometry = np.asarray(geometric, np.float64).transpose(2, 0, 1)
        tensor = self.transform(image).numpy().astype(np.float64)
        return Reading(np.asarray(image), geometry, tensor,
                       _softmax(self.original(tensor[None].astype(self.dtype))[0]))
