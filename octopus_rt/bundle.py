"""The model bundle: a directory with one `manifest.json` and the files its sections name.

This module is the contract between the exporter (which writes sections) and the runtime (which
reads them). It is torch-free. The full field list is documented in docs/bundle.md and the README.

Layout::

    BUNDLE/
      manifest.json            {"format": "octopus-rt-bundle", "format_version": 1,
                                "lmm": {...}, "sam": {...}, "engines": {...}, "defaults": {...}}
      lmm-<id>/                files of the "lmm" section (ONNX graphs, tokenizer.json, ...)
      sam-<id>/                files of the "sam" section
      engines-<id>/            files of the "engines" section (TensorRT)

A section that owns files has "dir" (its folder, relative to BUNDLE) and "files" ({relative path:
{"size": int, "sha256": hex}}). Every export step stages a new folder, writes its files there,
verifies them, and only then swaps the manifest (write to a temporary file + os.replace, which is
atomic on POSIX). The old folder is removed afterwards. An interrupted step therefore leaves the
previous manifest pointing at complete, unchanged files; leftovers are ".staging-*" folders that
nothing refers to and that the next step cleans up.

Every path in a manifest stays inside the bundle: `validate_manifest` (rules in bundle_validate.py)
runs on every read (`read_manifest`: verify, the runtime, each exporter before it stages) and on
every manifest a commit writes, so a crafted `dir` such as "../victim" is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from octopus_rt.bundle_validate import manifest_problem
from octopus_rt.errors import BundleError
from octopus_rt.manifest import Defaults
from octopus_rt.paths import is_inside
from octopus_rt.jsonfile import read_json_object

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SECTIONS",
    "DEFAULTS",
    "BundleError",
    "sha256_file",
    "package_versions",
    "describe_files",
    "read_manifest",
    "validate_manifest",
    "section_path",
    "check_files",
    "stage_section",
    "staged_section",
    "commit_section",
    "update_defaults",
]

FORMAT = "octopus-rt-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SECTIONS = ("lmm", "sam", "engines", "defaults")
# Written into a new bundle's "defaults" section; the demo issue's evaluation rewrites tau and the
# mapping from measurement (`octopus-rt eval --sweep`).
DEFAULTS: dict[str, Any] = Defaults().to_dict()  # the values are declared once, in octopus_rt/manifest.py
_STAGING_PREFIX = ".staging-"
_LOCK_NAME = ".lock"


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(*distributions: str) -> dict[str, str]:
    """{import name: installed version} of the given distributions, for a section's "versions";
    "unknown" for one that is not installed (an editable checkout without metadata, say)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for dist in distributions:
        try:
            found[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            found[dist.replace("-", "_")] = "unknown"
    return found


def describe_files(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} for every regular file below `folder`, sorted by path."""
    folder = Path(folder)
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        records[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    return records


def read_manifest(bundle_dir: str | os.PathLike[str], *, runnable: bool = False) -> dict[str, Any]:
    """Load and validate the manifest (`validate_manifest`). Raises BundleError with a one-line reason.

    runnable: also require the fields the runtime reads (an lmm section; a complete sam section if any).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise BundleError(f"bundle not found: {bundle_dir}")
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle must be a directory: {bundle_dir}")
    manifest = read_json_object(bundle_dir / MANIFEST_NAME, BundleError,
                                missing=f"not a model bundle (no {MANIFEST_NAME}): {bundle_dir}")
    validate_manifest(manifest, bundle_dir, runnable=runnable)
    return manifest


def validate_manifest(
    manifest: Any, bundle_dir: str | os.PathLike[str] | None = None, *, runnable: bool = False
) -> None:
    """Raise BundleError naming the first problem of `manifest` (rules: octopus_rt/bundle_validate.py).

    With `bundle_dir`, paths are also checked on disk: no section folder or file may be a symbolic
    link that leads outside the bundle. Every reader and writer of a bundle goes through here.
    """
    problem = manifest_problem(manifest, bundle_dir, format_name=FORMAT, format_version=FORMAT_VERSION,
                               runnable=runnable)
    if problem:
        where = f"{Path(bundle_dir) / MANIFEST_NAME}: " if bundle_dir is not None else "manifest: "
        raise BundleError(where + problem)


def section_path(bundle_dir: str | os.PathLike[str], section: dict[str, Any], name: str) -> Path:
    """Absolute path of file `name` (as listed in section["files"]) of a manifest section.

    Refuses (BundleError) a path that leads outside the bundle; `read_manifest` has normally
    refused such a manifest already.
    """
    path = Path(bundle_dir) / section["dir"] / name
    if not is_inside(path, bundle_dir) or ".." in Path(section["dir"], name).parts:
        raise BundleError(f"bundle {bundle_dir}: {section['dir']}/{name} leads outside the bundle")
    return path


def check_files(
    bundle_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    hashes: bool = False,
    sections: tuple[str, ...] = SECTIONS,
) -> list[str]:
    """Problems with the files the manifest lists: missing, wrong size, and with `hashes` wrong sha256.

    The runtime checks sizes only (fast start-up); `octopus-rt verify` re-hashes everything.
    Returns one human-readable line per problem; empty when all is well.
    """
    problems: list[str] = []
    for name in sections:
        section = manifest.get(name)
        if not isinstance(section, dict) or "files" not in section:
            continue
        for rel, record in section["files"].items():
            path = section_path(bundle_dir, section, rel)
            shown = f"{section['dir']}/{rel}"
            if not path.is_file():
                problems.append(f"{name}: file missing: {shown}")
                continue
            size = path.stat().st_size
            if size != record["size"]:
                problems.append(f"{name}: {shown} has {size} bytes, manifest says {record['size']}")
                continue
            if hashes and sha256_file(path) != record["sha256"]:
                problems.append(f"{name}: {shown} sha256 does not match the manifest")
    return problems


@contextlib.contextmanager
def _locked(bundle_dir: Path) -> Iterator[None]:
    """Serialise writers of one bundle (two exports into the same folder at once)."""
    with open(bundle_dir / _LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_or_new(bundle_dir: Path) -> dict[str, Any]:
    if (bundle_dir / MANIFEST_NAME).exists():
        return read_manifest(bundle_dir)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "defaults": dict(DEFAULTS)}


def _write_manifest_atomically(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = bundle_dir / f".{MANIFEST_NAME}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, bundle_dir / MANIFEST_NAME)


def stage_section(bundle_dir: str | os.PathLike[str], name: str) -> Path:
    """Create (and return) an empty staging folder inside the bundle for section `name`.

    Creates the bundle folder if needed; refuses a folder that exists, is non-empty and is not a bundle.
    Also removes staging folders that an interrupted earlier step left behind.
    """
    if name not in SECTIONS or name == "defaults":
        raise ValueError(f"section with files must be one of lmm, sam, engines; got {name!r}")
    bundle_dir = Path(bundle_dir)
    if bundle_dir.exists() and not bundle_dir.is_dir():
        raise BundleError(f"output exists and is not a directory: {bundle_dir}")
    if (bundle_dir / MANIFEST_NAME).exists():
        read_manifest(bundle_dir)  # refuse a bad manifest before any work (the commit would trust it)
    elif bundle_dir.is_dir():
        leftovers = [p for p in bundle_dir.iterdir() if not p.name.startswith((_STAGING_PREFIX, _LOCK_NAME))]
        if leftovers:
            raise BundleError(f"output folder is not empty and holds no bundle: {bundle_dir}")
    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        for stale in bundle_dir.glob(f"{_STAGING_PREFIX}{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = bundle_dir / f"{_STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as exc:
        raise BundleError(f"cannot write to {bundle_dir}: {exc.strerror or exc}") from exc
    return staging


@contextlib.contextmanager
def staged_section(bundle_dir: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """Stage section `name` for the body of a `with` block (which ends with `commit_section`).

    On any failure (including Ctrl-C) the staging folder is removed, and so is the bundle folder when
    this step created it: nothing that looks like a bundle may remain where none was before, and an
    existing bundle keeps its previous manifest and files.
    """
    bundle_dir = Path(bundle_dir)
    created = not bundle_dir.exists()
    staging = stage_section(bundle_dir, name)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(bundle_dir, ignore_errors=True)
        raise


def commit_section(
    bundle_dir: str | os.PathLike[str],
    name: str,
    staging: str | os.PathLike[str],
    section: dict[str, Any],
) -> dict[str, Any]:
    """Move a verified staging folder into place as section `name` and swap the manifest atomically.

    `section` is the section's content without "dir" and "files"; both are filled in here from the
    staged files. Returns the new manifest.
    """
    bundle_dir = Path(bundle_dir)
    staging = Path(staging)
    with _locked(bundle_dir):
        manifest = _load_or_new(bundle_dir)
        folder = f"{name}-{secrets.token_hex(4)}"
        previous = manifest.get(name, {}).get("dir") if isinstance(manifest.get(name), dict) else None
        manifest[name] = {
            "dir": folder,
            "files": describe_files(staging),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **section,
        }
        validate_manifest(manifest)  # what we write obeys the rules we read by
        os.rename(staging, bundle_dir / folder)
        _write_manifest_atomically(bundle_dir, manifest)
        old = bundle_dir / previous if previous and previous != folder else None
        # `previous` passed validate_manifest (a plain folder name, no symlink); checked again here
        # because this is the one place that deletes a folder named by the manifest.
        if old is not None and not old.is_symlink() and old.parent.resolve() == bundle_dir.resolve():
            shutil.rmtree(old, ignore_errors=True)
    return manifest


def update_defaults(bundle_dir: str | os.PathLike[str], values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into the manifest's "defaults" section (tau, point mapping, providers, ...)."""
    bundle_dir = Path(bundle_dir)
    with _locked(bundle_dir):
        manifest = read_manifest(bundle_dir)
        manifest["defaults"] = {**manifest.get("defaults", {}), **values}
        _write_manifest_atomically(bundle_dir, manifest)
    return manifest
