"""The parity gate: the original model against its exported artifact, with explicit tolerances.

Like Optimum's validate step: a failure names which output drifted, by how much, and the tolerance
it broke, so the user knows whether to loosen a tolerance or fix the export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from servetool.errors import ServetoolError

# fp32 exports reorder floating-point sums; 1e-4 absolute leaves room for that and nothing more.
DEFAULT_ATOL = {"torchscript": 1e-5, "onnx": 1e-4}


class ValidationError(ServetoolError):
    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class OutputParity:
    name: str
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None  # for outputs with a class axis
    shape: list[int]


@dataclass
class ParityReport:
    format: str
    atol: float
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_parity(original, artifact, batches: list[np.ndarray], fmt: str,
                 atol: float | None = None, min_top1: float = 1.0,
                 output_names: list[str] | None = None) -> ParityReport:
    """Run both runners on each batch and compare every output; never raises on drift."""
    atol = DEFAULT_ATOL.get(fmt, 1e-4) if atol is None else atol
    report = ParityReport(format=fmt, atol=atol, samples=sum(len(b) for b in batches))
    per_output: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for batch in batches:
        expected, actual = original(batch), artifact(batch)
        if len(expected) != len(actual):
            report.problems.append(f"the original has {len(expected)} output(s), the "
                                   f"{fmt} artifact {len(actual)}")
            return report
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            e, a = np.asarray(e), np.asarray(a)
            if e.shape != a.shape:
                name = _name(output_names, i)
                report.problems.append(f"output '{name}' has shape {list(a.shape)} in the {fmt} "
                                       f"artifact but {list(e.shape)} in the original "
                                       f"(batch of {len(batch)})")
                return report
            per_output.setdefault(i, []).append((e, a))
    for i, pairs in per_output.items():
        name = _name(output_names, i)
        e = np.concatenate([p[0].reshape(len(p[0]), -1) for p in pairs]).astype(np.float64)
        a = np.concatenate([p[1].reshape(len(p[1]), -1) for p in pairs]).astype(np.float64)
        diff = np.abs(e - a)
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(e), 1e-12)).max()) if diff.size else 0.0
        top1 = float((e.argmax(1) == a.argmax(1)).mean()) if e.ndim == 2 and e.shape[1] > 1 else None
        report.outputs.append(OutputParity(name, max_abs, max_rel, top1, list(pairs[0][0].shape[1:])))
        if not np.isfinite(a).all():
            report.problems.append(f"output '{name}' of the {fmt} artifact has NaN or infinity")
        elif max_abs > atol:
            report.problems.append(f"output '{name}' drifted: max abs diff {max_abs:.3g} > "
                                   f"tolerance {atol:.3g} (max rel diff {max_rel:.3g})")
        if top1 is not None and top1 < min_top1:
            report.problems.append(f"output '{name}': top-1 agreement {top1:.1%} < required "
                                   f"{min_top1:.1%}")
    return report


def require_parity(report: ParityReport, model: str) -> ParityReport:
    """Stop packaging on a failed report, naming every drift."""
    if not report.ok:
        raise ValidationError(f"{model}: the {report.format} export fails the parity check: "
                              + "; ".join(report.problems), report)
    return report


def _name(names: list[str] | None, i: int) -> str:
    return names[i] if names and i < len(names) else f"output_{i}"
