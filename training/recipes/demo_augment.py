"""Mirrored twins of training records for the demo's LLaVA training: the image and its masks flipped,
and every positional word of the conversation swapped to match.

Why (measured on the issue-16 bundle, docs/demo.md): on its own *training* images the LLaVA named the
horizontal side of the target right 41 % of the time (teacher forced; vertical 70 %), while its vision
probe found the distorted half 66 % (horizontal) / 74 % (vertical) of the time on the same images. The
language model had learnt which side of each photo's content is usually the answer, not to read the
side off the image tokens. A mirrored twin has the same content with the opposite answer, so that
shortcut stops paying; the labels stay exact because they move with the pixels. Measured (issue 16
round 2, docs/demo.md): with h / v / hv twins the horizontal answer became a constant ("left" for
every held-out question) instead of a reading, so the FULL recipe leaves them off (`DemoRecipe.lmm_flips`).

Frames: a record's image and masks are H x W; a horizontal mirror maps column x to W - 1 - x, so a
bbox [x0, y0, x1, y1] (x1 exclusive) becomes [W - x1, y0, W - x0, y1] and a centre x becomes W - x;
vertical likewise with H. Eq. 1's tie rule (x / W < 1/2 is left) is not symmetric, which is harmless
here: the data engine only asks about regions whose centre is off both midlines.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from octopus_rt import vocab

__all__ = ["FLIPS", "swap_position_words", "mirror_record", "add_mirrored_twins"]

FLIPS: tuple[str, ...] = ("h", "v", "hv")  # horizontal mirror, vertical flip, both (a half turn)

_PAIRS = {"h": vocab.HORIZONTAL_WORDS, "v": vocab.VERTICAL_WORDS}


def swap_position_words(text: str, flip: str) -> str:
    """`text` with left <-> right (flip "h"), top <-> bottom ("v") or both ("hv") swapped, as whole
    words, keeping the first letter's case ("Left" -> "Right"). "bright" or "topic" stay."""
    swaps: dict[str, str] = {}
    for axis in flip:
        a, b = _PAIRS[axis]
        swaps.update({a: b, b: a})
    pattern = re.compile(r"\b(" + "|".join(sorted(swaps)) + r")\b", re.IGNORECASE)

    def replace(match: re.Match) -> str:
        word = match.group(0)
        other = swaps[word.lower()]
        return other.capitalize() if word[0].isupper() else other

    return pattern.sub(replace, text)


def _flip_array(array: np.ndarray, flip: str) -> np.ndarray:
    if "h" in flip:
        array = array[:, ::-1]
    if "v" in flip:
        array = array[::-1]
    return np.ascontiguousarray(array)


def mirror_record(record: dict, flip: str, prefix: str) -> dict:
    """The twin of one record (a new dict): paths under `prefix`, geometry and words flipped."""
    width, height = int(record["width"]), int(record["height"])
    twin = dict(record, id=f"{record['id']}-{flip}", image=prefix + record["image"])
    if record.get("answer_mask"):
        twin["answer_mask"] = prefix + record["answer_mask"]
    twin["conversations"] = [dict(turn, value=swap_position_words(turn["value"], flip))
                             for turn in record["conversations"]]
    regions = []
    for region in record.get("regions") or []:
        region = dict(region, label=swap_position_words(str(region.get("label", "")), flip))
        if region.get("mask"):
            region["mask"] = prefix + region["mask"]
        x0, y0, x1, y1 = region["bbox"]
        cx, cy = region["center"]
        if "h" in flip:
            x0, x1, cx = width - x1, width - x0, width - cx
        if "v" in flip:
            y0, y1, cy = height - y1, height - y0, height - cy
        region["bbox"], region["center"] = [x0, y0, x1, y1], [cx, cy]
        if region.get("position"):
            region["position"] = [swap_position_words(word, flip) for word in region["position"]]
        regions.append(region)
    twin["regions"] = regions
    return twin


def add_mirrored_twins(data_dir: Path, records: list[dict], flips: tuple[str, ...] = FLIPS) -> list[dict]:
    """Write the flipped images and masks of `records` under data_dir/mirror_<flip>/ (same relative
    paths as the originals) and return the twin records, one per record and flip. Records without
    width / height are skipped. Images and masks are read and written as PNG (lossless)."""
    from PIL import Image

    from octopus_rt.paths import resolve_inside

    data_dir = Path(data_dir)
    twins: list[dict] = []
    written: set[str] = set()

    def write_flipped(rel: str, prefix: str, flip: str) -> None:
        if prefix + rel in written:
            return
        source = resolve_inside(data_dir, rel, "record file")
        target = resolve_inside(data_dir, prefix + rel, "mirrored file")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            mode = image.mode
            pixels = np.asarray(image)
        Image.fromarray(_flip_array(pixels, flip), mode=mode).save(target, format="PNG", compress_level=1)
        written.add(prefix + rel)

    for flip in flips:
        if flip not in FLIPS:
            raise ValueError(f"unknown flip {flip!r}; choose from {FLIPS}")
        prefix = f"mirror_{flip}/"
        for record in records:
            if "width" not in record or "height" not in record:
                continue
            write_flipped(record["image"], prefix, flip)
            for region in record.get("regions") or []:
                if region.get("mask"):
                    write_flipped(region["mask"], prefix, flip)
            twins.append(mirror_record(record, flip, prefix))
    return twins
