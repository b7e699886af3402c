"""The models compress works on: the original (the teacher, any source), the module pruning
rewrites (a Python nn.Module: the class, a trusted pickle, or a torch.export program rebuilt into
layers), and a student the user gives."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from servetool.convert import export
from servetool.convert.compress.common import CompressError
from servetool.errors import whole_cause
from servetool.model.spec import ModelSpec, StudentOptions

# Sources whose original is a Python nn.Module that torch-pruning can rewrite layer by layer.
MODULE_SOURCES = ("state_dict", "random_weights", "pickled_module", "transformers")
NOT_PRUNABLE = ("pruning removes channels from the model's Python layers, so it needs the model "
                "class (source.state_dict with model_file and class) or a torch.export program "
                "(source.exported_program); or distil the original into a smaller class of yours "
                "(compress.student)")


class FirstOutput(nn.Module):
    """A model whose forward returns a dict or tuple (a Hugging Face ModelOutput) as its first
    tensor: pruning, training and torch.export all see logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.model(x))


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    return first_tensor(out[0])


def require_prunable(spec: ModelSpec) -> None:
    """Before any work: pruning rewrites Python layers, which an ONNX or TorchScript file has not."""
    kind = spec.source.kind
    if kind not in (*MODULE_SOURCES, "exported_program"):
        what = {"onnx": "an ONNX file", "torchscript": "a TorchScript file"}.get(kind, kind)
        raise CompressError(f"{spec.spec_file}: source is {what}: {NOT_PRUNABLE}")


def prunable(spec: ModelSpec) -> nn.Module:
    """A fresh copy of the original as layers torch-pruning can rewrite (the teacher stays intact)."""
    require_prunable(spec)
    if spec.source.kind == "exported_program":
        from servetool.convert.compress.graph import program_layers
        from servetool.convert.export.exported_program import load

        return program_layers(load(spec.source.path).program)
    return as_logits_module(export.load_original(spec), spec)


def as_logits_module(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The module itself when it returns a tensor, else wrapped to return its first output."""
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(export.example_batch(spec, 2)))
    return model if isinstance(out, torch.Tensor) else FirstOutput(model)


def student(spec: ModelSpec, options: StudentOptions) -> nn.Module:
    """The user's student class, built with its init_args and, where given, its weights."""
    module = export.import_file(options.model_file, f"servetool_student_{spec.name}")
    cls = getattr(module, options.class_name, None)
    if cls is None:
        raise CompressError(f"{options.model_file}: defines no class {options.class_name!r} "
                            f"(named by compress.student.class in {spec.spec_file})")
    try:
        model = cls(**options.init_args)
    except Exception as exc:
        raise CompressError(f"{options.class_name}(**compress.student.init_args) failed: "
                            f"{whole_cause(exc)}") from None
    if options.state_dict is not None:
        try:
            model.load_state_dict(torch.load(options.state_dict, map_location="cpu",
                                             weights_only=True))
        except Exception as exc:
            raise CompressError(f"{options.state_dict}: not a state_dict for "
                                f"{options.class_name}: {whole_cause(exc)}") from None
    model = as_logits_module(model, spec)
    check_classes(spec, model, "the student " + options.class_name)
    return model


def check_classes(spec: ModelSpec, model: nn.Module, what: str) -> int:
    """The number of classes `model` gives, which must be the original's labels' count."""
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(export.example_batch(spec, 2)))
    classes = out.shape[1] if out.dim() == 2 else None
    labels = spec.label_names()
    if classes is None or (labels and classes != len(labels)):
        raise CompressError(f"{what} gives outputs of shape {list(out.shape)}; an image "
                            f"classifier gives [batch, {len(labels) if labels else 'classes'}]")
    return classes


def logits(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's outputs on x (any original: a module, a program, TorchScript, an ONNX file),
    batch by batch."""
    run = export.runner_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.concatenate([np.asarray(run(np.ascontiguousarray(x[i:i + batch]))[0], np.float32)
                               for i in range(0, len(x), batch)])


def check_shape(spec: ModelSpec, model: nn.Module, what: str, shape: tuple[int, ...]) -> None:
    """`model` gives outputs of the original's shape (past the batch axis)."""
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(export.example_batch(spec, 2)))
    if tuple(out.shape[1:]) != tuple(shape):
        raise CompressError(f"{what} gives outputs of shape {list(out.shape)}; the original "
                            f"gives [batch, {', '.join(map(str, shape))}]")
