"""`servetool compress`: structured pruning keeps a residual network valid and smaller, the
distillation loop lowers its loss and resumes from its checkpoint, the compression gate refuses a
model that lost too much against the original, the result goes through package and deploy to an
HTTP answer, and bad input is one line. The model is a tiny ResNet (residual adds, batch norm)
trained here for a few seconds on scikit-learn's digits, upscaled to 16x16."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from servetool.convert import export
from servetool.convert.compress import CompressError, compress, gate, prune
from servetool.model.spec import PruneOptions, SpecError, load_spec
from servetool.model.torch_files import PROGRAM, saved_as
from servetool.operate import lifecycle
from tests.conftest import ROOT, png_bytes, server_options

SERVETOOL = str(Path(sys.executable).with_name("servetool"))
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEAN, STD = 0.3, 0.4
MODEL_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = Block(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.block2(self.down(self.block1(self.stem(x)))).mean((2, 3)))


class Student(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """model.py, weights.pt (about 98% held out after ~3 s of training), train.npz, val.npz (the
    model's inputs, and the images as 0..1 pixels for requests), labels.txt."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("tiny")
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    digits = load_digits()
    pixels = np.kron(digits.images / 16.0, np.ones((2, 2))).astype(np.float32)[:, None]
    x, y = (pixels - MEAN) / STD, digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:1400], order[1400:]
    np.savez(folder / "train.npz", x=x[train], y=y[train], index=train)
    np.savez(folder / "train-x.npz", x=x[train])  # no labels
    np.savez(folder / "val.npz", x=x[val], y=y[val], pixels=pixels[val])
    for i in train[:500]:  # an image folder too: one sub-folder per label, as users keep them
        (folder / "images" / LABELS[y[i]]).mkdir(parents=True, exist_ok=True)
        (folder / "images" / LABELS[y[i]] / f"{i}.png").write_bytes(png_bytes(pixels[i]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the machine is shared
    try:
        torch.manual_seed(0)
        model = _module(folder).TinyResNet()
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        inputs, labels = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        for _ in range(5):
            for start in range(0, len(inputs), 64):
                loss = torch.nn.functional.cross_entropy(model(inputs[start:start + 64]),
                                                         labels[start:start + 64])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder


def _module(folder: Path):
    return export.import_file(folder / "model.py", "compress_test_model")


def spec_folder(tiny: Path, folder: Path, compress_section: dict | None, **overrides) -> Path:
    """A spec of the tiny model in `folder` (its files referred to where they are)."""
    raw = {"name": "tiny", "version": "1.0",
           "source": {"model_file": str(tiny / "model.py"), "class": "TinyResNet",
                      "state_dict": str(tiny / "weights.pt")},
           "input": {"shape": [1, 16, 16]}, "task": "image-classification",
           "preprocess": {"grayscale": True, "resize": [16, 16], "mean": [MEAN], "std": [STD]},
           "labels": str(tiny / "labels.txt"), "top_k": 3,
           "validation": {"data": str(tiny / "val.npz")},
           "calibration": {"data": str(tiny / "val.npz")}, "workers": {"min": 1, "max": 1},
           "compress": compress_section, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servetool.yaml").write_text(
        yaml.safe_dump({k: v for k, v in raw.items() if v is not None}, sort_keys=False))
    return folder


def _trained(tiny: Path):
    model = _module(tiny).TinyResNet()
    model.load_state_dict(torch.load(tiny / "weights.pt", weights_only=True))
    return model.eval()


def test_pruning_keeps_a_residual_network_valid_and_smaller(tiny):
    model = _trained(tiny)
    example = torch.randn(1, 1, 16, 16)
    base = prune.count(model, example)
    options = PruneOptions("speedup", 2.0, round_to=4)
    keep = prune.keep_names(model, options)
    assert keep == ["fc"]  # the classifier head by default
    pruned = prune.prune_to(model, example, options, keep, 0.5, base)
    assert 0.3 < pruned.macs / base[0] <= 0.5 and pruned.params < base[1]
    small = pruned.model
    assert small(torch.randn(5, 1, 16, 16)).shape == (5, 10)
    # channels removed, not masked; the residual adds kept both sides of each block in step
    assert small.stem[0].out_channels == small.block1.conv2.out_channels < 16
    assert small.down[0].out_channels == small.block2.conv2.out_channels < 32
    assert small.fc.in_features == small.block2.conv2.out_channels and small.fc.out_features == 10
    assert all(c % 4 == 0 for c in (small.stem[0].out_channels, small.block1.conv1.out_channels))
    assert model.stem[0].out_channels == 16  # the original is left as it was
    # the saved history rebuilds the same layers on a fresh copy (what a checkpoint resumes from)
    fresh = prune.replay(_trained(tiny), example, [pruned.history])
    fresh.load_state_dict(small.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), small.eval()(x))
    assert prune.step_goals(PruneOptions("speedup", 4.0, steps=2)) == pytest.approx([0.5, 0.25])


def test_distillation_lowers_the_loss_and_a_rerun_resumes_from_the_checkpoint(tiny, tmp_path,
                                                                              monkeypatch):
    """A student class distilled from the original on an image folder (decoded batch by batch,
    as a folder too large to hold decoded is); the first run is interrupted after its first
    epoch, the rerun goes on from the second (the checkpoint reads with weights_only=True)."""
    from servetool.convert.compress import data

    monkeypatch.setattr(data, "DECODED_LIMIT_BYTES", 0)
    folder = spec_folder(tiny, tmp_path / "m", {
        "student": {"model_file": str(tiny / "model.py"), "class": "Student"},
        "distill": {"train": {"images": str(tiny / "images")}, "epochs": 3, "lr": 0.01,
                    "batch": 50},
        "max_accuracy_drop": 100})
    samples = data.training_set(load_spec(folder), load_spec(folder).compress.distill.train)
    assert samples.arrays is None and samples.count == 500 and samples.y is not None
    with np.load(tiny / "train.npz") as train:  # the handler's decoding: the same inputs
        row = list(train["index"]).index(int(samples.files[0].stem))
        np.testing.assert_allclose(samples.rows(np.array([0]))[0], train["x"][row], atol=1e-2)
    out = tmp_path / "out"

    def interrupt(line: str) -> None:
        if "distil: epoch 1/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(load_spec(folder), out, latency_seconds=0, threads=1, progress=interrupt)
    saved = torch.load(out / ".compress" / "checkpoint.pt", weights_only=True)
    assert saved["loops"]["distil"]["epochs_done"] == 1
    lines: list[str] = []
    result = compress(load_spec(folder), out, latency_seconds=0, threads=1,
                      progress=lines.append)
    assert any("from epoch 2 of 3" in line for line in lines), lines
    log = result["training"]["distil"]
    assert [e["epoch"] for e in log] == [1, 2, 3] and all("holdout_accuracy" in e for e in log)
    assert any("50 of them held out for early stopping (top-1 against labels" in line
               for line in lines), lines
    assert log[-1]["loss"] < log[0]["loss"]
    assert [r["step"] for r in result["rows"]] == ["original", "student"]
    assert result["rows"][1]["params"] < result["rows"][0]["params"] / 10
    # the result: a program and a spec, no pickled code; the checkpoint gone
    assert saved_as(out / "model.pt2") == PROGRAM
    new = load_spec(out)
    assert (new.source.kind, new.version, new.task) == ("exported_program", "1.1", "image-classification")
    assert new.validation.path == tiny / "val.npz" and new.label_names() == LABELS
    assert not (out / ".compress").exists()


def test_early_stopping_holds_out_part_of_the_training_data_not_the_validation_set(tiny):
    from servetool.convert.compress import data, metric

    spec = load_spec(spec_folder(tiny, tiny / "split-spec", None))
    samples = data.training_set(spec, replace(spec.validation, path=tiny / "train.npz"))
    teacher = np.random.default_rng(1).normal(size=(samples.count, 10)).astype(np.float32)
    top1 = data.split(samples, teacher, 0.1, 0, metric.Metric(metric.TOP1))
    assert top1.train.count == 1260 and len(top1.early_stop[1]) == 140 and top1.labelled
    assert len(top1.teacher) == 1260
    held = {row.tobytes() for row in top1.early_stop[0]}
    assert not held & {row.tobytes() for row in top1.train.arrays}  # disjoint
    with np.load(tiny / "train.npz") as train:
        where = {row.tobytes(): i for i, row in enumerate(train["x"])}
        assert [train["y"][where[r.tobytes()]] for r in top1.early_stop[0]] == list(
            top1.early_stop[1])
    unlabelled = data.Samples(samples.count, None, arrays=samples.arrays)
    cosine = data.split(unlabelled, teacher, 0.1, 0, metric.Metric(metric.COSINE))
    assert cosine.early_stop[1].shape == (140, 10) and not cosine.labelled  # the outputs
    assert data.split(unlabelled, teacher, 0.1, 0, metric.Metric(metric.TOP1)).early_stop[
        1].tolist() == teacher[np.isin(np.arange(samples.count), np.sort(
            np.random.default_rng(0).permutation(samples.count)[:140]))].argmax(1).tolist()
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(metric.cosines(a, np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])),
                               [1.0, 1.0, -1.0])


