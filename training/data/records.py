"""The record form of octopus-rt datasets: region descriptors, record assembly and file writing.

One JSON object per line in ``DATA_DIR/{train,val,test}.jsonl`` (documented field by field in
``octopus_rt/schemas/record.schema.json`` and ``docs/data.md``). Paths inside records are relative to
``DATA_DIR``. Pixel coordinates have their origin at the top left corner, x to the right, y down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from octopus_rt import vocab

__all__ = [
    "Region",
    "SPLITS",
    "POSITION_MARGIN",
    "position_ambiguous",
    "mask_bbox",
    "region_from_mask",
    "save_mask",
    "save_image",
    "write_jsonl",
    "read_jsonl",
    "read_records",
    "conversation",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

# A grounding target must have its bounding-box centre at least this fraction of the side away from
# the vertical and the horizontal midline. Why: eq. 1 names a side for every centre, and its tie
# rule (x / W = 1/2 is "right") turned every full-width or full-height region into "right" /
# "bottom" (27 % of the targets in a three-photo set), teaching the model a bias instead of a
# position. Within 10 % of the middle the box still has at least 40 % of its extent on the other
# side, so the side word is a coin toss for a reader too; beyond it the named half holds most of
# the box. Such regions are still distorted and described; they are only not asked for by position.
POSITION_MARGIN = 0.1


@dataclass
class Region:
    """One region of a record.

    ``bbox`` is [x0, y0, x1, y1] in pixels with x1, y1 exclusive; ``center`` is the bbox centre
    ((x0 + x1) / 2, (y0 + y1) / 2) in the same pixel frame; ``position`` is the paper's eq. 1
    (horizontal, vertical) pair, None for a whole-image region. ``distortions`` is the ordered list
    of applied (category, subtype, severity) dicts; ``intensity`` is the sum of their severities.
    """

    id: int
    mask: str
    bbox: list[int]
    center: list[float]
    position: list[str] | None
    whole_image: bool
    label: str
    distortions: list[dict] = field(default_factory=list)

    @property
    def intensity(self) -> int:
        return int(sum(int(d["severity"]) for d in self.distortions))

    def severity_of(self, category: str) -> int:
        """Single intensity of one category (SiD-G): its summed severity here, 0 where absent."""
        return int(sum(int(d["severity"]) for d in self.distortions if d["category"] == category))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "mask": self.mask,
            "bbox": list(self.bbox),
            "center": list(self.center),
            "position": None if self.position is None else list(self.position),
            "whole_image": self.whole_image,
            "label": self.label,
            "distortions": [dict(d) for d in self.distortions],
            "intensity": self.intensity,
        }


def position_ambiguous(center: list[float] | tuple[float, float], width: int, height: int,
                       margin: float = POSITION_MARGIN) -> bool:
    """True when a box centre (x, y) in pixels of a width x height image lies within `margin` (a
    fraction of the side) of the vertical or the horizontal midline: eq. 1's side word is then not
    a well-posed grounding answer (see POSITION_MARGIN)."""
    return abs(center[0] / width - 0.5) < margin or abs(center[1] / height - 0.5) < margin


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] of the True pixels of a (H, W) bool mask, x1 / y1 exclusive."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        raise ValueError("empty mask has no bounding box")
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def region_from_mask(
    region_id: int, mask: np.ndarray, mask_path: str, label: str, *, whole_image: bool = False
) -> Region:
    """Region descriptor from a (H, W) bool mask; positional terms by eq. 1 unless ``whole_image``."""
    height, width = mask.shape
    bbox = mask_bbox(mask)
    center = [(bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0]
    position = None if whole_image else list(vocab.position_terms((center[0], center[1]), width, height))
    return Region(region_id, mask_path, bbox, center, position, whole_image, label)


def save_mask(mask: np.ndarray, path: Path) -> None:
    """Write a (H, W) bool mask as an 8-bit PNG with values 0 / 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, format="PNG", compress_level=1)


def save_image(image: np.ndarray, path: Path) -> None:
    """Write a (H, W, 3) uint8 RGB image as PNG (lossless: the only JPEG artefacts in our data are
    the ones the compression distortion put there on purpose). zlib level 1: level 6 (Pillow's
    default) took 4x longer, about a third of the whole per-image cost, for ~15% smaller files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="RGB").save(path, format="PNG", compress_level=1)


def conversation(question: str, answer: str) -> list[dict]:
    """LLaVA conversation form: the human turn starts with the image token."""
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def write_jsonl(records: list[dict], path: Path) -> None:
    """One compact JSON object per line, keys in insertion order (so output is byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Records of one JSONL file (blank lines ignored)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_records(data_dir: Path) -> dict[str, list[dict]]:
    """All records of a dataset folder by split; missing split files give empty lists."""
    data_dir = Path(data_dir)
    return {split: read_jsonl(data_dir / f"{split}.jsonl") if (data_dir / f"{split}.jsonl").exists() else []
            for split in SPLITS}
