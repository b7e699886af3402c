"""The compression gate: the compressed model's score on the spec's validation set (top-1, or
cosine to the original's outputs: metric.py) against the ORIGINAL's (not against its own export,
which `package` gates as usual), refused past compress.max_accuracy_drop points unless accepted."""

from __future__ import annotations

from typing import Any

from servetool.convert.compress.common import CompressError


def judge(original: float, result: float, samples: int, limit: float, accept: bool,
          metric: str = "top-1") -> dict[str, Any]:
    """The verdict as data (`refusal` makes the error of a refused one)."""
    drop = round((original - result) * 100, 4)
    verdict = {"metric": metric, "samples": samples, "original": original, "result": result,
               "drop_points": drop, "max_drop_points": limit, "ok": drop <= limit}
    verdict["accepted_despite_drop"] = not verdict["ok"] and accept
    return verdict


def refusal(verdict: dict[str, Any], report: str) -> CompressError:
    shown = (lambda v: f"{v:.2%}") if verdict["metric"] == "top-1" else (lambda v: f"{v:.4f}")
    what = "top-1 accuracy" if verdict["metric"] == "top-1" else "the mean cosine to its outputs"
    return CompressError(
        f"compression gate: {what} fell from {shown(verdict['original'])} (the original) to "
        f"{shown(verdict['result'])} on {verdict['samples']} validation samples: "
        f"{verdict['drop_points']:.2f} points > allowed {verdict['max_drop_points']:.2f} "
        "(compress.max_accuracy_drop); train longer (a rerun resumes from the checkpoint), "
        f"prune less, or pass --accept (every step's numbers: {report})")