def test_a_tensor_model_without_labels_is_gated_on_cosine_to_the_original(tiny, tmp_path):
    """A model whose outputs are features, not classes (no labels anywhere): pruned, distilled on
    the original's outputs, judged by the mean cosine of its outputs to the original's."""
    folder = spec_folder(tiny, tmp_path / "m", {
        "prune": {"speedup": 2, "round_to": 4},
        "distill": {"train": {"data": str(tiny / "train-x.npz")}, "epochs": 3, "lr": 0.003},
        "max_accuracy_drop": 15, "formats": ["onnx"]},
        task="tensor", preprocess=None, labels=None, top_k=None,
        validation={"data": str(tiny / "train-x.npz")}, calibration=None)
    lines: list[str] = []
    result = compress(load_spec(folder), tmp_path / "out", latency_seconds=0.2, threads=1,
                      progress=lines.append)
    assert result["metric"] == "cosine" and result["gate"]["metric"] == "cosine"
    rows = {r["step"]: r for r in result["rows"]}
    assert rows["original"]["accuracy"] == pytest.approx(1.0)
    assert 0.85 < rows["distilled"]["accuracy"] < 1.0
    assert rows["distilled"]["accuracy"] > rows["prune 1/1"]["accuracy"]
    assert list(rows["distilled"]["latency"]) == ["onnx"]
    assert any("held out for early stopping (cosine against the original's answers" in line
               for line in lines), lines
    assert load_spec(tmp_path / "out").task == "tensor"
    # `bench formats --with`: the compressed version's row beside the original's, same run
    from servetool.bench.formats import bench_formats

    table = bench_formats(load_spec(folder), ["onnx"], batch=4, iterations=10, seconds=0.2,
                          threads=1, others=[load_spec(tmp_path / "out")])
    assert [r["format"] for r in table["rows"]] == ["eager", "onnx", "onnx (v1.1)"]
    assert table["rows"][2]["version"] == "v1.1" and table["rows"][2]["p50_ms"] > 0


