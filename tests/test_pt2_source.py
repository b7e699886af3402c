"""torch.export programs (.pt2) as a source: inputs read from the program, a batch fixed by a
batch-1 example served in chunks, ONNX and the program itself as formats, each served by the
archive's own handler and compared with the eager model; a .pt2 under another key (and another
file under exported_program) named for what it is; a pickled module whose package is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from handlers.runtimes import ExportedProgramRuntime
from servetool.convert import export
from servetool.convert.export.pickled import PickleSourceError, load_pickled_module
from servetool.convert.pipeline import convert
from servetool.convert.reference.served import ServedPath
from servetool.engines.torchserve.archive import build_archive
from servetool.model.spec import SpecError, load_spec
from servetool.operate.package import package
from tests.conftest import DIGITS

SHAPE = (3, 8, 8)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _rows(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict:
    """The eager model and its programs as users save them: {case: .pt2 path}."""
    root = tmp_path_factory.mktemp("programs")
    torch.manual_seed(0)
    model = SmallCNN().eval()
    cases = {
        # dynamic batch (Dim("batch") gives the range [2, inf): a batch of 1 runs too)
        "dynamic": ((torch.randn(2, *SHAPE),), ({0: torch.export.Dim("batch")},)),
        # an example of batch 1 and no dynamic_shapes: the batch is specialised to 1
        "batch1": ((torch.randn(1, *SHAPE),), None),
        # a bounded batch: 3 to 6 rows a call
        "bounded": ((torch.randn(4, *SHAPE),), ({0: torch.export.Dim("batch", min=3, max=6)},)),
    }
    paths = {}
    for case, (example, dims) in cases.items():
        paths[case] = root / f"{case}.pt2"
        torch.export.save(torch.export.export(model, example, dynamic_shapes=dims), paths[case])
    torch.save(model.state_dict(), root / "weights.pt")
    with torch.no_grad():
        torch.jit.trace(model, (torch.randn(2, *SHAPE),)).save(str(root / "traced.pt"))
    return {"model": model, "root": root, **paths}


def _spec_folder(folder: Path, source: dict, **extra) -> Path:
    folder.mkdir(parents=True)
    raw = {"name": folder.name, "version": "1", "task": "tensor", "source": source, **extra}
    (folder / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def _eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(("case", "fmt"), [("dynamic", "onnx"), ("batch1", "onnx"),
                                           ("dynamic", "exported-program"),
                                           ("batch1", "exported-program")])
def test_a_program_is_packaged_and_served_like_the_eager_model(programs, tmp_path, case, fmt):
    folder = _spec_folder(tmp_path / f"p-{case}", {"exported_program": str(programs[case])},
                          format=fmt, batch={"size": 3, "max_delay_ms": 5})
    spec = load_spec(folder)
    assert [(i.name, i.shape, i.dtype) for i in spec.inputs] == [("x", SHAPE, "float32")]
    if fmt == "exported-program":  # the whole package: the new runtime through the pre-flight
        summary = package(spec, tmp_path / "store")
        mar, notes = summary["archive"], summary["notes"]
    else:  # ONNX archives are pre-flighted elsewhere (tests/test_onnx_sources.py): time saved
        artifact, _ = convert(spec, fmt, tmp_path / "out")
        mar, notes = build_archive(spec, artifact, tmp_path / "store", check=False), artifact.notes
    assert notes.get("fixed_batch") == (1 if case == "batch1" else None)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(unpacked)
        assert ("model.pt2" in zf.namelist()) == (fmt == "exported-program")
    config = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    assert config["handler"]["runtime"] == fmt
    x = _rows(3)
    replies, statuses, _ = ServedPath(unpacked, config).answer(
        [json.dumps(row.tolist()).encode() for row in x])
    assert statuses == [200, 200, 200], replies
    np.testing.assert_allclose(np.array(replies, np.float32), _eager(programs["model"], x),
                               rtol=1e-4, atol=1e-5)


def test_a_bounded_batch_runs_in_calls_the_program_takes(programs):
    """Guards refuse 1, 2 and 7 rows for a program exported with Dim(min=3, max=6); the runtime
    pads a short batch with copies of its last row and splits a long one."""
    with pytest.raises(Exception, match="Guard failed"):
        torch.export.load(programs["bounded"]).module()(torch.from_numpy(_rows(2)))
    runtime = ExportedProgramRuntime(str(programs["bounded"]), 1)
    assert (runtime.least, runtime.most, runtime.fixed_batch) == (3, 6, None)
    for count in (1, 2, 7, 13):
        x = _rows(count, seed=count)
        np.testing.assert_allclose(runtime.run(x)[0], _eager(programs["model"], x),
                                   rtol=1e-5, atol=1e-6)


def test_the_spec_may_repeat_the_programs_input_but_not_contradict_it(programs, tmp_path):
    source = {"exported_program": str(programs["dynamic"])}
    same = load_spec(_spec_folder(tmp_path / "same", source,
                                  input={"shape": list(SHAPE), "range": [0, 1]}))
    assert same.inputs[0].name == "x" and same.inputs[0].range == (0, 1)
    with pytest.raises(SpecError) as err:
        load_spec(_spec_folder(tmp_path / "other", source, input={"shape": [3, 32, 32]}))
    message = str(err.value)
    assert "gives x [3, 32, 32] float32, but the program dynamic.pt2 takes x [3, 8, 8] float32" \
        in message and "leave input out to use the program's" in message
    with pytest.raises(SpecError, match="int64, but the program dynamic.pt2 takes x"):
        load_spec(_spec_folder(tmp_path / "dtype", source,
                               input={"shape": list(SHAPE), "dtype": "int64"}))
    with pytest.raises(SpecError, match="gives 2 input.*takes 1"):
        load_spec(_spec_folder(tmp_path / "two", source, inputs=[
            {"name": "a", "shape": list(SHAPE)}, {"name": "b", "shape": list(SHAPE)}]))
    with pytest.raises(SpecError, match="a torch.export program is served as one of "
                                        "exported-program, onnx,.* TorchScript is not made"):
        load_spec(_spec_folder(tmp_path / "ts", source, format="torchscript"))


@pytest.mark.parametrize("key", ["state_dict", "torchscript", "pickled_module", "onnx"])
def test_a_program_under_another_key_is_named_a_program(programs, tmp_path, key):
    source = {key: str(programs["batch1"]), "trust_pickle": True} if key == "pickled_module" \
        else {key: str(programs["batch1"])}
    if key == "state_dict":
        source.update({"model_file": str(DIGITS / "model.py"), "class": "DigitsNet"})
    with pytest.raises(SpecError) as err:
        load_spec(_spec_folder(tmp_path / key, source))
    assert f"key 'source.{key}' names batch1.pt2, which is a torch.export program " \
           "(torch.export.save)" in str(err.value)
    assert "name it source.exported_program" in str(err.value)


@pytest.mark.parametrize(("file", "what", "fix"), [
    ("weights.pt", "a torch.save file", "name it source.state_dict (with model_file and class)"),
    ("traced.pt", "a TorchScript file", "name it source.torchscript")])
def test_another_file_named_as_a_program_says_what_it_is(programs, tmp_path, file, what, fix):
    with pytest.raises(SpecError) as err:
        load_spec(_spec_folder(tmp_path / "s", {"exported_program": str(programs["root"] / file)}))
    assert f"named as source.exported_program, but it is {what}, not a torch.export program: " \
           f"{fix}" in str(err.value) and "corrupted" not in str(err.value)


def test_a_pytorch_model_is_exported_to_a_program_too(tmp_path):
    """The digits model (a state_dict) as the exported-program format: torch.export with a
    dynamic batch, gated against eager like any format."""
    artifact, report = convert(load_spec(DIGITS), "exported-program", tmp_path / "out")
    assert report.ok and artifact.path.name == "model.pt2" and "fixed_batch" not in artifact.notes
    runtime = ExportedProgramRuntime(str(artifact.path), 1)
    x = export.example_batch(load_spec(DIGITS), 5)
    np.testing.assert_allclose(runtime.run(x)[0],
                               export.runner_for(export.load_original(load_spec(DIGITS)))(x)[0],
                               rtol=1e-5, atol=1e-6)


def _pickle_with_class_in(module: str, target: Path, monkeypatch) -> Path:
    """torch.save of a module whose class lives in `module`: importable while saving only, as
    on the machine that trained it."""
    with monkeypatch.context() as patch:
        parts = module.split(".")
        for i in range(len(parts)):
            patch.setitem(sys.modules, ".".join(parts[:i + 1]),
                          types.ModuleType(".".join(parts[:i + 1])))
        cls = type("Net", (nn.Linear,), {"__module__": module})
        sys.modules[module].Net = cls
        torch.save(cls(4, 3), target)
    return target


def test_a_pickle_whose_package_is_missing_names_the_package(tmp_path, monkeypatch):
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here: the package is not missing")
    pickled = _pickle_with_class_in("timm.models.resnet", tmp_path / "resnet.pt", monkeypatch)
    with pytest.raises(PickleSourceError) as err:
        load_pickled_module(pickled, None)
    message = str(err.value)
    assert "class lives in 'timm.models.resnet', from the package 'timm', which is not " \
           "installed: pip install timm" in message and "source.model_file" not in message
    # a user's own module name no test imports (another test may have imported a "model")
    own = _pickle_with_class_in("my_training_net", tmp_path / "own.pt", monkeypatch)
    with pytest.raises(PickleSourceError) as err:
        load_pickled_module(own, None)
    assert "refers to a class in 'my_training_net', which Python cannot import" in str(err.value)
    assert "name the file that defines it as source.model_file" in str(err.value)
    assert "pip install" not in str(err.value)


def test_bench_formats_measures_a_program_and_its_onnx_side_by_side(programs, tmp_path):
    """`bench formats` on a .pt2 source: the eager program, ONNX made from it and the program
    itself each measured (none skipped), every row gated against the program."""
    from servetool.bench.formats import bench_formats

    folder = _spec_folder(tmp_path / "bench", {"exported_program": str(programs["dynamic"])})
    result = bench_formats(load_spec(folder / "servetool.yaml"), ["onnx", "exported-program"],
                           batch=4, iterations=20, seconds=0.5, threads=1)
    rows = {row["format"]: row for row in result["rows"]}
    assert set(rows) == {"eager", "onnx", "exported-program"}
    for fmt in ("onnx", "exported-program"):
        assert "skipped" not in rows[fmt], rows[fmt]
        assert rows[fmt]["gate"] == "pass" and rows[fmt]["p50_ms"] > 0 and rows[fmt]["throughput"] > 0
