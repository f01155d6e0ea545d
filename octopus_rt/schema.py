"""Typed JSON records: dataclasses that read (validating) and write themselves.

`Schema.from_dict` checks every field of a dataclass against its annotation (int, float, str, bool,
lists, dicts, `Literal` values, nested schemas, `X | None`), fills in the declared defaults, runs the
class's own `check`, and raises `ManifestError` naming the field's path ("lmm.decoder.num_layers is
missing"); `to_dict` writes the JSON form back. `Schema.lookup` reads one field deep inside the JSON
form by the same declarations, without reading the rest (for code that needs a few fields of a
manifest that may not be complete, e.g. the provider plan). octopus_rt/manifest.py declares the
manifest with it.
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
                if _required(f):
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

    @classmethod
    def lookup(cls, data: Any, *keys: str, where: str = "") -> Any:
        """The value at `keys` inside `data` (this schema's JSON form), read as `from_dict` reads it:
        checked against its annotation, nested schemas built, the declared default when absent.

        Only the objects on the way are looked at, so the rest of `data` may be incomplete:
        `Manifest.lookup(m, "lmm", "decoder", "form")` is "flat_kv" for a decoder record without
        `form`, whatever else the lmm section holds. Where an object on the way is absent its
        declared default is followed (None below a None default); an absent key of a dict field
        (e.g. one file of `files`) is None; a required field that is absent, or a value of the wrong
        type, raises ManifestError naming its path. `check` rules are not applied. Keys that the
        schema does not declare are a programming error (TypeError).
        """
        kind: Any = cls
        value = data
        path = where
        for depth, key in enumerate(keys):
            kind, nullable = _container(kind, path)
            if value is None and nullable:  # an optional object that is null
                return None
            if not isinstance(value, dict):
                raise ManifestError(f"{path or cls.__name__} must be an object, got {type(value).__name__}")
            path = f"{path}.{key}" if path else key
            if isinstance(kind, type) and issubclass(kind, Schema):
                fields = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
                if key not in fields:
                    raise TypeError(f"{kind.__name__} declares no field {key!r}")
                if key not in value:
                    return _follow(_default(fields[key], path), keys[depth + 1:])
                value, kind = value[key], typing.get_type_hints(kind)[key]
            else:  # dict[str, X]
                if key not in value:
                    return None
                value, kind = value[key], typing.get_args(kind)[1]
        return _read(kind, value, path or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _write(value)
        return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field, path: str) -> Any:
    """The declared default of field `f` (a fresh one from its factory); ManifestError if it has none."""
    if _required(f):
        raise ManifestError(f"{path} is missing")
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _follow(value: Any, keys: tuple[str, ...]) -> Any:
    """`keys` followed through a default value: Schema instances by attribute, dicts by key, None stays None."""
    for key in keys:
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, Schema) and key in {f.name for f in dataclasses.fields(value)}:  # type: ignore[arg-type]
            value = getattr(value, key)
        else:
            raise TypeError(f"{type(value).__name__} declares no field {key!r}")
    return value


def _container(kind: Any, path: str) -> tuple[Any, bool]:
    """(the Schema class or dict type that `lookup` descends into, whether None is allowed there):
    X of `X | None`. TypeError where the annotation has nothing to descend into (a programming error)."""
    nullable = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        nullable = len(options) < len(typing.get_args(kind))
        if len(options) == 1:
            kind = options[0]
    if (isinstance(kind, type) and issubclass(kind, Schema)) or typing.get_origin(kind) is dict:
        return kind, nullable
    raise TypeError(f"{path or 'the schema'} has no fields to look up (annotation {kind})")


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