def test_the_gate_refuses_a_model_that_lost_too_much_unless_accepted(tiny, tmp_path):
    folder = spec_folder(tiny, tmp_path / "m", {"prune": {"speedup": 3, "round_to": 4},
                                                "max_accuracy_drop": 0.5})
    out = tmp_path / "out"
    with pytest.raises(CompressError) as refused:
        compress(load_spec(folder), out, latency_seconds=0, threads=1)
    message = str(refused.value)
    assert message.startswith("compression gate: top-1 accuracy fell from") and "\n" not in message
    assert "> allowed 0.50 (compress.max_accuracy_drop)" in message and "--accept" in message
    report = json.loads((out / "compress-report.json").read_text())
    assert report["gate"]["ok"] is False and [r["step"] for r in report["rows"]] == [
        "original", "prune 1/1", "pruned"]
    assert not (out / "servetool.yaml").exists() and not (out / "model.pt2").exists()
    # --accept: the pruning is not searched again, it comes from the checkpoint
    lines: list[str] = []
    result = compress(load_spec(folder), out, accept=True, latency_seconds=0, threads=1,
                      progress=lines.append)
    assert any("resuming from" in line for line in lines)
    assert not any("searching" in line for line in lines)
    assert result["gate"]["accepted_despite_drop"] is True
    assert load_spec(out).version == "1.1"
    assert gate.judge(0.98, 0.975, 400, 1.0, False)["ok"]
    assert not gate.judge(0.98, 0.96, 400, 1.0, False)["ok"]


