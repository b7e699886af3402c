"""OpenVINO IR (model.xml + model.bin) from the ONNX export, for Intel's CPU runtime."""

from __future__ import annotations

from pathlib import Path

from servetool.convert.export import Artifact, ExportError
from servetool.errors import whole_cause
from servetool.model.formats import Format


def require() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise ExportError("the openvino format needs the openvino package: "
                          "pip install 'servetool[openvino]'") from None


def convert(base: Path, target: Path, fmt: Format) -> Artifact:
    require()
    import openvino as ov

    try:
        model = ov.convert_model(str(base))
        ov.save_model(model, str(target), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO conversion failed: {whole_cause(exc)}") from None
    weights = target.with_suffix(".bin")
    # The IR stays fp32; the precision is a property of how the CPU plugin compiles it.
    options = {"inference_precision": "bf16" if fmt.precision == "bf16" else "f32"}
    return Artifact(fmt, target, [target, weights], {"openvino": ov.__version__.split("-")[0]},
                    runtime_options=options)
