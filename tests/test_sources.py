"""Sources people have: TorchScript files (also exported to ONNX), and whole modules saved with
torch.save(model), accepted only behind the spec's explicit opt-in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from servetool.convert import export
from servetool.convert.pipeline import convert
from servetool.errors import ServetoolError
from servetool.model.spec import SpecError, load_spec
from servetool.operate import lifecycle
from tests.conftest import DIGITS, write_spec
from tests.test_cli import run

SAVE_WHOLE_MODULE = """
import sys, torch
sys.path.insert(0, {folder!r})
from model import DigitsNet          # as a training script would: the class from model.py
net = DigitsNet()
net.load_state_dict(torch.load({weights!r}, weights_only=True))
torch.save(net, {target!r})
"""

SAVE_FROM_MAIN = """
import torch
from torch import nn

class Tiny(nn.Module):                # defined in the script itself: pickled as __main__.Tiny
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(x)

torch.manual_seed(0)
torch.save(Tiny(), {target!r})
"""


def save_whole_module(target: Path, script: str = SAVE_WHOLE_MODULE) -> Path:
    code = script.format(folder=str(DIGITS), weights=str(DIGITS / "digits.pt"), target=str(target))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=target.parent)
    return target


def spec_with_source(folder: Path, source: dict, **overrides) -> Path:
    write_spec(folder, **overrides)
    raw = yaml.safe_load((folder / "servetool.yaml").read_text())
    raw["source"] = source
    (folder / "servetool.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_a_whole_module_needs_the_opt_in_and_then_matches_the_original(tmp_path):
    pickled = save_whole_module(tmp_path / "whole.pt")
    refused = spec_with_source(tmp_path / "a", {"pickled_module": str(pickled)})
    with pytest.raises(SpecError) as err:
        load_spec(refused)
    assert "key 'source.pickled_module' names whole.pt, a whole pickled module (torch.save(model))" \
        in str(err.value) and "runs code from the file. Set source.trust_pickle: true" in str(err.value)
    spec = load_spec(spec_with_source(tmp_path / "b", {
        "pickled_module": str(pickled), "trust_pickle": True, "model_file": str(DIGITS / "model.py")}))
    model = export.load_original(spec)
    reference = export.load_original(load_spec(DIGITS))
    x = torch.from_numpy(export.example_batch(spec, 4))
    with torch.inference_mode():
        np.testing.assert_array_equal(model(x).numpy(), reference(x).numpy())


def test_a_module_pickled_from_a_training_script_loads_with_its_model_file(tmp_path):
    pickled = save_whole_module(tmp_path / "tiny.pt", SAVE_FROM_MAIN)
    (tmp_path / "tiny_model.py").write_text(SAVE_FROM_MAIN.split("torch.manual_seed")[0]
                                            .replace("{target!r}", "''"))
    spec = load_spec(spec_with_source(tmp_path / "s", {
        "pickled_module": str(pickled), "trust_pickle": True,
        "model_file": str(tmp_path / "tiny_model.py")},
        task="tensor", preprocess=None, labels=None, input={"shape": [4]}))
    out = export.runner_for(export.load_original(spec))(np.ones((2, 4), np.float32))
    assert out[0].shape == (2, 3)
    without = load_spec(spec_with_source(tmp_path / "t", {"pickled_module": str(pickled),
                                                          "trust_pickle": True},
                                         task="tensor", preprocess=None, labels=None,
                                         input={"shape": [4]}))
    with pytest.raises(ServetoolError, match="refers to a class Python cannot find .* name the "
                                                 "file that defines it as source.model_file"):
        export.load_original(without)


def test_each_kind_of_file_under_the_wrong_key_says_what_it_is(tmp_path):
    pickled = save_whole_module(tmp_path / "whole.pt")
    as_state = load_spec(spec_with_source(tmp_path / "a", {
        "state_dict": str(pickled), "model_file": str(DIGITS / "model.py"), "class": "DigitsNet"}))
    with pytest.raises(export.ExportError) as err:
        export.load_original(as_state)
    message = str(err.value)
    assert "not a state_dict (a torch.save file holding pickled objects: a whole module" in message
    assert "name it as source.pickled_module (with trust_pickle: true" in message
    assert "\n" not in message and "Weights only load failed" in message  # the whole cause, one line
    as_script = load_spec(spec_with_source(tmp_path / "b", {"torchscript": str(pickled)}))
    with pytest.raises(export.ExportError, match=r"not a TorchScript file \(a torch.save file"):
        export.load_original(as_script)


def test_a_torchscript_source_is_served_as_onnx(tmp_path):
    scripted = torch.jit.script(export.load_original(load_spec(DIGITS)))
    scripted.save(str(tmp_path / "digits.ts"))
    folder = spec_with_source(tmp_path / "s", {"torchscript": str(tmp_path / "digits.ts")},
                              name="digits_from_ts")  # format: onnx, the default
    artifact, report = convert(load_spec(folder), "onnx", tmp_path / "out")
    assert artifact.path.suffix == ".onnx" and report.ok
    proc = run("package", str(folder), "--model-store", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    assert "digits_from_ts 1.0 as onnx" in proc.stdout


def test_an_export_failure_is_one_line_with_the_whole_cause(tmp_path):
    model = tmp_path / "bad_model.py"
    model.write_text("import torch\nfrom torch import nn\n\nclass Bad(nn.Module):\n"
                     "    def forward(self, x):\n"
                     "        n = int(x.abs().sum().item() * 1000) % 7 + 1\n"  # data-dependent
                     "        return torch.zeros(x.shape[0], n)\n")
    folder = spec_with_source(tmp_path / "s", {"model_file": str(model), "class": "Bad",
                                               "random_weights": True},
                              task="tensor", preprocess=None, labels=None, validation=None,
                              calibration=None)
    proc = run("package", str(folder), "--model-store", str(tmp_path / "store"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # progress lines, then one error line: nothing the exporter printed on its own
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("... ")]
    assert len(lines) == 1 and lines[0].startswith("error: ONNX export failed: "), proc.stderr
    assert "GuardOnDataDependentSymNode" in lines[0] and len(lines[0]) > 200


def test_a_whole_module_with_the_opt_in_is_packaged_and_served(tmp_path):
    from servetool.targets.local import LocalTarget
    from tests.conftest import server_options
    from tests.test_server import http_predict

    pickled = save_whole_module(tmp_path / "whole.pt")
    folder = spec_with_source(tmp_path / "s", {
        "pickled_module": str(pickled), "trust_pickle": True,
        "model_file": str(DIGITS / "model.py")}, name="digits_pickled")
    proc = run("package", str(folder), "--model-store", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    target = LocalTarget(server_options(tmp_path / "run", tmp_path / "store"))
    try:
        lifecycle.deploy(target, [])
        reply = http_predict(target.running(), "digits_pickled",
                             (DIGITS / "samples" / "digit_7.png").read_bytes())
        assert reply.status_code == 200 and next(iter(reply.json())) == "seven"
    finally:
        target.down()
