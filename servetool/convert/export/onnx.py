"""ONNX: torch's current (dynamo) exporter, a dynamic batch axis, one self-contained file,
onnx.checker, optional onnxslim simplification, and servetool metadata inside the model."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from servetool.convert.export import Artifact, ExportError
from servetool.errors import whole_cause
from servetool.model.spec import ModelSpec

METADATA_PREFIX = "servetool."


def dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    """{input name: {axis: name}} with the batch axis, as the exporters take them (axis 0 is the
    batch; the spec's named axes follow, one past their place in the spec's shape)."""
    return {inp.name: {0: "batch", **{i + 1: d for i, d in enumerate(inp.shape)
                                      if isinstance(d, str)}} for inp in spec.inputs}


def export_onnx(model, example: Any, target: Path, spec: ModelSpec,
                torchscript_exporter: bool = False) -> dict[str, Any]:
    """The model as ONNX with the spec's input names and dynamic axes. torchscript_exporter: the
    TorchScript-based exporter (always for ScriptModules), whose graph patterns ONNX Runtime's
    transformer optimizer recognises (its attention fusion does not match the dynamo export)."""
    import onnx
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    # "Evaluation failed: cannot reshape ..." from constant folding: harmless, and not ours to say
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    from servetool.convert.export import quiet_native_output

    try:
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            if isinstance(model, torch.jit.ScriptModule) or torchscript_exporter:
                proto = _export_scripted(model, example, spec)
            else:
                proto = torch.onnx.export(
                    model, _tensors(example), dynamo=True, external_data=False,
                    input_names=[i.name for i in spec.inputs],
                    output_names=_output_names(model, example, spec),
                    dynamic_shapes=_dims(spec), opset_version=spec.export.onnx_opset,
                    verbose=False,
                ).model_proto
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {whole_cause(exc)}") from None
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    notes: dict[str, Any] = {"opset": opsets[0] if opsets else None}
    if spec.export.onnx_simplify:
        proto, notes["simplified"] = _simplify(proto)
    write_metadata(proto, spec)
    onnx.save_model(proto, str(target), save_as_external_data=False)
    check(target)
    notes["nodes"] = len(proto.graph.node)
    return notes


def _export_scripted(model, example: np.ndarray, spec: ModelSpec):
    """The TorchScript-based exporter (the dynamo exporter does not take ScriptModules), with the
    batch axis dynamic, and a token classifier's sequence axis in its output."""
    import io

    import onnx
    import torch

    args = _tensors(example)
    outputs = _output_names(model, example, spec)
    buffer = io.BytesIO()
    torch.onnx.export(model, args, buffer, dynamo=False, input_names=[i.name for i in spec.inputs],
                      output_names=outputs, opset_version=spec.export.onnx_opset or 17,
                      dynamic_axes={**dynamic_axes(spec), **{o: _output_axes(spec) for o in outputs}})
    return onnx.load_from_string(buffer.getvalue())


def _output_axes(spec: ModelSpec) -> dict[int, str]:
    if spec.task == "token-classification":
        return {0: "batch", 1: "sequence"}
    return {0: "batch"}


def _output_names(model, example: Any, spec: ModelSpec) -> list[str]:
    """The spec's output names, else output (one) or output_0, output_1, ... (several)."""
    import torch

    with torch.inference_mode():
        out = model(*_tensors(example))
    count = len(out) if isinstance(out, (list, tuple, dict)) else 1
    if spec.outputs:
        if len(spec.outputs) != count:
            raise ExportError(f"{spec.spec_file}: outputs names {len(spec.outputs)} output(s), "
                              f"the model gives {count}")
        return list(spec.outputs)
    if isinstance(out, dict):
        return [str(k) for k in out]
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _tensors(example: Any) -> tuple:
    import torch

    arrays = list(example.values()) if isinstance(example, dict) else [example]
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _dims(spec: ModelSpec) -> tuple:
    """torch.export's dynamic shapes: one Dim per axis name, shared by the inputs that use it."""
    import torch

    dims: dict[str, Any] = {}
    for axes in dynamic_axes(spec).values():
        for name in axes.values():
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=1, max=4096) if name == "batch" else \
                    torch.export.Dim(name, min=2, max=65536)
    return tuple({axis: dims[name] for axis, name in dynamic_axes(spec)[i.name].items()}
                 for i in spec.inputs)


def _simplify(proto):
    """onnxslim folds constants and removes redundant nodes; a failure keeps the unsimplified model."""
    try:
        import onnxslim
    except ImportError:
        return proto, "skipped: onnxslim is not installed"
    before = len(proto.graph.node)
    try:
        slim = onnxslim.slim(proto)
    except Exception as exc:  # a simplifier bug must not block a correct export
        return proto, f"skipped: onnxslim failed ({type(exc).__name__})"
    return slim, f"onnxslim: {before} -> {len(slim.graph.node)} nodes"


