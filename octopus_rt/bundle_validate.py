"""The one check of a bundle manifest: header, section layout, path containment, runtime fields.

`octopus_rt.bundle.validate_manifest` (and through it `read_manifest`, so `verify`, the runtime's
load and every exporter) raises the first problem found here as a one-line BundleError. Rules:

- header: `format` is "octopus-rt-bundle"; `format_version` is the integer 1 (not "1", not 1.0);
- sections (`lmm`, `sam`, `engines`) are objects; one that owns files has `dir`, a plain folder name
  (no "/", no "..", not hidden, not absolute) that no other section uses and that is not a symbolic
  link, and `files`, {relative path: {"size": int, "sha256": str}} whose paths pass
  `octopus_rt.paths.check_relative` and, on disk, resolve inside the section's folder;
- every `file` value anywhere in a section (lmm.vision.file, engines...graphs.*.file) is one of
  that section's `files` (so its size and hash are checked like the others);
- `defaults` is an object with the documented types;
- with `runnable`, the fields the runtime reads exist with the right types (RUNTIME_FIELDS): an
  `lmm` section, and a `sam` section when one is present.

Issue 12 turns this into a typed schema; until then the tables below are the single definition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.paths import check_relative

__all__ = ["FILE_SECTIONS", "RUNTIME_FIELDS", "manifest_problem"]

FILE_SECTIONS = ("lmm", "sam", "engines")
_INT, _NUM, _STR, _BOOL, _DICT, _LIST = "int", "number", "string", "bool", "object", "list"
# {section: {key: {field: kind}}}: what runtime/api.py, generate.py, preprocess.py and segment.py read
# without a default. A kind of _DICT with no fields means "an object".
RUNTIME_FIELDS: dict[str, dict[str, dict[str, str]]] = {
    "lmm": {
        "vision": {"file": _STR},
        "embedding": {"file": _STR},
        "decoder": {"file": _STR, "num_layers": _INT, "num_key_value_heads": _INT, "head_dim": _INT,
                    "hidden_size": _INT, "max_position_embeddings": _INT},
        "tokenizer": {},
        "preprocess": {"size": _DICT, "image_mean": _LIST, "image_std": _LIST, "input_height": _INT,
                       "input_width": _INT},
        "prompt": {"prefix": _STR, "image_token": _STR, "image_token_id": _INT, "num_image_tokens": _INT,
                   "infix": _STR, "suffix": _STR},
        "closed_set": {},
    },
    "sam": {"encoder": {"file": _STR}, "decoder": {"file": _STR}},
}
_DEFAULT_TYPES = {"tau": _NUM, "point_mapping": _STR, "max_new_tokens": _INT, "multimask": _BOOL, "providers": _DICT}


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {_STR: str, _BOOL: bool, _DICT: dict, _LIST: list}[kind])


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _header_problem(manifest: Any, format_name: str, format_version: int) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        return f"not an {format_name} manifest"
    version = manifest.get("format_version")
    if not _kind_ok(version, _INT):
        return f"format_version must be the integer {format_version}, got {_shown(version)}"
    if version != format_version:
        return (f"bundle format version {version} is not supported by this octopus-rt (it reads version "
                f"{format_version}); re-export the bundle with this version")
    return None


def _file_refs(node: Any, where: str):
    """(dotted location, value) of every "file" key below `node`, skipping the "files" table."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "files":
                continue
            if key == "file":
                yield f"{where}.file", value
            else:
                yield from _file_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _file_refs(value, f"{where}[{i}]")


