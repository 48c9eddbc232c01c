"""Plain data (parsed YAML) -> typed dataclasses, by the dataclasses' own type hints.

Generic: it knows no raymtl type. Unknown keys get a "did you mean" hint, a wrong type the
dotted path of the fault (`training.lr: expected float, got 'fast'`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

from raymtl.errors import ConfigError, did_you_mean


def from_dict(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from plain data; unknown keys and bad types name their dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            hint = did_you_mean(key, names) or f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {join_path(path, key)!r}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], join_path(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {join_path(path, f.name)!r}")
    return cls(**kwargs)


def join_path(path: str, key: Any) -> str:
    """The dotted path of `key` below `path` (`training.lr`)."""
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is Callable or origin is Callable:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        errors = []
        for arg in members:
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        # The member the value is shaped like (a mapping's dataclass, a list's list) holds the real fault
        # (an unknown key, a bad item); a value shaped like none gets every member named.
        shaped = [e for arg, e in zip(members, errors) if _container(arg) and isinstance(value, _container(arg))]
        if len(members) == 1 or shaped:
            raise (shaped or errors)[0]
        raise ConfigError(f"{path}: expected {' or '.join(map(_describe, members))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        for k in value:
            if args[0] is str and not isinstance(k, str):  # YAML reads `1:` or `true:` as a number or a bool
                raise ConfigError(f"{join_path(path, k)}: keys here are strings, got {type(k).__name__} {k!r}; "
                                  "quote it in YAML")
        return {k: _convert(args[1], v, join_path(path, k)) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _container(tp: Any) -> type | None:
    """The plain-data container a type is read from: dict for a dataclass or mapping, list for a list."""
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return dict
    return list if typing.get_origin(tp) is list else None


def _describe(tp: Any) -> str:
    return {dict: "a mapping", list: "a list"}.get(_container(tp)) or getattr(tp, "__name__", str(tp))
