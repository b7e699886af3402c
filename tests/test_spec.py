"""servetool.yaml validation: every rejection names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from servetool.model.samples import load_data
from servetool.model.spec import SpecError, find_specs, load_spec
from tests.conftest import DIGITS, write_spec


def test_digits_spec_parses_into_typed_fields():
    spec = load_spec(DIGITS)
    assert spec.name == "digits" and spec.version == "1.0"
    assert spec.source.kind == "state_dict" and spec.source.class_name == "DigitsNet"
    assert spec.source.path == DIGITS / "digits.pt"
    assert spec.input_shape == (1, 8, 8)
    assert spec.format == "onnx" and spec.task == "image-classification"
    assert spec.preprocess.grayscale and spec.preprocess.resize == (8, 8)
    assert (spec.batch_size, spec.max_batch_delay_ms) == (8, 1)  # the example batches
    assert (spec.min_workers, spec.max_workers) == (None, None)  # auto: one per serving core
    assert spec.label_names()[3] == "three"


def test_batching_is_off_unless_the_spec_asks(tmp_path):
    spec = load_spec(write_spec(tmp_path / "m", batch=None))
    assert (spec.batch_size, spec.max_batch_delay_ms) == (1, 0)  # servetool's CPU default


def spec_with(tmp_path: Path, **overrides) -> Path:
    return write_spec(tmp_path / "m", **overrides) / "servetool.yaml"


def edit(path: Path, change) -> Path:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("overrides, key, words", [
    ({"colour": "blue"}, "colour", "not a known key"),
    ({"format": "tflite"}, "format", "must be one of torchscript, onnx"),
    ({"task": "segmentation"}, "task", "must be one of"),
    ({"top_k": "three"}, "top_k", "must be an integer"),
    ({"top_k": 0}, "top_k", "must be >= 1"),
    ({"batch": {"size": True}}, "batch.size", "got a boolean"),
    ({"batch": {"size": 4, "delay": 3}}, "batch.delay", "not a known key"),
    ({"workers": {"min": 3, "max": 2}}, "workers.max", "smaller than min"),
    ({"workers": {"min": "auto", "max": 2}}, "workers.max", "auto for both"),
    ({"workers": {"min": "many"}}, "workers.min", "positive integer or auto"),
    ({"input": {"shape": [1, 8]}}, "input.shape", "[channels, height, width]"),
    ({"input": {"shape": [1, "8", 8]}}, "input.shape", "an axis is a positive length, or a name"),
    ({"input": {"shape": [0, 8, 8]}}, "input.shape", "has 0 at position 0"),
    ({"labels": "no-such-labels.txt"}, "labels", "does not exist"),
    ({"name": "9lives"}, "name", "must start with a letter"),
    ({"preprocess": {"grayscale": True, "std": [0]}}, "preprocess.std", "must not contain 0"),
    ({"preprocess": {"grayscale": False}}, "preprocess.grayscale", "1 channel"),
    ({"name": None}, "name", "is required"),
])
def test_bad_specs_name_the_key_and_the_file(tmp_path, overrides, key, words):
    path = spec_with(tmp_path, **overrides)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    assert f"'{key}'" in message
    assert words in message


def test_missing_weights_file_is_named(tmp_path):
    path = edit(spec_with(tmp_path), lambda r: r["source"].update(state_dict="gone.pt"))
    with pytest.raises(SpecError, match=r"key 'source.state_dict' names a file that does not exist"):
        load_spec(path)


def test_source_must_name_exactly_one_kind(tmp_path):
    path = edit(spec_with(tmp_path), lambda r: r["source"].update(onnx=str(DIGITS / "digits.pt")))
    with pytest.raises(SpecError, match="exactly one of state_dict, torchscript, onnx"):
        load_spec(path)


def test_onnx_source_cannot_be_served_as_torchscript(tmp_path):
    def change(raw):
        raw["source"] = {"onnx": str(DIGITS / "digits.pt")}
        raw["format"] = "torchscript"

    with pytest.raises(SpecError, match="ONNX source can only be served as one of onnx, "):
        load_spec(edit(spec_with(tmp_path), change))


def test_invalid_yaml_and_missing_spec(tmp_path):
    bad = tmp_path / "servetool.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nowhere")
    with pytest.raises(SpecError, match="no servetool.yaml found"):
        find_specs([], tmp_path / "empty")


def test_top_level_must_be_a_mapping(tmp_path):
    bad = tmp_path / "servetool.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(bad)


@pytest.mark.parametrize("overrides, key, words", [
    ({"export": {"torchscript_method": "compile"}}, "export.torchscript_method", "must be one of"),
    ({"runtime": {"graph_optimization": "max"}}, "runtime.graph_optimization", "must be one of"),
    ({"runtime": {"intra_op_threads": 0}}, "runtime.intra_op_threads", "must be >= 1"),
    ({"tolerance": {"min_top1_agreement": 1.5}}, "tolerance.min_top1_agreement", "between 0 and 1"),
    ({"tolerance": {"atol": -1}}, "tolerance.atol", "must be >= 0"),
    ({"validation": {"data": str(DIGITS / "calibration.npz")}}, "validation.data", "lacks array(s) y"),
    ({"validation": {"data": str(DIGITS / "labels.txt")}}, "validation.data", "not an .npz"),
    ({"calibration": {"images": str(DIGITS.parent.parent / "handlers")}}, "calibration.images",
     "names no folder of images"),
    ({"validation": {"images": str(DIGITS / "samples")}}, "validation.images", "labelled images"),
    ({"format": "onnx-int8-static", "validation": None, "calibration": None}, "format",
     "needs calibration data: add calibration.images (a folder of images"),
    ({"source": {"model_file": str(DIGITS / "model.py"), "class": "DigitsNet",
                 "random_weights": False}}, "source.random_weights", "must be true"),
])
def test_bad_conversion_settings_name_the_key(tmp_path, overrides, key, words):
    path = spec_with(tmp_path, **overrides)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"'{key}'" in str(err.value) and words in str(err.value), str(err.value)


def test_resnet18_spec_calibrates_on_real_photographs():
    spec = load_spec(DIGITS.parent / "resnet18")
    assert spec.source.kind == "random_weights" and spec.source.path is None
    x, y = load_data(spec, spec.calibration)
    assert x.shape == (16, 3, 224, 224) and y is None
    assert abs(float(x.mean())) < 2 and float(x.std()) > 0.3  # normalised photographs, not blanks
