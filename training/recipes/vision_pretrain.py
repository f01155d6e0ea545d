"""Dense per-patch pretraining of a LLaVA's vision tower + projector on region-wise distortion labels.

Why: measured on this machine, a small LLaVA trained from scratch on instruction data alone stays at
chance on "which region is degraded", while simple per-patch statistics + an MLP reach 70-82 %. The
vision encoder is the bottleneck, so before instruction tuning we train it (through the projector,
whose outputs are exactly the image tokens the language model reads) with a linear probe on dense
targets read off the data engine's region masks, for every patch p of the g x g grid:
- distorted: fraction of p's pixels inside distorted regions (BCE; 1 everywhere for whole-image);
- intensity: the covering regions' cumulative severity / 6 (MSE; 6 = the largest pair, 3 + 3);
- category: for each of the 12 distortion categories, the fraction of p inside regions with it (BCE);
- position: p's centre (x, y) in [0, 1] (MSE), so each image token also says where it is: the
  language model can then pool "distorted" tokens by attention and read their position linearly,
  whatever the question's length (RoPE alone only gives positions relative to the question's end).
With `relative_weight` > 0 a relative term is added (demo-findings: an absolute per-patch
"distorted?" target lets the network memorise which photo content is clean; comparing patches within
one image removes that shortcut): a softmax over the image's patches of the "distorted" logit,
against the patches' share of the image's distortion mass (intensity channel), on images with local
distortions. With `distill_steps` > 0 the tower first learns to carry a frozen ImageNet network's
features (teacher.py), a perception prior from millions of photos that our few dozen cannot give.
The probe is thrown away afterwards; only the vision tower and projector weights change. Flips and
quarter turns (targets moved with the pixels) give 8x the variety.

Frames: the LLaVA's processor must resize the whole image to a square without cropping (SigLIP-style
processors do; a centre crop would cut off regions), so patch (row i, col j) of the g x g grid covers
rows [i H / g, (i + 1) H / g) and columns [j W / g, (j + 1) W / g) of the original H x W image.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["VisionPretrainOptions", "VisionPretrainResult", "load_probe", "patch_targets", "patch_and_quadrant_accuracy",
           "pretrain_vision", "relative_loss"]

CATEGORIES: tuple[str, ...] = (
    "blur", "noise", "compression", "brighten", "darken", "contrast_strengthen", "contrast_weaken",
    "saturate_strengthen", "saturate_weaken", "oversharpen", "pixelate", "quantization",
)
N_TARGETS = 2 + len(CATEGORIES) + 2  # distorted, intensity, categories, (x, y)


@dataclass
class VisionPretrainOptions:
    """model_dir: a LlavaForConditionalGeneration save_pretrained folder, updated in place.
    data_dir: dataset folder (train.jsonl [+ val.jsonl]). Steps of `batch_size` images; stops early at
    `time_limit_s`. lr: AdamW peak (cosine decay)."""

    model_dir: Path
    data_dir: Path
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    time_limit_s: float | None = None
    max_images: int | None = None
    seed: int = 0
    log_every: int = 100
    threads: int = 1
    rotate: bool = True  # quarter-turn augmentation on top of horizontal flips
    relative_weight: float = 0.0  # weight of the within-image softmax over patches (see module docstring)
    distill_steps: int = 0  # teacher-distillation steps before the distortion pretraining (teacher.py)
    freeze_stages: int = 0  # the tower's input layers + first N stages stay frozen (lora.freeze_stages)


@dataclass
class VisionPretrainResult:
    steps: int
    seconds: float
    train_images: int
    val_images: int
    val_patch_accuracy: float | None  # distorted yes/no per patch (fraction >= 0.5), on val
    val_quadrant_accuracy: float | None  # argmax quadrant of predicted vs true distorted mass, on val
    train_patch_accuracy: float | None  # the same on (up to) 200 training images: fit vs generalisation
    train_quadrant_accuracy: float | None
    log: list[dict] = field(default_factory=list)
    distill: dict | None = None  # teacher.distill's summary when it ran


def patch_targets(regions: list[dict], masks: dict[str, np.ndarray], grid: int) -> np.ndarray:
    """(grid, grid, N_TARGETS) float32 targets of one image from its regions and their H x W masks.

    regions: the record's region dicts (mask path, whole_image, distortions). masks: mask path ->
    H x W bool. Channels: distorted, intensity / 6, 12 category fractions, x centre, y centre.
    """
    first = next(iter(masks.values()))
    height, width = first.shape
    rows = np.minimum((np.arange(height) * grid) // height, grid - 1)
    cols = np.minimum((np.arange(width) * grid) // width, grid - 1)
    counts = np.zeros((grid, grid), dtype=np.float64)
    np.add.at(counts, (rows[:, None].repeat(width, 1), cols[None, :].repeat(height, 0)), 1.0)

    def pooled(field_hw: np.ndarray) -> np.ndarray:
        sums = np.zeros((grid, grid), dtype=np.float64)
        np.add.at(sums, (rows[:, None].repeat(width, 1), cols[None, :].repeat(height, 0)), field_hw)
        return sums / np.maximum(counts, 1)

    distorted = np.zeros((height, width), dtype=np.float64)
    intensity = np.zeros((height, width), dtype=np.float64)
    per_category = np.zeros((len(CATEGORIES), height, width), dtype=np.float64)
    for region in regions:
        chain = region.get("distortions") or []
        if not chain:
            continue
        mask = masks[region["mask"]]
        distorted[mask] = 1.0
        intensity[mask] = sum(int(d["severity"]) for d in chain) / 6.0
        for d in chain:
            if d["category"] in CATEGORIES:
                per_category[CATEGORIES.index(d["category"])][mask] = 1.0
    out = np.zeros((grid, grid, N_TARGETS), dtype=np.float32)
    out[..., 0] = pooled(distorted)
    out[..., 1] = pooled(intensity)
    for c in range(len(CATEGORIES)):
        out[..., 2 + c] = pooled(per_category[c]) if per_category[c].any() else 0.0
    centres = (np.arange(grid) + 0.5) / grid
    out[..., -2] = centres[None, :]
    out[..., -1] = centres[:, None]
    return out


def _collect(data_dir: Path, split: str, grid: int, max_images: int | None, seed: int):
    """Distinct images of a split -> (list of PIL images, (N, g, g, T) targets)."""
    from PIL import Image

    from octopus_rt.paths import read_inside
    from octopus_rt.training.eval_data import load_record_mask

    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        return [], np.zeros((0, grid, grid, N_TARGETS), np.float32)
    seen: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if record.get("regions") and all(r.get("mask") for r in record["regions"]):
                    seen.setdefault(record["image"], record["regions"])
    names = list(seen)
    if max_images is not None and len(names) > max_images:
        rng = np.random.default_rng(seed)
        names = [names[i] for i in sorted(rng.choice(len(names), max_images, replace=False))]
    images, targets = [], []
    for name in names:
        image = Image.open(io.BytesIO(read_inside(data_dir, name, "record image"))).convert("RGB")
        masks = {r["mask"]: load_record_mask(data_dir, r["mask"]) for r in seen[name]}
        if any(m.shape != (image.height, image.width) for m in masks.values()):
            continue
        images.append(image)
        targets.append(patch_targets(seen[name], masks, grid))
    return images, np.stack(targets) if targets else np.zeros((0, grid, grid, N_TARGETS), np.float32)


def _loss(torch, pred, target, relative: float = 0.0):
    """pred / target: (B, g*g, N_TARGETS). BCE on fractions, MSE on intensity and position; plus
    `relative` x the within-image patch softmax cross-entropy (`relative_loss`)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(pred[..., 0], target[..., 0])
    loss = loss + 4.0 * torch.nn.functional.mse_loss(torch.sigmoid(pred[..., 1]), target[..., 1])
    loss = loss + bce(pred[..., 2:2 + len(CATEGORIES)], target[..., 2:2 + len(CATEGORIES)])
    loss = loss + torch.nn.functional.mse_loss(pred[..., -2:], target[..., -2:])
    if relative > 0:
        loss = loss + relative * relative_loss(torch, pred[..., 0], target[..., 0], target[..., 1])
    return loss


