"""Train a small Segment Anything model on a dataset's region masks with point prompts.

There is no pretrained SAM on our machines, so the demo bundle uses this stand-in for the frozen SAM
of the paper: segment-anything's own classes (ImageEncoderViT, PromptEncoder, MaskDecoder with its
TwoWayTransformer) built by `export/sam_models.build_sam` from a small `SamConfig`, trained here on
the data engine's region masks. Real deployments export an official checkpoint (vit_b/l/h) instead.

Training sample: one image of the dataset (resized and padded with the runtime's own numpy
preprocessing, `runtime/sam_transforms.preprocess_image`), one of its region masks, and one positive
point drawn inside that mask (biased to the interior: pixels are drawn with probability proportional
to their distance from the mask border, so prompts look like the oracle / text-to-point prompts the
runtime sends). Loss (SAM paper, section 3 / appendix A): 20:1 focal + dice on the low-resolution
logits against the mask resized to the low-res grid, taking the best of the multimask outputs plus
the single-mask output, and an MSE loss of the IoU head against the true IoU.

Frames: images H x W x 3 uint8 RGB; masks H x W bool; points (x, y) in original pixels, mapped into
the encoder's resized frame (longest side = image_size) with `sam_transforms.map_points`. Low-res
targets cover the padded square (4 * image_size / patch_size pixels a side), like SAM's outputs.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DEMO_SAM_CONFIG", "SegmenterOptions", "SegmenterResult", "load_region_samples", "train_segmenter"]

# A small architecture that fits the demo bundle's budget (about 1.6 M parameters, 6.4 MB in fp32):
# 256 px input, 16 x 16 embedding grid, 64 x 64 low-res masks. Keys are `SamConfig` fields.
DEMO_SAM_CONFIG: dict = {
    "image_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 128,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1, 3],
    "window_size": 8,
    "prompt_embed_dim": 96,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 384,
    "decoder_num_heads": 4,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 96,
}


@dataclass
class SegmenterOptions:
    """One segmenter training run.

    data_dir: dataset folder with train.jsonl (and val.jsonl for the reported validation IoU).
    out: checkpoint path (`.pth`, a plain state_dict); its config goes next to it as `.json`.
    config: SamConfig fields (defaults to DEMO_SAM_CONFIG). steps: optimiser steps; each sees
    `images_per_step` images with `points_per_image` (mask, point) prompts each.
    max_images: cap on the distinct training images loaded (None = all). time_limit_s: stop early
    (after the current step) once training has run this long; None = no limit.
    """

    data_dir: Path
    out: Path
    config: dict = field(default_factory=lambda: dict(DEMO_SAM_CONFIG))
    steps: int = 1500
    images_per_step: int = 4
    points_per_image: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_images: int | None = None
    max_val_images: int = 64
    time_limit_s: float | None = None
    seed: int = 0
    log_every: int = 50
    threads: int = 1


@dataclass
class SegmenterResult:
    """Where the checkpoint went and how well it segments (mean IoU over val prompts, at the low-res
    grid, best-IoU-head mask of the multimask outputs, one interior point per region)."""

    checkpoint: Path
    config_path: Path
    steps: int
    seconds: float
    train_images: int
    val_iou: float | None
    val_prompts: int
    num_parameters: int
    log: list[dict] = field(default_factory=list)


@dataclass
class _ImageSample:
    """One preprocessed image and its region masks.

    image: 3 x S x S float32 (normalised, padded). masks: R x L x L bool low-res targets (L = 4 * grid).
    weights: R x H' x W' float64 point-drawing weights at the ORIGINAL mask resolution (distance to the
    border), scale: (sx, sy) from original pixels to the resized frame.
    """

    image: np.ndarray
    masks: np.ndarray
    weights: list[np.ndarray]
    scale: tuple[float, float]


def _low_res_target(mask: np.ndarray, resized_hw: tuple[int, int], image_size: int, low: int) -> np.ndarray:
    """Resize an H x W bool mask into the padded low-res frame (low x low): the resized image occupies
    the top-left (nh, nw) * low / image_size part, the padding is background."""
    from PIL import Image

    nh, nw = resized_hw
    lh, lw = max(1, round(nh * low / image_size)), max(1, round(nw * low / image_size))
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((lw, lh), Image.BILINEAR)) >= 128
    out = np.zeros((low, low), dtype=bool)
    out[:lh, :lw] = small
    return out


def load_region_samples(
    data_dir: Path, split: str, config: dict, *, max_images: int | None = None, seed: int = 0
) -> list[_ImageSample]:
    """Distinct images of one split with all their local (not whole-image) region masks, preprocessed.

    Images are taken in file order of the split's records, deduplicated by image path; with
    `max_images` a seeded subset is kept.
    """
    from PIL import Image
    from scipy.ndimage import distance_transform_edt

    from octopus_rt.paths import read_inside
    from octopus_rt.training.eval_data import load_record_mask
    from octopus_rt.runtime.sam_transforms import preprocess_image

    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        return []
    by_image: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            regions = by_image.setdefault(record["image"], {})
            for region in record.get("regions") or []:
                if not region.get("whole_image") and region.get("mask"):
                    regions.setdefault(region["mask"], region["mask"])
    names = [name for name, regions in by_image.items() if regions]
    if max_images is not None and len(names) > max_images:
        rng = np.random.default_rng(seed)
        names = [names[i] for i in sorted(rng.choice(len(names), size=max_images, replace=False))]
    size = int(config["image_size"])
    low = 4 * size // int(config["patch_size"])
    mean = config.get("pixel_mean", (123.675, 116.28, 103.53))
    std = config.get("pixel_std", (58.395, 57.12, 57.375))
    samples = []
    for name in names:
        rgb = np.asarray(Image.open(io.BytesIO(read_inside(data_dir, name, "record image"))).convert("RGB"))
        image, resized_hw = preprocess_image(rgb, size, mean, std)
        masks, weights = [], []
        for mask_rel in by_image[name]:
            mask = load_record_mask(data_dir, mask_rel)
            if mask.shape != rgb.shape[:2] or not mask.any():
                continue
            masks.append(_low_res_target(mask, resized_hw, size, low))
            # Draw points proportionally to distance-to-border squared: interior points, like the
            # oracle and the text-to-point prompts, but not always the single farthest pixel.
            weights.append(distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] ** 2)
        if masks:
            h, w = rgb.shape[:2]
            samples.append(_ImageSample(image[0], np.stack(masks), weights,
                                        (resized_hw[1] / w, resized_hw[0] / h)))
    return samples


def _draw_point(weights: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    flat = weights.ravel()
    index = int(rng.choice(flat.size, p=flat / flat.sum()))
    y, x = divmod(index, weights.shape[1])
    return x + 0.5, y + 0.5


def _losses(torch, low_res, iou_pred, target):
    """Per-prompt SAM loss. low_res: K x M x L x L logits, iou_pred: K x M, target: K x L x L float.

    Returns (loss scalar, true IoU of each output K x M). Focal (gamma 2, alpha 0.25) : dice = 20 : 1,
    summed for the single-mask output (index 0) and the best multimask output (lowest mask loss).
    """
    t = target[:, None].expand_as(low_res)
    prob = torch.sigmoid(low_res)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(low_res, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    focal = (0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * ce
    focal = focal.mean(dim=(-1, -2))
    inter = (prob * t).sum(dim=(-1, -2))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(-1, -2)) + t.sum(dim=(-1, -2)) + 1)
    mask_loss = 20 * focal + dice  # K x M
    with torch.no_grad():
        hard = low_res > 0
        tb = t > 0.5
        union = (hard | tb).sum(dim=(-1, -2)).float()
        true_iou = torch.where(union > 0, (hard & tb).sum(dim=(-1, -2)).float() / union.clamp(min=1),
                               torch.ones_like(union))
    best = mask_loss[:, 1:].min(dim=1).values if mask_loss.shape[1] > 1 else mask_loss[:, 0]
    iou_loss = ((iou_pred - true_iou) ** 2).mean()
    return (mask_loss[:, 0] + best).mean() + iou_loss, true_iou


def _prompt_batch(torch, sample: _ImageSample, count: int, rng: np.random.Generator):
    """`count` (region, point) prompts of one image: coords K x 1 x 2 in the resized frame, labels K x 1,
    targets K x L x L float."""
    regions = rng.integers(0, sample.masks.shape[0], size=count)
    coords = []
    for r in regions:
        x, y = _draw_point(sample.weights[r], rng)
        coords.append([x * sample.scale[0], y * sample.scale[1]])
    coords_t = torch.tensor(coords, dtype=torch.float32)[:, None, :]
    labels_t = torch.ones((count, 1), dtype=torch.float32)
    target = torch.from_numpy(sample.masks[regions].astype(np.float32))
    return coords_t, labels_t, target


def _decode(sam, embedding, coords, labels):
    """Decoder outputs for K prompts on one image embedding (1 x C x h x w): (K x M x L x L, K x M),
    the single-mask output first, as the exported decoder orders them."""
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou = sam.mask_decoder.predict_masks(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
    return masks, iou


def _validate(torch, sam, samples: list[_ImageSample], seed: int) -> tuple[float | None, int]:
    """Mean IoU (low-res grid) of the output the IoU head ranks best, one interior point per region."""
    if not samples:
        return None, 0
    rng = np.random.default_rng(seed + 1)
    ious = []
    sam.eval()
    with torch.no_grad():
        for sample in samples:
            embedding = sam.image_encoder(torch.from_numpy(sample.image)[None])
            count = sample.masks.shape[0]
            coords = []
            for r in range(count):
                x, y = _draw_point(sample.weights[r], rng)
                coords.append([x * sample.scale[0], y * sample.scale[1]])
            masks, iou_pred = _decode(sam, embedding, torch.tensor(coords, dtype=torch.float32)[:, None],
                                      torch.ones((count, 1)))
            pick = iou_pred[:, 1:].argmax(dim=1) + 1 if masks.shape[1] > 1 else torch.zeros(count, dtype=torch.long)
            chosen = masks[torch.arange(count), pick] > 0
            target = torch.from_numpy(sample.masks)
            union = (chosen | target).sum(dim=(-1, -2)).float()
            inter = (chosen & target).sum(dim=(-1, -2)).float()
            ious.extend(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist())
    return float(np.mean(ious)), len(ious)


def train_segmenter(options: SegmenterOptions) -> SegmenterResult:
    """Train the small SAM and save `options.out` (state_dict) + its config JSON next to it."""
    import torch

    # Grad mode on explicitly: an export earlier in the same process may have switched it off globally.
    with torch.enable_grad():
        return _train_segmenter(options)


def _train_segmenter(options: SegmenterOptions) -> SegmenterResult:
    import torch

    from octopus_rt.errors import InputError
    from octopus_rt.export.sam_models import SamConfig, build_sam, save_custom_checkpoint

    torch.set_num_threads(options.threads)
    config = SamConfig.from_dict(dict(options.config))
    train = load_region_samples(options.data_dir, "train", options.config, max_images=options.max_images,
                                seed=options.seed)
    if not train:
        raise InputError(f"no training images with local region masks in {options.data_dir}/train.jsonl")
    val = load_region_samples(options.data_dir, "val", options.config, max_images=options.max_val_images,
                              seed=options.seed)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    sam = build_sam(config)
    sam.train()
    optimiser = torch.optim.AdamW(sam.parameters(), lr=options.lr, weight_decay=options.weight_decay)

    def lr_at(step: int) -> float:
        if step < options.warmup_steps:
            return options.lr * (step + 1) / options.warmup_steps
        progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        return options.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    log: list[dict] = []
    start = time.monotonic()
    step = 0
    running = []
    for step in range(options.steps):
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        picks = rng.integers(0, len(train), size=options.images_per_step)
        images = torch.from_numpy(np.stack([train[i].image for i in picks]))
        embeddings = sam.image_encoder(images)
        loss = 0.0
        for b, i in enumerate(picks):
            coords, labels, target = _prompt_batch(torch, train[i], options.points_per_image, rng)
            masks, iou_pred = _decode(sam, embeddings[b:b + 1], coords, labels)
            sample_loss, _ = _losses(torch, masks, iou_pred, target)
            loss = loss + sample_loss / len(picks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimiser.step()
        running.append(float(loss.detach()))
        if (step + 1) % options.log_every == 0 or step + 1 == options.steps:
            entry = {"step": step + 1, "loss": float(np.mean(running)), "lr": lr_at(step),
                     "seconds": round(time.monotonic() - start, 1)}
            running = []
            log.append(entry)
            print(f"[segmenter] step {entry['step']}/{options.steps} loss {entry['loss']:.4f} "
                  f"({entry['seconds']:.0f}s)", flush=True)
        if options.time_limit_s is not None and time.monotonic() - start > options.time_limit_s:
            print(f"[segmenter] time limit reached after {step + 1} steps", flush=True)
            break
    val_iou, val_prompts = _validate(torch, sam, val, options.seed)
    sam.eval()
    checkpoint, config_path = save_custom_checkpoint(sam, config, options.out)
    seconds = time.monotonic() - start
    result = SegmenterResult(checkpoint, config_path, step + 1, seconds, len(train), val_iou, val_prompts,
                             sum(p.numel() for p in sam.parameters()), log)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    Path(options.out).with_suffix(".log.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[segmenter] saved {checkpoint} ({result.num_parameters} parameters); val IoU "
          f"{'n/a' if val_iou is None else f'{val_iou:.3f}'} over {val_prompts} prompts", flush=True)
    return result
