"""JSON -> a numpy array of a model input's dtype and shape, checked strictly.

Nothing is cast silently: a fraction, a string or a boolean sent to an integer input, an integer
outside the dtype's range, a string or boolean sent to a float input, and (unless the spec allows
them) NaN and infinity are refused with a RequestError naming the problem.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from handlers.errors import RequestError, describe

DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


def parse_json(payload: Any, *, allow_nonfinite: bool = False) -> Any:
    """The request's JSON value (TorchServe has already parsed bodies sent as application/json)."""
    if isinstance(payload, (bytes, bytearray)):
        if not payload:
            raise RequestError(400, "empty request body: send a JSON array")
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"request body is not UTF-8 text: {exc.reason} at byte "
                                    f"{exc.start}") from None
    if not isinstance(payload, str):
        return payload
    try:
        return json.loads(payload, parse_constant=None if allow_nonfinite else _refuse_constant)
    except RequestError:
        raise
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits, deep nesting
        raise RequestError(400, f"request body is not usable JSON ({describe(exc)})") from None


def to_array(value: Any, shape: tuple[int | str, ...], dtype: str, *,
             allow_nonfinite: bool = False, name: str = "input") -> np.ndarray:
    """A nested JSON list of `shape` as an array of `dtype`; a string in `shape` is a dynamic
    axis (any length from 1)."""
    if not isinstance(value, list):
        raise RequestError(400, f"expected a JSON array of shape {list(shape)} for {name}, got "
                                f"{_json_kind(value)}")
    try:
        cells = np.array(value, dtype=object)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"{name} must be a rectangular array of shape {list(shape)} "
                                f"({describe(exc)})") from None
    if len(cells.shape) != len(shape) or any(
            (want != got) if isinstance(want, int) else got < 1
            for want, got in zip(shape, cells.shape, strict=False)):
        raise RequestError(400, f"{name} has shape {list(cells.shape)}, the model takes "
                                f"{list(shape)} (a rectangular array of numbers"
                                + (", any length >= 1 on named axes)" if any(
                                    isinstance(d, str) for d in shape) else ")"))
    kinds = {type(v) for v in cells.flat}
    target = np.dtype(DTYPES[dtype])
    allowed = {int} if target.kind == "i" else {int, float}
    if not kinds <= allowed:
        wrong = sorted(_json_kind_of_type(t) for t in kinds - allowed)
        expected = "integers" if target.kind == "i" else "numbers"
        raise RequestError(400, f"{name} ({dtype}) takes {expected} only, got {', '.join(wrong)}")
    return _ints(cells, target) if target.kind == "i" else _floats(cells, target, allow_nonfinite)


def _ints(cells: np.ndarray, target: np.dtype) -> np.ndarray:
    info = np.iinfo(target)
    if cells.size:
        low, high = min(cells.flat), max(cells.flat)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise RequestError(400, f"input value {_short(bad)} is outside the {target.name} range "
                                    f"[{info.min}, {info.max}]")
    return cells.astype(target)


def _floats(cells: np.ndarray, target: np.dtype, allow_nonfinite: bool) -> np.ndarray:
    try:
        array = cells.astype(np.float64)
    except OverflowError:  # an integer beyond float64
        raise RequestError(400, "input holds an integer too large for a float") from None
    with np.errstate(over="ignore"):
        array = array.astype(target)
    if not allow_nonfinite and not np.isfinite(array).all():
        raise RequestError(400, f"input contains NaN or infinity (or a value beyond the "
                                f"{target.name} range); this model accepts finite numbers only")
    return array


def _refuse_constant(name: str) -> Any:
    raise RequestError(400, f"input contains {name}; this model accepts finite numbers only")


def _json_kind(value: Any) -> str:
    return _json_kind_of_type(type(value))


def _json_kind_of_type(kind: type) -> str:
    return {bool: "booleans", str: "strings", float: "fractions", int: "integers",
            type(None): "null", dict: "objects", list: "nested arrays"}.get(kind, kind.__name__)


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"
