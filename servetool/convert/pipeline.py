"""spec -> export -> gate: one format of one model, converted and checked against the original
(`servetool convert`; `servetool package` and `servetool compress` build on it)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from handlers.batching import batch_size, take
from servetool.convert import export, gate
from servetool.errors import ServetoolError, whole_cause
from servetool.model.formats import get_format
from servetool.model.samples import collate_texts, encode_texts, representative_texts
from servetool.model.spec import ModelSpec

PARITY_BATCH_SIZES = (1, 4, 16)  # more than one, so a batch axis frozen at export is caught
Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def gate_batches(spec: ModelSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(random, real) input batches of sizes 1, 4 and 16 for the parity check."""
    # dynamic axes at other lengths than the export example's
    random = [export.example_batch(spec, n, seed=n, length=3 + 2 * n) for n in PARITY_BATCH_SIZES]
    real: list = []
    if spec.is_text():  # the representative texts (servetool's and the spec's), as the worker
        encoded = encode_texts(spec, gate_texts(spec))  # tokenizes them
        sizes = list(PARITY_BATCH_SIZES)
        while sum(sizes) < len(encoded):  # every text, in batches of 16 after 1, 4 and 16
            sizes.append(PARITY_BATCH_SIZES[-1])
        edges = np.cumsum((0, *sizes))
        real = [collate_texts(spec, encoded[a:b])
                for a, b in zip(edges[:-1], edges[1:], strict=True) if a < len(encoded)]
    elif spec.validation is not None or spec.calibration is not None:
        x = export.sample_inputs(spec, sum(PARITY_BATCH_SIZES))
        edges = np.cumsum((0, *PARITY_BATCH_SIZES))
        real = [take(x, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)
                if b <= batch_size(x)]
    return random, real