def relative_loss(torch, logits, distorted, mass):
    """Cross-entropy between softmax(logits) over each image's patches and the patches' share of the
    image's distortion mass. logits / distorted / mass: (B, P). Images without local distortions
    (none, or every patch distorted) are left out; 0 when none is left."""
    total = mass.sum(-1)
    local = (total > 0) & (distorted.mean(-1) < 0.999)
    if not local.any():
        return logits.sum() * 0.0
    share = mass[local] / total[local, None]
    return -(share * torch.log_softmax(logits[local], dim=-1)).sum(-1).mean()


def _quadrant_of(mass: np.ndarray) -> int:
    """Index 0..3 (TL, TR, BL, BR) of the quadrant holding the most of a (g, g) map."""
    g = mass.shape[0]
    h = g // 2
    sums = [mass[:h, :h].sum(), mass[:h, h:].sum(), mass[h:, :h].sum(), mass[h:, h:].sum()]
    return int(np.argmax(sums))


def _probe_accuracy(torch, features, probe, pixels, targets: np.ndarray, grid: int):
    """(patch accuracy, quadrant accuracy) of the probe's "distorted" output on preprocessed images;
    features: the model's image tokens (vision_wrapper).

    Patch: distorted yes / no (fraction >= 0.5) per patch. Quadrant: on images with local distortions,
    the quadrant holding the most predicted distorted mass is the one holding the most true mass.
    """
    if pixels is None or len(targets) == 0:
        return None, None
    with torch.no_grad():
        pred = torch.cat([probe(features(pixels[i:i + 64])) for i in range(0, len(targets), 64)])
    return patch_and_quadrant_accuracy(torch.sigmoid(pred[..., 0]).reshape(-1, grid, grid).numpy(), targets[..., 0])


