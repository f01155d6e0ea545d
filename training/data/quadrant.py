"""A tiny procedural grounding dataset for tests: one distorted quadrant per image, one fixed question.

The source images are smooth random textures (no photos needed), so the only thing that tells the
quadrants apart is the distortion itself: "the image is the only signal". Records have exactly the
form `octopus-rt data synth` writes (task "grounding", sub-task "HyD-G-max").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octopus_rt import vocab
from octopus_rt.training.data.records import SPLITS, conversation, region_from_mask, save_image, save_mask, write_jsonl

__all__ = ["QUADRANT_QUESTION", "QUADRANTS", "make_quadrant_dataset", "smooth_texture"]

QUADRANT_QUESTION = "Which region shows the most severe degradation in the evaluated image?"

# (horizontal, vertical) eq. 1 terms of the four quadrants, in the order the labels cycle.
QUADRANTS: tuple[tuple[str, str], ...] = (("left", "top"), ("right", "top"), ("left", "bottom"), ("right", "bottom"))


def smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 RGB image: a random colour gradient plus low-frequency colour blobs
    (bilinear upsampling of a 4x4 random grid). Smooth on purpose: noise stands out everywhere."""
    import cv2

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3)).astype(np.float32)
    gradient = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    grid = rng.uniform(-0.2, 0.2, size=(4, 4, 3)).astype(np.float32)
    blobs = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return (np.clip(gradient + blobs, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _quadrant_mask(size: int, quadrant: tuple[str, str]) -> np.ndarray:
    half = size // 2
    mask = np.zeros((size, size), dtype=bool)
    ys = slice(0, half) if quadrant[1] == "top" else slice(half, size)
    xs = slice(0, half) if quadrant[0] == "left" else slice(half, size)
    mask[ys, xs] = True
    return mask


def _split_sizes(n: int) -> dict[str, int]:
    """About 80 / 10 / 10, with at least one record in val and test once n >= 3."""
    n_eval = max(1, n // 10) if n >= 3 else 0
    return {"train": n - 2 * n_eval, "val": n_eval, "test": n_eval}


def make_quadrant_dataset(
    out_dir: str | Path,
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    question: str = QUADRANT_QUESTION,
    severity: int = 5,
) -> dict[str, int]:
    """Write `n` grounding records to ``out_dir/{train,val,test}.jsonl`` (+ images/, masks/).

    Each record's image is a `size` x `size` smooth texture whose one quadrant carries Gaussian RGB
    noise of the given severity; the four quadrants are regions 0..3 (top left, top right, bottom
    left, bottom right), the distorted one is the target. Quadrant labels cycle within each split, so
    every split is balanced (counts differ by at most one). Same arguments -> byte-identical files.
    Returns the number of records per split.
    """
    from octopus_rt.training.data.distortions import apply_distortion

    if n < 1:
        raise ValueError("n must be >= 1")
    if size < 32 or size % 2:
        raise ValueError("size must be even and >= 32")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    masks = [_quadrant_mask(size, q) for q in QUADRANTS]
    mask_paths = [f"masks/quadrant_{i}.png" for i in range(4)]
    for mask, rel in zip(masks, mask_paths):
        save_mask(mask, out / rel)
    name = vocab.DISTORTION_NAMES["noise"]
    counts = _split_sizes(n)
    index = 0
    for split in SPLITS:
        order = rng.permutation(counts[split]) % 4  # balanced, shuffled quadrant labels
        records = []
        for k in range(counts[split]):
            target = int(order[k])
            clean = smooth_texture(rng, size)
            noisy = apply_distortion(clean, "noise", "gaussian_rgb", severity, rng)
            image = np.where(masks[target][..., None], noisy, clean)
            image_rel = f"images/quad_{index:06d}.png"
            save_image(image, out / image_rel)
            regions = []
            for i, q in enumerate(QUADRANTS):
                region = region_from_mask(i, masks[i], mask_paths[i], f"{q[1]} {q[0]} quadrant")
                if i == target:
                    region.distortions.append({"category": "noise", "subtype": "gaussian_rgb", "severity": severity})
                regions.append(region.to_json())
            horizontal, vertical = QUADRANTS[target]
            phrase = vocab.position_phrase(horizontal, vertical)
            answer = f"The {phrase} region, the {phrase} quadrant, is the most degraded one, with severe {name}."
            records.append({
                "id": f"quad-{index:06d}",
                "image": image_rel,
                "task": "grounding",
                "subtask": "HyD-G-max",
                "conversations": conversation(question, answer),
                "regions": regions,
                "target_regions": [target],
                "answer_mask": mask_paths[target],
                "source": f"quad-src-{index:06d}",
                "width": size,
                "height": size,
            })
            index += 1
        write_jsonl(records, out / f"{split}.jsonl")
    return counts
