"""ONNX Runtime's transformer optimizer as a format of its own: the exported graph with attention,
LayerNorm (with its residual add) and GELU rewritten as ONNX Runtime's fused CPU kernels.

Which fusions applied is reported (a graph the optimizer does not recognise gets none, and the
format is then plain fp32 ONNX under another name: the notes say so).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from servetool.convert.export import Artifact, ExportError
from servetool.model.formats import Format
from servetool.model.spec import ModelSpec

# The families ONNX Runtime's "bert" optimizer covers (encoder-only transformers).
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet",
             "albert", "deberta", "deberta-v2"}


def _shape(spec: ModelSpec) -> tuple[int, int]:
    """(attention heads, hidden size) from the Hugging Face config, refusing a family the
    optimizer does not cover; 0, 0 (the optimizer guesses) for other sources."""
    if spec.source.kind != "transformers":
        return 0, 0
    from servetool.model import hf

    config = hf.read_json(spec.source.path / "config.json")
    family = config.get("model_type")
    if family not in BERT_LIKE:
        raise ExportError(f"{spec.name}: onnx-transformer fuses encoder transformers "
                          f"({', '.join(sorted(BERT_LIKE))}); this model is {family!r}")
    heads = config.get("num_attention_heads") or config.get("n_heads") or 0
    hidden = config.get("hidden_size") or config.get("dim") or 0
    return int(heads), int(hidden)


def optimize(spec: ModelSpec, base: Path, target: Path, fmt: Format) -> Artifact:
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _shape(spec)
    noise = logging.getLogger("onnxruntime.transformers")
    level = noise.level
    noise.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(str(base), model_type="bert", num_heads=heads,
                                   hidden_size=hidden, opt_level=0, use_gpu=False)
            fused = {op: int(n) for op, n in model.get_fused_operator_statistics().items() if n}
            model.save_model_to_file(str(target))
    except Exception as exc:
        from servetool.errors import whole_cause

        raise ExportError(f"{spec.name}: ONNX Runtime's transformer optimizer failed: "
                          f"{whole_cause(exc)}") from None
    finally:
        noise.setLevel(level)
    applied = ", ".join(f"{op} x{n}" for op, n in sorted(fused.items())) or "none applied"
    return Artifact(fmt, target, [target], {"fusions": applied})
