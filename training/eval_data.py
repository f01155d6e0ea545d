"""The evaluation split: its records, their fields, and their images and masks read inside the dataset.

Records are those of docs/data.md (one JSON object per line of DATA_DIR/{split}.jsonl). Images are
decoded exactly as the runtime decodes a file (EXIF orientation, mode conversion, pixel limit), and
every path a record names must resolve inside DATA_DIR (octopus_rt/paths.resolve_inside).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_split", "question_of", "reference_of", "target_region", "load_record_rgb", "load_record_mask",
           "progress"]


def load_split(data_dir: Path, split: str, max_records: int | None = None) -> list[dict]:
    """Records of DATA_DIR/{split}.jsonl in file order (at most max_records)."""
    from octopus_rt.errors import InputError

    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"no {split} split in {data_dir} (expected {path})")
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{number}: not a JSON record ({exc})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{number}: not a JSON object")
                records.append(record)
                if max_records is not None and len(records) >= max_records:
                    break
    return records


def question_of(record: dict) -> str:
    """The record's first human turn without the image placeholder."""
    text = record["conversations"][0]["value"]
    return text.replace("<image>\n", "").replace("<image>", "").strip()


def reference_of(record: dict) -> str:
    """The record's first answer (the reference text)."""
    return record["conversations"][1]["value"]


def target_region(record: dict) -> dict | None:
    """The one region a grounding record targets, or None (no target, or several)."""
    targets = record.get("target_regions") or []
    by_id = {r["id"]: r for r in record.get("regions") or []}
    return by_id.get(targets[0]) if len(targets) == 1 else None


def load_record_rgb(data_dir: Path, rel: Any) -> np.ndarray:
    """A record's image exactly as the runtime decodes a file (EXIF orientation applied, same mode
    conversion and pixel limit); the path must stay inside the dataset folder."""
    from octopus_rt.paths import read_inside
    from octopus_rt.runtime.images import load_image

    return load_image(read_inside(data_dir, rel, "record image")).rgb


def load_record_mask(data_dir: Path, rel: Any) -> np.ndarray:
    """A record's mask PNG as H x W bool (>= 128 inside); the path must stay inside the dataset folder."""
    from PIL import Image

    from octopus_rt.errors import InputError
    from octopus_rt.paths import read_inside

    data = read_inside(data_dir, rel, "record mask")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L")) >= 128
    except OSError as exc:
        raise InputError(f"cannot read mask {Path(data_dir) / str(rel)}: {exc}") from None


def progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
