"""The result as a new servetool model folder without pickled code: the model as a torch.export
program (model.pt2, source.exported_program) and a servetool.yaml derived from the original's,
which `package`, `watch` and `promote` take like any other version of the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from servetool.convert.compress.common import CompressError
from servetool.convert.export.exported_program import export_module
from servetool.errors import ServetoolError
from servetool.model.spec import ModelSpec, Preprocess, load_spec

PROGRAM = "model.pt2"
LABELS = "labels.txt"
MARK = "# made by servetool compress"
# formats a program is not served as (TorchScript is not made from one): the result uses ONNX
NOT_FOR_PROGRAMS = ("torchscript", "tensorrt", "tensorrt-fp16")
DATA_KEYS = ("data", "images", "texts", "coco")


def next_version(version: str) -> str:
    """1.0 -> 1.1, 2 -> 3, 1.0-rc -> 1.0-rc.1: the last number one up, else `.1` added."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    return f"{match[1]}{int(match[2]) + 1}" if match else f"{version}.1"


def check_out(spec: ModelSpec, out: Path) -> None:
    """The output folder may be new, or one compress made before; never the original's, never
    someone else's folder."""
    if out.resolve() == spec.directory:
        raise CompressError(f"--out {out} is the original's own folder: choose a new one")
    spec_file = out / "servetool.yaml"
    if spec_file.is_file() and not spec_file.read_text().startswith(MARK):
        raise CompressError(f"{out} holds a servetool.yaml that compress did not write: choose "
                            "another --out")


def write_model_folder(spec: ModelSpec, model: torch.nn.Module, out: Path, version: str,
                       note: str) -> ModelSpec:
    """model.pt2 and servetool.yaml (and labels.txt) in `out`; returns the new spec, read back."""
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_module(spec, model.eval()), str(out / PROGRAM))
    raw = derived_spec(spec, out, version)
    names = spec.label_names()
    if names:
        (out / LABELS).write_text("\n".join(names) + "\n")
        raw["labels"] = LABELS
    header = f"{MARK} from {spec.spec_file.resolve()} ({spec.name} {spec.version}): {note}\n"
    (out / "servetool.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False))
    try:
        return load_spec(out)
    except ServetoolError as exc:
        raise CompressError(f"the compressed model's spec does not read back: {exc}") from None


def derived_spec(spec: ModelSpec, out: Path, version: str) -> dict[str, Any]:
    """The original's spec for the program in `out`: same task, preprocessing (written out in
    full: a program carries no image config) and serving settings; data paths made absolute
    (see _relocated); inputs read from the program."""
    raw = yaml.safe_load(spec.spec_file.read_text())
    raw.pop("compress", None)
    for key in ("input", "inputs", "labels", "text"):
        raw.pop(key, None)
    raw["version"] = version
    raw["source"] = {"exported_program": PROGRAM}
    raw["task"] = spec.task
    if raw.get("format") in NOT_FOR_PROGRAMS:
        raw["format"] = "onnx"
    if spec.compress and spec.compress.int8:
        raw["format"] = "onnx-int8-static"
    defaults = Preprocess().as_dict()
    raw["preprocess"] = {k: v for k, v in spec.preprocess.as_dict().items() if v != defaults[k]}
    for key in ("validation", "calibration"):
        if isinstance(raw.get(key), dict):
            raw[key] = _relocated(raw[key], spec.directory)
    return raw


def _relocated(section: dict[str, Any], origin: Path) -> dict[str, Any]:
    """A data section whose paths (relative to the original's folder) name the same files as
    absolute paths: the compressed folder is moved on its own (into a watched folder, a bucket's
    staging copy), and a path relative to it would then name nothing."""
    moved = dict(section)
    for key in DATA_KEYS:
        if isinstance(moved.get(key), str):
            moved[key] = str((origin / moved[key]).resolve())
    return moved
