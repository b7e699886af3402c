"""ModelSpec -> a serving artifact, and the original model to check it by.

Export and validation are separate steps (see gate.py): an exporter never judges its own output,
except where a format's construction needs a decision (TorchScript's trace-or-script choice).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlers.batching import take
from servetool.errors import ServetoolError, whole_cause
from servetool.model.formats import Format, get_format
from servetool.model.samples import load_data, sample_texts, text_batch
from servetool.model.spec import ModelSpec


class ExportError(ServetoolError):
    pass


# A callable from a batch's feeds ({input name: array}, or one array for one input) to a list of
# numpy outputs: how the gate (gate.py) sees any model.
Runner = Callable[[Any], list[np.ndarray]]
EXAMPLE_LENGTH = 7  # of a dynamic axis in sample inputs (other lengths probe it, see lengths_for)


@dataclass
class Artifact:
    format: Format
    path: Path  # the file the handler loads
    files: list[Path]  # everything to ship, including path
    notes: dict[str, Any] = field(default_factory=dict)  # decisions worth reporting
    runtime_options: dict[str, Any] = field(default_factory=dict)  # what the handler must use

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def load_original(spec: ModelSpec):
    """The model as its author wrote it: an eager nn.Module, a TorchScript module, a torch.export
    program's module, or an ONNX file."""
    import torch

    src = spec.source
    if src.kind in ("state_dict", "random_weights"):
        module = import_file(src.model_file, f"servetool_user_model_{spec.name}")
        cls = getattr(module, src.class_name, None)
        if cls is None:
            raise ExportError(f"{src.model_file}: defines no class {src.class_name!r} "
                              f"(named by source.class in {spec.spec_file})")
        if src.kind == "random_weights":
            torch.manual_seed(src.seed)
        try:
            model = cls(**src.init_args)
        except Exception as exc:
            raise ExportError(f"{src.class_name}(**source.init_args) failed: {exc}") from None
        if src.kind == "state_dict":
            try:
                model.load_state_dict(_load_state_dict(src.path, src.class_name))
            except RuntimeError as exc:  # missing, unexpected or mis-shaped weights: all named
                raise ExportError(f"{src.path}: not a state_dict for {src.class_name}: "
                                  f"{whole_cause(exc, limit=1200)}") from None
        return model.eval()
    if src.kind == "exported_program":
        from servetool.convert.export import exported_program

        return exported_program.load(src.path)
    if src.kind == "pickled_module":
        from servetool.convert.export.pickled import load_pickled_module

        return load_pickled_module(src.path, src.model_file).eval()
    if src.kind == "transformers":
        from servetool.convert.export import transformers

        return transformers.load(spec)
    if src.kind == "torchscript":
        try:
            return torch.jit.load(str(src.path), map_location="cpu").eval()
        except Exception as exc:
            raise ExportError(f"{src.path}: not a TorchScript file ({_saved_as(src.path)}): "
                              f"{whole_cause(exc)}") from None
    from servetool.convert.export import onnx as onnx_export

    # its weights may be in external files: a missing one is named here, not by ONNX Runtime
    onnx_export.external_data_files(src.path)
    return src.path  # an ONNX source is its own original


