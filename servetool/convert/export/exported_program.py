"""torch.export programs (.pt2): a source (source.exported_program), and a serving format
(exported-program) that ships the program for PyTorch to run.

A program may fix its batch (an example of batch 1 without dynamic_shapes specialises it) or bound
it (Dim('batch', max=8)). The original is then run as the server runs it: in calls of a batch the
program takes (handlers.runtimes.rows_per_call), so the gate compares like with like.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers.runtimes import load_program, program_batch, rows_per_call, run_in_chunks
from servetool.convert.export import Artifact, ExportError, example_batch, quiet_native_output
from servetool.errors import whole_cause
from servetool.model.formats import Format
from servetool.model.spec import ModelSpec


class ProgramModule(torch.nn.Module):
    """A program's module as servetool's original: called with a batch of any size."""

    def __init__(self, program) -> None:
        super().__init__()
        self.program = program
        self.call = program.module()
        self.least, self.most = program_batch(program)

    def train(self, mode: bool = True) -> ProgramModule:
        return self  # a program's module refuses train()/eval(): it is fixed in inference form

    def forward(self, *args: torch.Tensor) -> Any:
        feeds = {str(i): a.detach().numpy() for i, a in enumerate(args)}
        size = rows_per_call(len(args[0]), self.least, self.most) if args else None
        outs = self._numpy_call(feeds) if size is None else \
            run_in_chunks(self._numpy_call, feeds, size)
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _numpy_call(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs flattened as the runtime flattens them: a dict's values, a tuple's items."""
        from torch.utils import _pytree

        out = self.call(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values()))
        return [o.detach().numpy() for o in _pytree.tree_leaves(out)]


def load(path: Path) -> ProgramModule:
    try:
        program = load_program(str(path))
    except Exception as exc:
        raise ExportError(f"{path}: torch.export.load failed: {whole_cause(exc)}") from None
    return ProgramModule(program)


def output_names(program, spec: ModelSpec) -> list[str]:
    """The spec's output names, else output (one) or output_0, output_1, ... (several)."""
    count = len(program.graph_signature.user_outputs)
    if spec.outputs:
        if len(spec.outputs) != count:
            raise ExportError(f"{spec.spec_file}: outputs names {len(spec.outputs)} output(s), "
                              f"the program gives {count}")
        return list(spec.outputs)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def to_onnx(original: ProgramModule, spec: ModelSpec, target: Path) -> dict[str, Any]:
    """ONNX straight from the program: torch.onnx.export takes an ExportedProgram and keeps its
    shapes (a fixed batch stays fixed, and the server runs it in chunks as any fixed-batch ONNX)."""
    import onnx

    from servetool.convert.export import onnx as onnx_export

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            proto = torch.onnx.export(original.program, dynamo=True, external_data=False,
                                      input_names=[i.name for i in spec.inputs],
                                      output_names=output_names(original.program, spec),
                                      opset_version=spec.export.onnx_opset).model_proto
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of the program failed: {whole_cause(exc)}") from None
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    notes: dict[str, Any] = {"opset": opsets[0] if opsets else None}
    if spec.export.onnx_simplify:
        proto, notes["simplified"] = onnx_export._simplify(proto)
    onnx_export.write_metadata(proto, spec)
    onnx.save_model(proto, str(target), save_as_external_data=False)
    onnx_export.check(target)
    notes["nodes"] = len(proto.graph.node)
    return notes


def export(spec: ModelSpec, original, target: Path, fmt: Format) -> Artifact:
    """The program as model.pt2: the source file itself, or torch.export of a PyTorch model with
    a dynamic batch (and the spec's dynamic axes)."""
    if isinstance(original, ProgramModule):
        shutil.copyfile(spec.source.path, target)
        program = original.program
    elif isinstance(original, torch.jit.ScriptModule) or not isinstance(original, torch.nn.Module):
        raise ExportError(f"{spec.name}: torch.export takes a Python nn.Module; a "
                          f"{spec.source.kind} source cannot be exported to a program: use onnx "
                          "(or torchscript, for a TorchScript source)")
    else:
        program = export_module(spec, original)
        torch.export.save(program, str(target))
    least, most = program_batch(program)
    notes: dict[str, Any] = {"fixed_batch": least} if least == most else {}
    if most is not None and least != most:
        notes["batch_range"] = [least, most]
    options = {"output_names": output_names(program, spec)}
    return Artifact(fmt, target, [target], notes, options)


def export_module(spec: ModelSpec, model: torch.nn.Module):
    """torch.export of a PyTorch model with a dynamic batch (and the spec's dynamic axes)."""
    from servetool.convert.export.onnx import _dims

    example = example_batch(spec, 2)
    arrays = list(example.values()) if isinstance(example, dict) else [example]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, tuple(torch.from_numpy(a) for a in arrays),
                                       dynamic_shapes=_dims(spec))
    except Exception as exc:
        raise ExportError(f"torch.export.export failed: {whole_cause(exc)}") from None
