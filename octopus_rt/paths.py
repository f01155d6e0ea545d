"""Containment of paths that come from data: bundle manifests, dataset records, batch files.

One rule for every reader: a path written in a file we read is relative, has no ".." component, and,
once symbolic links are resolved, lies inside the root it is relative to. Readers of file contents use
`read_inside`, which checks again on the opened file, so a component swapped for a symbolic link between
the check and the open cannot make it read outside the root. Standard library only (the runtime imports
this module).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from octopus_rt.errors import InputError

__all__ = ["check_relative", "resolve_inside", "is_inside", "read_inside"]


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


def _opened_path(fd: int) -> Path | None:
    """The path the kernel opened for `fd` (Linux: /proc/self/fd), None where it cannot tell."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def read_inside(root: str | os.PathLike[str], rel: object, what: str) -> bytes:
    """The bytes of ROOT / REL: `resolve_inside` before the open, and the opened file itself checked to lie
    inside ROOT (where the system tells which file an open descriptor is: Linux), so a race that swaps a
    path component for a symbolic link after the first check is refused too. InputError when the file is
    missing, not a regular file, unreadable or outside ROOT. Never blocks on a FIFO (opened non-blocking)."""
    path = resolve_inside(root, rel, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{what} {rel!r} not found in {root}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        opened = _opened_path(fd)
        if opened is not None and not is_inside(opened, root):
            raise InputError(f"{what} {rel!r} leads outside {root} (a symbolic link changed while it was opened)")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{what} {path} is not a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        try:
            return handle.read()
        except OSError as exc:
            raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
