"""Files the `infer` and `infer-batch` commands read and write: output path checks, batch input lines,
the locked and resumable batch output, collision-free mask names.

Standard library + Pillow only (imported by the CLI inside its commands). Rules (docs/runtime.md):
- an output (--mask, --overlay, --profile, --out) is checked before any inference: a writable place,
  a known image extension for pictures, never an input file, never a folder;
- a batch input is read line by line as bytes: a line that is not UTF-8, not JSON or not an object
  becomes that line's error item; ids must be unique (they key the output and the resume);
- the batch output is locked (fcntl.flock, exclusive, non-blocking) for the whole run, and a last line
  cut by a killed run is truncated away before anything is appended (its item is redone).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from octopus_rt.errors import InputError

__all__ = ["BatchItem", "BatchOutput", "check_output_file", "read_batch", "refuse_duplicate_ids", "mask_name"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


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


def mask_name(item_id: str) -> str:
    """File name of an item's mask: the id made file-safe (ASCII letters, digits, - _ .), then a hash
    of the exact id, so ids that read alike ("x/1", "x_1", "X_1") never share a file."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in item_id)[:80].lstrip(".")
    digest = hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return f"{safe or 'item'}-{digest}.png"


@dataclass
class BatchItem:
    """One input: `id`, its `line` (1-based; None for a folder input), the record (None when the line
    is unusable) and the reason it is unusable (`error`)."""

    id: str
    line: Optional[int]
    record: Optional[dict[str, Any]]
    error: Optional[str] = None


def _parse_line(raw: bytes, number: int, source: Path, question: Optional[str]) -> Optional[BatchItem]:
    fallback = f"line-{number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BatchItem(fallback, number, None, f"line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} "
                                                 f"at column {exc.start + 1})")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        return BatchItem(fallback, number, None, f"line {number} is not a JSON object: {exc}")
    if not isinstance(record, dict):
        return BatchItem(fallback, number, None, f"line {number} is not a JSON object (got {type(record).__name__})")
    raw_id = record.get("id", fallback)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return BatchItem(fallback, number, None, f"line {number}: \"id\" must be a string or an integer")
    if question and "question" not in record:
        record["question"] = question
    image = record.get("image")
    if isinstance(image, str) and image and not Path(image).is_absolute():
        record["image"] = str(source.parent / image)
    return BatchItem(str(raw_id), number, record)


def read_batch(source: Path, question: Optional[str]) -> list[BatchItem]:
    """The inputs of a batch: the lines of a JSONL file, or a folder's images (ids = file names)."""
    if source.is_dir():
        if not question:
            raise InputError("a folder input needs --question")
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [BatchItem(p.name, None, {"image": str(p), "question": question}) for p in paths]
    if not source.is_file():
        raise InputError(f"batch input not found: {source}")
    items = []
    with open(source, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            item = _parse_line(raw, number, source, question)
            if item is not None:
                items.append(item)
    return items


def refuse_duplicate_ids(items: list[BatchItem], source: Path) -> None:
    """InputError naming the repeated ids (and their lines): an id is the key of an output record and
    of the resume, so two inputs with one id would lose one answer."""
    lines: dict[str, list[str]] = {}
    for item in items:
        lines.setdefault(item.id, []).append(str(item.line) if item.line is not None else "?")
    repeated = {i: where for i, where in lines.items() if len(where) > 1}
    if repeated:
        shown = "; ".join(f"{i!r} on lines {', '.join(w)}" for i, w in list(repeated.items())[:5])
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        raise InputError(f"{source}: {len(repeated)} id(s) appear more than once: {shown}{more}; ids must be unique")


class BatchOutput:
    """The batch's output JSONL, opened for appending and locked for the life of the `with` block.

    On entry: take the lock (InputError at once if another process holds it), drop a cut-off last
    line, and collect the ids already answered (`done`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        self.repaired = 0  # bytes of a cut-off last line that were dropped
        self._handle = None

    def __enter__(self) -> "BatchOutput":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"another process is writing {self.path} (infer-batch holds a lock on it); "
                                 "wait for it to finish or choose another --out") from None
            raise
        self._handle = handle
        handle.seek(0)
        data = handle.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.ftruncate(handle.fileno(), keep)
            self.repaired, data = len(data) - keep, data[:keep]
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                self.done.add(str(record["id"]))
        handle.seek(0, os.SEEK_END)
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one line (ASCII JSON, so any id or text survives) and flush it."""
        self._handle.write((json.dumps(record) + "\n").encode("ascii"))
        self._handle.flush()
        self.done.add(str(record["id"]))

    def __exit__(self, *exc_info) -> None:
        try:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        finally:
            self._handle.close()
