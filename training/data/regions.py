"""Region proposals for synthetic data: a partition of the image into a few large regions.

Classical (default): SLIC superpixels on a copy whose long side is 256 px, grouped by k-means on
(mean Lab colour, centroid) into 3-5 clusters, split into connected components. With a Segment
Anything checkpoint: `SamAutomaticMaskGenerator` masks, largest first, each pixel to the first mask
claiming it. Either way, regions smaller than `min_area` of the image or too thin (an erosion by
`thin_radius` pixels at 256 px keeps less than a quarter of them) are dropped and their pixels given
to the nearest kept region, so the regions always tile the image: every pixel has a known
distortion intensity, which the "least degraded region" questions need.

Names: the paper names regions with SSA + InternVL; offline we have no semantic model, so a region
is described by measurable attributes - size, brightness and dominant colour ("large dark blue
area") - unless the caller supplies a label map with names.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from octopus_rt.errors import InputError

__all__ = ["RegionOptions", "propose_regions", "label_map_regions", "read_label_map", "describe_region", "colour_name",
           "load_sam"]

_WORK_SIDE = 256


@dataclass(frozen=True)
class RegionOptions:
    """Region proposal knobs. `min_area`: fraction of the image; `thin_radius`: pixels at 256 px."""

    min_regions: int = 3
    max_regions: int = 5
    min_area: float = 0.04
    thin_radius: int = 3
    max_kept: int = 6


def _work_copy(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = _WORK_SIDE / max(height, width)
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def _kmeans(features: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 15) -> np.ndarray:
    """Plain Lloyd k-means (seeded, so reproducible); returns (N,) int cluster ids."""
    centres = features[rng.choice(len(features), size=k, replace=False)].copy()
    for _ in range(iterations):
        dist = ((features[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        assign = dist.argmin(1)
        for c in range(k):
            members = features[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return ((features[:, None, :] - centres[None, :, :]) ** 2).sum(-1).argmin(1)


def _cleanup(labels: np.ndarray, options: RegionOptions) -> np.ndarray:
    """Connected components of a (h, w) int label map -> (h, w) int32 map of kept regions 0..n-1,
    with dropped pixels given to the nearest kept region (-1 only if nothing was kept)."""
    from scipy import ndimage

    area_total = labels.size
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * options.thin_radius + 1,) * 2)
    candidates = []
    for value in np.unique(labels):
        count, comps = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=4)
        for comp in range(1, count):
            piece = comps == comp
            area = int(piece.sum())
            if area < options.min_area * area_total:
                continue
            core = cv2.erode(piece.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
            if core.sum() < 0.25 * area:
                continue
            candidates.append((area, piece))
    candidates.sort(key=lambda item: -item[0])
    out = np.full(labels.shape, -1, dtype=np.int32)
    for index, (_, piece) in enumerate(candidates[: options.max_kept]):
        out[piece] = index
    if (out >= 0).any() and (out < 0).any():
        _, (iy, ix) = ndimage.distance_transform_edt(out < 0, return_indices=True)
        out = out[iy, ix]
    return out


def _to_masks(small_labels: np.ndarray, shape: tuple[int, int]) -> list[np.ndarray]:
    """Upscale a label map to (H, W) (nearest) and return one bool mask per region id, in id order."""
    height, width = shape
    full = cv2.resize(small_labels.astype(np.int32).astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)
    full = full.astype(np.int32)
    return [full == value for value in range(int(full.max()) + 1) if (full == value).any()]


def propose_regions(
    image: np.ndarray, rng: np.random.Generator, options: RegionOptions = RegionOptions(), sam_generator=None
) -> list[np.ndarray]:
    """Partition a (H, W, 3) uint8 RGB image into large regions; returns (H, W) bool masks that do
    not overlap and cover the image, largest first. One mask (the whole image) when nothing splits."""
    from skimage.color import rgb2lab
    from skimage.segmentation import slic

    small = _work_copy(image)
    h, w = small.shape[:2]
    if sam_generator is not None:
        labels = np.full((h, w), -1, dtype=np.int32)
        masks = sorted(sam_generator.generate(small), key=lambda m: -int(m["area"]))
        for index, record in enumerate(masks):
            labels[(labels < 0) & record["segmentation"]] = index
        labels[labels < 0] = len(masks)  # the unclaimed remainder is one more candidate
    else:
        segments = slic(small, n_segments=60, compactness=10.0, start_label=0, channel_axis=-1)
        lab = rgb2lab(small).reshape(-1, 3)
        n_seg = int(segments.max()) + 1
        flat = segments.ravel()
        counts = np.maximum(np.bincount(flat, minlength=n_seg), 1)[:, None]
        mean_lab = np.stack([np.bincount(flat, weights=lab[:, c], minlength=n_seg) for c in range(3)], 1) / counts
        yy, xx = np.mgrid[0:h, 0:w]
        centroid = np.stack([np.bincount(flat, weights=xx.ravel() / w, minlength=n_seg),
                             np.bincount(flat, weights=yy.ravel() / h, minlength=n_seg)], 1) / counts
        # Position weighs like ~40 Lab units across the image: colour groups first, but stay compact.
        features = np.concatenate([mean_lab, centroid * 40.0], axis=1)
        k = int(rng.integers(options.min_regions, options.max_regions + 1))
        k = min(k, n_seg)
        labels = _kmeans(features, k, rng)[segments] if k > 1 else np.zeros_like(segments)
    cleaned = _cleanup(labels, options)
    if (cleaned < 0).all():
        return [np.ones(image.shape[:2], dtype=bool)]
    masks = _to_masks(cleaned, image.shape[:2])
    return sorted(masks, key=lambda m: -int(m.sum()))


def read_label_map(path: Path, *, header_only: bool = False) -> np.ndarray | None:
    """(H, W) int32 labels of a user label map PNG: palette indices or grey values as they are, an RGB
    colour as one value (R << 16 | G << 8 | B). The sources' pixel limit (sources.MAX_SOURCE_PIXELS) is
    checked from the header before any decoding, so a tiny file claiming a huge size cannot exhaust
    memory. header_only: only that check (returns None). Raises ValueError (one line) when refused."""
    from octopus_rt.training.data.sources import open_limited

    with open_limited(path, f"label map {path.name}") as im:
        if header_only:
            return None
        if im.mode in ("P", "L", "I", "I;16"):  # palette indices or grey values are the labels
            return np.asarray(im).astype(np.int32)
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)  # colour-coded labels: one value per colour
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def label_map_regions(label_map: np.ndarray, options: RegionOptions = RegionOptions()) -> list[tuple[np.ndarray, int]]:
    """Regions from a user's (H, W) integer label map: per label value its largest connected piece,
    if large and thick enough (as for proposals); the other pixels go to the nearest kept region so
    the regions still tile the image. Returns (mask, label value) pairs, largest first."""
    from scipy import ndimage

    pieces: list[tuple[np.ndarray, int]] = []
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * options.thin_radius + 1,) * 2)
    for value in np.unique(label_map):
        count, comps = cv2.connectedComponents((label_map == value).astype(np.uint8), connectivity=4)
        if count < 2:
            continue
        areas = np.bincount(comps.ravel())[1:]
        piece = comps == (1 + int(areas.argmax()))
        core = cv2.erode(piece.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
        if piece.sum() >= options.min_area * label_map.size and core.sum() >= 0.25 * piece.sum():
            pieces.append((piece, int(value)))
    if not pieces:
        return []
    index = np.full(label_map.shape, -1, dtype=np.int32)
    for k, (piece, _) in enumerate(pieces):
        index[piece] = k
    if (index < 0).any():
        _, (iy, ix) = ndimage.distance_transform_edt(index < 0, return_indices=True)
        index = index[iy, ix]
    out = [(index == k, value) for k, (_, value) in enumerate(pieces)]
    return sorted(out, key=lambda item: -int(item[0].sum()))


_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
         (290, "purple"), (335, "pink"), (360, "red"))


def colour_name(rgb: np.ndarray) -> str:
    """Name of a mean (3,) float RGB colour in [0, 255]: an achromatic name for low saturation or
    value, else a hue name."""
    hsv = cv2.cvtColor(np.asarray(rgb, dtype=np.float32).reshape(1, 1, 3) / 255.0, cv2.COLOR_RGB2HSV)[0, 0]
    hue, sat, val = float(hsv[0]), float(hsv[1]), float(hsv[2])
    if val < 0.2:
        return "black"
    if sat < 0.18:
        return "white" if val > 0.8 else "gray"
    for limit, name in _HUES:
        if hue < limit:
            return "brown" if name in ("orange", "red") and val < 0.55 else name
    return "red"


def describe_region(image: np.ndarray, mask: np.ndarray) -> str:
    """Attribute label of a region of a (H, W, 3) uint8 image: size, brightness, colour + "area"."""
    fraction = float(mask.mean())
    size = "small" if fraction < 0.12 else ("large" if fraction > 0.35 else "medium-sized")
    pixels = image[mask].astype(np.float32)
    luma = float((pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
    brightness = "dark " if luma < 85 else ("bright " if luma > 170 else "")
    colour = colour_name(np.median(pixels, axis=0))
    if colour in ("black", "white"):
        brightness = ""
    return f"{size} {brightness}{colour} area"


@lru_cache(maxsize=2)
def load_sam(checkpoint: str):
    """SamAutomaticMaskGenerator for a segment-anything checkpoint; the model type (vit_b / vit_l /
    vit_h) is read from the checkpoint's patch-embedding width. One per process (cached)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"SAM checkpoint not found: {checkpoint}")
    try:
        import torch
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    except ImportError as exc:
        raise InputError(f"--sam needs segment-anything and torch ({exc}); install octopus-rt[export]") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        width = int(state["image_encoder.patch_embed.proj.weight"].shape[0])
        kind = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}[width]
        model = sam_model_registry[kind]()
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError, EOFError,
            pickle.UnpicklingError) as exc:  # not a (complete) SAM checkpoint
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputError(f"invalid SAM checkpoint {checkpoint}: {reason}") from exc
    model.eval()
    return SamAutomaticMaskGenerator(model, points_per_side=16)
