"""Reduced-precision ONNX models for ONNX Runtime: dynamic int8, static int8, fp16.

- text models' int8 (onnx-int8) is per-row: see per_row_int8.
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

from servetool.convert.export import Artifact, ExportError
from servetool.model.formats import Format
from servetool.model.samples import load_data
from servetool.model.spec import ModelSpec, calibration_hint

CALIBRATION_SAMPLES = 256
# Static int8 fixes each activation's scale at calibration: batch-independent, but a transformer's
# activations have outliers that one fixed scale cannot hold (all-MiniLM-L6-v2 calibrated on
# servetool's representative texts: cosine to fp32 down to 0.12 quantizing every op, 0.79 its
# MatMuls only; benchmarks/text_int8.py). onnx-int8 quantizes text models per row instead.
STATIC_TEXT_REFUSAL = ("{name}: onnx-int8-static is not offered for text models: static "
                       "activation scales lose a transformer's accuracy (all-MiniLM-L6-v2: "
                       "cosine to fp32 down to 0.12); use format onnx-int8 (per-row scales, "
                       "the same answer for a text alone or in any batch)")


def quantize(spec: ModelSpec, base: Path, target: Path, fmt: Format) -> Artifact:
    # ONNX Runtime's quantizer writes a large model's weights to a uuid-named .data file in the
    # current directory (seen with all-MiniLM-L6-v2: 90 MB per run, in the user's project folder):
    # it works in a scratch directory instead, so every path it is given is made absolute first.
    base, target = base.resolve(), target.resolve()
    with tempfile.TemporaryDirectory(prefix="servetool-quantize-") as scratch, \
            contextlib.chdir(scratch):
        if fmt.name == "onnx-fp16":
            notes = to_fp16(base, target)
        elif fmt.name == "onnx-int8" and spec.is_text():  # the same text, the same answer
            notes = per_row_int8(base, target)
        elif fmt.name == "onnx-int8":
            notes = dynamic_int8(base, target)
        elif fmt.name == "onnx-int8-static" and spec.is_text():
            raise ExportError(STATIC_TEXT_REFUSAL.format(name=spec.name))
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
    x, _ = load_data(spec, ref)
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

    base, target = base.resolve(), target.resolve()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its .data scratch: see quantize
        # Per-channel weight scales: one scale per output column keeps the transformer's
        # projections apart (all-MiniLM-L6-v2's worst cosine on the gate's sentences: 0.87 with
        # one scale per tensor, 0.98 per channel).
        quantize_dynamic(str(_preprocessed(base, Path(tmp))), str(target), per_channel=True,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return {"quantization": "dynamic int8, MatMul/Gemm weights per channel"}


def per_row_int8(base: Path, target: Path, weight_bits: int = 7) -> dict[str, str]:
    """int8 MatMuls whose answer for a row never depends on the other rows of its batch.

    Every MatMul by a 2-D weight becomes: the activation quantized per row (one scale per token,
    its largest |value| / 127, uint8 around 128), MatMulInteger by the weight quantized per
    output column, and the int32 result scaled back by row scale x column scale. ONNX Runtime's
    dynamic int8 takes one scale per tensor instead, so a text's vector moved with the other texts
    and the padding of its batch (all-MiniLM-L6-v2: cosine 0.957 alone vs in a batch); static
    int8 fixes the scales at calibration and lost a transformer's accuracy (cosine down to 0.12
    on MiniLM: activations with outliers). benchmarks/text_int8.py measures the four.
    7-bit weights: u8 x s8 products summed in pairs stay within int16 on CPUs without VNNI."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(base))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        raise ExportError(f"per-row int8 needs ONNX opset 13 or later (per-axis QuantizeLinear); "
                          f"this model has {opset}: export it with export.onnx_opset: 17")
    limit = 2 ** (weight_bits - 1) - 1
    consts = {"rowq_127": np.array(127.0, np.float32), "rowq_eps": np.array(1e-12, np.float32),
              "rowq_zp": np.array(128, np.uint8), "rowq_zp1": np.array([128], np.uint8),
              "rowq_last": np.array([-1], np.int64)}
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 rows, row scales)
    nodes: list = []
    count = 0
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            p = f"rowq{len(quantized)}"
            consts[p + "_flat"] = np.array([-1, weight.dims[0]], np.int64)
            quantized[x] = _quantize_rows(nodes, x, p, opset)
        rows, scale = quantized[x]
        w = numpy_helper.to_array(weight).astype(np.float32)
        column_scale = np.abs(w).max(axis=0) / limit
        column_scale[column_scale == 0] = 1.0
        name = f"rowq_w{count}"
        count += 1
        consts[name] = np.clip(np.round(w / column_scale), -limit, limit).astype(np.int8)
        consts[name + "_scale"] = column_scale.astype(np.float32)
        out = node.output[0]
        nodes += [
            helper.make_node("MatMulInteger", [rows, name, "rowq_zp"], [out + "_i32"]),
            helper.make_node("DequantizeLinear", [out + "_i32", scale], [out + "_rows"], axis=0),
            helper.make_node("Mul", [out + "_rows", name + "_scale"], [out + "_flat"]),
            helper.make_node("Shape", [x], [out + "_xshape"]),
            helper.make_node("Slice", [out + "_xshape", "rowq_first", "rowq_last"],
                             [out + "_lead"]),
            helper.make_node("Concat", [out + "_lead", "rowq_last"], [out + "_shape"], axis=0),
            helper.make_node("Reshape", [out + "_flat", out + "_shape"], [out]),
        ]
    if not count:
        raise ExportError("per-row int8 quantizes MatMuls by a weight and this model has none")
    consts["rowq_first"] = np.array([0], np.int64)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend([*kept, *(numpy_helper.from_array(v, k) for k, v in consts.items())])
    onnx.save_model(model, str(target))
    return {"quantization": f"per-row int8: {count} MatMul weights per column ({weight_bits}-bit), "
                            "activations per row at run time (no calibration; a text's answer "
                            "does not depend on its batch)"}


def _quantize_rows(nodes: list, x: str, p: str, opset: int) -> tuple[str, str]:
    """Nodes that flatten `x` to rows [N, K] and quantize each row by its own scale."""
    from onnx import helper

    reduce = (helper.make_node("ReduceMax", [p + "_abs", "rowq_last"], [p + "_max"], keepdims=0)
              if opset >= 18 else
              helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], axes=[-1], keepdims=0))
    nodes += [
        helper.make_node("Reshape", [x, p + "_flat"], [p + "_rows"]),
        helper.make_node("Abs", [p + "_rows"], [p + "_abs"]),
        reduce,
        helper.make_node("Max", [p + "_max", "rowq_eps"], [p + "_maxe"]),
        helper.make_node("Div", [p + "_maxe", "rowq_127"], [p + "_scale"]),
        # one zero point per row (QuantizeLinear wants it the scale's shape): 128, symmetric
        helper.make_node("Shape", [p + "_scale"], [p + "_n"]),
        helper.make_node("Expand", ["rowq_zp1", p + "_n"], [p + "_zp"]),
        helper.make_node("QuantizeLinear", [p + "_rows", p + "_scale", p + "_zp"], [p + "_q"],
                         axis=0),
    ]
    return p + "_q", p + "_scale"


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

    from servetool.convert.export.onnx import fixed_batch

    input_name = onnx.load(str(base), load_external_data=False).graph.input[0].name
    batches = calibration_batches(inputs, fixed_batch(base))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    base, target = base.resolve(), target.resolve()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its .data scratch: see quantize
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
