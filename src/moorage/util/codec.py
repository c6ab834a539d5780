"""Dataclasses to JSON-able data and back, driven by their type hints.

Records of containers hold nested frozen dataclasses, tuples, enums and ``bytes``
(environment values); this turns them into plain JSON data and rebuilds them exactly, so
a record type needs no hand-written (de)serialiser that could drift from its fields.
"""

from __future__ import annotations

import base64
import copy as _copy
import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_BYTES = "__bytes__"


def to_data(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bytes):
        return {_BYTES: base64.b64encode(obj).decode()}
    if isinstance(obj, list | tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict | types.MappingProxyType):
        return {str(k): to_data(v) for k, v in obj.items()}
    return obj


def snapshot(obj: T) -> T:
    """A copy of the dataclass ``obj`` that later changes to ``obj`` cannot reach, cheap
    enough for the event loop (so that :func:`to_data`, the costly part, can run on it in a
    worker thread): list, dict and set values are copied (recursively), as are nested
    mutable dataclasses; frozen dataclasses and other values are shared (never modified in
    place by convention)."""
    copy = _copy.copy(obj)
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        snap = _snapshot_value(value)
        if snap is not value:
            object.__setattr__(copy, f.name, snap)
    return copy


def _snapshot_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_snapshot_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _snapshot_value(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    if (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and not type(value).__dataclass_params__.frozen):  # type: ignore[attr-defined]
        return snapshot(value)
    return value


def from_data(tp: Any, data: Any) -> Any:
    """Rebuild a value of type ``tp`` from :func:`to_data` output; ValueError if it can't."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_data(arg, data)
            except (ValueError, TypeError, KeyError):
                continue
        raise ValueError(f"{data!r} fits none of {tp}")
    if origin is typing.Literal:
        if data not in args:
            raise ValueError(f"{data!r} is not one of {args}")
        return data
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_data(args[0], v) for v in data)
        return tuple(from_data(a, v) for a, v in zip(args, data, strict=True))
    if origin is list:
        return [from_data(args[0], v) for v in data]
    if origin in (dict, typing.Mapping) or tp is dict:
        key_t, val_t = args if args else (Any, Any)
        return {from_data(key_t, k): from_data(val_t, v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {data!r}")
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: from_data(hints[f.name], data[f.name])
                  for f in dataclasses.fields(tp) if f.name in data}
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is bytes:
        if not isinstance(data, dict) or _BYTES not in data:
            raise ValueError(f"expected bytes, got {data!r}")
        return base64.b64decode(data[_BYTES])
    if tp is float and isinstance(data, int | float):
        return float(data)
    if isinstance(tp, type) and not isinstance(data, tp):
        raise ValueError(f"expected {tp.__name__}, got {data!r}")
    return data


def load(tp: type[T], data: Any) -> T:
    result: T = from_data(tp, data)
    return result


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(..., object_pairs_hook=unique_keys)``: a JSON object, refusing a
    duplicated key (ValueError naming it), as Go's strict policy and signature parsers do."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out
