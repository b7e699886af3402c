"""Export and the parity gate on real exports: passing, and broken exports the gate must catch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from servetool import export, validate
from servetool.package import package
from servetool.spec import load_spec
from servetool.validate import ValidationError, check_parity, require_parity
from tests.conftest import DIGITS, write_spec

SPEC = load_spec(DIGITS)


@pytest.fixture(scope="module")
def original():
    return export.load_original(SPEC)


def batches(spec, sizes=(1, 4, 16)):
    return [export.example_batch(spec, n, seed=n) for n in sizes]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_match_the_eager_model_at_every_batch_size(tmp_path, original, fmt):
    spec = load_spec(write_spec(tmp_path / "spec", format=fmt))
    artifact = export.export(spec, original, tmp_path)
    report = check_parity(export.runner_for(original), export.runner_for(artifact, fmt),
                          batches(spec), fmt)
    assert report.ok, report.problems
    assert report.samples == 21
    out = report.outputs[0]
    assert out.max_abs_diff <= validate.DEFAULT_ATOL[fmt]
    assert out.top1_agreement == 1.0 and out.shape == [10]


def test_onnx_export_is_one_checked_file_with_a_dynamic_batch(tmp_path, original):
    artifact = export.export(SPEC, original, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no external .data file
    model = onnx.load(str(artifact))
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not frozen at 2


def test_the_gate_catches_a_corrupted_onnx_export_and_names_the_drift(tmp_path, original):
    artifact = export.export(SPEC, original, tmp_path)
    model = onnx.load(str(artifact))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest).copy()
    weights *= 1.5  # a plausible export bug: a wrongly scaled layer
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(artifact))

    report = check_parity(export.runner_for(original), export.runner_for(artifact, "onnx"),
                          batches(SPEC), "onnx")
    assert not report.ok
    with pytest.raises(ValidationError) as err:
        require_parity(report, "digits")
    message = str(err.value)
    assert "output 'output_0' drifted: max abs diff" in message
    assert "> tolerance 0.0001" in message
    assert report.outputs[0].max_abs_diff > 1e-2


class SignBranch(torch.nn.Module):
    """Data-dependent control flow: tracing records only the branch the example input took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


def test_the_gate_catches_a_trace_that_froze_a_branch(tmp_path):
    model = SignBranch().eval()
    positive = np.ones((2, 3), np.float32)
    artifact = export.export_torchscript(model, positive, tmp_path / "model.pt")
    mixed = [positive, -np.ones((2, 3), np.float32)]
    report = check_parity(export.runner_for(model), export.runner_for(artifact, "torchscript"),
                          mixed, "torchscript")
    assert not report.ok
    assert "drifted: max abs diff 3" in report.problems[0]


def test_package_stops_on_drift_and_leaves_no_archive(tmp_path):
    spec = load_spec(write_spec(tmp_path / "spec", format="onnx"))
    store = tmp_path / "store"
    with pytest.raises(ValidationError, match="fails the parity check"):
        package(spec, store, atol=0.0)  # fp32 ONNX never matches eager to the last bit
    assert not list(store.glob("*.mar"))


def test_load_original_reports_a_wrong_state_dict(tmp_path):
    torch.save({"nope": torch.zeros(1)}, tmp_path / "other.pt")
    spec = load_spec(write_spec(tmp_path / "spec"))
    bad = load_spec(write_spec(tmp_path / "bad", source={
        "model_file": str(spec.source.model_file), "class": "DigitsNet",
        "state_dict": str(tmp_path / "other.pt")}))
    with pytest.raises(export.ExportError, match="not a state_dict for DigitsNet"):
        export.load_original(bad)
    missing_class = load_spec(write_spec(tmp_path / "cls", source={
        "model_file": str(spec.source.model_file), "class": "NoSuchNet",
        "state_dict": str(spec.source.path)}))
    with pytest.raises(export.ExportError, match="defines no class 'NoSuchNet'"):
        export.load_original(missing_class)
