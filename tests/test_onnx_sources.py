"""ONNX files as users export them: a FIXED batch axis (ultralytics' default, torch.onnx.export
without dynamic axes) and weights in EXTERNAL data files (torch 2.14's default, onnx.save_model
with save_as_external_data). Each is packaged as a user would, served by the archive's own handler,
and compared with ONNX Runtime run directly on the original file."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from handlers.runtimes import OnnxRuntime
from servetool.convert import export
from servetool.convert.export import onnx as onnx_export
from servetool.convert.pipeline import convert
from servetool.model.spec import load_spec
from servetool.operate.package import package
from tests.conftest import serve_in_process
from tests.test_cli import run

SHAPE = (3, 8, 8)  # one example: a tiny RGB image


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)  # 1728 bytes: over onnx's 1 KiB external
        self.fc = nn.Linear(16, 5)                     # data threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyConv().eval()


def _example(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, *SHAPE),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The exports, each in its own folder as the exporter left it: {case: model file}."""
    root = tmp_path_factory.mktemp("exports")
    net, models = _net(), {}

    def target(case: str) -> Path:
        (root / case).mkdir()
        models[case] = root / case / "model.onnx"
        return models[case]

    # the TorchScript-based exporter with no dynamic axes: batch fixed at the example's 1
    torch.onnx.export(net, _example(1), target("fixed1"), dynamo=False, input_names=["images"],
                      output_names=["scores"])
    # the dynamo exporter with no dynamic shapes: batch fixed at the example's 2
    torch.onnx.export(net, _example(2), target("fixed2"), dynamo=True, external_data=False,
                      input_names=["images"], output_names=["scores"])
    # torch 2.14's default: model.onnx + model.onnx.data, here with a dynamic batch
    torch.onnx.export(net, _example(2), target("torch-data"), dynamo=True, external_data=True,
                      input_names=["images"], output_names=["scores"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    # other tools: every weight in weights.bin (and a fixed batch of 1) ...
    # (save_model moves the weights out of the proto it is given: a fresh one each time)
    onnx.save_model(onnx.load(str(models["fixed1"])), str(target("weights-bin")),
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    # ... or one file per weight, named after it
    onnx.save_model(onnx.load(str(models["fixed1"])), str(target("several")),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list((root / "several").iterdir())) > 2
    return models


def _spec(folder: Path, model: Path, **extra) -> Path:
    """A spec in its own folder (not the exporter's) naming the model by a relative path."""
    folder.mkdir(parents=True)
    raw = {"name": folder.name, "version": "1", "task": "tensor",
           "source": {"onnx": str(Path("..") / model.parent.name / model.name)}, **extra}
    (folder / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if model.parent != folder.parent / model.parent.name:
        shutil.copytree(model.parent, folder.parent / model.parent.name, dirs_exist_ok=True)
    return folder


def _direct(model: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the original file, one example at a time, each fed as a batch of the
    model's own fixed size (copies of it): nothing of servetool's chunking involved."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    size = fixed if isinstance(fixed, int) else 1
    return np.stack([session.run(None, {"images": np.repeat(row[None], size, axis=0)})[0][0]
                     for row in x])


def _served(mar: Path, folder: Path, x: np.ndarray) -> np.ndarray:
    """x through the archive's handler and config, as one TorchServe batch of len(x)."""
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(folder)
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    replies, statuses, _ = serve_in_process(folder, config,
                                            [json.dumps(row.tolist()).encode() for row in x])
    assert statuses == [200] * len(x), replies
    return np.array(replies, dtype=np.float32)


def _inputs(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize(("case", "fixed"), [("fixed1", 1), ("fixed2", 2)])
def test_a_fixed_batch_model_packages_and_serves_any_batch(exported, tmp_path, case, fixed):
    """The gate feeds batches of 1, 4 and 16; TorchServe a batch of 5 (batch.size 5): in chunks
    of the fixed size, the last one padded for a batch of 2, each row's answer its own."""
    folder = _spec(tmp_path / f"m-{case}", exported[case], batch={"size": 5, "max_delay_ms": 5})
    proc = run("package", str(folder), "--model-store", str(tmp_path / "store"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["models"][0]
    assert summary["notes"]["fixed_batch"] == fixed
    assert f"the model has a fixed batch of {fixed} (input 'images' is [{fixed}, 3, 8, 8])" \
        in proc.stderr
    assert ("padding row(s)" in proc.stderr) == (fixed == 2)  # 5 is no multiple of 2
    with zipfile.ZipFile(summary["archive"]) as zf:
        assert yaml.safe_load(zf.read("model-config.yaml"))["batchSize"] == 5  # chunks fit any
    x = _inputs(5)
    served = _served(Path(summary["archive"]), tmp_path / "unpacked", x)
    np.testing.assert_allclose(served, _direct(exported[case], x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["torch-data", "weights-bin", "several"])
def test_external_data_is_folded_into_one_served_model(exported, tmp_path, case):
    folder = _spec(tmp_path / f"m-{case}", exported[case])
    summary = package(load_spec(folder), tmp_path / "store")
    with zipfile.ZipFile(summary["archive"]) as zf:
        names = zf.namelist()
    assert "model.onnx" in names and not [n for n in names if n.endswith((".data", ".bin"))]
    x = _inputs(3)
    served = _served(Path(summary["archive"]), tmp_path / "unpacked", x)
    np.testing.assert_allclose(served, _direct(exported[case], x), rtol=1e-6, atol=1e-6)
    assert summary["notes"].get("fixed_batch") == (None if case == "torch-data" else 1)


def test_a_dynamic_batch_runs_whole_as_before(exported):
    """No chunking for a dynamic batch: one call, bit for bit ONNX Runtime's own answer."""
    model = exported["torch-data"]
    runtime = OnnxRuntime(str(model), 1)
    assert runtime.fixed_batch is None and onnx_export.fixed_batch(model) is None
    x = _inputs(6)
    direct = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(runtime.run(x)[0], direct.run(None, {"images": x})[0])


def test_large_external_data_stays_beside_the_model(exported, tmp_path, monkeypatch):
    """Above the fold limit (here 0 bytes, standing in for a model over 1 GiB) the weights are
    shipped as one model.onnx.data beside model.onnx, and so are an optimised model's."""
    monkeypatch.setattr(onnx_export, "FOLD_LIMIT_BYTES", 0)
    folder = _spec(tmp_path / "m-large", exported["several"],
                   runtime={"optimized_model": True})
    summary = package(load_spec(folder), tmp_path / "store")
    with zipfile.ZipFile(summary["archive"]) as zf:
        names = set(zf.namelist())
    assert {"model.onnx", "model.onnx.data", "model.opt.onnx", "model.opt.onnx.data"} <= names
    x = _inputs(3)
    unpacked = tmp_path / "unpacked"
    served = _served(Path(summary["archive"]), unpacked, x)
    assert onnx_export.external_data_files(unpacked / "model.onnx") == ["model.onnx.data"]
    np.testing.assert_allclose(served, _direct(exported["several"], x), rtol=1e-6, atol=1e-6)


def test_a_missing_external_file_is_named_with_the_model_that_needs_it(exported, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(exported["torch-data"], lonely / "model.onnx")  # without model.onnx.data
    folder = _spec(tmp_path / "m-missing", lonely / "model.onnx")
    proc = run("package", str(folder), "--model-store", str(tmp_path / "store"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if not line.startswith("... ")]
    assert len(error) == 1 and error[0].startswith(f"error: {lonely / 'model.onnx'}: "), error
    assert f"'model.onnx.data', which is missing: {lonely / 'model.onnx.data'}" in error[0]
    assert "servetool-export" not in proc.stderr  # no temporary folder


@pytest.mark.parametrize("fmt", ["onnx-fp16", "onnx-int8-static", "openvino"])
def test_other_formats_of_fixed_batch_and_external_data_sources(exported, tmp_path, fmt,
                                                                 monkeypatch):
    """Quantization (calibrated in batches the model takes: 7 rows for a batch of 2) and OpenVINO
    keep the fixed batch, and the gate passes them on batches of 1, 4 and 16. The external data
    stays external (as over the fold limit), so each converter reads it from beside the model."""
    monkeypatch.setattr(onnx_export, "FOLD_LIMIT_BYTES", 0)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=_inputs(7, seed=3))
    for case in ("fixed2", "weights-bin"):
        folder = _spec(tmp_path / f"m-{case}", exported[case],
                       calibration={"data": str(calibration)})
        spec = load_spec(folder)
        artifact, report = convert(spec, fmt, tmp_path / "out" / case)
        assert report.ok and artifact.notes["fixed_batch"] == (2 if case == "fixed2" else 1)
        left = {p.name for p in (tmp_path / "out" / case).iterdir()}
        assert left == {f.name for f in artifact.files}  # base.onnx and its data removed
        x = _inputs(3)
        converted = export.artifact_runner(artifact.format.runtime, artifact.path, 1,
                                           artifact.runtime_options)(x)[0]
        np.testing.assert_allclose(converted, _direct(exported[case], x), atol=0.1)
