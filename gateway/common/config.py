"""Strict TOML configuration: a file maps onto nested frozen dataclasses.

An unknown key, a wrong type, a bad choice or an unreadable file is a ConfigError that names the key
(`mqtt.key_file: cannot read /etc/sgw/device.key: permission denied`), raised before anything starts.
Paths are resolved against the config file's folder, so a bundle can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from gateway.errors import ConfigError

T = TypeVar("T")

# Field metadata: {"file": True} means the path must name a readable file when the config loads.
READABLE_FILE: Mapping[str, Any] = types.MappingProxyType({"file": True})


def file_field(default: Path | None = None) -> Any:
    """A Path field that must name a readable file (checked at load, so errors come before start-up)."""
    if default is None:
        return dataclasses.field(metadata=READABLE_FILE)
    return dataclasses.field(default=default, metadata=READABLE_FILE)


def load_toml(path: Path, cls: type[T]) -> T:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(cls, data, base_dir=path.resolve().parent)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, base_dir: Path, where: str = "") -> T:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(where, unknown[0])
        raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        key = _join(where, name)
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        value = _convert(hints[name], data[name], key=key, base_dir=base_dir)
        if fld.metadata.get("file") and isinstance(value, Path):
            check_readable(value, key)
        kwargs[name] = value
    return cls(**kwargs)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, *, key: str, base_dir: Path) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return from_mapping(tp, value, base_dir=base_dir, where=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # The first member that takes the value (`int | str`: 4 or "auto"); else the first one's error.
        errors: list[ConfigError] = []
        for arg in args:
            try:
                return _convert(arg, value, key=key, base_dir=base_dir)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        items = [_convert(item_tp, v, key=f"{key}[{i}]", base_dir=base_dir) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        if value == "":
            return Path()
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if tp is float:
        # TOML writes 10 for 10.0; accept ints where floats are meant, never bools.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def check_readable(path: Path, key: str) -> None:
    if path == Path():
        return
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: is a directory, expected a file: {path}") from None
    except PermissionError:
        raise ConfigError(f"{key}: permission denied reading {path}") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def require_range(key: str, value: float, low: float, high: float) -> None:
    """Bounds a numeric option; services call it in their config's __post_init__."""
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low:g} and {high:g}, got {value:g}")
