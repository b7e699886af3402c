"""A whole module saved with `torch.save(model)`: loaded only behind the spec's explicit opt-in
(source.trust_pickle), because unpickling runs code from the file.

The pickle names the module's class by where it lived when it was saved: `model.Net` when the
class came from a model.py, `__main__.Net` when it was defined in the training script itself.
With source.model_file, that file is importable under its own name and stands in for `__main__`.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

from servetool.errors import ServetoolError, whole_cause


class PickleSourceError(ServetoolError):
    pass


def load_pickled_module(path: Path, model_file: Path | None):
    import torch

    stand_in = None
    if model_file is not None:
        from servetool.convert.export import import_file

        stand_in = import_file(model_file, model_file.stem)
        sys.modules.setdefault(model_file.stem, stand_in)

    wanted: list[str] = []  # the module each class was looked up in, the failing one last

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            wanted.append(module)
            if module == "__main__" and stand_in is not None:
                return getattr(stand_in, name)
            return super().find_class(module, name)

    pickle_module = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load,
                                          __name__="servetool_pickle")
    added = str(model_file.parent) if model_file is not None else None
    if added:
        sys.path.insert(0, added)  # the pickle may import the model's neighbours by name
    try:
        model = torch.load(path, map_location="cpu", weights_only=False,
                           pickle_module=pickle_module)
    except ModuleNotFoundError as exc:
        raise PickleSourceError(missing_module_message(path, exc, wanted[-1] if wanted else "",
                                                       model_file)) from None
    except (AttributeError, ImportError) as exc:
        raise PickleSourceError(
            f"{path}: the pickled module refers to a class Python cannot find ({exc}); name the "
            "file that defines it as source.model_file") from None
    except Exception as exc:
        raise PickleSourceError(f"{path}: not a module saved with torch.save(model): "
                                f"{whole_cause(exc)}") from None
    finally:
        if added:
            sys.path.remove(added)
    if not isinstance(model, torch.nn.Module):
        raise PickleSourceError(f"{path}: holds a {type(model).__name__}, not a torch.nn.Module "
                                "(a state_dict goes under source.state_dict)")
    return model


# import name -> the distribution pip installs it from, where the two differ
PIP_NAMES = {"sklearn": "scikit-learn", "cv2": "opencv-python-headless", "PIL": "Pillow",
             "yaml": "pyyaml", "skimage": "scikit-image", "mmcv": "mmcv", "detectron2": "detectron2"}


def missing_module_message(path: Path, exc: ModuleNotFoundError, wanted: str,
                           model_file: Path | None) -> str:
    """Why the pickle's class cannot be imported, and the fix: a package to install when the class
    lives in a library (timm.models.resnet, say), the defining file when it is the user's own."""
    import importlib.util

    missing = exc.name or wanted
    top = missing.split(".")[0]
    where = [d for d in (path.parent, model_file.parent if model_file else None) if d is not None]
    own = top in ("__main__", "__mp_main__") or any(
        (d / f"{top}.py").is_file() or (d / top / "__init__.py").is_file() for d in where)
    if own or "." not in wanted:  # `model` (a model.py beside the training script): the user's
        return (f"{path}: the pickled module refers to a class in {wanted or missing!r}, which "
                f"Python cannot import ({exc}); name the file that defines it as "
                "source.model_file")
    if importlib.util.find_spec(top) is not None:  # installed, but another version
        return (f"{path}: the pickled module's class lives in {wanted!r}, which the installed "
                f"{top} does not have ({exc}): install the {top} version the model was saved "
                f"with (pip install '{PIP_NAMES.get(top, top)}==VERSION')")
    return (f"{path}: the pickled module's class lives in {wanted!r}, from the package {top!r}, "
            f"which is not installed: pip install {PIP_NAMES.get(top, top)} (the version the "
            "model was saved with), or save a state_dict or a torch.export program instead")
