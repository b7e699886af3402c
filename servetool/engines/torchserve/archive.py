"""Artifact + handler files + model-config.yaml -> model_store/NAME.mar (torch-model-archiver API).

The archive is self-contained: the `handlers` package travels inside it, so it runs on a stock
TorchServe with no servetool installed. It is built in a scratch folder, unpacked and pre-flighted
there, and only then moved into the model store, so a broken build never replaces a good archive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import handlers
from servetool.convert.export import Artifact
from servetool.engines.torchserve import preflight
from servetool.errors import ServetoolError
from servetool.model.spec import ModelSpec

HANDLER_PACKAGE = Path(handlers.__file__).resolve().parent
ENTRY = HANDLER_PACKAGE / "entry.py"
SMOKE_FILE = "smoke-request.json"  # a request that must be answered 200: see build_archive


class ArchiveError(ServetoolError):
    pass


def handler_config(spec: ModelSpec, artifact: Artifact) -> dict[str, Any]:
    """What the handler reads at initialize (model-config.yaml, section `handler:`)."""
    return {
        "format": artifact.format.name,
        "runtime": artifact.format.runtime,
        "precision": artifact.format.precision,
        "artifact": artifact.path.name,
        "runtime_options": artifact.runtime_options,
        "task": spec.task,
        "inputs": [i.as_dict() for i in spec.inputs],
        "input_shape": list(spec.input_shape),  # the first input's: for archives' older readers
        "input_dtype": spec.input_dtype,
        "allow_nonfinite": spec.allow_nonfinite,
        "preprocess": spec.preprocess.as_dict(),
        "labels": "labels.txt" if spec.label_names() else None,
        "top_k": spec.top_k,
        "text": spec.text.handler_dict() if spec.text else None,
        "detection": spec.detection.handler_dict() if spec.detection else None,
        "model_name": spec.name,
        "max_request_bytes": spec.max_request_bytes,
        "output_values": artifact.notes.get("output_values"),
    }


def model_config(spec: ModelSpec, artifact: Artifact) -> dict[str, Any]:
    # Worker counts left out ("auto") are chosen at deploy time from the serving machine's cores.
    workers = {} if spec.min_workers is None else {"minWorkers": spec.min_workers,
                                                   "maxWorkers": spec.max_workers}
    return {
        **workers,
        # Any batch size is right, also for a model whose ONNX file fixes its batch at N: the
        # handler's runtime runs a TorchServe batch in chunks of N (handlers/runtimes.py,
        # run_in_chunks), so the spec's batch.size stays what TorchServe collects; `package`
        # names the fixed batch, and says when batch.size is no multiple of it (padding rows).
        "batchSize": spec.batch_size,
        # TorchServe reads 0 as "unset" and waits its default 100 ms for every batch to fill; 1 ms
        # is the least it waits, which is what a spec's 0 asks for.
        "maxBatchDelay": max(1, spec.max_batch_delay_ms),
        "responseTimeout": spec.response_timeout_s,
        "handler": handler_config(spec, artifact),
    }


def build_archive(spec: ModelSpec, artifact: Artifact, model_store: Path, *,
                  check: bool = True,
                  verify: Callable[[Path, dict[str, Any]], None] | None = None) -> Path:
    """Write model_store/NAME.mar after a pre-flight of the very archive that will ship;
    `verify` (reference parity) is then given the unpacked archive and its config, and may raise
    to keep the archive out of the store."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"servetool-{spec.name}-") as scratch_dir:
        scratch = Path(scratch_dir)
        extra = scratch / "extra"
        shutil.copytree(HANDLER_PACKAGE, extra / "handlers",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if spec.labels:
            shutil.copyfile(spec.labels, extra / "labels.txt")
        elif spec.label_names():  # a text classifier's id2label
            (extra / "labels.txt").write_text("\n".join(spec.label_names()) + "\n")
        if spec.text:
            shutil.copyfile(spec.text.tokenizer, extra / spec.text.tokenizer.name)
        # The request a new version is smoke-tested with once it is registered, before it takes
        # traffic (servetool.operate.lifecycle): the pre-flight's good request, answered 200 in-process.
        body, content_type = preflight.sample_requests(spec)[0]
        (extra / SMOKE_FILE).write_text(json.dumps({
            "content_type": content_type, "body": base64.b64encode(body).decode()}) + "\n")
        for companion in artifact.files:  # e.g. OpenVINO's .bin, a pre-optimised ONNX model
            if companion != artifact.path:
                shutil.copyfile(companion, extra / companion.name)
        config_file = scratch / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config(spec, artifact), sort_keys=False))
        out = scratch / "out"
        out.mkdir()
        generate_model_archive(ModelArchiverConfig(
            model_name=spec.name, handler=str(ENTRY), version=spec.version,
            serialized_file=str(artifact.path), extra_files=str(extra), export_path=str(out),
            config_file=str(config_file), force=True,
        ))
        built = out / f"{spec.name}.mar"
        if not built.is_file():
            raise ArchiveError(f"torch-model-archiver wrote no {built.name}")
        if check:
            unpacked = scratch / "unpacked"
            with zipfile.ZipFile(built) as zf:
                zf.extractall(unpacked)
            preflight.run(unpacked, spec)
            if verify is not None:
                verify(unpacked, model_config(spec, artifact))
        target = model_store / built.name
        # Same filesystem rename where possible, so a running server never sees half a file.
        staged = model_store / f".{built.name}.partial"
        shutil.copyfile(built, staged)
        os.replace(staged, target)
    return target