def gate_texts(spec: ModelSpec) -> list[str]:
    """servetool's representative texts plus the spec's (text.samples, calibration.texts), at
    least enough for batches of 1, 4 and 16 (repeated when the set is smaller)."""
    texts, _ = representative_texts(spec)
    need = sum(PARITY_BATCH_SIZES)
    return (texts * (need // len(texts) + 1))[:max(need, len(texts))]


class TaskMismatch(export.ExportError):
    pass


def sample_range(inp) -> str:
    if inp.range:
        return f"[{inp.range[0]}, {inp.range[1]})"
    return "[0, 2)" if inp.dtype.startswith("int") else "normal"


@contextlib.contextmanager
def sample_inputs_failures(spec: ModelSpec):
    """A model that raises on the gate's sample inputs: one line saying so, and what to set (the
    samples are guesses where the spec has no data: integers in [0, 2), normal floats)."""
    try:
        yield
    except ServetoolError:
        raise
    except Exception as exc:
        ranges = ", ".join(f"{i.name} {sample_range(i)}" for i in spec.inputs)
        raise export.ExportError(
            f"{spec.name}: the model raised on servetool's sample inputs ({ranges}): "
            f"{whole_cause(exc)}. Give inputs[].range the values it takes, or validation data"
        ) from None


def check_task(spec: ModelSpec, original) -> list[str]:
    """The model's outputs must be what the spec's task turns into answers; returns how they are
    read (what `package` says), so that nothing is chosen silently."""
    from handlers.tasks import output_problem

    batch = 2
    outputs = export.runner_for(original)(export.example_batch(spec, batch))
    names = export.output_names(original, len(outputs), spec.outputs)
    labels = spec.label_names()
    problem = output_problem(spec.task, [tuple(np.shape(o)) for o in outputs], names, batch,
                             spec.detection.layout if spec.detection else "auto",
                             len(labels) if labels else None)
    if problem:
        raise TaskMismatch(f"{spec.spec_file}: task {spec.task}: {problem}")
    if spec.detection is None:
        return []
    from handlers.detection import BOX_DEFAULTS, resolve_layout

    shapes = [tuple(np.shape(o)) for o in outputs]
    layout = resolve_layout([s[1:] for s in shapes], spec.detection.layout,
                            len(labels) if labels else None)
    usual = BOX_DEFAULTS[layout]
    d = spec.detection
    if (d.box_units or usual[1]) == "pixels":
        refuse_normalised_boxes(spec, outputs, layout, d.box_format or usual[0])
    how = "named in the spec or the model file" if d.layout != "auto" else (
        f"found from the output shape {[list(s) for s in shapes]} and "
        + (f"{len(labels)} labels" if labels else "no labels"))
    return [f"detector: layout {layout} ({how}); boxes {d.box_format or usual[0]} in "
            f"{d.box_units or usual[1]}; image {fitted(d.fit, d.stride)} {list(spec.input_shape[1:])} with "
            f"{spec.preprocess.interpolation} resizing; confidence {d.confidence}, iou {d.iou}, "
            f"max_detections {d.max_detections}; labels: "
            + (f"{len(labels)}" if labels else "none (answers give class ids)")]


def fitted(fit: str, stride: int) -> str:
    """How the image is placed in the model input, for package's report."""
    if fit == "letterbox-rect":
        return f"letterboxed (rect: padded to multiples of {stride}) within"
    return f"{fit}ed to"


def refuse_normalised_boxes(spec: ModelSpec, outputs: list[np.ndarray], layout: str,
                            box_format: str) -> None:
    """A detector read as giving pixels whose every box on the sample inputs lies within [0, 1.5]
    gives normalised coordinates: served as pixels, each object would come back as a speck in
    the image's corner with HTTP 200. Checked here, once at package time, not per request."""
    from handlers.detection import BoxFormat, candidates, looks_normalised

    _, height, width = spec.input_shape
    boxes_as = BoxFormat(box_format, "pixels")
    found = []
    for row in range(len(outputs[0])):
        image = [np.asarray(o)[row] for o in outputs]
        found.append(candidates(image if layout == "torchvision" else image[0], layout, -np.inf,
                                boxes_as, (width, height))[0])
    if looks_normalised(np.concatenate(found), width, height):
        raise TaskMismatch(
            f"{spec.spec_file}: task object-detection: every box the model gives on the sample "
            f"inputs lies within [0, 1.5] of its {width}x{height} input, read as {layout} boxes "
            "in pixels: they are normalised (0..1) coordinates; set detection.box_units: "
            "normalized")


def preflight_format(fmt: str) -> None:
    """Fail before any work when a format cannot be produced on this machine."""
    runtime = get_format(fmt).runtime
    if runtime == "tensorrt":
        from servetool.convert.export import tensorrt

        tensorrt.require()
    elif runtime == "openvino":
        from servetool.convert.export import openvino

        openvino.require()


def fixed_batch_line(spec: ModelSpec, fixed: int) -> str:
    """What `package` says about a model whose file fixes its batch (ultralytics' default
    export, torch.onnx.export without dynamic axes): how it is run, and what batch.size fits."""
    first = spec.inputs[0]
    line = (f"the model has a fixed batch of {fixed} (input {first.name!r} is "
            f"{[fixed, *first.shape]}): the gate and the server run every batch in chunks of "
            f"{fixed}")
    if fixed == 1:
        return line + "; re-export with a dynamic batch axis to run a batch in one call"
    line += ", the last chunk padded with copies of its last row"
    if spec.batch_size % fixed:
        line += (f"; a full batch of batch.size {spec.batch_size} leaves "
                 f"{fixed - spec.batch_size % fixed} padding row(s) in its last chunk: a multiple "
                 f"of {fixed} fills every chunk")
    return line


def convert(spec: ModelSpec, fmt: str, out_dir: Path, *, original=None, atol: float | None = None,
            accept_drift: bool = False, progress: Progress = quiet
            ) -> tuple[export.Artifact, gate.ValidationReport]:
    """Export one format into out_dir and put it through the gate (raises on failure)."""
    preflight_format(fmt)
    if original is None:
        progress(f"{spec.name}: loading the original model ({spec.source.kind})")
        original = export.load_original(spec)
    with sample_inputs_failures(spec):
        reading = check_task(spec, original)
    for line in (*spec.inferred, *reading):
        progress(f"{spec.name}: {line}")
    progress(f"{spec.name}: exporting to {fmt}")
    artifact = export.export(spec, original, out_dir, fmt)
    if artifact.notes.get("quantization"):  # how, and on what data (int8: none for text)
        progress(f"{spec.name}: {artifact.notes['quantization']}")
    if artifact.notes.get("fixed_batch"):
        progress(f"{spec.name}: {fixed_batch_line(spec, artifact.notes['fixed_batch'])}")
    progress(f"{spec.name}: checking {artifact.path.name} ({fmt}) against the original")
    runner = export.artifact_runner(artifact.format.runtime, artifact.path, 1,
                                    artifact.runtime_options, [i.name for i in spec.inputs])
    random, real = gate_batches(spec)
    if spec.is_text():
        progress(f"{spec.name}: gating on {len(gate_texts(spec))} texts from "
                 + " + ".join(representative_texts(spec)[1])
                 + "; each also alone and in a batch of mixed lengths")
    with sample_inputs_failures(spec):
        report = gate.validate(spec, export.runner_for(original), runner, fmt,
                                   gate.limits_for(fmt, spec.tolerance, atol, spec.task),
                                   random, real,
                                   export.output_names(original, len(runner(random[0])),
                                                       spec.outputs))
    gate.require(report, spec.name, accept=accept_drift)
    # how many numbers one answer carries: what max_response_size must allow (tensor answers)
    artifact.notes["output_values"] = sum(int(np.prod(o.shape)) for o in report.outputs)
    if report.accepted_despite_problems:
        progress(f"{spec.name}: WARNING: {fmt} accepted despite: " + "; ".join(report.problems))
    return artifact, report


def describe(artifact: export.Artifact, report: gate.ValidationReport) -> dict[str, Any]:
    return {
        "format": artifact.format.name,
        "runtime": artifact.format.runtime,
        "precision": artifact.format.precision,
        "files": [str(f) for f in artifact.files],
        "size_bytes": artifact.size_bytes,
        "notes": artifact.notes,
        "gate": report.as_dict(),
    }
