"""Config machinery every section shares: the error type, the `_check` helper each section's
`__post_init__` validates with, and dict -> dataclass conversion (type checks, unknown keys
rejected, every error prefixed by the dotted key)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    # Messages are "key: problem; fix". The loader prefixes the section path.
    if not cond:
        raise ValueError(f"{key}: {msg}")



# ----------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks, unknown keys rejected, errors prefixed by path.


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce) `value` against annotation `tp`. Returns (ok, value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (arg,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; every error names the dotted key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{where}: unknown key. Valid keys under '{prefix.rstrip('.') or '<top>'}': "
            f"{', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        tp, value = hints[name], data[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            kwargs[name] = from_dict(tp, value, prefix=f"{key}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)
