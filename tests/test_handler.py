"""The handler in-process: tasks on real images and JSON, and a whole batch through ServeHandler
with TorchServe's own Context, on real exported artifacts of the digits model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context

from handlers.entry import ServeHandler, quiet_request_lines
from handlers.runtimes import threads_per_worker
from handlers.tasks import ImageClassification, RequestError, Tensor, request_payload
from servetool.convert import export
from servetool.engines.torchserve import archive
from servetool.model.formats import get_format
from servetool.model.spec import load_spec
from tests.conftest import DIGITS, png_bytes, serve_in_process, write_spec

SPEC = load_spec(DIGITS)
IMAGE_CONFIG = archive.handler_config(SPEC, export.Artifact(get_format("onnx"), Path("model.onnx"), []))
LABELS = SPEC.label_names()


def image_bytes(mode: str, size: tuple[int, int], fmt: str = "PNG", value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(buffer, fmt)
    return buffer.getvalue()


def test_image_preprocess_matches_the_training_normalisation(held_out):
    images, _ = held_out
    task = ImageClassification(IMAGE_CONFIG, LABELS)
    for image in images[:20]:
        got = task.preprocess(png_bytes(image))
        # what train.py feeds the model: pixels in [0, 1], then (x - mean) / std
        expected = (np.rint(image * 255) / 255 - SPEC.preprocess.mean[0]) / SPEC.preprocess.std[0]
        assert got.shape == (1, 8, 8) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"),
                                       ("L", "BMP"), ("RGB", "WEBP"), ("CMYK", "TIFF")])
def test_common_formats_and_modes_decode_to_the_model_shape(mode, fmt):
    task = ImageClassification(IMAGE_CONFIG, LABELS)
    out = task.preprocess(image_bytes(mode, (40, 30), fmt))
    assert out.shape == (1, 8, 8) and np.isfinite(out).all()


@pytest.mark.parametrize("payload, status, words", [
    (b"", 400, "empty request body"),
    (b"\x89PNG\r\n\x1a\n garbage", 400, "not an image in an accepted format"),
    (image_bytes("L", (64, 64))[:60], 400, "could not be decoded"),
    ({"data": [1, 2]}, 415, "got JSON"),
])
def test_bad_images_raise_request_errors(payload, status, words):
    task = ImageClassification(IMAGE_CONFIG, LABELS)
    with pytest.raises(RequestError) as err:
        task.preprocess(payload)
    assert err.value.status == status and words in err.value.message


def test_pixel_limit_is_checked_before_decoding():
    config = {**IMAGE_CONFIG, "preprocess": {**IMAGE_CONFIG["preprocess"], "max_pixels": 10_000}}
    task = ImageClassification(config, LABELS)
    with pytest.raises(RequestError) as err:
        task.preprocess(image_bytes("L", (200, 100)))
    assert err.value.status == 413 and "200x100 = 20000 pixels" in err.value.message


def test_wrong_size_without_resize_is_a_clear_400():
    config = {**IMAGE_CONFIG, "preprocess": {**IMAGE_CONFIG["preprocess"], "resize": None}}
    with pytest.raises(RequestError, match="takes 8x8"):
        ImageClassification(config, LABELS).preprocess(image_bytes("L", (20, 20)))


def test_postprocess_gives_top_k_labels_by_probability():
    task = ImageClassification(IMAGE_CONFIG, LABELS)
    logits = np.array([0.1, 5.0, 0.2, 3.0, 0, 0, 0, 0, 0, 0], np.float32)
    out = task.postprocess([logits])
    assert list(out) == ["one", "three", "two"]
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    assert out["one"] == pytest.approx(float(probs[1]), abs=1e-6)


def test_tensor_task_parses_and_rejects():
    task = Tensor({"input_shape": [1, 8, 8], "input_dtype": "float32"}, None)
    grid = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    np.testing.assert_array_equal(task.preprocess(json.dumps(grid.tolist()).encode()), grid)
    np.testing.assert_array_equal(task.preprocess({"data": grid.tolist()}), grid)
    cases = [
        (b"[1, 2,", "not valid JSON"),
        ([[1, 2], [3]], "rectangular array"),
        ([[["a"] * 8] * 8], "takes numbers only, got strings"),
        ([[[True] * 8] * 8], "takes numbers only, got booleans"),
        ([[0.0] * 8] * 8, "shape [8, 8], the model takes [1, 8, 8]"),
        ({"inputs": []}, "under \"data\""),
        (b"", "empty request body"),
        ("[[[NaN]]]", "contains NaN"),
    ]
    for payload, words in cases:
        with pytest.raises(RequestError) as err:
            task.preprocess(payload)
        assert err.value.status == 400 and words in err.value.message, (payload, err.value.message)
    nan = np.full((1, 8, 8), np.nan).tolist()
    with pytest.raises(RequestError, match="NaN"):
        task.preprocess(json.dumps(nan))


def test_request_payload_takes_body_or_first_form_field():
    assert request_payload({"body": b"x"}) == b"x"
    assert request_payload({"data": b"y"}) == b"y"
    assert request_payload({"file": b"z"}) == b"z"
    with pytest.raises(RequestError):
        request_payload({})


def test_threads_never_oversubscribe():
    assert threads_per_worker(1, cores=2) == 2
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(8, cores=2) == 1
    assert threads_per_worker(2, cores=16) == 8
    assert threads_per_worker(None, cores=16) == 1  # auto: a worker per core, a thread each


@pytest.fixture(scope="module", params=["onnx", "torchscript", "openvino", "onnx-int8-static"])
def model_dir(request, tmp_path_factory):
    """A folder laid out like an unpacked archive, for each runtime."""
    folder = tmp_path_factory.mktemp(request.param)
    spec = load_spec(write_spec(folder / "spec", format=request.param))
    artifact = export.export(spec, export.load_original(spec), folder)
    (folder / "labels.txt").write_text((DIGITS / "labels.txt").read_text())
    return folder, archive.model_config(spec, artifact)


def run_batch(model_dir, payloads, config=None):
    replies, statuses, _ = serve_in_process(model_dir[0], config or model_dir[1], payloads)
    return replies, statuses


def test_a_bad_request_fails_alone_in_its_batch(model_dir, held_out):
    images, labels = held_out
    payloads = [png_bytes(images[0]), b"", png_bytes(images[1]), b"not an image",
                image_bytes("RGB", (16, 16), "JPEG")]
    replies, statuses = run_batch(model_dir, payloads)
    assert statuses == [200, 400, 200, 400, 200]
    assert replies[1]["error"].startswith("empty request body")
    assert "not an image in an accepted format" in replies[3]["error"]
    assert next(iter(replies[0])) == LABELS[labels[0]]
    assert next(iter(replies[2])) == LABELS[labels[1]]
    assert abs(sum(replies[4].values())) <= 1.0 + 1e-6


def test_labels_come_from_the_model_metadata_when_the_archive_has_none(tmp_path):
    spec = load_spec(write_spec(tmp_path / "spec", format="onnx"))
    artifact = export.export(spec, export.load_original(spec), tmp_path)
    config = archive.model_config(spec, artifact)
    config["handler"]["labels"] = None
    replies, statuses = run_batch((tmp_path, config), [(DIGITS / "samples" / "digit_5.png").read_bytes()])
    assert statuses == [200] and next(iter(replies[0])) == "five"


def test_a_tensorrt_archive_on_a_cpu_worker_fails_with_a_clear_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    artifact = export.Artifact(get_format("tensorrt"), tmp_path / "model.ts", [])
    config = archive.model_config(SPEC, artifact)
    assert (config["handler"]["runtime"], config["handler"]["precision"]) == ("tensorrt", "fp32")
    context = Context("digits", str(tmp_path), {}, 1, None, "0.12.0", model_yaml_config=config)
    with pytest.raises(RuntimeError, match="runs on an NVIDIA GPU with CUDA"):
        ServeHandler().initialize(context)


def test_available_cores_follows_the_pod_request_and_the_cgroup_quota(tmp_path, monkeypatch):
    from handlers.runtimes import available_cores

    monkeypatch.delenv("SERVETOOL_CPUS", raising=False)
    affinity = len(__import__("os").sched_getaffinity(0))
    assert available_cores(str(tmp_path)) == affinity  # no cgroup file: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one
    assert available_cores(str(tmp_path)) == 1
    monkeypatch.setenv("SERVETOOL_CPUS", "1")  # the Downward API's requests.cpu
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == 1
    monkeypatch.setenv("SERVETOOL_CPUS", "64")  # never more than the cores it may run on
    assert available_cores(str(tmp_path)) == affinity


def test_the_worker_stops_printing_a_line_per_batch():
    """TorchServe's worker logs every batch it receives to stdout (read and parsed by the frontend);
    the handler drops that line and nothing else."""
    import logging

    out = io.StringIO()
    root = logging.getLogger()
    stream = logging.StreamHandler(out)  # as the worker's logging.basicConfig(stream=sys.stdout)
    root.addHandler(stream)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        quiet_request_lines()
        quiet_request_lines()  # twice (a second model in the worker's process) adds nothing
        logging.info("Backend received inference at: %d", 1700000000)
        logging.info("[METRICS]PredictionTime.Milliseconds:0.4")
        logging.warning("model failed")
    finally:
        root.removeHandler(stream)
        root.setLevel(level)
    assert out.getvalue().splitlines() == ["[METRICS]PredictionTime.Milliseconds:0.4",
                                           "model failed"]
    assert len(stream.filters) == 1
