"""`octopus-rt data show`: one record as a picture for a person to check.

Left: the record's image with every region outlined in its own colour, target regions tinted,
and "#id label: distortions" tags at the region centres. Right: the original image clean of
overlays (to judge the distortion itself). Below: the conversation, wrapped, plus the region list.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from octopus_rt.errors import InputError

__all__ = ["find_record", "render_record"]

_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230))


def find_record(data_dir: Path, record_id: str) -> dict:
    """The record with this id from any split file of `data_dir` (or an imported records.jsonl)."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise InputError(f"no .jsonl record files in {data_dir}")
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if record_id in line:
                    record = json.loads(line)
                    if record.get("id") == record_id:
                        return record
    raise InputError(f"no record with id {record_id!r} in {data_dir}")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render_record(
    data_dir: str | Path, record: dict, out_path: str | Path, *, max_side: int = 512, min_side: int = 256
) -> Path:
    """Draw `record` (see the module docstring) into a PNG at `out_path`; returns the path."""
    import cv2
    from PIL import Image, ImageDraw

    data_dir = Path(data_dir)
    image_path = data_dir / record["image"]
    meta = data_dir / "dataset.json"
    root = json.loads(meta.read_text(encoding="utf-8")).get("image_root") if meta.is_file() else None
    if root:  # imported data: images are relative to the recorded image root (synth data has none)
        image_path = Path(root) / record["image"]
    try:
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"cannot read {image_path}: {exc}") from exc
    height, width = image.shape[:2]
    # Large images shrink to max_side; small ones grow (nearest: pixels stay visible) to min_side.
    scale = min(1.0, max_side / max(height, width))
    if max(height, width) < min_side:
        scale = float(np.floor(min_side / max(height, width)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    shown = cv2.resize(image, size, interpolation=interpolation) if scale != 1 else image.copy()
    clean = shown.copy()
    overlay = shown.astype(np.float32)
    targets = set(record.get("target_regions") or [])
    regions = record.get("regions") or []
    tags = []
    for k, region in enumerate(regions):
        colour = np.array(_COLOURS[k % len(_COLOURS)], dtype=np.float32)
        with Image.open(data_dir / region["mask"]) as im:
            mask = np.asarray(im.convert("L")) > 127
        if scale != 1:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        if region["id"] in targets:
            overlay[mask] = overlay[mask] * 0.6 + colour * 0.4
        edge = mask ^ cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        overlay[edge] = colour
        names = ", ".join(f"{d['category']}/{d['subtype']}:{d['severity']}" for d in region.get("distortions", []))
        tag = f"#{region['id']} {region.get('label', '')}" + (f" [{names}]" if names else "")
        cx, cy = region.get("center", [width / 2, height / 2])
        tags.append((cx * scale, cy * scale, tag, tuple(int(c) for c in colour)))
    canvas_w = max(2 * size[0] + 30, 720)
    font = _font(14)
    lines = []
    for turn in record.get("conversations", []):
        who = "Q" if turn["from"] == "human" else "A"
        text = turn["value"].replace("<image>\n", "").replace("<|image|>", "")
        wrapped = textwrap.wrap(text, width=max(40, canvas_w // 8)) or [""]
        lines += [f"{who}: {wrapped[0]}"] + [f"   {w}" for w in wrapped[1:]]
    header = f"{record.get('id')}  task={record.get('task')}  subtask={record.get('subtask')}  targets={sorted(targets)}"
    extra = []
    if "mos" in record:
        extra.append(f"mos={record['mos']} (scale {record.get('mos_scale')})")
    if "answer" in record:
        extra.append(f"answer={record['answer']}  candidates={record.get('candidates')}")
    region_lines = [t[2] for t in tags]
    text_lines = [header] + lines + extra + region_lines
    line_h = 18
    canvas = Image.new("RGB", (canvas_w, size[1] + 20 + line_h * len(text_lines) + 10), (255, 255, 255))
    canvas.paste(Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8)), (10, 10))
    canvas.paste(Image.fromarray(clean), (20 + size[0], 10))
    draw = ImageDraw.Draw(canvas)
    for x, y, tag, colour in tags:
        label = tag.split(" [")[0]
        box = draw.textbbox((10 + x, 10 + y), label, font=font, anchor="mm")
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((10 + x, 10 + y), label, fill=colour, font=font, anchor="mm")
    y = size[1] + 20
    for line in text_lines:
        draw.text((10, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path
