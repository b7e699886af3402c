"""Reduced-precision ONNX models for ONNX Runtime: dynamic int8, static int8, fp16.

- dynamic int8 quantizes the weights of MatMul/Gemm only: ONNX Runtime's dynamic ConvInteger is
  slower than fp32 on CPUs (measured: ResNet-18 at batch 1 went from 17 ms to 84 ms), so convolution
  models keep fp32 convolutions here and should use static int8.
- static int8 writes QDQ pairs with per-channel weight scales and activation ranges calibrated on
  the spec's calibration data (or its validation inputs when no calibration set is given).
- fp16 converts weights and activations, keeping fp32 inputs and outputs so clients do not change.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

from servetool.export import Artifact, ExportError
from servetool.formats import Format
from servetool.spec import ModelSpec, calibration_hint

CALIBRATION_SAMPLES = 256


def quantize(spec: ModelSpec, base: Path, target: Path, fmt: Format) -> Artifact:
    # ONNX Runtime's quantizer writes a large model's weights to a uuid-named .data file in the
    # current directory (seen with all-MiniLM-L6-v2: 90 MB per run, in the user's project folder):
    # it works in a scratch directory instead, so every path it is given is made absolute first.
    base, target = base.resolve(), target.resolve()
    with tempfile.TemporaryDirectory(prefix="servetool-quantize-") as scratch, \
            contextlib.chdir(scratch):
        if fmt.name == "onnx-fp16":
            notes = to_fp16(base, target)
        elif fmt.name == "onnx-int8":
            notes = dynamic_int8(base, target)
        elif fmt.name == "onnx-int8-static":
            # A detector's graph ends in its decoding (sigmoid, box arithmetic) and one output
            # that holds box pixels (0-128 and more) beside scores (0-1): one uint8 scale cannot
            # hold both (digits-detect lost 6.7 points of mAP), so only its convolutions and
            # matrix products are quantized (0.35 points).
            ops = ["Conv", "MatMul", "Gemm"] if spec.task == "object-detection" else None
            notes = static_int8(base, target, calibration_inputs(spec), ops)
        else:
            raise ExportError(f"no quantizer for format {fmt.name}")
    _copy_metadata(base, target)
    return Artifact(fmt, target, [target], notes)


def calibration_inputs(spec: ModelSpec) -> np.ndarray:
    ref = spec.calibration or spec.validation
    if ref is None:
        raise ExportError(f"{spec.name}: onnx-int8-static needs calibration data; add "
                          f"{calibration_hint(spec.task)} to {spec.spec_file}")
    x, _ = spec.load_data(ref)
    if tuple(x.shape[1:]) != spec.input_shape:
        raise ExportError(f"{ref.path}: calibration inputs have shape {list(x.shape[1:])}, the "
                          f"model takes {list(spec.input_shape)}")
    return np.ascontiguousarray(x[:CALIBRATION_SAMPLES], dtype=np.float32)


def _preprocessed(base: Path, folder: Path) -> Path:
    """Shape inference and basic graph fusions first, as ONNX Runtime recommends before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / "pre.onnx"
    try:
        quant_pre_process(str(base), str(out), skip_symbolic_shape=False)
    except Exception:  # pre-processing is an optimisation; quantizing the raw graph still works
        return base
    return out


def dynamic_int8(base: Path, target: Path) -> dict[str, str]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = {node.op_type for node in onnx.load(str(base), load_external_data=False).graph.node}
    if not ops & {"MatMul", "Gemm"}:  # an "int8" model that is fp32 throughout would mislead
        raise ExportError("onnx-int8 (dynamic) quantizes MatMul/Gemm weights and this model has "
                          f"none ({', '.join(sorted(ops & {'Conv', 'ConvTranspose'})) or 'no'} "
                          "convolutions instead): use onnx-int8-static")

    with tempfile.TemporaryDirectory() as tmp:
        # Per-channel weight scales: one scale per output column keeps the transformer's
        # projections apart (all-MiniLM-L6-v2's worst cosine on the gate's sentences: 0.87 with
        # one scale per tensor, 0.98 per channel).
        quantize_dynamic(str(_preprocessed(base, Path(tmp))), str(target), per_channel=True,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return {"quantization": "dynamic int8, MatMul/Gemm weights per channel"}


def static_int8(base: Path, target: Path, inputs: np.ndarray,
                op_types: list[str] | None = None) -> dict[str, str]:
    """QDQ int8; `op_types`: only these ops (default: every op ONNX Runtime quantizes)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from servetool.export.onnx import fixed_batch

    input_name = onnx.load(str(base), load_external_data=False).graph.input[0].name
    batches = calibration_batches(inputs, fixed_batch(base))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        # reduce_range: 7-bit weights. On x86 CPUs without VNNI, ONNX Runtime's u8*s8 kernels sum
        # pairs of products in 16 bits and saturate; the example detector lost 1.09 points of
        # mAP@0.5:0.95 with 8-bit weights on an AVX2 machine, 0.33 with 7-bit ones.
        quantize_static(str(_preprocessed(base, Path(tmp))), str(target), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=op_types)
    return {"quantization": f"static int8 QDQ, per-channel 7-bit weights, calibrated on {len(inputs)} "
                            "inputs (MinMax)" + (f", {'/'.join(op_types)} only" if op_types else "")}


def calibration_batches(inputs: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """Calibration inputs in batches the model takes: about 16 rows each, or exactly `fixed`
    rows for a model with a fixed batch, the last batch padded with copies of its last row
    (MinMax calibration: repeated rows leave every range as it was)."""
    if fixed is None:
        return np.array_split(inputs, max(1, len(inputs) // 16))
    batches = [inputs[i:i + fixed] for i in range(0, len(inputs), fixed)]
    short = fixed - len(batches[-1])
    if short:
        batches[-1] = np.concatenate([batches[-1], np.repeat(batches[-1][-1:], short, axis=0)])
    return batches


def to_fp16(base: Path, target: Path) -> dict[str, str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
    onnx.save_model(model, str(target))
    return {"quantization": "fp16 weights and activations, fp32 inputs/outputs"}


def _copy_metadata(base: Path, target: Path) -> None:
    import onnx

    src, dst = onnx.load(str(base), load_external_data=False), onnx.load(str(target))
    existing = {p.key for p in dst.metadata_props}
    for prop in src.metadata_props:
        if prop.key not in existing:
            dst.metadata_props.add().CopyFrom(prop)
    onnx.save_model(dst, str(target))
