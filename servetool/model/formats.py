"""The serving formats servetool can produce, and what the parity gate allows each of them.

One table, read by the spec (which names are valid), the exporters (how to make one), the gate
(default tolerances) and the archive (which handler runtime loads it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    runtime: str  # the handler runtime that loads it: torchscript | onnx | openvino | tensorrt
    # | exported-program
    artifact: str  # main file name inside the archive
    precision: str  # fp32 | fp16 | int8
    # Parity against the original, every value of every output (servetool/convert/gate.py):
    # |converted - original| <= atol * max(1, max|original|) + rtol * |original|
    atol: float
    rtol: float
    min_top1_agreement: float  # share of samples whose top-1 class must match the original's
    max_accuracy_drop: float  # points of top-1 accuracy on the spec's validation set
    description: str


# fp32 formats only reorder floating-point sums: tight bounds. Reduced precision changes values by
# design, so its bounds scale with the output and the real judge is the accuracy on labelled data.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("torchscript", "torchscript", "model.pt", "fp32", 1e-5, 0.0, 1.0, 0.1,
           "TorchScript (trace, or script where tracing would freeze control flow)"),
    Format("onnx", "onnx", "model.onnx", "fp32", 1e-4, 0.0, 1.0, 0.1,
           "ONNX Runtime, fp32"),
    # The same ATen kernels as eager PyTorch, called from the program's graph: tight bounds.
    Format("exported-program", "exported-program", "model.pt2", "fp32", 1e-5, 0.0, 1.0, 0.1,
           "torch.export program (.pt2) run by PyTorch: torch.export.load(...).module()"),
    # Fused kernels (one Attention op, SkipLayerNormalization, a GELU op) add up differently.
    Format("onnx-transformer", "onnx", "model.onnx", "fp32", 1e-3, 1e-3, 1.0, 0.1,
           "ONNX Runtime, fp32, with its transformer optimizer's fusions (attention, LayerNorm, "
           "GELU)"),
    Format("onnx-fp16", "onnx", "model.onnx", "fp16", 1e-2, 1e-2, 0.98, 0.5,
           "ONNX Runtime, fp16 weights and activations (fp32 inputs/outputs)"),
    Format("onnx-int8", "onnx", "model.onnx", "int8", 5e-2, 5e-2, 0.97, 0.5,
           "ONNX Runtime, int8 MatMul/Gemm weights; activations quantized per call (text models: "
           "per row, so a text's answer does not depend on its batch)"),
    Format("onnx-int8-static", "onnx", "model.onnx", "int8", 5e-2, 1.5e-1, 0.95, 0.5,
           "ONNX Runtime, static int8 (QDQ, per-channel 7-bit weights, calibrated activations)"),
    Format("openvino", "openvino", "model.xml", "fp32", 1e-3, 1e-4, 1.0, 0.1,
           "OpenVINO Runtime, fp32 IR converted from the ONNX export"),
    Format("openvino-bf16", "openvino", "model.xml", "bf16", 5e-2, 2e-2, 0.98, 0.5,
           "OpenVINO Runtime, bf16 compute on CPUs with AVX512-BF16/AMX (fp32 elsewhere)"),
    Format("tensorrt", "tensorrt", "model.ts", "fp32", 1e-3, 1e-3, 1.0, 0.1,
           "Torch-TensorRT on an NVIDIA GPU, fp32"),
    Format("tensorrt-fp16", "tensorrt", "model.ts", "fp16", 1e-2, 1e-2, 0.98, 0.5,
           "Torch-TensorRT on an NVIDIA GPU, fp16"),
)}

ONNX_FAMILY = tuple(n for n, f in FORMATS.items() if f.runtime in ("onnx", "openvino"))


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None
