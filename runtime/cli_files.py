"""Output files of `octopus-rt infer`, checked before any inference (docs/runtime.md): a writable
place, a known image extension for pictures, never an input file, never a folder.

Standard library + Pillow only (imported by the CLI inside its commands). The batch files
(`infer-batch` input, locked output, mask names) are runtime/batch.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

from octopus_rt.errors import InputError

__all__ = ["check_output_file"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(path: Path, what: str, *, inputs: tuple[Path, ...] = (), image: bool = True) -> None:
    """InputError (one line) unless `path` can take a new output file. Creates nothing.

    image: the suffix must be one Pillow can write (it picks the format from it).
    inputs: files this run reads; an output may never be one of them.
    """
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise InputError(f"{what} {path} is an input of this run; choose another file (inputs are never overwritten)")
    if image:
        from PIL import Image

        suffix = path.suffix.lower()
        if suffix not in Image.registered_extensions():
            raise InputError(f"{what} {path}: unknown image file extension {suffix or '(none)'!r}; use .png (or .jpg, .webp)")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise InputError(f"cannot write {what} {path}: permission denied")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {path}: {parent} is not a writable folder")