def patch_and_quadrant_accuracy(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float | None]:
    """(patch accuracy, quadrant accuracy) of (N, g, g) predicted distorted probabilities against the
    (N, g, g) true distorted fractions; see `_probe_accuracy`. Quadrant: None without local images."""
    patch = float(((predicted >= 0.5) == (truth >= 0.5)).mean())
    local = [i for i in range(len(truth)) if 0 < truth[i].mean() < 0.999]
    quadrant = float(np.mean([_quadrant_of(predicted[i]) == _quadrant_of(truth[i]) for i in local])) if local else None
    return patch, quadrant


def pretrain_vision(options: VisionPretrainOptions, probe_out: Path | None = None) -> VisionPretrainResult:
    """Train the vision tower + projector with a linear probe (see `_pretrain_vision`)."""
    import torch

    with torch.enable_grad():  # an export earlier in the process may have switched grad mode off
        return _pretrain_vision(options, probe_out)


def _pretrain_vision(options: VisionPretrainOptions, probe_out: Path | None = None) -> VisionPretrainResult:
    """Train the vision tower + projector of options.model_dir with a linear probe; save in place.

    probe_out: where to save the trained probe (a torch.nn.Linear's state_dict, tensors only), for the
    auxiliary loss during instruction tuning.
    """
    import torch

    from octopus_rt.errors import InputError
    from octopus_rt.export.llava_wrappers import vision_wrapper
    from octopus_rt.training.architectures import load_llava
    from octopus_rt.training.lora import freeze_stages

    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    model, processor = load_llava(options.model_dir)
    # (B, g*g, D) projected image tokens exactly as the LLaVA (or FastVLM) computes them: the export's
    # vision wrapper (parity-tested against the model), built once; it shares the model's modules.
    features = vision_wrapper(model)
    image_processor = processor.image_processor
    with torch.no_grad():  # the token grid, whatever the tower (a ViT's patches or a CNN's last map)
        side = image_processor.size["height"]
        grid = int(round(math.sqrt(features(torch.zeros(1, 3, side, side)).shape[1])))
    if getattr(image_processor, "do_center_crop", False):
        raise InputError("vision pretraining needs a processor that resizes without cropping (SigLIP-style)")

    def pixels(images: list) -> torch.Tensor:
        return image_processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)

    train_images, train_targets = _collect(options.data_dir, "train", grid, options.max_images, options.seed)
    if not train_images:
        raise InputError(f"no training images with region masks in {options.data_dir}")
    val_images, val_targets = _collect(options.data_dir, "val", grid, 200, options.seed)
    # Preprocess once (float16 cache keeps memory small); flips are done on the tensors.
    train_pixels = torch.cat([pixels(train_images[i:i + 64]) for i in range(0, len(train_images), 64)]).half()
    val_pixels = (torch.cat([pixels(val_images[i:i + 64]) for i in range(0, len(val_images), 64)])
                  if val_images else None)
    distilled = None
    if options.distill_steps > 0:
        from octopus_rt.training.recipes.teacher import distill

        distilled = distill(torch, model, features, train_pixels,
                            options.distill_steps, batch_size=options.batch_size, lr=options.lr, seed=options.seed,
                            threads=options.threads, log_every=options.log_every)
    targets = torch.from_numpy(train_targets)
    canonical = targets[0, ..., -2:].clone()  # (g, g, 2) patch centres, the same for every image
    width = model.config.text_config.hidden_size
    probe = torch.nn.Linear(width, N_TARGETS)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()):
        param.requires_grad_(True)
    if options.freeze_stages:
        freeze_stages(model.model.vision_tower, options.freeze_stages)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimiser = torch.optim.AdamW(trainable + list(probe.parameters()), lr=options.lr,
                                  weight_decay=options.weight_decay)
    rng = np.random.default_rng(options.seed)
    log, running = [], []
    start = time.monotonic()
    model.train()
    step = 0
    for step in range(options.steps):
        if step < options.warmup_steps:
            lr = options.lr * (step + 1) / options.warmup_steps
        else:
            progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
            lr = options.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(train_images), size=options.batch_size))
        batch = train_pixels[idx].float()
        target = targets[idx].clone()
        # Dihedral augmentation (flip + quarter turns): pixels and the target grid move together; the
        # position channels then describe where each patch now is, i.e. the canonical grid again.
        flip = torch.from_numpy(rng.random(options.batch_size) < 0.5)
        if flip.any():
            batch[flip] = batch[flip].flip(-1)
            target[flip] = target[flip].flip(2)  # (b, g, g, T): mirror the columns
        turns = int(rng.integers(0, 4)) if options.rotate else 0
        if turns:
            batch = torch.rot90(batch, turns, dims=(-2, -1))
            target = torch.rot90(target, turns, dims=(1, 2))
        target[..., -2:] = canonical
        pred = probe(features(batch))
        loss = _loss(torch, pred, target.reshape(len(idx), grid * grid, N_TARGETS), options.relative_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        running.append(float(loss.detach()))
        if (step + 1) % options.log_every == 0:
            entry = {"step": step + 1, "loss": float(np.mean(running)), "seconds": round(time.monotonic() - start, 1)}
            running = []
            log.append(entry)
            print(f"[vision] step {entry['step']}/{options.steps} loss {entry['loss']:.4f} ({entry['seconds']:.0f}s)",
                  flush=True)
        if options.time_limit_s is not None and time.monotonic() - start > options.time_limit_s:
            print(f"[vision] time limit reached after {step + 1} steps", flush=True)
            break
    model.eval()
    patch_acc, quad_acc = _probe_accuracy(torch, features, probe, val_pixels, val_targets, grid)
    train_patch_acc, train_quad_acc = _probe_accuracy(torch, features, probe, train_pixels[:200].float(),
                                                      train_targets[:200], grid)
    for param in model.parameters():
        param.requires_grad_(True)
    model.save_pretrained(options.model_dir)
    if probe_out is not None:
        torch.save(probe.state_dict(), probe_out)  # tensors only: read back with weights_only=True
    seconds = time.monotonic() - start
    result = VisionPretrainResult(step + 1, seconds, len(train_images), len(val_images), patch_acc, quad_acc,
                                  train_patch_acc, train_quad_acc, log, distilled)
    print(f"[vision] done: {result.steps} steps in {seconds:.0f}s; patch / quadrant accuracy: val {patch_acc} / "
          f"{quad_acc}, train {train_patch_acc} / {train_quad_acc}", flush=True)
    return result


def load_probe(path: Path):
    """The frozen linear probe of vision pretraining from its state_dict file, read with
    weights_only=True (tensors only: a file that holds anything else is refused, never run)."""
    import pickle

    import torch

    from octopus_rt.errors import OctopusError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight = state["weight"]
        probe = torch.nn.Linear(weight.shape[1], weight.shape[0])
        probe.load_state_dict(state)
    except (pickle.UnpicklingError, OSError, RuntimeError, KeyError, TypeError, AttributeError, EOFError) as exc:
        raise OctopusError(f"cannot read the vision probe {path} as tensors ({type(exc).__name__}); "
                           "delete it to retrain it") from None
    return probe
