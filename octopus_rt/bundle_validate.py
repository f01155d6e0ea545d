"""The one check of a bundle manifest: header, field types (through the schema), section layout and
path containment.

`octopus_rt.bundle.validate_manifest` (and through it `read_manifest`, so `verify`, the runtime's
load and every exporter) raises the first problem found here as a one-line BundleError. The fields
themselves (names, types, required or default) are defined once, in `octopus_rt/manifest.py`; this
module adds what a schema of one manifest cannot say:

- header: `format` is "octopus-rt-bundle"; `format_version` is the integer 1 (not "1", not 1.0);
- sections (`lmm`, `sam`, `engines`) are objects; one that owns files has `dir`, a plain folder name
  (no "/", no "..", not hidden, not absolute) that no other section uses and that is not a symbolic
  link, and `files` (`manifest_section.FileRecord` each) whose paths pass `octopus_rt.paths.check_relative`
  and, on disk, resolve inside the section's folder;
- every `file` value anywhere in a section (lmm.vision.file, engines...graphs.*.file) is one of
  that section's `files` (so its size and hash are checked like the others);
- `defaults` parses as `manifest.Defaults`;
- with `runnable`, the whole manifest parses (`manifest.parse_manifest`) and has an `lmm` section
  with files: what the runtime needs to run it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.manifest import Defaults, parse_manifest
from octopus_rt.manifest_section import FileRecord
from octopus_rt.schema import ManifestError
from octopus_rt.paths import check_relative

__all__ = ["FILE_SECTIONS", "manifest_problem"]

FILE_SECTIONS = ("lmm", "sam", "engines")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _header_problem(manifest: Any, format_name: str, format_version: int) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        return f"not an {format_name} manifest"
    version = manifest.get("format_version")
    if not _is_int(version):
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
            FileRecord.from_dict(record, f"{name}.files.{rel}")
        except ManifestError as exc:
            return exc.problem
        except InputError as exc:
            return str(exc)
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
    try:
        Defaults.from_dict(manifest.get("defaults", {}), "defaults")
        if runnable:
            if not isinstance(manifest.get("lmm"), dict) or "files" not in manifest["lmm"]:
                return "bundle has no lmm section; run `octopus-rt export lmm` first"
            parse_manifest(manifest)
    except ManifestError as exc:
        return exc.problem
    return None
