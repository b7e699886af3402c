"""A local Hugging Face image-classification folder -> the original model servetool exports.

Loaded offline with AutoModelForImageClassification and wrapped to take `pixel_values`
[N, C, H, W] (what servetool's image preprocessing produces) and return the logits, which the
handler turns into top-k probabilities. The folder's image processor is not run here: its
settings became the spec's preprocessing (servetool/model/image_metadata.py), and reference parity
compares the two on real image files.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from servetool.errors import whole_cause
from servetool.model.spec import ModelSpec

AUTO_CLASS = "AutoModelForImageClassification"


def load(spec: ModelSpec, attention: str | None = None) -> Any:
    """The folder's classifier, wrapped; `attention` picks transformers' attention
    implementation for models that have one (None: its default)."""
    from servetool.convert.export import ExportError

    folder = spec.source.path
    if spec.task != "image-classification":
        raise ExportError(f"{folder} is a Hugging Face image model; servetool serves it as task "
                          f"image-classification, not {spec.task}")
    try:
        import transformers
    except ImportError:
        raise ExportError("loading a Hugging Face folder needs transformers: pip install "
                          "transformers") from None
    model, missing = from_pretrained(transformers, folder, attention)
    if missing:
        raise ExportError(f"{folder}: the weights lack {', '.join(sorted(missing)[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}: the folder must hold a model "
                          "trained for image classification (a base model has no classifier "
                          "head; its head would be random)")
    return wrap(model.eval())


def from_pretrained(transformers: Any, folder: Any, attention: str | None,
                    auto_class: str = AUTO_CLASS) -> tuple[Any, list]:
    """transformers' `auto_class` from the folder, offline, with its load report's missing keys;
    its warnings silenced and a failure one ExportError (shared with export/transformers.py)."""
    from servetool.convert.export import ExportError

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "weights not initialised" warning becomes our error
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model, info = getattr(transformers, auto_class).from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True,
                **({"attn_implementation": attention} if attention else {}))
    except Exception as exc:
        raise ExportError(f"{folder}: cannot load it as an {auto_class} "
                          f"({whole_cause(exc, limit=600)})") from None
    finally:
        quiet.setLevel(level)
    return model, list(info.get("missing_keys", []))


def wrap(model: Any) -> Any:
    import torch

    class ImageClassifier(torch.nn.Module):
        """pixel_values in, logits out (exporters read the one positional input)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values, return_dict=True).logits

    return ImageClassifier().eval()
