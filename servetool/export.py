"""ModelSpec -> a serving artifact (TorchScript or ONNX file), and the original model to check it by.

Export and validation are separate steps (see validate.py): exporting never judges its own output.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from servetool.errors import ServetoolError
from servetool.spec import ModelSpec

ARTIFACT_NAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}


class ExportError(ServetoolError):
    pass


# A callable from a numpy batch to a list of numpy outputs: how validate.py sees any model.
Runner = Callable[[np.ndarray], list[np.ndarray]]


def load_original(spec: ModelSpec):
    """The model as its author wrote it: an eager nn.Module, a TorchScript module, or an ONNX file."""
    import torch

    src = spec.source
    if src.kind == "state_dict":
        module = import_file(src.model_file, f"servetool_user_model_{spec.name}")
        cls = getattr(module, src.class_name, None)
        if cls is None:
            raise ExportError(f"{src.model_file}: defines no class {src.class_name!r} "
                              f"(named by source.class in {spec.spec_file})")
        try:
            model = cls(**src.init_args)
        except Exception as exc:
            raise ExportError(f"{src.class_name}(**source.init_args) failed: {exc}") from None
        try:
            state = torch.load(src.path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise ExportError(f"{src.path}: not a state_dict for {src.class_name}: {first}") from None
        return model.eval()
    if src.kind == "torchscript":
        try:
            return torch.jit.load(str(src.path), map_location="cpu").eval()
        except Exception as exc:
            raise ExportError(f"{src.path}: not a TorchScript file: {exc}") from None
    return src.path  # an ONNX source is its own original


def import_file(path: Path, module_name: str):
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


def example_batch(spec: ModelSpec, batch: int, seed: int = 0) -> np.ndarray:
    """Deterministic sample inputs of the spec's shape, for tracing and parity checks."""
    rng = np.random.default_rng(seed)
    shape = (batch, *spec.input_shape)
    if spec.input_dtype.startswith("int"):
        return rng.integers(0, 10, size=shape).astype(spec.input_dtype)
    return rng.standard_normal(shape).astype(spec.input_dtype)


def runner_for(original_or_path, fmt: str | None = None, threads: int = 1) -> Runner:
    """A Runner for an in-memory torch model, or for an artifact file through the handler's runtime."""
    if isinstance(original_or_path, (str, Path)):
        from handlers.runtimes import load_runtime

        path = Path(original_or_path)
        fmt = fmt or ("onnx" if path.suffix == ".onnx" else "torchscript")
        return load_runtime(fmt, str(path), threads).run

    import torch

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = original_or_path(torch.from_numpy(batch))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.numpy() for o in outs]

    return run


def export(spec: ModelSpec, original, out_dir: Path) -> Path:
    """Write the spec's serving artifact into out_dir and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ARTIFACT_NAMES[spec.format]
    if spec.source.kind == spec.format:  # already in the serving format
        shutil.copyfile(spec.source.path, target)
        return target
    if spec.format == "torchscript":
        return export_torchscript(original, example_batch(spec, 2), target)
    return export_onnx(original, example_batch(spec, 2), target)


def export_torchscript(model, example: np.ndarray, target: Path) -> Path:
    import torch

    with warnings.catch_warnings():
        # jit.trace is deprecated in torch 2.13 but remains what TorchServe loads natively.
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model, torch.from_numpy(example), check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {type(exc).__name__}: {exc}") from None
        traced.save(str(target))
    return target


def export_onnx(model, example: np.ndarray, target: Path) -> Path:
    """ONNX with a dynamic batch axis, as one self-contained file, checked by onnx's checker."""
    import onnx
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (torch.from_numpy(example),), dynamo=True, external_data=False,
                input_names=["input"], dynamic_shapes=({0: batch},), verbose=False,
            )
        program.save(str(target), external_data=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first}") from None
    try:
        onnx.checker.check_model(str(target), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{target}: onnx.checker rejects the export: {exc}") from None
    return target
