"""The gate: the original model against its converted artifact, with explicit tolerances.

Like Optimum's validate step, a failure names which output drifted, by how much, and the bound it
broke. Two checks: parity on sample inputs (max abs/rel diff and cosine similarity for every output,
top-1 agreement for a classifier's scores only, bounds per format), and, where the spec names a
labelled validation set, top-1 accuracy of original vs converted.

The parity bound fits the output's scale. Every value must satisfy, as numpy.allclose,

    |converted - original| <= atol * max(1, max|original|) + rtol * |original|

with max|original| taken over the whole output. A float32 conversion reorders sums, and the error
that leaves grows with the size of the numbers summed, not with a fixed constant: a detector's boxes
in pixels (0..320) or large logits drift by more than 1e-4 in a correct ONNX export, while a
probability or an embedding (|values| <= 1) keeps the plain `atol`. A real drift (a wrong weight, a
box moved by a pixel) is still orders of magnitude over the bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from handlers.batching import apply, batch_size, take
from servetool.convert.export import as_input_dtypes
from servetool.errors import ServetoolError
from servetool.model.formats import get_format
from servetool.model.samples import load_data
from servetool.model.spec import ModelSpec, Tolerance

ACCURACY_BATCH = 64


class ValidationError(ServetoolError):
    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Limits:
    atol: float  # scaled per output by max(1, max|original|): see this module's docstring
    rtol: float  # relative to each original value, elementwise (numpy.allclose's rtol)
    min_top1_agreement: float
    max_accuracy_drop: float  # percentage points
    # detectors (detection_gate.py): points of mAP@0.5:0.95, and the share of the original's boxes
    # found again (per precision: MAP_DROP, BOX_MATCH)
    max_map_drop: float
    min_box_match: float
    min_cosine: float | None = None  # per example, for outputs that are vectors (the spec's)


# A detector's allowances by precision: full precision moves boxes by rounding only; reduced
# precision moves scores near the threshold, which adds or drops a few boxes (the issue's
# bound for int8: one point of mAP).
MAP_DROP = {"fp32": 0.2, "fp16": 0.5, "bf16": 0.5, "int8": 1.0}
BOX_MATCH = {"fp32": 0.99, "fp16": 0.95, "bf16": 0.95, "int8": 0.9}


def limits_for(fmt: str, tolerance: Tolerance = Tolerance(), atol: float | None = None,
               task: str | None = None) -> Limits:
    """The format's defaults, overridden by the spec's tolerance section, then by --atol.
    Embeddings are judged by cosine similarity too, the lowest over the sample texts: >= 0.999
    at full precision, >= 0.98 below (all-MiniLM-L6-v2 in per-row int8 over servetool's
    representative texts: 0.9826 at worst, 0.994 on average; benchmarks/text_int8.py)."""
    f = get_format(fmt)
    cosine = tolerance.min_cosine
    if cosine is None and task == "feature-extraction":
        cosine = 0.999 if f.precision == "fp32" else 0.98
    pick = lambda override, default: default if override is None else float(override)  # noqa: E731
    return Limits(
        atol=pick(atol, pick(tolerance.atol, f.atol)),
        rtol=pick(tolerance.rtol, f.rtol),
        min_top1_agreement=pick(tolerance.min_top1_agreement, f.min_top1_agreement),
        max_accuracy_drop=pick(tolerance.max_accuracy_drop, f.max_accuracy_drop),
        min_cosine=None if cosine is None else float(cosine),
        max_map_drop=pick(tolerance.max_map_drop, MAP_DROP[f.precision]),
        min_box_match=pick(tolerance.min_box_match, BOX_MATCH[f.precision]),
    )


# A relative difference is reported only for values at least this share of the output's scale:
# next to a value that is practically 0, any difference is "infinitely" relative and says nothing.
REL_DIFF_FLOOR = 1e-3


def scaled_atol(atol: float, magnitude: float) -> float:
    """The absolute part of the parity bound for an output whose largest |value| is `magnitude`."""
    return atol * max(1.0, magnitude)


@dataclass
class OutputParity:
    name: str
    max_abs_diff: float
    max_rel_diff: float  # over values >= REL_DIFF_FLOOR x max(1, max|original|)
    bound: float  # atol (scaled) + rtol * |original| at the value with the largest abs diff
    top1_agreement: float | None  # a classifier's scores only
    shape: list[int]
    min_cosine: float | None = None  # the lowest per-example cosine similarity (embeddings)
    atol: float = 0.0  # the absolute bound applied: limits.atol * max(1, max|original|)
    rtol: float = 0.0
    values_outside: int = 0  # values whose difference broke their bound


@dataclass
class Accuracy:
    samples: int
    original: float  # top-1, in [0, 1]
    converted: float
    drop_points: float  # (original - converted) * 100


@dataclass
class ValidationReport:
    format: str
    limits: Limits
    samples: int = 0
    outputs: list[OutputParity] = field(default_factory=list)
    accuracy: Accuracy | None = None
    detection: dict | None = None  # a detector's box agreement and mAP (detection_gate.py)
    batch_independence: dict | None = None  # text models: each text alone vs in a mixed batch
    problems: list[str] = field(default_factory=list)
    accepted_despite_problems: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def atol(self) -> float:
        return self.limits.atol

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_parity(original, artifact, batches: list[np.ndarray], fmt: str,
                 limits: Limits | None = None, output_names: list[str] | None = None,
                 report: ValidationReport | None = None, classifier: bool = True
                 ) -> ValidationReport:
    """Run both runners on each batch and compare every output; never raises on drift."""
    limits = limits or limits_for(fmt)
    report = report or ValidationReport(format=fmt, limits=limits)
    report.samples += sum(batch_size(b) for b in batches)
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
                report.problems.append(f"output '{_name(output_names, i)}' has shape "
                                       f"{list(a.shape)} in the {fmt} artifact but "
                                       f"{list(e.shape)} in the original (batch of "
                                       f"{batch_size(batch)})")
                return report
            per_output.setdefault(i, []).append((e, a))
    for i, pairs in per_output.items():
        report.outputs.append(_compare(_name(output_names, i), pairs, fmt, limits, report.problems,
                                       classifier and len(per_output) == 1))
    return report


def _compare(name: str, pairs, fmt: str, limits: Limits, problems: list[str],
             classifier: bool) -> OutputParity:
    """One output over every batch (batches may differ in a dynamic axis's length)."""
    flat = [(e.reshape(len(e), -1).astype(np.float64), a.reshape(len(a), -1).astype(np.float64))
            for e, a in pairs]
    finite = all(bool(np.isfinite(a).all()) for _, a in flat)
    # the output's scale over every batch, so one batch of small values is not judged tighter
    scale = max((float(np.abs(e).max()) for e, _ in flat if e.size), default=0.0)
    atol = scaled_atol(limits.atol, scale)
    rel_floor = REL_DIFF_FLOOR * max(1.0, scale)
    max_abs = max_rel = 0.0
    bound = atol
    outside = total = 0
    worst: tuple[float, int, int] | None = None  # (diff / bound, batch, flat index)
    hits = rows = 0
    cosine: float | None = None
    for b, (e, a) in enumerate(flat):
        if not e.size:
            continue
        diff = np.abs(e - a)
        allowed = atol + limits.rtol * np.abs(e)
        k = int(np.argmax(diff))
        if diff.flat[k] > max_abs:
            max_abs, bound = float(diff.flat[k]), float(allowed.flat[k])
        significant = np.abs(e) >= rel_floor
        if significant.any():
            max_rel = max(max_rel, float((diff[significant] / np.abs(e[significant])).max()))
        over = diff > allowed
        total += diff.size
        if over.any():
            outside += int(over.sum())
            ratio = np.where(over, diff / np.maximum(allowed, 1e-300), 0.0)
            j = int(np.argmax(ratio))
            if worst is None or ratio.flat[j] > worst[0]:
                worst = (float(ratio.flat[j]), b, j)
        if e.shape[1] > 1:
            norms = np.linalg.norm(e, axis=1) * np.linalg.norm(a, axis=1)
            low = float(np.min(np.where(norms > 0, (e * a).sum(1) / np.maximum(norms, 1e-300),
                                        1.0)))
            cosine = low if cosine is None else min(cosine, low)
            hits += int((e.argmax(1) == a.argmax(1)).sum())
            rows += len(e)
    top1 = hits / rows if classifier and rows and len(pairs[0][0].shape) == 2 else None
    if not finite:
        problems.append(f"output '{name}' of the {fmt} artifact has NaN or infinity")
    elif worst is not None:
        _, b, j = worst
        e, a = flat[b][0].flat[j], flat[b][1].flat[j]
        where = list(int(i) for i in np.unravel_index(j, pairs[b][0].shape))
        rel = f"{abs(e - a) / abs(e):.3g}" if e else "inf"
        problems.append(
            f"output '{name}' drifted: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}; "
            f"{outside} of {total} values break |converted - original| <= atol {atol:.3g} "
            f"({limits.atol:.3g} x max(1, max|original| {scale:.4g})) + rtol {limits.rtol:.3g} x "
            f"|original|; worst at {where} of a batch of {len(flat[b][0])}: original {e:.7g}, "
            f"converted {a:.7g}, abs diff {abs(e - a):.3g} > bound "
            f"{atol + limits.rtol * abs(e):.3g}, rel diff {rel}")
    if top1 is not None and top1 < limits.min_top1_agreement:
        problems.append(f"output '{name}': top-1 agreement with the original {top1:.1%} < "
                        f"required {limits.min_top1_agreement:.1%}")
    if cosine is not None and limits.min_cosine is not None and cosine < limits.min_cosine:
        problems.append(f"output '{name}': cosine similarity with the original down to "
                        f"{cosine:.10g} < required {limits.min_cosine}")
    return OutputParity(name, max_abs, max_rel, bound, top1, list(pairs[0][0].shape[1:]), cosine,
                        atol, limits.rtol, outside)


def top1_accuracy(run, x, y: np.ndarray) -> float:
    """Share of samples whose first output's argmax is the label (x: an array, or feeds)."""
    hits, count = 0, batch_size(x)
    for start in range(0, count, ACCURACY_BATCH):
        out = run(apply(take(x, start, start + ACCURACY_BATCH), np.ascontiguousarray))[0]
        hits += int((np.asarray(out).argmax(1) == y[start:start + ACCURACY_BATCH]).sum())
    return hits / count


def check_accuracy(original, artifact, x, y: np.ndarray, limits: Limits,
                   report: ValidationReport) -> ValidationReport:
    before, after = top1_accuracy(original, x, y), top1_accuracy(artifact, x, y)
    drop = (before - after) * 100
    report.accuracy = Accuracy(batch_size(x), before, after, drop)
    if drop > limits.max_accuracy_drop:
        report.problems.append(f"top-1 accuracy fell from {before:.2%} to {after:.2%} on "
                               f"{batch_size(x)} validation samples: {drop:.2f} points > allowed "
                               f"{limits.max_accuracy_drop:.2f}")
    return report


def validate(spec: ModelSpec, original, artifact, fmt: str, limits: Limits,
             random_batches: list[np.ndarray], real_batches: list[np.ndarray],
             output_names: list[str] | None = None) -> ValidationReport:
    """Parity on real inputs (and random ones for full-precision formats), then accuracy."""
    report = ValidationReport(format=fmt, limits=limits)
    batches = list(real_batches)
    if get_format(fmt).precision == "fp32" or not batches:
        # random inputs probe the whole input range, but a reduced-precision model is calibrated
        # for real data only, so it is judged on that when there is any
        batches += random_batches
    # A classifier: the image task, or a model whose labelled validation set declares it one.
    # A score head (a cross-encoder's one output, a regression) has no class to agree on: its
    # outputs are judged by their differences alone (the logits' max abs diff bounds the
    # sigmoid scores' too, the sigmoid's slope being at most 1/4).
    score_head = spec.text is not None and spec.text.head in ("score", "regression")
    classifier = not score_head and (spec.task in ("image-classification", "text-classification")
                                     or (spec.validation is not None
                                         and spec.validation.has_labels))
    check_parity(original, artifact, batches, fmt, limits, report=report, classifier=classifier,
                 output_names=output_names)
    if spec.is_text() and report.outputs:
        check_batch_independence(spec, artifact, fmt, report)
    if spec.task == "object-detection":
        from servetool.convert import detection_gate

        if report.outputs:
            found = detection_gate.check(spec, original, artifact, fmt, limits.max_map_drop,
                                         limits.min_box_match, report.problems)
            report.detection = found.as_dict() if found else None
        return report
    if spec.validation is not None and report.outputs:
        x, y = load_data(spec, spec.validation)
        if y is not None:
            check_accuracy(original, artifact, as_input_dtypes(spec, x), y, limits, report)
    return report


# A text must read the same alone and beside any other texts (issue 24): ONNX Runtime's dynamic
# int8 takes one activation scale per batch, and all-MiniLM-L6-v2's vector for a sentence alone
# and beside a long text had cosine 0.953. Full precision and per-row int8 differ by summation
# order only (about 1e-7), so the bounds are tight and still far from rounding noise.
MIN_BATCH_COSINE = 0.9999  # embeddings
MAX_BATCH_DIFF = 1e-3  # other outputs (logits, token scores): x max(1, max|alone|)
MIXED_BATCH = 8  # texts per mixed batch: the longest sample text and 7 others


def check_batch_independence(spec: ModelSpec, artifact, fmt: str,
                             report: ValidationReport) -> None:
    """Each representative text run alone, then inside a batch of MIXED_BATCH texts of mixed
    lengths led by the longest; every output row must read the same. Names the worst text."""
    from servetool.model.samples import collate_texts, encode_texts, representative_texts

    texts, _ = representative_texts(spec)
    encoded = encode_texts(spec, texts)  # once: a pair model keeps each text's pair
    longest = max(range(len(encoded)), key=lambda i: encoded[i].tokens)
    others = [i for i in range(len(encoded)) if i != longest]
    embeddings = spec.task == "feature-extraction"
    worst: tuple[float, int] | None = None  # (cosine, or diff / bound; text index)
    for start in range(0, len(others), MIXED_BATCH - 1):
        rows = [longest, *others[start:start + MIXED_BATCH - 1]]
        mixed = artifact(collate_texts(spec, [encoded[i] for i in rows]))
        for row, i in enumerate(rows):
            alone = artifact(collate_texts(spec, [encoded[i]]))
            score = _same_reading(alone, mixed, row, embeddings)
            if worst is None or (score < worst[0] if embeddings else score > worst[0]):
                worst = (score, i)
    if worst is None:
        return
    score, i = worst
    key = "min_cosine" if embeddings else "max_diff_over_bound"
    report.batch_independence = {"texts": len(texts), "batch": MIXED_BATCH, key: score,
                                 "worst_text": texts[i][:80]}
    if embeddings and score < MIN_BATCH_COSINE or not embeddings and score > 1.0:
        reading = (f"cosine {score:.6f} < {MIN_BATCH_COSINE}" if embeddings else
                   f"max abs diff {score:.3g} x the bound {MAX_BATCH_DIFF} x max(1, max|value|)")
        report.problems.append(
            f"text {texts[i][:60]!r} reads differently alone and in a batch of {MIXED_BATCH} "
            f"texts of mixed lengths ({reading}): the {fmt} artifact's answer depends on the "
            "other texts of a request (a scale taken over the whole batch, as ONNX Runtime's "
            "dynamic int8 does, or padding that leaks); use servetool's onnx-int8 (per-row "
            "scales) or a full-precision format")


def _same_reading(alone: list, mixed: list, row: int, embeddings: bool) -> float:
    """Embeddings: the lowest cosine over outputs; others: the largest |difference| over its
    bound. A row of the mixed batch is cut to the text's own tokens (the rest is padding)."""
    worst = 1.0 if embeddings else 0.0
    for a, m in zip(alone, mixed, strict=True):
        a = np.asarray(a, np.float64)[0]
        m = np.asarray(m, np.float64)[row]
        if a.shape != m.shape:  # per-token outputs: [tokens, ...] padded to the longest
            m = m[tuple(slice(0, n) for n in a.shape)]
        if embeddings:
            norms = float(np.linalg.norm(a) * np.linalg.norm(m))
            worst = min(worst, float((a * m).sum()) / norms if norms else 1.0)
        else:
            bound = MAX_BATCH_DIFF * max(1.0, float(np.abs(a).max(initial=0.0)))
            worst = max(worst, float(np.abs(a - m).max(initial=0.0)) / bound)
    return worst


def require(report: ValidationReport, model: str, accept: bool = False) -> ValidationReport:
    """Stop on a failed report, naming every problem, unless the user explicitly accepts it."""
    if not report.ok:
        if accept:
            report.accepted_despite_problems = True
            return report
        raise ValidationError(f"{model}: the {report.format} artifact fails the gate: "
                              + "; ".join(report.problems)
                              + " (--accept-drift packages it anyway)", report)
    return report


def _name(names: list[str] | None, i: int) -> str:
    return names[i] if names and i < len(names) else f"output_{i}"
