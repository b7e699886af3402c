"""A local Hugging Face folder -> the original model servetool exports and gates.

The folder is loaded offline (never the hub) with the Auto class for the spec's task, and wrapped
so that it takes the tokenizer's inputs positionally, in the spec's order, and returns exactly what
is served: a feature-extraction model returns the pooled (and, where the spec says, L2-normalised)
sentence embedding, as sentence-transformers computes it, so every format carries the pooling in
its graph and the gate compares the vectors clients get; classifiers return their logits.
"""

from __future__ import annotations

from typing import Any

from servetool.model.spec import ModelSpec

AUTO_CLASSES = {"feature-extraction": "AutoModel", "tensor": "AutoModel",
                "text-classification": "AutoModelForSequenceClassification",
                "text-reranking": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification"}


def load(spec: ModelSpec, attention: str | None = None) -> Any:
    """The folder's model for the spec's task, wrapped; `attention` picks transformers'
    attention implementation (None: its default, SDPA where available)."""
    from servetool.convert.export import ExportError

    folder = spec.source.path
    if spec.task == "image-classification":  # an image model's folder
        from servetool.convert.export import hf_vision

        return hf_vision.load(spec, attention)
    try:
        import transformers
    except ImportError:
        raise ExportError("loading a Hugging Face folder needs transformers: pip install "
                          "transformers") from None
    from servetool.convert.export.hf_vision import from_pretrained

    model, missing = from_pretrained(transformers, folder, attention, AUTO_CLASSES[spec.task])
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise ExportError(f"{folder}: the weights lack {', '.join(sorted(missing)[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}: for task {spec.task} the folder "
                          "must hold a model trained for it (a base model has no classification "
                          "head; its head would be random)")
    return wrap(model.eval(), spec)


def wrap(model: Any, spec: ModelSpec) -> Any:
    import torch

    names = [i.name for i in spec.inputs]
    text = spec.text
    pooling = text.pooling if text else "mean"
    normalize = bool(text and text.normalize)
    task = spec.task

    class TextModel(torch.nn.Module):
        """The transformer with the tokenizer's inputs in order, returning what is served."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def run(self, *inputs: torch.Tensor) -> torch.Tensor:
            feeds = dict(zip(names, inputs, strict=True))
            out = self.model(**feeds, return_dict=True)
            if task not in ("feature-extraction", "tensor"):
                return out.logits
            hidden = out.last_hidden_state
            if task == "tensor":
                return hidden
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:  # the mean over real tokens: padding has attention_mask 0
                mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    # Exporters read the inputs from forward's signature: one positional parameter per input.
    class TwoInputs(TextModel):
        def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return self.run(first, second)

    class ThreeInputs(TextModel):
        def forward(self, first: torch.Tensor, second: torch.Tensor,
                    third: torch.Tensor) -> torch.Tensor:
            return self.run(first, second, third)

    if len(names) not in (2, 3):
        from servetool.convert.export import ExportError

        raise ExportError(f"a Hugging Face text model takes 2 or 3 of input_ids, attention_mask, "
                          f"token_type_ids; the spec lists {names}")
    return (TwoInputs if len(names) == 2 else ThreeInputs)().eval()
