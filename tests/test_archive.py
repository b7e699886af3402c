"""The .mar: its contents, its config, and the pre-flight that stops a broken handler early."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from servetool.convert import export
from servetool.engines.torchserve import archive, preflight
from servetool.engines.torchserve.preflight import PreflightError
from servetool.model.spec import load_spec
from tests.conftest import DIGITS


def test_archive_is_self_contained_with_its_config(model_store):
    with zipfile.ZipFile(model_store / "digits.mar") as zf:
        names = set(zf.namelist())
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert {"entry.py", "model.onnx", "labels.txt", "MAR-INF/MANIFEST.json", "model-config.yaml",
            "handlers/__init__.py", "handlers/entry.py", "handlers/runtimes.py",
            "handlers/tasks.py"} <= names
    assert not any("servetool" in n for n in names)
    assert (config["batchSize"], config["maxBatchDelay"]) == (8, 1)  # the spec's
    assert "minWorkers" not in config and "maxWorkers" not in config  # auto: chosen at deploy
    assert config["handler"]["format"] == "onnx"
    assert config["handler"]["artifact"] == "model.onnx"
    assert config["handler"]["preprocess"]["mean"] == [0.305447]
    meta = archive.archive_manifest(model_store / "digits.mar")["manifest"]["model"]
    assert (meta["modelName"], meta["modelVersion"], meta["handler"]) == ("digits", "1.0", "entry.py")


def test_digest_ignores_build_time_but_not_content(tmp_path):
    spec = load_spec(DIGITS)
    artifact = export.export(spec, export.load_original(spec), tmp_path / "a")
    first = archive.archive_digest(archive.build_archive(spec, artifact, tmp_path / "s1", check=False))
    second = archive.archive_digest(archive.build_archive(spec, artifact, tmp_path / "s2", check=False))
    assert first == second
    artifact.path.write_bytes(artifact.path.read_bytes() + b"\0")
    third = archive.archive_digest(archive.build_archive(spec, artifact, tmp_path / "s3", check=False))
    assert third != first


def unpack(mar, target):
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(target)
    return target


def test_preflight_passes_on_the_real_archive(model_store, tmp_path):
    result = preflight.run(unpack(model_store / "digits.mar", tmp_path / "ok"), load_spec(DIGITS))
    good, bad = result["replies"]
    assert good["status"] == 200 and len(good["body"]) == 3
    assert bad["status"] == 400
    assert result["servetool_imported"] is False


def test_preflight_quotes_a_handler_that_cannot_import(model_store, tmp_path):
    folder = unpack(model_store / "digits.mar", tmp_path / "broken")
    entry = folder / "entry.py"
    entry.write_text(entry.read_text().replace("import numpy as np\n",
                                          "import numpy as np\nimport module_that_is_not_installed\n"))
    with pytest.raises(PreflightError) as err:
        preflight.run(folder, load_spec(DIGITS))
    assert "failed to load or answer" in str(err.value)
    assert "No module named 'module_that_is_not_installed'" in str(err.value)


def test_preflight_rejects_a_handler_that_needs_servetool(model_store, tmp_path):
    folder = unpack(model_store / "digits.mar", tmp_path / "leaky")
    entry = folder / "entry.py"
    entry.write_text(entry.read_text().replace("import numpy as np\n",
                                          "import numpy as np\nimport servetool.model.spec\n"))
    with pytest.raises(PreflightError, match="imports servetool"):
        preflight.run(folder, load_spec(DIGITS))


def test_openvino_archive_carries_its_weights_and_runtime(model_store):
    with zipfile.ZipFile(model_store / "digits_ov.mar") as zf:
        names = set(zf.namelist())
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert {"model.xml", "model.bin"} <= names
    assert (config["handler"]["runtime"], config["handler"]["format"]) == ("openvino", "openvino")