# A JSON number as a client writes it, with its separator: "-0.123456789," is 13 bytes; 24 covers
# full float64 precision ("-1.2345678901234567e-05,").
JSON_BYTES_PER_VALUE = 24
REQUEST_OVERHEAD_BYTES = 64 * 1024


def request_bytes_needed(config: dict[str, Any]) -> int | None:
    """The largest request body a model's handler expects (its model-config.yaml), or None where
    TorchServe's default does (images are compressed files of any size up to the pixel limit)."""
    handler = config.get("handler") or {}
    if handler.get("max_request_bytes"):
        return int(handler["max_request_bytes"])
    inputs = handler.get("inputs") or ([{"shape": handler["input_shape"]}]
                                       if handler.get("input_shape") else [])
    if handler.get("task") != "tensor" or not inputs:
        return None
    if any(isinstance(d, str) for i in inputs for d in i["shape"]):
        return None  # a dynamic axis has no largest length: the spec's max_request_bytes says
    values = sum(int(np.prod(i["shape"])) for i in inputs)
    return values * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD_BYTES


def response_bytes_needed(config: dict[str, Any]) -> int | None:
    """The largest answer a tensor model gives (its outputs as JSON), or None."""
    handler = config.get("handler") or {}
    if handler.get("task") == "tensor" and handler.get("output_values"):
        return int(handler["output_values"]) * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD_BYTES
    return None


def archive_sizes(archives: list[Path]) -> tuple[int | None, int | None]:
    """What the largest request to, and answer from, any of these archives may need."""
    configs = [archive_manifest(p)["config"] for p in archives]
    requests = [n for n in map(request_bytes_needed, configs) if n]
    responses = [n for n in map(response_bytes_needed, configs) if n]
    return max(requests, default=None), max(responses, default=None)


def archive_digest(path: Path) -> str:
    """A digest of what the archive holds, blind to zip timestamps and the manifest's build date,
    so that re-packaging an unchanged model does not make deploy re-register it."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            data = zf.read(name)
            if name == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest.pop("createdOn", None)
                data = json.dumps(manifest, sort_keys=True).encode()
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def archive_manifest(path: Path) -> dict[str, Any]:
    """The MANIFEST.json and model-config.yaml of a built archive (for deploy's version checks)."""
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
            config_name = manifest.get("model", {}).get("configFile")
            config = yaml.safe_load(zf.read(config_name)) if config_name else {}
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ArchiveError(f"{path}: not a model archive servetool can read: {exc}") from None
    return {"manifest": manifest, "config": config or {}}


def smoke_request(path: Path) -> tuple[bytes, str] | None:
    """The archive's smoke-test request (body, content type), or None for an archive servetool
    did not build (or built before it carried one)."""
    try:
        with zipfile.ZipFile(path) as zf:
            raw = json.loads(zf.read(SMOKE_FILE))
        return base64.b64decode(raw["body"]), str(raw["content_type"])
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile):
        return None
