"""TorchScript by trace or script.

Tracing records the operations one example input took: a forward with data-dependent control flow
(`if x.sum() > 0`) traces into a graph that is wrong for other inputs, silently. So a trace is
compared with eager on several inputs of other batch sizes and values before it is accepted; where
they disagree, `auto` scripts the model instead, and `trace` stops and says why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from handlers.batching import apply, batch_size
from servetool.convert.export import Artifact, ExportError, example_batch, runner_for
from servetool.errors import whole_cause
from servetool.model.formats import Format
from servetool.model.spec import ModelSpec


def probe_inputs(spec: ModelSpec) -> list:
    """Inputs unlike the tracing example: other batch sizes, lengths of dynamic axes, signs and
    scales."""
    base = [example_batch(spec, n, seed=100 + n, length=length)
            for n, length in ((1, 3), (3, 11), (5, 5))]
    if any(i.dtype.startswith("int") for i in spec.inputs):
        return base
    return base + [apply(base[1], np.negative), apply(base[1], lambda a: a * 10.0),
                   apply(base[2], np.abs), apply(base[0], np.zeros_like)]


def disagreement(model, candidate, inputs: list[np.ndarray], atol: float) -> str | None:
    """How a candidate TorchScript module differs from eager on the inputs, or None."""
    eager, other = runner_for(model), runner_for(candidate)
    for x in inputs:
        try:
            got = other(x)
        except Exception as exc:  # a trace with a frozen shape fails outright on another batch
            return (f"fails on a batch of {batch_size(x)}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]}")
        for i, (e, a) in enumerate(zip(eager(x), got, strict=False)):
            if e.shape != a.shape:
                return f"output {i} has shape {list(a.shape)} instead of {list(e.shape)}"
            diff = float(np.abs(e - a).max()) if e.size else 0.0
            # scaled as the gate scales it (gate.py): pixel-valued outputs reorder sums too
            bound = atol * max(1.0, float(np.abs(e).max())) if e.size else atol
            if not diff <= bound:
                return (f"output {i} differs by {diff:.3g} (> {bound:.3g}) on a batch of "
                        f"{batch_size(x)}")
    return None


def export(spec: ModelSpec, model, target: Path, fmt: Format) -> Artifact:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{spec.name}: torchscript needs a PyTorch model, the source is {model}")
    method = spec.export.torchscript_method
    probes = probe_inputs(spec)
    notes: dict[str, str] = {}
    module = None
    if isinstance(model, torch.jit.ScriptModule):
        module, notes["torchscript_method"] = model, "source"
    if module is None and method in ("auto", "trace"):
        traced = _trace(model, example_batch(spec, 2))
        problem = disagreement(model, traced, probes, fmt.atol)
        if problem is None:
            module, notes["torchscript_method"] = traced, "trace"
        elif method == "trace":
            raise ExportError(f"{spec.name}: the TorchScript trace disagrees with the eager model: "
                              f"{problem}. The forward likely has data-dependent control flow; set "
                              "export.torchscript_method: script (or auto)")
        else:
            notes["trace_rejected"] = problem
    if module is None:
        module = _script(spec, model, notes.get("trace_rejected"))
        problem = disagreement(model, module, probes, fmt.atol)
        if problem is not None:
            raise ExportError(f"{spec.name}: the scripted model disagrees with eager: {problem}")
        notes["torchscript_method"] = "script"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.save(str(target))
    return Artifact(fmt, target, [target], notes)


def _trace(model, example):
    import torch

    arrays = list(example.values()) if isinstance(example, dict) else [example]
    with warnings.catch_warnings():
        # jit.trace is deprecated in torch 2.13 but remains what TorchServe loads natively.
        warnings.simplefilter("ignore")
        try:
            return torch.jit.trace(model, tuple(torch.from_numpy(a) for a in arrays),
                                   check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {whole_cause(exc)}") from None


def _script(spec: ModelSpec, model, why: str | None):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(model)
        except Exception as exc:
            reason = f"the trace was rejected ({why}) and " if why else ""
            raise ExportError(f"{spec.name}: {reason}torch.jit.script failed: "
                              f"{whole_cause(exc)}") from None
