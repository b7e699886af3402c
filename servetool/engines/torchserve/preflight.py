"""Pre-flight: load an unpacked archive's handler in a fresh interpreter and answer two requests.

One good request must come back 200 in the task's JSON shape, and one bad request must come back 4xx
in the same batch: the same checks a served model must pass, found before any server is started.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from servetool.errors import ServetoolError
from servetool.model.spec import ModelSpec

CHILD = Path(__file__).with_name("_preflight_child.py")
TIMEOUT_S = 180


class PreflightError(ServetoolError):
    pass


def sample_requests(spec: ModelSpec) -> list[tuple[bytes, str]]:
    """A good and a bad request body for the spec's task, with their content types."""
    rng = np.random.default_rng(0)
    if spec.task in ("image-classification", "object-detection"):
        from PIL import Image

        channels, height, width = spec.input_shape
        if spec.task == "object-detection":  # not square, so the letterbox pads
            height, width = height + 37, width * 2 - 11
        elif spec.preprocess.resize or spec.preprocess.center_crop:
            height, width = height * 2 + 3, width * 2 + 5  # exercise resizing and cropping
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
        return [(buffer.getvalue(), "image/png"), (b"this is not an image", "image/png")]
    if spec.is_text():
        good = json.dumps({"inputs": ["A first sentence.", "Une deuxième, plus longue phrase."]})
        return [(good.encode(), "application/json"), (b"\xff\xfe not UTF-8", "text/plain")]
    from servetool.convert.export import example_batch  # what the gate feeds: integers for int inputs

    example = example_batch(spec, 1)
    value = ({name: a[0].round(4).tolist() for name, a in example.items()}
             if isinstance(example, dict) else example[0].round(4).tolist())
    good = json.dumps(value).encode()
    return [(good, "application/json"), (b"[1, 2,", "text/plain")]


def _check_good(spec: ModelSpec, body: Any) -> str | None:
    if spec.task == "image-classification":
        if not isinstance(body, dict) or not body:
            return f"expected a {{label: probability}} object, got {body!r:.200}"
        if not all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in body.values()):
            return f"probabilities must be numbers in [0, 1], got {body!r:.200}"
        return None
    if spec.task == "object-detection":
        if not isinstance(body, list) or not all(
                isinstance(d, dict) and {"label", "class_id", "score", "box"} <= set(d) for d in body):
            return f"expected a list of {{label, class_id, score, box}}, got {body!r:.200}"
        return None
    if spec.is_text():
        key = {"feature-extraction": "embeddings", "text-classification": "predictions",
               "text-reranking": "predictions",
               "token-classification": "entities"}[spec.task]
        if not isinstance(body, dict) or not isinstance(body.get(key), list) or len(body[key]) != 2:
            return f"expected {{\"{key}\": [one per text]}} for 2 texts, got {body!r:.200}"
        return None
    # one output: a list; several: an object by output name
    return None if isinstance(body, (list, dict)) else f"expected JSON lists, got {body!r:.200}"


def run(model_dir: Path, spec: ModelSpec) -> dict[str, Any]:
    requests = sample_requests(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"body": base64.b64encode(b).decode(), "content_type": ct}
                   for b, ct in requests], f)
        requests_file = f.name
    try:
        proc = subprocess.run([sys.executable, str(CHILD), str(model_dir), requests_file],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PreflightError(f"pre-flight of {spec.name}: the handler did not answer within "
                             f"{TIMEOUT_S} s") from None
    finally:
        Path(requests_file).unlink(missing_ok=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise PreflightError(f"pre-flight of {spec.name}: the handler failed to load or answer:\n"
                             f"{tail}")
    result = json.loads(lines[-1])
    problems = []
    if result["servetool_imported"]:
        problems.append("the handler imports servetool, which a stock TorchServe does not have")
    if Path(result["handlers_from"]).resolve() != (model_dir / "handlers").resolve():
        problems.append(f"the handler imported `handlers` from {result['handlers_from']}, "
                        "not from the archive")
    good, bad = result["replies"]
    if good["status"] != 200:
        problems.append(f"a good request got status {good['status']}: {good['body']!r:.200}")
    elif (problem := _check_good(spec, good["body"])) is not None:
        problems.append(problem)
    if not 400 <= bad["status"] < 500 or "error" not in (bad["body"] or {}):
        problems.append(f"a bad request got {bad['status']} {bad['body']!r:.200}, not a 4xx error")
    if problems:
        raise PreflightError(f"pre-flight of {spec.name} failed: " + "; ".join(problems))
    return result
