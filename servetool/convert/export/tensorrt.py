"""Torch-TensorRT (fp32/fp16) for NVIDIA GPUs, saved as TorchScript with embedded TensorRT engines.

Needs CUDA and the torch_tensorrt package (`pip install 'servetool[tensorrt]'`, from NVIDIA's
index where PyPI's wheel does not match the installed torch). Without them this format stops
before any work, saying which of the two is missing.
"""

from __future__ import annotations

from pathlib import Path

from servetool.convert.export import Artifact, ExportError, example_batch
from servetool.model.formats import Format
from servetool.model.spec import ModelSpec

MAX_BATCH = 64


def require() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ExportError("the tensorrt formats need an NVIDIA GPU with CUDA, and this machine has "
                          "none (torch.cuda.is_available() is False); use onnx, onnx-int8-static "
                          "or openvino on a CPU")
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        raise ExportError("the tensorrt formats need the torch_tensorrt package matching torch "
                          f"{torch.__version__}: pip install 'servetool[tensorrt]'") from None


def export(spec: ModelSpec, model, out_dir: Path, fmt: Format) -> Artifact:
    require()
    import torch
    import torch_tensorrt

    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{spec.name}: tensorrt needs a PyTorch model, the source is {model}")
    if len(spec.inputs) != 1 or spec.inputs[0].dynamic:
        raise ExportError(f"{spec.name}: the tensorrt formats take one input of a fixed shape "
                          "here; this model's are "
                          + ", ".join(f"{i.name} {list(i.shape)}" for i in spec.inputs))
    precision = torch.float16 if fmt.precision == "fp16" else torch.float32
    shape = tuple(spec.input_shape)
    inputs = [torch_tensorrt.Input(min_shape=(1, *shape), opt_shape=(8, *shape),
                                   max_shape=(MAX_BATCH, *shape), dtype=torch.float32)]
    example = torch.from_numpy(example_batch(spec, 8)).cuda()
    compiled = torch_tensorrt.compile(model.cuda().eval(), ir="dynamo", inputs=inputs,
                                      enabled_precisions={precision})
    target = out_dir / fmt.artifact
    torch_tensorrt.save(compiled, str(target), output_format="torchscript", inputs=[example])
    model.cpu()
    return Artifact(fmt, target, [target], {"tensorrt": torch_tensorrt.__version__,
                                            "max_batch": MAX_BATCH})
