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
        from servetool.export import import_file

        stand_in = import_file(model_file, model_file.stem)
        sys.modules.setdefault(model_file.stem, stand_in)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
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
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
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
