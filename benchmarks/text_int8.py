"""int8 schemes for a text model side by side, in one run (issue 24): all-MiniLM-L6-v2 (models/minilm).

Per scheme: batch independence (each text alone vs inside a batch of 8 led by a ~200-token text:
min cosine), cosine to fp32 over servetool's representative texts plus held-out varied ones (min,
mean), and bare ONNX Runtime latency at 1 thread, batch 1 and 16, next to fp32's.
Schemes: per-row (servetool's onnx-int8 for text), ONNX Runtime dynamic (one activation scale per
batch), static QDQ calibrated on the representative texts (per tensor; per-channel 7-bit weights;
MatMul/Gemm only).

Run: .venv/bin/python benchmarks/text_int8.py
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servetool.convert import export  # noqa: E402
from servetool.convert.export.quantize import _preprocessed, dynamic_int8, per_row_int8  # noqa: E402
from servetool.model.samples import representative_texts, text_batch  # noqa: E402
from servetool.model.spec import load_spec  # noqa: E402

HELD_OUT = ["Plain English, nothing special.", "naïve façade coöperate — déjà vu ÀÉÎÕÜ",
            "東京は日本の首都です。我今天很高兴见到你。서울의 겨울", "Emoji 😍🔥👍🏽 and a flag 🇫🇷",
            "Numbers 3.14159, $1,249.99 and 2026-12-01T18:17:01Z", "tabs\tand\nnewlines\r\nmixed",
            "Привет, как дела? Сегодня хорошая погода.", "مرحبا بك في المدينة القديمة",
            "नमस्ते, आप कैसे हैं?", "SELECT * FROM users WHERE id = 42;", "lol ok 👍", "word " * 400]
LONG = "The committee reviewed the evidence over several weeks and concluded. " * 20


def static(spec, base: Path, target: Path, texts: list[str], per_channel: bool, ops) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = iter([text_batch(spec, texts[i:i + 4]) for i in range(0, len(texts), 4)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    # in a scratch folder: ONNX Runtime's quantizer leaves a 90 MB uuid.data in the working one
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        quantize_static(str(base.resolve()), str(target.resolve()), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=ops)


def latency_ms(run, feeds, seconds: float = 1.5) -> float:
    run(feeds)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def cosine(a, b) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    spec = load_spec(ROOT / "models" / "minilm")
    texts, _ = representative_texts(spec)
    every = texts + HELD_OUT
    names = [i.name for i in spec.inputs]
    with tempfile.TemporaryDirectory(prefix="servetool-text-int8-") as tmp:
        folder = Path(tmp)
        base = export.export(spec, export.load_original(spec), folder / "fp32", "onnx").path
        pre = _preprocessed(base, folder)
        schemes = {"fp32": lambda t: None,
                   "per-row (onnx-int8)": lambda t: per_row_int8(pre, t),
                   "dynamic (ORT)": lambda t: dynamic_int8(base, t),
                   "static, per tensor": lambda t: static(spec, pre, t, texts, False, None),
                   "static, per-channel 7-bit": lambda t: static(spec, pre, t, texts, True, None),
                   "static, MatMul/Gemm only": lambda t: static(spec, pre, t, texts, True,
                                                                ["MatMul", "Gemm"])}
        runners = {}
        for i, (name, make) in enumerate(schemes.items()):
            path = base if name == "fp32" else folder / f"{i}.onnx"
            make(path)
            runners[name] = export.artifact_runner("onnx", path, 1, input_names=names)
        fp32 = [runners["fp32"](text_batch(spec, [t]))[0][0] for t in every]
        one, sixteen = text_batch(spec, texts[1:2]), text_batch(spec, texts[:16])
        base_ms = (latency_ms(runners["fp32"], one), latency_ms(runners["fp32"], sixteen))
        print("| scheme | alone vs batch: min cosine | cosine to fp32: min | mean | "
              "b=1 ms (fp32) | b=16 ms (fp32) |\n|---|---|---|---|---|---|")
        for name, run in runners.items():
            alone = [run(text_batch(spec, [t]))[0][0] for t in every]
            mixed = [run(text_batch(spec, [LONG, *texts[:3], t, *texts[3:6]]))[0][4]
                     for t in every]
            independent = min(cosine(a, m) for a, m in zip(alone, mixed, strict=True))
            to_fp32 = [cosine(a, f) for a, f in zip(alone, fp32, strict=True)]
            print(f"| {name} | {independent:.6f} | {min(to_fp32):.4f} | {np.mean(to_fp32):.4f} | "
                  f"{latency_ms(run, one):.2f} ({base_ms[0]:.2f}) | "
                  f"{latency_ms(run, sixteen):.1f} ({base_ms[1]:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