def _load_state_dict(path: Path, class_name: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = _saved_as(path)
        hint = ("; it looks like a whole module saved with torch.save(model): name it as "
                "source.pickled_module (with trust_pickle: true, since loading it runs code)"
                if "pickled objects" in kind else "")
        raise ExportError(f"{path}: not a state_dict ({kind}){hint}: {whole_cause(exc)}") from None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: holds a {type(state).__name__}, not a state_dict (a dict of "
                          "tensors, as model.state_dict() gives)")
    return state


def _saved_as(path: Path) -> str:
    """What kind of PyTorch file `path` is, read from its zip layout (nothing is unpickled)."""
    from servetool.model.torch_files import saved_as

    return saved_as(path)


@contextlib.contextmanager
def quiet_native_output():
    """Silence what exporters print straight to the process's stdout and stderr (graph dumps,
    "Evaluation failed" lines): servetool reports their outcome itself, on one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def import_file(path: Path, module_name: str):
    # An identifier: TorchScript records a class by its module's name and cannot load one back
    # whose name has a '-' (a model named digits-resnet), so a trace would save but never load.
    module_name = re.sub(r"\W", "_", module_name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # The user's model.py may import its neighbours (a layers.py beside it).
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ExportError(f"{path}: failed to import: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def example_batch(spec: ModelSpec, batch: int, seed: int = 0, length: int | None = None) -> Any:
    """Deterministic sample inputs, for tracing and parity checks: one array for a one-input
    model, else {input name: array}. Dynamic axes get `length` (default: EXAMPLE_LENGTH)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in spec.inputs:
        shape = (batch, *(d if isinstance(d, int) else (length or EXAMPLE_LENGTH)
                          for d in inp.shape))
        if inp.dtype.startswith("int"):
            low, high = inp.range or (0, 2)
            feeds[inp.name] = rng.integers(int(low), int(high), size=shape).astype(inp.dtype)
        elif inp.range:
            feeds[inp.name] = rng.uniform(*inp.range, size=shape).astype(inp.dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
    return next(iter(feeds.values())) if len(feeds) == 1 else feeds


def sample_inputs(spec: ModelSpec, count: int = 64) -> np.ndarray:
    """Realistic inputs where the spec has data (quantized formats are judged on real data), else
    random ones. A text model's are its sample sentences, tokenized."""
    if spec.is_text():
        return text_batch(spec, sample_texts(spec, count))
    for ref in (spec.validation, spec.calibration):
        if ref is not None:
            x, _ = load_data(spec, ref)
            return as_input_dtypes(spec, take(x, 0, count))
    return example_batch(spec, count, seed=7)


def as_input_dtypes(spec: ModelSpec, batch: Any) -> Any:
    """Data as each input's dtype (an .npz may hold float64 or int32 where the model takes
    float32 or int64)."""
    if isinstance(batch, dict):
        return {i.name: np.ascontiguousarray(batch[i.name], dtype=i.dtype) for i in spec.inputs}
    return np.ascontiguousarray(batch, dtype=spec.input_dtype)


def runner_for(original) -> Runner:
    """A Runner for the original: an in-memory torch model, or an ONNX source file."""
    if isinstance(original, (str, Path)):
        return artifact_runner("onnx", Path(original))

    import torch

    def run(batch: Any) -> list[np.ndarray]:
        arrays = list(batch.values()) if isinstance(batch, dict) else [batch]  # in spec order
        with torch.inference_mode():
            out = original(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        if isinstance(out, dict):
            out = list(out.values())
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.numpy() for o in outs]

    return run


def _require_single_input_for(spec: ModelSpec, fmt: Format) -> None:
    if fmt.name == "onnx-int8-static" and len(spec.inputs) > 1 and not spec.is_text():
        raise ExportError(f"{spec.name}: onnx-int8-static calibrates one input; this model has "
                          f"{len(spec.inputs)}: use onnx-int8 (dynamic) or onnx")


def output_names(original, count: int, spec_outputs: tuple[str, ...] = ()) -> list[str]:
    """The original's output names where its format has them (ONNX), else output, output_1..."""
    if isinstance(original, (str, Path)):
        from handlers.runtimes import load_runtime

        return list(load_runtime("onnx", str(original), 1).output_names)
    if spec_outputs and len(spec_outputs) == count:
        return list(spec_outputs)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def artifact_runner(runtime: str, path: Path, threads: int = 1,
                    options: dict[str, Any] | None = None,
                    input_names: list[str] | None = None) -> Runner:
    """The artifact as the handler will run it: through the handler's own runtime classes."""
    from handlers.runtimes import load_runtime

    options = {**(options or {}), **({"input_names": input_names} if input_names else {})}
    return load_runtime(runtime, str(path), threads, options).run


def export(spec: ModelSpec, original, out_dir: Path, fmt: str | None = None) -> Artifact:
    """Write one serving artifact (the spec's format, or `fmt`) into out_dir."""
    fmt_info = get_format(fmt or spec.format)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt_info.runtime == "tensorrt":
        from servetool.convert.export import tensorrt

        return tensorrt.export(spec, original, out_dir, fmt_info)
    if fmt_info.runtime == "exported-program":
        from servetool.convert.export import exported_program

        return exported_program.export(spec, original, out_dir / fmt_info.artifact, fmt_info)
    if fmt_info.name == "torchscript":
        from servetool.convert.export import torchscript

        return torchscript.export(spec, original, out_dir / fmt_info.artifact, fmt_info)
    return _export_onnx_family(spec, original, out_dir, fmt_info)


def _for_onnx(spec: ModelSpec, original, fmt: Format) -> tuple[Any, ModelSpec]:
    """The model to export for an ONNX-family format. A Hugging Face model is reloaded with
    transformers' eager attention: its default (SDPA) exports to a graph ONNX Runtime runs slower
    (all-MiniLM-L6-v2, 256 tokens, 2 threads: 32.8 ms against 26.6) and that its transformer
    optimizer cannot fuse. For onnx-transformer the graph also stays as exported (TorchScript-based
    exporter, no onnxslim): then Attention x6 and EmbedLayerNormalization fuse, none otherwise."""
    from dataclasses import replace

    if spec.source.kind == "transformers":
        from servetool.convert.export import transformers

        original = transformers.load(spec, attention="eager")
    if fmt.name != "onnx-transformer":
        return original, spec
    return original, replace(spec, export=replace(spec.export, onnx_simplify=False))


def _export_onnx_family(spec: ModelSpec, original, out_dir: Path, fmt: Format) -> Artifact:
    from servetool.convert.export import onnx as onnx_export

    base = out_dir / "base.onnx" if fmt.name != "onnx" else out_dir / fmt.artifact
    notes: dict[str, Any] = {}
    base_files = [base]  # base and the external data it needs
    if spec.source.kind == "onnx":
        base_files = onnx_export.copy_source(spec.source.path, base)
        onnx_export.check(base)
    elif spec.source.kind == "exported_program":  # its own shapes, fixed batch included
        from servetool.convert.export import exported_program

        notes.update(exported_program.to_onnx(original, spec, base))
    else:
        model, export_spec = _for_onnx(spec, original, fmt)
        notes.update(onnx_export.export_onnx(model, example_batch(spec, 2), base, export_spec,
                                             torchscript_exporter=fmt.name == "onnx-transformer"))
    fixed = onnx_export.fixed_batch(base)
    if fixed is not None:  # the runtimes run any batch in chunks of it (handlers/runtimes.py)
        notes["fixed_batch"] = fixed
    if spec.source.kind == "onnx" or len(spec.inputs) > 1:
        _require_single_input_for(spec, fmt)
    if fmt.name == "onnx":
        artifact = Artifact(fmt, base, base_files, notes)
    elif fmt.name == "onnx-transformer":
        from servetool.convert.export import fusion

        artifact = fusion.optimize(spec, base, out_dir / fmt.artifact, fmt)
    elif fmt.runtime == "openvino":
        from servetool.convert.export import openvino

        artifact = openvino.convert(base, out_dir / fmt.artifact, fmt)
    else:
        from servetool.convert.export import quantize

        artifact = quantize.quantize(spec, base, out_dir / fmt.artifact, fmt)
    artifact.notes = {**notes, **artifact.notes}
    if fmt.runtime == "openvino":
        artifact.runtime_options = {**artifact.runtime_options,
                                    "intra_op_threads": spec.runtime.intra_op_threads}
    if fmt.runtime == "onnx":
        artifact.runtime_options = spec.runtime.as_dict()
        if spec.runtime.optimized_model:
            onnx_export.add_optimized_model(artifact, spec)
    for file in base_files:
        if file not in artifact.files:
            file.unlink(missing_ok=True)
    return artifact