def _section_problem(name: str, section: dict, bundle_dir: Path | None) -> str | None:
    if "dir" not in section and "files" not in section:
        return None
    folder, files = section.get("dir"), section.get("files")
    try:
        check_relative(folder, f"{name}.dir")
    except InputError as exc:
        return str(exc)
    if "/" in folder or "\\" in folder or folder.startswith("."):
        return f"{name}.dir must be a plain folder name inside the bundle, got {folder!r}"
    if not isinstance(files, dict):
        return f"{name}.files must be an object of {{path: {{size, sha256}}}}, got {_shown(files)}"
    for rel, record in files.items():
        try:
            check_relative(rel, f"{name}.files entry")
        except InputError as exc:
            return str(exc)
        if not isinstance(record, dict) or not _kind_ok(record.get("size"), _INT) \
                or not isinstance(record.get("sha256"), str):
            return f"{name}.files[{rel!r}] must be {{\"size\": int, \"sha256\": str}}, got {_shown(record)}"
    for where, value in _file_refs(section, name):
        if not isinstance(value, str) or value not in files:
            return f"{where} must name one of the section's files, got {_shown(value)}"
    if bundle_dir is not None:
        root = bundle_dir / folder
        if root.is_symlink():
            return f"{name}.dir {folder!r} is a symbolic link; a section's folder must lie inside the bundle"
        if root.is_dir():
            resolved_root = root.resolve()
            for rel in files:
                path = root / rel
                if os.path.lexists(path):
                    resolved = path.resolve()
                    if resolved_root not in resolved.parents:
                        return f"{name} file {rel!r} leads outside {folder}/ (through a symbolic link)"
    return None


def _fields_problem(name: str, section: Any) -> str | None:
    if not isinstance(section, dict) or "files" not in section:
        return f"bundle has no {name} section; run `octopus-rt export {name}` first"
    for key, fields in RUNTIME_FIELDS[name].items():
        value = section.get(key)
        if not isinstance(value, dict):
            return f"manifest field {name}.{key} is missing or not an object" if value is None else \
                f"manifest field {name}.{key} must be an object, got {_shown(value)}"
        for field, kind in fields.items():
            if field not in value:
                return f"manifest field {name}.{key}.{field} is missing"
            if not _kind_ok(value[field], kind):
                return f"manifest field {name}.{key}.{field} must be a {kind}, got {_shown(value[field])}"
    if name == "lmm":
        from octopus_rt import vocab

        closed = section["closed_set"]
        for words in vocab.closed_set_words().values():
            for word in words:
                ids = closed.get(word)
                if not isinstance(ids, list) or not ids or not all(_kind_ok(i, _INT) for i in ids):
                    return f"manifest field lmm.closed_set.{word} must be a non-empty list of token ids, got {_shown(ids)}"
    return None


def manifest_problem(
    manifest: Any, bundle_dir: str | os.PathLike[str] | None, *, format_name: str, format_version: int,
    runnable: bool = False,
) -> str | None:
    """The first problem of `manifest` (read from `bundle_dir`, which enables the on-disk checks), or None."""
    problem = _header_problem(manifest, format_name, format_version)
    if problem:
        return problem
    root = Path(bundle_dir) if bundle_dir is not None else None
    used: dict[str, str] = {}
    for name in FILE_SECTIONS:
        if name not in manifest:
            continue
        section = manifest[name]
        if not isinstance(section, dict):
            return f"manifest section {name} must be an object, got {_shown(section)}"
        problem = _section_problem(name, section, root)
        if problem:
            return problem
        if "dir" in section:
            if section["dir"] in used:
                return f"sections {used[section['dir']]} and {name} share the folder {section['dir']!r}"
            used[section["dir"]] = name
    defaults = manifest.get("defaults", {})
    if not isinstance(defaults, Mapping):
        return f"manifest defaults must be an object, got {_shown(defaults)}"
    for key, kind in _DEFAULT_TYPES.items():
        if key in defaults and not _kind_ok(defaults[key], kind):
            return f"manifest field defaults.{key} must be a {kind}, got {_shown(defaults[key])}"
    if runnable:
        for name in ("lmm", "sam"):
            if name == "lmm" or (isinstance(manifest.get("sam"), dict) and "files" in manifest["sam"]):
                problem = _fields_problem(name, manifest.get(name))
                if problem:
                    return problem
    return None