@pytest.mark.server
def test_compress_package_deploy_and_predict_over_http(tiny, tmp_path):
    """The CLI prunes in two steps, distils, puts int8 on top; the new version packages, deploys
    and answers HTTP requests for real digits."""
    from servetool.operate.package import package
    from servetool.targets.local import LocalTarget

    folder = spec_folder(tiny, tmp_path / "m", {
        "prune": {"speedup": 2, "round_to": 4, "steps": 2},
        "distill": {"train": {"data": str(tiny / "train.npz")}, "epochs": 4, "lr": 0.005},
        "int8": True, "max_accuracy_drop": 3})
    out = tmp_path / "tiny-small"
    proc = subprocess.run([SERVETOOL, "compress", str(folder), "--out", str(out), "--version",
                           "2.0", "--threads", "1", "--latency-seconds", "0.3", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["original", "prune 1/2", "prune 2/2", "distilled", "int8"]
    assert rows["distilled"]["macs"] <= rows["original"]["macs"] / 2
    assert all(r["p50_ms_b1"] > 0 and r["ms_b16"] > 0 for r in rows.values())
    # each step in each serving format; int8 in its own
    assert all(list(rows[s]["latency"]) == ["onnx", "torchscript"] for s in list(rows)[:-1])
    assert list(rows["int8"]["latency"]) == ["onnx-int8-static"]
    assert rows["distilled"]["latency"]["torchscript"]["speedup_b1"] > 0
    assert rows["int8"]["size_mb"] < rows["distilled"]["size_mb"] < rows["original"]["size_mb"]
    assert result["gate"]["ok"] and "distilling from the original" in proc.stderr
    for kind in ("json", "csv", "png"):
        assert Path(result["files"][kind]).is_file()
    spec = load_spec(out)
    assert (spec.version, spec.format) == ("2.0", "onnx-int8-static")

    # the original serves as 1.0; the compressed folder is installed as 2.0 beside it (as the
    # watcher installs a published version), rolled back and promoted like any other version
    from servetool.operate.lifecycle import Lifecycle

    store = tmp_path / "store"
    package(load_spec(folder), store)
    compressed = package(spec, tmp_path / "staged")["archive"]
    target = LocalTarget(server_options(tmp_path / "run", store))
    try:
        lifecycle.deploy(target, [])
        life = Lifecycle(target)
        assert life.install(Path(compressed))["version"] == "2.0"
        state = target.client().state
        key = json.loads(Path(state.key_file).read_text())["inference"]["key"]
        with np.load(tiny / "val.npz") as val:
            pixels, labels = val["pixels"][:8], val["y"][:8]

        def ask() -> list[requests.Response]:
            return [requests.post(f"{state.url('inference')}/predictions/tiny",
                                  data=png_bytes(image), timeout=60,
                                  headers={"Authorization": f"Bearer {key}",
                                           "Content-Type": "application/octet-stream"})
                    for image in pixels]

        answers = ask()
        assert [a.status_code for a in answers] == [200] * 8
        assert answers[0].headers["X-Model-Version"] == "2.0"
        right = sum(next(iter(a.json())) == LABELS[y] for a, y in zip(answers, labels, strict=True))
        assert right >= 7, [a.json() for a in answers]
        assert life.rollback("tiny")["default"] == "1.0"
        assert ask()[0].headers["X-Model-Version"] == "1.0"
        life.promote("tiny", "2.0")
        assert ask()[0].headers["X-Model-Version"] == "2.0"
    finally:
        target.down()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SERVETOOL, "compress", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1 and one error line, last (progress lines before it go to stderr too)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert all(line.startswith("... ") for line in lines[:-1]), proc.stderr
    for word in words:
        assert word in lines[-1], proc.stderr


def test_bad_input_is_one_line(tiny, tmp_path):
    distill = {"train": {"data": str(tiny / "train.npz")}, "epochs": 1}
    # through the CLI: a layer that is not there, and an ONNX source
    folder = spec_folder(tiny, tmp_path / "keep", {"prune": {"speedup": 2, "keep": ["head"]}})
    _one_line(_cli(str(folder), "--out", str(tmp_path / "o1")),
              "compress.prune.keep names 'head', which is not a module of the model")
    onnx = export.export(load_spec(folder), _trained(tiny), tmp_path / "onnx", "onnx").path
    folder = spec_folder(tiny, tmp_path / "onnx-src", {"prune": {"speedup": 2}},
                         source={"onnx": str(onnx)}, input=None)
    _one_line(_cli(str(folder), "--out", str(tmp_path / "o2")), "source is an ONNX file",
              "needs the model class (source.state_dict with model_file and class) or a "
              "torch.export program")

    def refused(section: dict | None, *words: str, error=CompressError, **overrides) -> None:
        with pytest.raises(error) as caught:
            folder = spec_folder(tiny, tmp_path / f"case{len(list(tmp_path.iterdir()))}",
                                 section, **overrides)
            compress(load_spec(folder), tmp_path / "out", latency_seconds=0, threads=1)
        assert "\n" not in str(caught.value)
        for word in words:
            assert word in str(caught.value)

    refused({"prune": {"speedup": 50}}, "compress.prune.speedup 50 cannot be met",
            "layers kept whole: fc")
    refused({"student": {"model_file": str(tiny / "model.py"), "class": "Student"}},
            "'compress.distill' is required: a student learns on training data", error=SpecError)
    refused({"prune": {"speedup": 2}, "distill": {"epochs": 2}},
            "'compress.distill.train' is required: the training data", error=SpecError)
    # training data not made yet: the spec still loads (package and deploy need none), compress
    # names the missing file
    refused({"prune": {"speedup": 2}, "distill": {**distill, "train": {
        "data": str(tmp_path / "later.npz")}}}, "compress.distill.train.data",
            f"names a file that does not exist: {tmp_path / 'later.npz'}")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 16, 16), np.float32))
    refused({"prune": {"speedup": 2}, "distill": {**distill, "train": {
        "data": str(tmp_path / "empty.npz")}}}, "no training data")
    refused({"prune": {"speed_up": 2}}, "compress.prune", "exactly one target", error=SpecError)
    refused({"prune": {"speedup": 2, "round": 8}}, "'compress.prune.round' is not a known key",
            error=SpecError)
    refused(None, "has no compress: section")
    refused({"prune": {"speedup": 2}}, "the compression gate needs a validation set",
            validation=None, calibration=None)
    refused({"prune": {"speedup": 2}}, "lacks array(s) y", error=SpecError,
            validation={"data": str(tiny / "train-x.npz")})
    with pytest.raises(CompressError) as caught:  # no mAP gate (nor box losses) yet
        folder = spec_folder(tiny, tmp_path / "detector", {"prune": {"speedup": 2}})
        compress(replace(load_spec(folder), task="object-detection"), tmp_path / "out")
    assert "compress supports task image-classification, tensor" in str(caught.value)
    assert "this model's task is object-detection" in str(caught.value)


