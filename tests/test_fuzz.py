"""Fuzzing the task preprocessing: mutated images of every accepted format and malformed JSON.

Nothing may escape a task's preprocess but the handler's own RequestError (a 4xx for that request
alone). Images: a seeded mutation loop over the committed corpus in tests/fuzz_corpus/ (bit flips,
interesting values in 8/16/32-bit fields, deleted, duplicated and inserted chunks, truncation,
splices of two files), a fixed number of seeded inputs per format, so that every machine runs the
same inputs (how long each takes, the slowest included, is benchmarks/fuzz_inputs.py's). JSON:
Hypothesis, with arbitrary JSON values, near-miss tensors and raw bytes. A failure lists each
distinct escape with a reproducing seed.
"""

from __future__ import annotations

import json
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.errors import RequestError
from handlers.imaging import DEFAULT_FORMATS
from handlers.tasks import ImageClassification, Tensor

CORPUS = Path(__file__).with_name("fuzz_corpus")
INPUTS_PER_FORMAT = 5000
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
              "TIFF": ".tif"}
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        if not out:
            out = bytearray(rng.choice(others))
        op = rng.randrange(8)
        pos = rng.randrange(len(out))
        if op == 0:  # flip a bit
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # an interesting byte
            out[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op == 2:  # an interesting 16/32-bit value, either byte order
            value = rng.choice(INTERESTING)
            fmt = rng.choice(["<H", ">H", "<I", ">I"])
            packed = struct.pack(fmt, value & (0xFFFF if fmt[1] == "H" else 0xFFFFFFFF))
            out[pos:pos + len(packed)] = packed
        elif op == 3:  # delete a chunk
            del out[pos:pos + rng.randrange(1, 64)]
        elif op == 4:  # duplicate a chunk
            chunk = out[pos:pos + rng.randrange(1, 64)]
            out[pos:pos] = chunk * rng.randrange(1, 4)
        elif op == 5:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randrange(1, 32))
        elif op == 6:  # truncate
            del out[pos:]
        else:  # splice with another file of the corpus
            other = rng.choice(others)
            cut = rng.randrange(len(other))
            out = out[:pos] + other[cut:]
    return bytes(out)


def mutated_inputs(fmt: str, count: int = INPUTS_PER_FORMAT):
    """(seed, task, bytes) for `count` mutated inputs of one format: the same on every machine."""
    seeds = [p.read_bytes() for p in sorted(CORPUS.glob(f"*{EXTENSIONS[fmt]}"))]
    others = [p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.is_file() and p.suffix != ".py"]
    assert seeds, f"no {fmt} files in {CORPUS}"
    tasks = [image_task(1), image_task(3)]
    rng = random.Random(f"servetool-fuzz-{fmt}")
    for _ in range(count):
        seed = rng.getrandbits(32)
        case = random.Random(seed)
        yield seed, tasks[seed % 2], mutate(case.choice(seeds), case, others)


def image_task(channels: int) -> ImageClassification:
    shape = [channels, 8, 8]
    return ImageClassification({"input_shape": shape, "preprocess": {
        "resize": [8, 8], "mean": [0.5], "std": [0.25]}}, None)


@pytest.mark.parametrize("fmt", DEFAULT_FORMATS)
def test_mutated_images_raise_only_request_errors(fmt):
    escapes: dict[tuple[str, str], str] = {}
    runs = accepted = 0
    warnings.simplefilter("ignore")  # Pillow warns about much of what it is fed here
    for seed, task, data in mutated_inputs(fmt):
        try:
            out = task.preprocess(data)
            assert out.shape == (task.channels, 8, 8) and np.isfinite(out).all()
            accepted += 1
        except RequestError as error:
            assert 400 <= error.status < 500, (seed, error.status, error.message)
        except Exception as exc:  # an escape: the test's finding
            key = (type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
            escapes.setdefault(key, f"seed {seed}")
        runs += 1
    assert runs == INPUTS_PER_FORMAT
    assert not escapes, f"{fmt}: {len(escapes)} distinct escapes in {runs} inputs: {escapes}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children,
                                                                      max_size=4),
    max_leaves=40)


def near_tensor(draw_cell):
    """Arrays that are almost [2, 3]: right nesting, a wrong cell or a wrong length here and there."""
    row = st.lists(draw_cell, min_size=2, max_size=4)
    return st.lists(row, min_size=1, max_size=3)


CELLS = st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.booleans() | st.none() | st.text(max_size=3)


def check_tensor(payload, dtype: str) -> None:
    task = Tensor({"input_shape": [2, 3], "input_dtype": dtype}, None)
    try:
        out = task.preprocess(payload)
    except RequestError as error:
        assert 400 <= error.status < 500
        return
    assert out.shape == (2, 3) and out.dtype == np.dtype(dtype)
    assert out.dtype.kind == "i" or np.isfinite(out).all()


FUZZ_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


@FUZZ_SETTINGS
@given(value=json_values | near_tensor(CELLS), dtype=st.sampled_from(["float32", "int64", "int32"]),
       as_text=st.booleans())
def test_json_values_raise_only_request_errors(value, dtype, as_text):
    payload = json.dumps(value).encode() if as_text else value
    check_tensor(payload, dtype)
    check_tensor({"data": value}, dtype)


@FUZZ_SETTINGS
@given(data=st.binary(max_size=64), seed_cut=st.integers(0, 400))
def test_malformed_json_bytes_raise_only_request_errors(data, seed_cut):
    base = (CORPUS / "tensor.json").read_bytes()
    for payload in (data, base[:seed_cut] + data, base[:seed_cut] + data + base[seed_cut:]):
        check_tensor(payload, "float32")
