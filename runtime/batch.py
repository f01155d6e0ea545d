"""Batches of records through one `Octopus` (`octopus-rt infer-batch` is a thin front end over this).

A record is a JSON object: {"id", "image", "question"} asks; "task": "score" scores the image;
"options": [...] (or "task": "choose") asks a multiple-choice question. `answer_record` dispatches one
record to `Octopus.ask` / `.score` / `.choose` and returns the result's JSON (`Answer.to_json`,
`ScoreResult.to_json`, `ChoiceResult.to_json`). `BatchRun` runs a whole input (a JSONL file or a
folder of images) into an output JSONL with these guarantees (docs/runtime.md):

- the input is read line by line as bytes: a line that is not UTF-8, not JSON or not an object
  becomes that line's error record; ids must be unique (they key the output, the resume and the mask
  file), a repeated id refuses the whole input before any work;
- every per-record failure (a bad field, an error inside the model) becomes that record's
  {"id", "error", "line"} and the batch goes on;
- the output is locked (fcntl.flock, exclusive, non-blocking) for the whole run, a last line cut by
  a killed run is truncated away before anything is appended (its record is redone), and ids
  already in the output are skipped (resume);
- masks go to `<masks>/<file-safe id>-<hash of the id>.png`, so ids that read alike never share a file.

Standard library + Pillow at import; the model is only what the caller passes in.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime.results import AskOptions

__all__ = [
    "BatchItem",
    "BatchOutput",
    "BatchReport",
    "BatchRun",
    "answer_record",
    "read_batch",
    "refuse_duplicate_ids",
    "mask_name",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


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


def answer_record(model: Any, record: dict[str, Any], *, mask_file: Optional[Path] = None,
                  options: Optional[AskOptions] = None) -> dict[str, Any]:
    """The JSON result of one record (see the module docstring) from `model` (an `Octopus`).

    mask_file: where an asked question's mask goes (segmentation on when the bundle has SAM; no file
    without a mask). options: the ask options of every asked question. InputError for a bad record.
    """
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise InputError("record has no \"image\" path")
    task = record.get("task") or ("choose" if "options" in record else "ask")
    if task == "score":
        return model.score(image).to_json()
    question = record.get("question")
    if not isinstance(question, str):
        raise InputError("record has no \"question\" string (or pass --question)")
    if task == "choose":
        return model.choose(image, question, record.get("options") or []).to_json()
    if task != "ask":
        raise InputError(f"unknown task {task!r}; use ask, score or choose")
    segment = mask_file is not None and model.has_sam
    answer = model.ask(image, question, options=(options or AskOptions()).merged(segment=segment))
    mask_path = None
    if mask_file is not None and answer.mask is not None:
        from octopus_rt.runtime.overlay import mask_to_png

        mask_to_png(answer.mask).save(mask_file)
        mask_path = str(mask_file)
    return answer.to_json(mask_path)


@dataclass
class BatchReport:
    """What a run did: records answered, records that became error records, records already in
    the output (skipped), and bytes of a cut-off last line that were dropped before appending."""

    done: int = 0
    errors: int = 0
    skipped: int = 0
    repaired: int = 0


class BatchRun:
    """One batch: `source` (JSONL or a folder of images, with `question` for a folder or for lines
    without one) into the JSONL `out`, masks into the folder `masks` (None: no segmentation).

        with BatchRun(source, out, question=q, masks=m) as run:   # reads, checks, locks `out`
            report = run.run(model, AskOptions(tau=...))           # one output line per record

    The constructor reads the input and refuses (InputError, before any work) repeated ids, an
    output that is the input or a folder, and masks that name a file; entering takes the output's
    lock and repairs a cut-off last line (`report.repaired`).
    """

    def __init__(self, source: Path, out: Path, *, question: Optional[str] = None, masks: Optional[Path] = None) -> None:
        self.source, self.out, self.masks = Path(source), Path(out), None if masks is None else Path(masks)
        self.items = read_batch(self.source, question)
        refuse_duplicate_ids(self.items, self.source)
        if self.source.is_file() and (self.out.resolve() == self.source.resolve()
                                      or (self.out.exists() and os.path.samefile(self.out, self.source))):
            raise InputError(f"--out {self.out} is the batch input; choose another file")
        if self.out.is_dir():
            raise InputError(f"--out {self.out} is a folder; give a JSONL file name")
        if self.masks is not None and self.masks.exists() and not self.masks.is_dir():
            raise InputError(f"--masks {self.masks} is a file; give a folder")
        self.report = BatchReport()
        self._output: Optional[BatchOutput] = None

    def __enter__(self) -> "BatchRun":
        self._output = BatchOutput(self.out).__enter__()
        self.report.repaired = self._output.repaired
        return self

    def __exit__(self, *exc_info) -> None:
        self._output.__exit__(*exc_info)

    def run(self, model: Any, options: Optional[AskOptions] = None,
            items: Optional[Iterable[BatchItem]] = None) -> BatchReport:
        """Answer every record not yet in the output, appending one line each. `items`: `self.items`
        wrapped by the caller (e.g. in a progress bar); default `self.items`."""
        if self.masks is not None:
            self.masks.mkdir(parents=True, exist_ok=True)
        sink, report = self._output, self.report
        for item in self.items if items is None else items:
            if item.id in sink.done:
                report.skipped += 1
                continue
            result: dict[str, Any] = {"id": item.id}
            record, error = item.record, item.error
            if record is not None:
                result.update({k: record.get(k) for k in ("image", "question") if k in record})
            if error is None:
                mask_file = None if self.masks is None else self.masks / mask_name(item.id)
                try:
                    result.update(answer_record(model, record, mask_file=mask_file, options=options))
                except OctopusError as exc:
                    error = str(exc)
                except Exception as exc:  # noqa: BLE001 - one bad record must not end the batch
                    error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                result["error"] = error
                if item.line is not None:
                    result["line"] = item.line
                report.errors += 1
            else:
                report.done += 1
            sink.write(result)
        return report
