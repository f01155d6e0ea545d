"""Typed JSON records: dataclasses that read (validating) and write themselves.

`Schema.from_dict` checks every field of a dataclass against its annotation (int, float, str, bool,
lists, dicts, `Literal` values, nested schemas, `X | None`), fills in the declared defaults, runs the
class's own `check`, and raises `ManifestError` naming the field's path ("lmm.decoder.num_layers is
missing"); `to_dict` writes the JSON form back. octopus_rt/manifest.py declares the manifest with it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, TypeVar

from octopus_rt.errors import BundleError, InputError

__all__ = ["ManifestError", "Schema", "optional"]

T = TypeVar("T", bound="Schema")


class ManifestError(BundleError):
    """A manifest field is missing, mistyped or out of its allowed values; `problem` names it
    ("lmm.decoder.num_layers is missing") without the "bundle manifest: " prefix."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"bundle manifest: {problem}")
        self.problem = problem


def optional(default: Any = None) -> Any:
    """A field that `to_dict` leaves out while it is None."""
    return field(default=default, metadata={"omit_if_none": True})


class Schema:
    """Reading (`from_dict`, validating) and writing (`to_dict`) for the dataclasses below."""

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str = "") -> T:
        """Validated instance from JSON data; `where` is the field path used in messages ("lmm")."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where or cls.__name__} must be an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{path} is missing")
                continue
            values[f.name] = _read(hints[f.name], data[f.name], path)
        try:
            instance = cls(**values)
        except InputError as exc:  # a dataclass that validates its values (ProfileLimits) on creation
            raise ManifestError(f"{where or cls.__name__}: {exc}") from None
        instance.check(where)
        return instance

    def check(self, where: str) -> None:
        """Rules across or inside fields beyond their types (ManifestError); none by default."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _write(value)
        return out


def _write(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_write(v) for v in value]
    return value


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def _read(kind: Any, value: Any, where: str) -> Any:
    """`value` checked against the type annotation `kind` (and nested schemas built)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message names the nested field
            return _read(options[0], value, where)
        for option in options:
            try:
                return _read(option, value, where)
            except ManifestError:
                continue
        wanted = " or ".join(_NAMES.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a))) for a in options)
        raise ManifestError(f"{where} must be {wanted}, got {type(value).__name__}")
    if isinstance(kind, type) and issubclass(kind, Schema):
        return kind.from_dict(value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where} must be a list, got {type(value).__name__}")
        return [_read(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} must be an object, got {type(value).__name__}")
        return {str(k): _read(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ManifestError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    ok = (type(value) is bool if kind is bool else
          isinstance(value, (int, float)) and type(value) is not bool if kind is float else
          isinstance(value, int) and type(value) is not bool if kind is int else
          isinstance(value, kind))
    if not ok:
        raise ManifestError(f"{where} must be {_NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value
