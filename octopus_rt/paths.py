"""Containment of paths that come from data: bundle manifests, dataset records, batch files.

One rule for every reader: a path written in a file we read is relative, has no ".." component, and,
once symbolic links are resolved, lies inside the root it is relative to. Standard library only (the
runtime imports this module).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from octopus_rt.errors import InputError

__all__ = ["check_relative", "resolve_inside", "is_inside"]


def check_relative(rel: object, what: str) -> str:
    """`rel` itself when it is a usable relative path string; InputError (a ValueError) otherwise.

    Refused: non-strings, empty strings, NUL bytes, absolute paths (POSIX "/x", Windows "C:\\x" or
    "\\\\server\\x"), and any ".." component (in either separator style).
    """
    if not isinstance(rel, str):
        raise InputError(f"{what} must be a path string, got {type(rel).__name__} {rel!r}")
    if not rel or "\x00" in rel:
        raise InputError(f"{what} must be a non-empty path without NUL bytes, got {rel!r}")
    windows = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise InputError(f"{what} must be a relative path, got the absolute path {rel!r}")
    if ".." in PurePosixPath(rel).parts or ".." in windows.parts:
        raise InputError(f"{what} must not contain '..', got {rel!r}")
    return rel


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when `path`, with symbolic links resolved, is `root` or lies below it (resolved too)."""
    resolved_root = Path(root).resolve()
    resolved = Path(path).resolve()
    return resolved == resolved_root or resolved_root in resolved.parents


def resolve_inside(root: str | os.PathLike[str], rel: object, what: str) -> Path:
    """ROOT / REL after `check_relative`, refused (InputError) when symbolic links take it outside ROOT.

    Returns the joined path (not the resolved one), so messages and records keep the user's spelling.
    The file need not exist.
    """
    joined = Path(root) / check_relative(rel, what)
    if not is_inside(joined, root):
        raise InputError(f"{what} {rel!r} leads outside {root} (through a symbolic link)")
    return joined
