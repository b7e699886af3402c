"""The model contract: several named inputs, dynamic axes padded per batch, outputs by name,
through package, the handler and a real TorchServe; an ONNX source's inputs read from the file."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from servetool.convert import export
from servetool.convert.pipeline import convert
from servetool.engines.torchserve import archive
from servetool.model.spec import SpecError, load_spec
from servetool.operate import lifecycle
from servetool.operate.package import package
from servetool.targets.local import LocalTarget
from tests.conftest import serve_in_process, server_options
from tests.test_cli import run
from tests.test_server import http_predict

FRAGILE = Path(__file__).with_name("models") / "fragile.py"
INPUTS = [{"name": "input_ids", "shape": ["seq"], "dtype": "int64"},
          {"name": "attention_mask", "shape": ["seq"], "dtype": "int64"}]


def write(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def masked_mean_spec(folder: Path, **extra) -> Path:
    return write(folder, {"name": "maskedmean", "source": {
        "model_file": str(FRAGILE), "class": "MaskedMean", "random_weights": True},
        "inputs": INPUTS, "outputs": ["pooled", "states"], "task": "tensor", "format": "onnx",
        **extra})


def request(ids: list[int]) -> dict:
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def handle(folder: Path, config: dict, payloads: list) -> tuple[list, list[int]]:
    replies, statuses, _ = serve_in_process(folder, config, [json.dumps(p).encode() for p in payloads])
    return replies, statuses


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maskedmean")
    spec = load_spec(masked_mean_spec(folder / "spec"))
    artifact, report = convert(spec, "onnx", folder)
    return spec, folder, artifact, report


def test_named_inputs_and_dynamic_axes_export_and_pass_the_gate(exported):
    spec, _, artifact, report = exported
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact.path))
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "seq"])]
    assert [o.name for o in session.get_outputs()] == ["pooled", "states"]
    assert report.ok and [o.name for o in report.outputs] == ["pooled", "states"]
    assert all(o.top1_agreement is None for o in report.outputs)  # not a classifier


def test_requests_of_different_lengths_in_one_batch_get_their_answers_alone(exported):
    spec, folder, artifact, _ = exported
    config = archive.model_config(spec, artifact)
    payloads = [request([1, 2, 3]), request([4, 5, 6, 7, 8, 9, 1, 2]), {"input_ids": [1]},
                request([9]), {"input_ids": [1, 2], "attention_mask": [1]},
                request([5, 5, 5, 5, 5])]
    replies, statuses = handle(folder, config, payloads)
    assert statuses == [200, 200, 400, 200, 400, 200]
    assert "missing 'attention_mask'" in replies[2]["error"]
    assert "axis 'seq' is 2 long in one input and 1 in 'attention_mask'" in replies[4]["error"]
    for i in (0, 1, 3, 5):
        alone, _ = handle(folder, config, [payloads[i]])
        assert set(replies[i]) == {"pooled", "states"}
        assert len(replies[i]["states"]) == len(payloads[i]["input_ids"])  # padding cropped off
        np.testing.assert_allclose(replies[i]["pooled"], alone[0]["pooled"], atol=1e-6)
        np.testing.assert_allclose(replies[i]["states"], alone[0]["states"], atol=1e-6)
    model = export.load_original(spec)
    with torch.inference_mode():
        pooled, _ = model(torch.tensor([[4, 5, 6, 7, 8, 9, 1, 2]]), torch.ones(1, 8, dtype=torch.long))
    np.testing.assert_allclose(replies[1]["pooled"], pooled[0].numpy(), atol=1e-5)


def test_an_onnx_source_is_read_for_its_inputs_and_served_over_http(exported, tmp_path):
    _, _, artifact, _ = exported
    shutil.copyfile(artifact.path, tmp_path / "model.onnx")
    folder = write(tmp_path / "spec", {"name": "fromonnx", "source": {"onnx": "../model.onnx"},
                                       "task": "tensor",  # batches of 4: lengths mix in one batch
                                       "batch": {"size": 4, "max_delay_ms": 1000},
                                       "workers": {"min": 1, "max": 1}})
    spec = load_spec(folder)  # no input: section at all
    assert [(i.name, i.shape, i.dtype) for i in spec.inputs] == [
        ("input_ids", ("seq",), "int64"), ("attention_mask", ("seq",), "int64")]
    # and a TorchScript source with the same two inputs, exported to ONNX
    scripted = torch.jit.script(export.load_original(load_spec(masked_mean_spec(tmp_path / "m"))))
    scripted.save(str(tmp_path / "mm.ts"))
    ts_folder = write(tmp_path / "ts", {"name": "fromts", "source": {"torchscript": "../mm.ts"},
                                        "inputs": INPUTS, "task": "tensor"})
    store = tmp_path / "store"
    packaged = run("package", str(folder), "--model-store", str(store))  # through the CLI
    assert packaged.returncode == 0, packaged.stderr
    package(load_spec(ts_folder), store)
    target = LocalTarget(server_options(tmp_path / "run", store))
    try:
        lifecycle.deploy(target, [])
        state = target.running()
        bodies = [request([1, 2, 3]), request([7] * 9), request([4]), request([2, 3])]
        alone = [http_predict(state, "fromonnx", json.dumps(b).encode(), "application/json").json()
                 for b in bodies]
        for model in ("fromonnx", "fromts"):
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda b, m=model: http_predict(
                    state, m, json.dumps(b).encode(), "application/json"), bodies))
            assert [r.status_code for r in replies] == [200] * 4, replies[0].text
            for body, reply, single in zip(bodies, replies, alone, strict=True):
                answer = reply.json()
                states = answer["states"] if model == "fromonnx" else answer["output_1"]
                assert len(states) == len(body["input_ids"])
                pooled = answer["pooled"] if model == "fromonnx" else answer["output_0"]
                np.testing.assert_allclose(pooled, single["pooled"], atol=1e-5)
        sample = tmp_path / "request.json"
        sample.write_text(json.dumps(request([3, 1, 4, 1, 5])))
        predicted = run("predict", "fromonnx", str(sample), "--json", "--run-dir",
                        str(target.opts.run_dir), "--model-store", str(store))
        assert predicted.returncode == 0, predicted.stderr
        assert len(json.loads(predicted.stdout)["prediction"]["states"]) == 5
    finally:
        target.down()


def test_spec_errors_for_inputs(tmp_path):
    cases = [
        ({"inputs": INPUTS + [INPUTS[0]]}, "names an input twice"),
        ({"inputs": [{"name": "x", "shape": ["seq", 0]}]}, "has 0 at position 1"),
        ({"inputs": [{"shape": [4]}]}, "key 'inputs[0].name' is required"),
        ({"input": {"shape": [4]}, "inputs": INPUTS}, "and input both given"),
    ]
    for extra, words in cases:
        with pytest.raises(SpecError, match=None) as err:
            raw = yaml.safe_load((masked_mean_spec(tmp_path / "x").joinpath("servetool.yaml"))
                                 .read_text())
            raw.pop("inputs")
            raw.update(extra)
            load_spec(write(tmp_path / "y", raw))
        assert words in str(err.value), str(err.value)
    with pytest.raises(SpecError, match="image-classification takes one input"):
        load_spec(masked_mean_spec(tmp_path / "z", task="image-classification"))


@pytest.mark.parametrize("shape, expected", [
    ([-1], ("x_1",)), ([None, 4], ("x_1", 4)), (["seq"], ("seq",)), ([3, "h", "w"], (3, "h", "w")),
])
def test_any_length_axes_can_be_written_as_a_name_null_or_minus_one(tmp_path, shape, expected):
    spec = load_spec(write(tmp_path / "s", {
        "name": "anylength", "source": {"model_file": str(FRAGILE), "class": "ExpNet",
                                        "random_weights": True},
        "input": {"name": "x", "shape": shape}, "task": "tensor"}))
    assert spec.inputs[0].shape == expected


def test_validation_data_for_several_inputs_is_one_array_per_input_name(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (20, 6))
    np.savez(tmp_path / "val.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             y=rng.integers(0, 4, 20))
    spec = load_spec(masked_mean_spec(tmp_path / "s", validation={"data": str(tmp_path / "val.npz")}))
    _, report = convert(spec, "onnx", tmp_path / "out")
    assert report.ok and report.accuracy.samples == 20 and report.accuracy.drop_points == 0
    np.savez(tmp_path / "bad.npz", x=ids, y=rng.integers(0, 4, 20))
    with pytest.raises(SpecError, match="lacks array.s. attention_mask, input_ids"):
        load_spec(masked_mean_spec(tmp_path / "b", validation={"data": str(tmp_path / "bad.npz")}))


def test_a_model_that_raises_on_the_sample_inputs_is_one_line_naming_the_range(tmp_path):
    """Integer samples default to [0, 2) (valid ids, masks and type ids); a range the model does not
    take says so on one line (found with a real BERT: token_type_ids take 0 and 1 only)."""
    raw = {"name": "embednet", "source": {"model_file": str(FRAGILE), "class": "EmbedNet",
                                          "random_weights": True},
           "input": {"name": "ids", "shape": [4], "dtype": "int64"}, "task": "tensor"}
    assert package(load_spec(write(tmp_path / "ok", raw)), tmp_path / "store")["parity"]["ok"]
    raw["input"]["range"] = [0, 50]  # the embedding has 10 rows
    proc = run("package", str(write(tmp_path / "bad", raw)), "--model-store", str(tmp_path / "s2"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last.startswith("error: embednet: the model raised on servetool's sample inputs "
                           "(ids [0, 50)): ") and "Give inputs[].range the values it takes" in last
