"""The compression gate: the compressed model's top-1 accuracy on the spec's validation set
against the ORIGINAL's (not against its own export, which `package` gates as usual), refused past
compress.max_accuracy_drop points unless accepted."""

from __future__ import annotations

from typing import Any

from servetool.convert.compress.common import CompressError


def judge(original: float, result: float, samples: int, limit: float, accept: bool
          ) -> dict[str, Any]:
    """The verdict as data; raises CompressError when the drop is refused."""
    drop = round((original - result) * 100, 4)
    verdict = {"metric": "top-1", "samples": samples, "original": original, "result": result,
               "drop_points": drop, "max_drop_points": limit, "ok": drop <= limit}
    verdict["accepted_despite_drop"] = not verdict["ok"] and accept
    return verdict


def refusal(verdict: dict[str, Any], report: str) -> CompressError:
    return CompressError(
        f"compression gate: top-1 accuracy fell from {verdict['original']:.2%} (the original) to "
        f"{verdict['result']:.2%} on {verdict['samples']} validation samples: "
        f"{verdict['drop_points']:.2f} points > allowed {verdict['max_drop_points']:.2f} "
        "(compress.max_accuracy_drop); train longer (a rerun resumes from the checkpoint), "
        f"prune less, or pass --accept (every step's numbers: {report})")
