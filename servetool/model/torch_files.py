"""What kind of PyTorch file a path holds, read from its zip layout: nothing is unpickled or run.

torch.save, torch.jit.save and torch.export.save all write zip archives, and each loader reports
another kind's file as "corrupted". The layout tells them apart: a torch.export program has an
`archive_format` record reading "pt2" and its graph in models/*.json; TorchScript has
constants.pkl; torch.save has data.pkl (a whole module's pickle names torch.nn classes).
No servetool imports: the spec (which source key fits a file) and the exporters both read it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

PROGRAM = "a torch.export program (torch.export.save, a .pt2)"
AOTI = ("an AOTInductor package (aoti_compile_and_package: compiled code, not a program); "
        "servetool takes the program itself, as torch.export.save writes it")
TORCHSCRIPT = "a TorchScript file"
WHOLE_MODULE = "a torch.save file holding pickled objects: a whole module, not a state_dict"
TORCH_SAVE = "a torch.save file"
NOT_TORCH = "not a file torch.save, torch.jit.save or torch.export.save wrote"

# the source key that takes each kind of file (servetool.yaml's source section)
SOURCE_KEYS = {PROGRAM: "exported_program", TORCHSCRIPT: "torchscript",
               WHOLE_MODULE: "pickled_module", TORCH_SAVE: "state_dict"}


def saved_as(path: Path) -> str:
    """One of the descriptions above."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            formats = [n for n in names if n.endswith("archive_format")]
            if formats and zf.read(formats[0]).strip() == b"pt2":
                if any("/data/aotinductor/" in n for n in names):
                    return AOTI
                return PROGRAM
            if any(n.endswith("/constants.pkl") for n in names):
                return TORCHSCRIPT
            pickle_name = next((n for n in names if n.endswith("/data.pkl")), None)
            data = zf.read(pickle_name) if pickle_name else b""
    except (OSError, zipfile.BadZipFile):
        return NOT_TORCH
    if b"torch.nn.modules" in data or b"__main__" in data:
        return WHOLE_MODULE
    return TORCH_SAVE


def is_exported_program(path: Path) -> bool:
    return saved_as(path) == PROGRAM
