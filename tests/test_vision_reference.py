"""Image classifiers read their preprocessing from their library's config (a Hugging Face image
processor, timm's pretrained_cfg) and are checked against that library end to end: its own
processor and model on image files against servetool's served path (decode, preprocess, runtime,
postprocess), in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from servetool.convert.reference import NOT_CHECKED, ReferenceMismatch
from servetool.engines.torchserve.archive import archive_manifest
from servetool.model.spec import SpecError, load_spec
from servetool.operate.package import package

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LABELS = ["cat", "dog", "fox", "owl", "eel"]


def _labels() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}


def _save(model, processor, folder: Path) -> Path:
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def vit_folder(root: Path) -> Path:
    """A tiny ViT (random, seeded weights with a wide init, so that its probabilities move when
    the pixels do) and the ViTImageProcessor saved beside it: 32x32 exact resize, bilinear."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, initializer_range=0.5, **_labels())
    return _save(transformers.ViTForImageClassification(config),
                 transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}),
                 root / "vit")


def convnext_folder(root: Path) -> Path:
    """A tiny ConvNeXt with the ConvNextImageProcessor's crop_pct rule: shorter side to
    int(32 / 0.875) = 36, then a 32x32 centre crop (offsets rounded down, as HF does), bicubic."""
    torch.manual_seed(1)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=4,
                                         initializer_range=0.5, **_labels())
    processor = transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_pct=0.875,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(transformers.ConvNextForImageClassification(config), processor,
                 root / "convnext")


def spec_in(root: Path, **fields) -> Path:
    (root / "servetool.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))
    return root


def handler_preprocess(summary: dict) -> dict:
    return archive_manifest(Path(summary["archive"]))["config"]["handler"]["preprocess"]


@pytest.mark.parametrize("make, resize, crop", [
    (vit_folder, [32, 32], None),
    (convnext_folder, 36, [32, 32]),
])
def test_hf_folder_preprocessing_is_read_and_matches_transformers(tmp_path, make, resize, crop):
    make(tmp_path)
    name = make.__name__.removesuffix("_folder")
    spec = load_spec(spec_in(tmp_path, name=name, source={"transformers": name}))
    lines: list[str] = []
    summary = package(spec, tmp_path / "store", progress=lines.append)
    said = "\n".join(lines)
    assert spec.task == "image-classification" and spec.input_shape == (3, 32, 32)
    assert "preprocessing:" in said and "preprocessor_config.json" in said
    assert "labels: 5 class names" in said
    pre = handler_preprocess(summary)
    assert pre["resize"] == resize and pre["center_crop"] == crop
    if crop:
        assert pre["crop_offsets"] == "floor" and pre["interpolation"] == "bicubic"
        np.testing.assert_allclose(pre["mean"], [0.485, 0.456, 0.406])
    [line] = summary["reference"]
    assert line.startswith("matches transformers") and "6 image files" in line
    assert f"{name}: reference: {line}" in lines


def test_a_spec_override_that_changes_the_resize_is_caught_as_resize(tmp_path):
    convnext_folder(tmp_path)
    spec = load_spec(spec_in(tmp_path, name="convnext", source={"transformers": "convnext"},
                             preprocess={"interpolation": "nearest"}))
    assert spec.preprocess.interpolation == "nearest"  # the spec overrides the processor
    assert spec.preprocess.resize == 36  # and keeps what it does not override
    with pytest.raises(ReferenceMismatch, match=r"differs from transformers .* the first stage "
                                                r"that differs: resize: .*pixels differ"):
        package(spec, tmp_path / "store")
    assert not (tmp_path / "store" / "convnext.mar").exists()


def test_a_processor_step_servetool_lacks_is_refused_naming_it(tmp_path):
    folder = vit_folder(tmp_path)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 1}))
    spec_in(tmp_path, name="vit", source={"transformers": "vit"})
    with pytest.raises(SpecError, match="LANCZOS.*set preprocess.interpolation"):
        load_spec(tmp_path)


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_timm_config_beside_an_onnx_file_is_read_and_reported_not_checked(tmp_path):
    torch.manual_seed(0)
    torch.onnx.export(SmallCNN().eval(), (torch.randn(1, 3, 40, 40),), str(tmp_path / "net.onnx"),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "small_cnn", "num_classes": 4, "label_names": ["a", "b", "c", "d"],
        "pretrained_cfg": {"input_size": [3, 40, 40], "interpolation": "bicubic",
                           "crop_pct": 0.9, "crop_mode": "center", "mean": mean, "std": std}}))
    spec = load_spec(spec_in(tmp_path, name="cnn", source={"onnx": "net.onnx"},
                             task="image-classification"))
    assert spec.label_names() == ["a", "b", "c", "d"]
    lines: list[str] = []
    summary = package(spec, tmp_path / "store", progress=lines.append)
    pre = handler_preprocess(summary)
    assert pre["resize"] == 44 and pre["center_crop"] == [40, 40]  # floor(40 / 0.9), timm's rule
    assert pre["interpolation"] == "bicubic" and pre["crop_offsets"] == "round"
    np.testing.assert_allclose(pre["mean"], mean)
    np.testing.assert_allclose(pre["std"], std)
    assert any("timm's config.json (small_cnn)" in line and "preprocessing:" in line
               for line in lines)
    try:
        import timm  # noqa: F401
    except ImportError:
        [line] = summary["reference"]
        assert line.startswith(f"{NOT_CHECKED}: timm is not importable here")


def test_a_processor_config_beside_an_onnx_file_is_read_and_checked(tmp_path):
    """An ONNX export with the folder's preprocessor_config.json and config.json beside it (as
    optimum writes them): preprocessing and labels read, the ONNX file checked against
    transformers' processor on the same image files."""
    from servetool.convert.export.hf_vision import wrap

    folder = vit_folder(tmp_path)
    model = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="eager")
    torch.onnx.export(wrap(model.eval()), (torch.randn(1, 3, 32, 32),),
                      str(folder / "model.onnx"), input_names=["pixel_values"],
                      output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"},
                                                             "logits": {0: "batch"}}, dynamo=False)
    spec = load_spec(spec_in(folder, name="vit-onnx", source={"onnx": "model.onnx"},
                             task="image-classification"))
    assert spec.label_names() == LABELS and spec.preprocess.resize == (32, 32)
    summary = package(spec, tmp_path / "store")
    [line] = summary["reference"]
    assert line.startswith("matches transformers"), line
