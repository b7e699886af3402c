"""Two timm classifiers as a timm user has them (an ONNX export and timm's config.json beside it),
packaged from a folder outside the repository with nothing but the file and the task: the served
answers equal timm's own (its data config and transforms, the model in PyTorch) on raw image files
of several sizes, aspect ratios and modes. The answers were made by timm itself in a separate venv
(scripts/make_timm_fixtures.py): timm needs a torchvision that does not load beside this torch."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "answers.json").is_file())
TOLERANCE = 1e-3  # probabilities; measured here: see test_served_answers_equal_timms


@pytest.fixture(scope="module", params=MODELS)
def packaged(request, tmp_path_factory):
    from servetool.model.spec import load_spec
    from servetool.operate.package import package

    folder = tmp_path_factory.mktemp(request.param)
    for name in ("model.onnx", "config.json"):
        shutil.copyfile(FIXTURES / request.param / name, folder / name)
    (folder / "servetool.yaml").write_text(yaml.safe_dump({
        "name": request.param.replace("_", "-"), "source": {"onnx": "model.onnx"},
        "task": "image-classification"}))
    said: list[str] = []
    spec = load_spec(folder)
    summary = package(spec, tmp_path_factory.mktemp("store"), progress=said.append)
    unpacked = folder / "unpacked"
    with zipfile.ZipFile(summary["archive"]) as mar:
        mar.extractall(unpacked)
    config = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    return request.param, spec, summary, said, unpacked, config


def test_the_data_config_is_read_and_said(packaged):
    """Input size, crop_pct, interpolation, mean and std as timm resolves them, and the labels."""
    name, spec, _, said, _, config = packaged
    timm_config = json.loads((FIXTURES / name / "answers.json").read_text())["data_config"]
    pre = config["handler"]["preprocess"]
    size = timm_config["input_size"][1]
    assert list(spec.input_shape) == timm_config["input_size"]
    assert pre["resize"] == int(size / timm_config["crop_pct"])  # timm's Resize(size / crop_pct)
    assert list(pre["center_crop"]) == [size, size]
    assert pre["interpolation"] == timm_config["interpolation"]
    assert pre["mean"] == pytest.approx(timm_config["mean"])
    assert pre["std"] == pytest.approx(timm_config["std"])
    assert spec.label_names() == ["cat", "dog", "fox", "owl", "eel"]
    assert any("config.json" in line and "crop" in line for line in said), said


def test_the_report_says_it_was_not_checked_against_timm(packaged):
    """timm cannot be imported here: the report says so instead of nothing."""
    _, _, summary, said, _, _ = packaged
    lines = summary["reference"]
    assert lines and all("not checked against the library" in line for line in lines), lines
    assert any("timm" in line for line in lines), lines
    assert any("reference: not checked" in line for line in said)


def test_served_answers_equal_timms(packaged):
    """Each raw file through the archive's own handler: the same labels in the same order and
    probabilities within TOLERANCE of timm's."""
    from servetool.convert.reference.served import ServedPath

    name, spec, _, _, unpacked, config = packaged
    expected = json.loads((FIXTURES / name / "answers.json").read_text())["answers"]
    served = ServedPath(unpacked, config)
    worst = 0.0
    for image, reference in expected.items():
        answer = served.answer_one((FIXTURES / name / image).read_bytes())
        theirs = {d["label"]: d["probability"] for d in reference}
        assert len(answer) == min(spec.top_k, len(theirs)), answer
        for label, p in answer.items():
            worst = max(worst, abs(p - theirs[label]))
            assert abs(p - theirs[label]) <= TOLERANCE, (image, label, p, theirs[label])
        # the served top-k is timm's top-k, in its order
        assert list(answer) == [d["label"] for d in reference][: len(answer)], (image, answer)
    print(f"{name}: largest probability difference from timm {worst:.2e}")