def write_metadata(proto, spec: ModelSpec) -> None:
    """What a handler needs to know about the model, stored in the model itself."""
    values = {
        "task": spec.task,
        "input_name": proto.graph.input[0].name,
        "input_shape": json.dumps(list(spec.input_shape)),
        "input_dtype": spec.input_dtype,
        "inputs": json.dumps([i.as_dict() for i in spec.inputs]),
        "labels": json.dumps(spec.label_names() or []),
        "preprocess": json.dumps(spec.preprocess.as_dict()),
        "model": f"{spec.name} {spec.version}",
    }
    kept = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


# An ONNX source's external weights are folded into the one model file up to this size: well under
# protobuf's 2 GiB limit on one message, so the folded file always serializes. One self-contained
# file is what every later step handles best (onnxslim, the quantizers, OpenVINO). Above it, the
# weights are rewritten into one file beside the model, named after it (model.onnx.data).
FOLD_LIMIT_BYTES = 1 << 30


def _graph_tensors(graph) -> list:
    """Every TensorProto a graph holds, its subgraphs' (If, Loop, Scan) included: where an
    exporter may have put weights in external data."""
    tensors = [*graph.initializer]
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            tensors += [attr.t] if attr.HasField("t") else []
            tensors += list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                tensors += _graph_tensors(sub)
    return tensors


def external_data_files(path: Path) -> list[str]:
    """The external data files (locations relative to the model's folder, as ONNX resolves them)
    that the model at `path` references, in first-use order; raises ExportError naming the file
    and the model when one is missing or lies outside the model's folder."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    folder = path.resolve().parent
    found: dict[str, str] = {}  # location -> the first tensor stored there
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        found.setdefault(location, tensor.name)
    for location, tensor in found.items():
        where = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not where.is_relative_to(folder):
            raise ExportError(f"{path}: tensor {tensor!r} names external data {location!r}, "
                              f"which is not a file in the model's folder {folder} (ONNX only "
                              "reads external data beside the model)")
        if not where.is_file():
            raise ExportError(f"{path}: its weights (tensor {tensor!r} and maybe more) are in "
                              f"the external data file {location!r}, which is missing: {where}; "
                              f"copy it beside {path.name}, where the exporter wrote it")
    return list(found)


def copy_source(source: Path, target: Path) -> list[Path]:
    """An ONNX source as one model at `target`, plus the files it needs: the same bytes when it
    is self-contained; its external data folded in (up to FOLD_LIMIT_BYTES) or rewritten into one
    file beside `target` when it is not (exporters write any names, several files, subfolders:
    one flat file is what the archive ships and ONNX Runtime finds beside the model)."""
    import shutil

    import onnx

    locations = external_data_files(source)
    if not locations:
        shutil.copyfile(source, target)
        return [target]
    size = source.stat().st_size + sum((source.parent / loc).stat().st_size for loc in locations)
    model = onnx.load(str(source))  # external data read relative to the source's folder
    if size <= FOLD_LIMIT_BYTES:
        onnx.save_model(model, str(target), save_as_external_data=False)
        return [target]
    data = target.with_name(target.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    return [target, data] if data.is_file() else [target]  # tensors under 1 KiB stay inline


def fixed_batch(path: Path) -> int | None:
    """The batch size the model's inputs fix (their first axis), or None for a dynamic batch;
    the same rule as the handler's runtime (handlers.runtimes.fixed_batch)."""
    import onnx

    from handlers.runtimes import fixed_batch as first_fixed

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    dims = [list(v.type.tensor_type.shape.dim) for v in graph.input if v.name not in weights]
    return first_fixed([d[0].dim_value if d and d[0].HasField("dim_value") else None
                        for d in dims])


def check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: onnx.checker rejects the model: {whole_cause(exc)}") from None


def add_optimized_model(artifact: Artifact, spec: ModelSpec) -> None:
    """Let ONNX Runtime optimise the graph once, offline, and ship the result beside the model.

    Workers then load it with optimisation off, which shortens their start. The offline level is
    `extended`: `all` adds layout changes tied to the CPU that does the optimising.
    """
    import onnxruntime as ort

    optimized = artifact.path.with_name("model.opt.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    # A model too large for one file (external weights) must not be written back as one
    optimized_data = (optimized.with_name(optimized.name + ".data")
                      if external_data_files(artifact.path) else None)
    if optimized_data is not None:
        optimized_data.unlink(missing_ok=True)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized_data.name)
    ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
    artifact.files.append(optimized)
    if optimized_data is not None and optimized_data.is_file():
        artifact.files.append(optimized_data)
    artifact.runtime_options = {**artifact.runtime_options, "optimized_model_file": optimized.name}
    artifact.notes["optimized_model"] = f"{optimized.name} (ONNX Runtime, extended level)"