def test_the_compress_section_reads_strictly(tiny, tmp_path):
    student = {"model_file": str(tiny / "model.py"), "class": "Student"}
    train = {"data": str(tiny / "train.npz")}
    spec = load_spec(spec_folder(tiny, tmp_path / "full", {
        "prune": {"macs_ratio": 0.4, "importance": "taylor", "keep": ["fc", "down.0"],
                  "round_to": 4, "steps": 3, "max_layer_ratio": 0.8},
        "distill": {"train": train, "epochs": 7, "lr": 0.01, "batch": 32, "temperature": 2,
                    "alpha": 0.2, "max_minutes": 1.5, "patience": 2, "step_epochs": 0, "seed": 3},
        "max_accuracy_drop": 0.25, "int8": True}))
    options = spec.compress
    assert (options.prune.target, options.prune.value, options.prune.keep, options.prune.steps) == (
        "macs_ratio", 0.4, ("fc", "down.0"), 3)
    assert (options.distill.epochs, options.distill.temperature, options.distill.max_minutes) == (
        7, 2.0, 1.5)
    assert options.distill.train.path == tiny / "train.npz"
    assert (options.max_accuracy_drop, options.int8, options.student) == (0.25, True, None)
    for section, words in [
        ({"prune": {"speedup": 1}}, "'compress.prune.speedup' must be > 1"),
        ({"prune": {"params_ratio": 1.5}}, "'compress.prune.params_ratio' must be between 0 and 1"),
        ({"prune": {"speedup": 2, "macs_ratio": 0.5}}, "exactly one target"),
        ({"prune": {"speedup": 2}, "student": student, "distill": {"train": train}},
         "gives both prune and student"),
        ({"prune": {"speedup": 2, "importance": "taylor"}}, "taylor importance is measured on "
                                                            "training data"),
        ({"prune": {"speedup": 2}, "distill": {"train": train, "alpha": 2}},
         "'compress.distill.alpha' must be between 0 and 1"),
        ({"prune": {"speedup": 2, "keep": "fc"}}, "'compress.prune.keep' must be a list"),
        ({"student": {**student, "model_file": "nope.py"}, "distill": {"train": train}},
         "'compress.student.model_file' names a file that does not exist"),
        ({"distill": {"train": train}}, "needs prune (channels removed from the original) or "
                                        "student")]:
        with pytest.raises(SpecError) as caught:
            load_spec(spec_folder(tiny, tmp_path / "bad", section))
        assert words in str(caught.value) and "\n" not in str(caught.value)
