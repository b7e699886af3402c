"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servetool.engines.torchserve.process import free_ports
from tests.conftest import DIGITS, ROOT, write_spec

SERVETOOL = str(Path(sys.executable).with_name("servetool"))
COMMANDS = ["package", "compress", "deploy", "image", "predict", "scale", "status", "token", "stop"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 300):
    return subprocess.run([SERVETOOL, *args], capture_output=True, text=True, cwd=cwd,
                          env=env or os.environ.copy(), timeout=timeout)


def assert_clean_error(proc, *words: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    proc = run(command, "--help")
    assert proc.returncode == 0 and "Usage: servetool " + command in proc.stdout


def test_bad_spec_is_one_line_naming_the_key(tmp_path):
    spec_dir = write_spec(tmp_path / "m", batch={"size": "eight"})
    proc = run("package", str(spec_dir), "--model-store", str(tmp_path / "store"))
    assert_clean_error(proc, "'batch.size'", "must be an integer", str(spec_dir / "servetool.yaml"))
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tensorrt_without_cuda_is_one_clear_line(tmp_path):
    spec_dir = write_spec(tmp_path / "m", format="tensorrt")
    proc = run("package", str(spec_dir), "--model-store", str(tmp_path / "store"))
    assert_clean_error(proc, "need an NVIDIA GPU with CUDA")
    assert not (tmp_path / "store").exists()


def test_convert_writes_each_format_and_reports_the_gate(tmp_path):
    # as a user runs it: from their own folder, into the default (relative) --out; the quantizer
    # works in a scratch directory, which once broke every relative path
    proc = run("convert", str(DIGITS), "--format", "onnx", "--format", "onnx-int8-static",
               "--format", "onnx-fp16", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["formats"]
    assert [r["format"] for r in rows] == ["onnx", "onnx-int8-static", "onnx-fp16"]
    for row in rows:
        assert (tmp_path / row["files"][0]).is_file()
        assert row["gate"]["ok"] and row["gate"]["accuracy"]["samples"] == 360
    assert (tmp_path / "build" / "digits" / "onnx-int8-static" / "model.onnx").is_file()


def test_commands_without_a_server_say_so(tmp_path):
    image = str(DIGITS / "samples" / "digit_0.png")
    proc = run("predict", "digits", image, "--run-dir", str(tmp_path / "run"))
    assert_clean_error(proc, "no TorchServe is running", "servetool deploy")
    status = run("status", "--json", "--run-dir", str(tmp_path / "run"))
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is False
    stop = run("stop", "--json", "--run-dir", str(tmp_path / "run"))
    assert stop.returncode == 0 and json.loads(stop.stdout)["stopped"] is False


def test_deploy_without_archives_or_java_is_explained(tmp_path, model_store):
    proc = run("deploy", "--model-store", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "r"))
    assert_clean_error(proc, "no archives in", "servetool package")
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = venv_bin  # a machine without java on PATH
    proc = run("deploy", "--model-store", str(model_store), "--run-dir", str(tmp_path / "r"), env=env)
    assert_clean_error(proc, "no `java` found", "openjdk-17-jre-headless")


@pytest.mark.server
def test_package_deploy_predict_scale_status_stop(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    ports = list(free_ports().values())
    where = ["--run-dir", str(run_dir), "--model-store", str(store)]
    packaged = run("package", str(DIGITS), "--model-store", str(store), "--json")
    assert packaged.returncode == 0, packaged.stderr
    result = json.loads(packaged.stdout)["models"][0]
    assert result["parity"]["ok"] and Path(result["archive"]).is_file()
    assert "exporting to onnx" in packaged.stderr  # progress on stderr, JSON alone on stdout

    deployed = run("deploy", *where, "--inference-port", str(ports[0]), "--management-port",
                   str(ports[1]), "--metrics-port", str(ports[2]), "--grpc-inference-port",
                   str(ports[3]), "--grpc-management-port", str(ports[4]))
    try:
        assert deployed.returncode == 0, deployed.stderr
        assert f"http://127.0.0.1:{ports[0]}/predictions/digits" in deployed.stdout
        assert "curl -H @<(servetool token --header) -T" in deployed.stdout

        predicted = run("predict", "digits", str(DIGITS / "samples" / "digit_6.png"), *where, "--json")
        assert predicted.returncode == 0, predicted.stderr
        assert next(iter(json.loads(predicted.stdout)["prediction"])) == "six"

        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        refused = run("predict", "digits", str(bad), *where)
        assert_clean_error(refused, "digits answered 400", "not an image in an accepted format")

        scaled = run("scale", "digits", "--workers", "3", *where, "--json")
        assert scaled.returncode == 0 and len(json.loads(scaled.stdout)["workers"]) == 3

        status = json.loads(run("status", *where, "--json").stdout)
        model = next(m for m in status["models"] if m["name"] == "digits")
        assert model["version"] == "1.0"
        assert [w["status"] for w in model["workers"]] == ["READY"] * 3

        load = run("bench", "serve", "digits", *where, "--requests", "60", "-c", "4",
                   "--payload", str(DIGITS / "samples"), "--out", str(tmp_path / "bench"), "--json")
        assert load.returncode == 0, load.stderr
        summary = json.loads(load.stdout)
        assert (summary["sent"], summary["ok"], summary["lost"], summary["errors"]) == (60, 60, 0, {})
        assert summary["throughput"] > 0 and summary["p99_ms"] >= summary["p50_ms"]
        assert Path(summary["files"]["png"]).is_file()

        token = run("token", *where)
        keys = json.loads((run_dir / "key_file.json").read_text())
        assert token.stdout.strip() == keys["inference"]["key"]
        # the README's recipe: the header through a pipe, the key in no command line
        servetool = Path(SERVETOOL)
        recipe = (f"curl -sf -H @<({servetool} token --header {' '.join(where)}) "
                  f"-T {DIGITS / 'samples' / 'digit_2.png'} "
                  f"http://127.0.0.1:{ports[0]}/predictions/digits")
        curl = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, timeout=60)
        assert curl.returncode == 0 and next(iter(json.loads(curl.stdout))) == "two", curl.stderr

        again = run("deploy", *where, "--json", "--inference-port", str(ports[0]))
        assert [m["action"] for m in json.loads(again.stdout)["models"]] == ["unchanged"]
    finally:
        stopped = run("stop", *where, "--json")
    assert json.loads(stopped.stdout)["stopped"] is True
    assert json.loads(run("status", *where, "--json").stdout)["running"] is False



@pytest.mark.parametrize("args, words", [
    (["predict", "../ping", str(DIGITS / "samples" / "digit_1.png")], "model name '../ping'"),
    (["scale", "digits", "--version", "../embed", "--workers", "1"], "version '../embed'"),
    (["scale", "a/b", "--workers", "1"], "model name 'a/b'"),
    (["bench", "serve", "x?y"], "model name 'x?y'"),
    # `^...$` lets `$` match before a trailing newline: names are matched whole (\A...\Z)
    (["predict", "digits\n", str(DIGITS / "samples" / "digit_1.png")], "model name 'digits\\n'"),
    (["predict", "digits", str(DIGITS / "samples" / "digit_1.png"), "--version", "1.0\n"],
     "version '1.0\\n'"),
    (["scale", "digits\n", "--workers", "1"], "model name 'digits\\n'"),
    (["scale", "digits", "--version", "2.0\n", "--workers", "1"], "version '2.0\\n'"),
    (["bench", "serve", "digits\n"], "model name 'digits\\n'"),
    (["versions", "digits\n"], "model name 'digits\\n'"),
    (["promote", "digits", "2.0\n"], "version '2.0\\n'"),
])
def test_model_names_and_versions_are_checked_before_any_request(args, words, tmp_path):
    proc = run(*args, "--run-dir", str(tmp_path / "nothing-runs-here"))
    assert_clean_error(proc, words, "is not valid")
    assert len(proc.stderr.strip().splitlines()) == 1  # the newline is shown escaped, not printed


def newline_forms(good: str) -> list[str]:
    return [good + "\n", good + "\r\n", "\n" + good, good[:2] + "\n" + good[2:]]


def test_a_name_with_a_newline_is_refused_by_every_check(tmp_path):
    """The management client's checks (before anything is sent), the spec, the split's labels and
    the Kubernetes names: each matches the whole string, so a trailing newline is refused."""
    from servetool.engines.torchserve import split_runtime
    from servetool.engines.torchserve.management import (
        APIError,
        Client,
        check_name,
        check_version,
        model_path,
    )
    from servetool.engines.torchserve.state import ServerState
    from servetool.model import spec
    from servetool.targets import kubecheck, manifests

    state = ServerState(run_dir=str(tmp_path), pid=0, host="127.0.0.1", ports={"management": 9},
                        model_store=str(tmp_path), token_auth=False)
    client = Client(state)
    for name, version in zip(newline_forms("digits"), newline_forms("2.0"), strict=True):
        for call, arg in ((check_name, name), (check_version, version), (model_path, name),
                          (lambda v: model_path("digits", v), version),
                          # refused before any connection (nothing listens on port 9)
                          (lambda n: client.register("digits.mar", n, 1, timeout=1), name),
                          (client.describe, name), (lambda v: client.unregister("digits", v), version)):
            with pytest.raises(APIError, match="is not valid"):
                call(arg)
        with pytest.raises(split_runtime.SplitError, match="not a model name"):
            split_runtime.set_weight(tmp_path, name, "2.0", 10)
    for pattern, good in ((spec.NAME_RE, "digits"), (spec.VERSION_RE, "1.0"),
                          (spec.INPUT_NAME, "input_ids"), (spec.AXIS_NAME, "batch"),
                          (split_runtime.NAME, "digits"), (manifests.NAME_RE, "servetool"),
                          (kubecheck.DNS_LABEL, "servetool"), (kubecheck.DNS_SUBDOMAIN, "a.b"),
                          (kubecheck.QUANTITY, "500m")):
        assert pattern.match(good), (pattern, good)
        assert not [bad for bad in newline_forms(good) if pattern.match(bad)], pattern
    with pytest.raises(spec.SpecError, match="name"):
        spec.load_spec(write_spec(tmp_path / "spec", name="digits\n"))
    with pytest.raises(spec.SpecError, match="version"):
        spec.load_spec(write_spec(tmp_path / "spec-v", version="1.0\n"))


@pytest.mark.server
def test_a_deployment_outside_the_repository_gets_the_same_frontend_settings(tmp_path, model_store):
    """servetool's tuning is its own default, not this repository's config.properties."""
    import shutil

    from servetool.engines.torchserve import process

    scratch = tmp_path / "project"
    (scratch / "model_store").mkdir(parents=True)
    shutil.copyfile(model_store / "digits.mar", scratch / "model_store" / "digits.mar")
    ports = free_ports()
    deployed = run("deploy", *[f"--{api.replace('_', '-')}-port={p}" for api, p in ports.items()],
                   cwd=scratch)
    try:
        assert deployed.returncode == 0, deployed.stderr
        outside = process.read_properties(scratch / ".servetool" / "config.properties")
    finally:
        run("stop", cwd=scratch)
    inside_file = process.render_config(process.ServerOptions(
        run_dir=tmp_path / "inside", model_store=scratch / "model_store",
        base_config=ROOT / "config.properties"))
    inside = process.read_properties(inside_file)
    for key in ("number_of_netty_threads", "netty_client_threads", "vmargs", "async_logging",
                "job_queue_size", "default_response_timeout", "metrics_mode"):
        assert outside[key] == inside[key], key
    assert outside["number_of_netty_threads"] == "1" and "-XX:+UseSerialGC" in outside["vmargs"]
    assert "-XX:TieredStopAtLevel=1" in outside["vmargs"]
