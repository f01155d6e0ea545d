"""A yardstick for the demo data: how well do hand-crafted per-patch statistics find distorted patches
on photos a model never saw?

    .venv/bin/python -m octopus_rt.training.recipes.feature_probe WORK/data [--steps 2000]

Why: the demo's vision tower is the bottleneck (docs/demo.md). This probe needs no LLaVA and runs in
about two minutes, so a new photo source or data-engine setting can be judged before a 40-minute
recipe run. Per image (resized to 256 x 256, an 8 x 8 grid of 32 px patches, the frame of the demo's
vision tower) each patch gets 13 statistics: mean R, G, B, luma mean and standard deviation, log mean
|horizontal / vertical gradient|, log mean |Laplacian| and its square, saturation (max - min), clipped
white / black fractions, 8 px block-edge gradient (JPEG blocks); plus each statistic minus its median
over the image's patches (distortions are local: a patch is judged against its own photo). A
2-layer transformer over the 64 patch vectors (so it can compare patches) predicts "distorted" per
patch (target: fraction of the patch inside distorted regions >= 0.5), trained on the train split.

Variants (`--features`, `--objective`), to choose a perception prior and an objective before a long
run: `teacher` replaces the statistics by the frozen features of a teacher of teacher.py (`--teacher`:
EfficientNet-Lite0, 472 per patch, or -Lite2, 520; plus minus-median; `--teacher-size`: the pixels resized
to that size first), `both` concatenates them; `relative` adds the within-image softmax over patches
(vision_pretrain.relative_loss) to the per-patch BCE.

`--seeds N` repeats the probe with N seeds (each also draws its own training images) and reports the mean and
range: one run's quadrant accuracy moves by up to 6 points with the seed alone (issue 16 round 10), so compare
priors on several seeds, or on patch accuracy, which is steadier.

Reported per split, with the same definitions as vision pretraining: patch accuracy, and quadrant
accuracy (the quadrant with the most predicted distorted mass is the one with the most true mass, on
images with local distortions; chance 25 %), plus recall on distorted and clean patches.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["ProbeResult", "patch_statistics", "run_probe", "spread", "main"]

GRID = 8
SIDE = 256


@dataclass
class ProbeResult:
    """Accuracies of the probe on one split (None when the split has no local-distortion image)."""

    split: str
    images: int
    patch_accuracy: float
    quadrant_accuracy: float | None
    distorted_recall: float
    clean_recall: float | None


def patch_statistics(image) -> np.ndarray:
    """(GRID * GRID, 26) float32 statistics of a PIL image (see the module docstring), row-major patches."""
    rgb = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    grad_x = np.abs(np.diff(luma, axis=1, append=luma[:, -1:]))
    grad_y = np.abs(np.diff(luma, axis=0, append=luma[-1:]))
    laplacian = np.abs(4 * luma - np.roll(luma, 1, 0) - np.roll(luma, -1, 0) - np.roll(luma, 1, 1)
                       - np.roll(luma, -1, 1))
    block_edges = np.zeros_like(luma)
    block_edges[:, 7::8] = grad_x[:, 7::8]
    maps = [rgb[..., 0], rgb[..., 1], rgb[..., 2], luma, luma * luma, grad_x, grad_y, laplacian, laplacian ** 2,
            rgb.max(-1) - rgb.min(-1), (luma > 0.98).astype(np.float32), (luma < 0.02).astype(np.float32),
            block_edges]
    cell = SIDE // GRID
    stats = np.stack([m.reshape(GRID, cell, GRID, cell).mean((1, 3)) for m in maps], -1)
    stats[..., 4] = np.sqrt(np.maximum(stats[..., 4] - stats[..., 3] ** 2, 0.0))  # luma std
    stats[..., 5:9] = np.log(stats[..., 5:9] + 1e-4)
    flat = stats.reshape(GRID * GRID, -1)
    return np.concatenate([flat, flat - np.median(flat, axis=0)], axis=-1).astype(np.float32)


def _measure(split: str, predicted: np.ndarray, truth: np.ndarray) -> ProbeResult:
    """predicted / truth: (N, GRID, GRID) distorted probability / fraction."""
    from octopus_rt.training.recipes.vision_pretrain import patch_and_quadrant_accuracy

    pred, true = predicted >= 0.5, truth >= 0.5
    patch, quadrant = patch_and_quadrant_accuracy(predicted, truth)
    return ProbeResult(split, len(truth), patch, quadrant, float(pred[true].mean()),
                       float((~pred[~true]).mean()) if (~true).any() else None)


FEATURES = ("stats", "teacher", "both")
OBJECTIVES = ("absolute", "relative")


def _teacher_statistics(torch, teacher, images, size: int | None = None) -> np.ndarray:
    """(N, GRID * GRID, 2 * C): teacher features (teacher.teacher_features) and their minus-median."""
    from octopus_rt.training.recipes.teacher import teacher_features

    out = []
    for i in range(0, len(images), 32):
        batch = np.stack([np.asarray(im.convert("RGB").resize((SIDE, SIDE)), np.float32) for im in images[i:i + 32]])
        pixels = torch.from_numpy((batch / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
        out.append(teacher_features(torch, teacher, pixels, GRID, size).numpy())
    flat = np.concatenate(out)
    return np.concatenate([flat, flat - np.median(flat, axis=1, keepdims=True)], -1).astype(np.float32)


def run_probe(data_dir: Path, *, steps: int = 2000, max_images: int = 1500, seed: int = 0, features: str = "stats",
              objective: str = "absolute", teacher_name: str = "efficientnet_lite0",
              teacher_size: int | None = None) -> list[ProbeResult]:
    """Train on data_dir's train split, measure on train (up to 300 images), val and test."""
    import torch

    from octopus_rt.errors import InputError
    from octopus_rt.training.recipes.vision_pretrain import _collect, relative_loss

    if features not in FEATURES or objective not in OBJECTIVES:
        raise InputError(f"features: one of {FEATURES}; objective: one of {OBJECTIVES}")
    teacher = None
    if features != "stats":
        from octopus_rt.training.recipes.teacher import feature_extractor

        teacher = feature_extractor(teacher_name)
    splits = {}
    for split in ("train", "val", "test"):
        images, targets = _collect(Path(data_dir), split, GRID, max_images if split == "train" else 400, seed)
        if images:
            parts = []
            if features != "teacher":
                parts.append(np.stack([patch_statistics(image) for image in images]))
            if teacher is not None:
                parts.append(_teacher_statistics(torch, teacher, images, teacher_size))
            splits[split] = (torch.from_numpy(np.concatenate(parts, -1)), targets[..., 0], targets[..., 1])
    if "train" not in splits:
        raise InputError(f"no training images with region masks in {data_dir}")
    x_train, y_train, mass_train = splits["train"]
    mean, std = x_train.reshape(-1, x_train.shape[-1]).mean(0), x_train.reshape(-1, x_train.shape[-1]).std(0) + 1e-6
    width = 64
    torch.manual_seed(seed)  # here, so the probe's initialisation does not depend on how the teacher was built
    layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Linear(x_train.shape[-1], width), torch.nn.TransformerEncoder(layer, 2),
                                torch.nn.Linear(width, 1))
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    target = torch.from_numpy(y_train.reshape(len(y_train), -1))
    mass = torch.from_numpy(mass_train.reshape(len(mass_train), -1))
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x_train), 32))
        logits = model((x_train[idx] - mean) / std)[..., 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[idx])
        if objective == "relative":
            loss = loss + relative_loss(torch, logits, target[idx], mass[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    results = []
    with torch.no_grad():
        for split, (values, truth, _) in splits.items():
            if split == "train":
                values, truth = values[:300], truth[:300]
            prob = torch.sigmoid(model((values - mean) / std)[..., 0]).reshape(-1, GRID, GRID).numpy()
            results.append(_measure(split, prob, truth))
    return results


def spread(runs: list[list[ProbeResult]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per split, (mean, min, max) of patch and quadrant accuracy over several seeds' results (splits or
    quadrants a run lacks are left out). Measured in issue 16 round 10: one run's quadrant accuracy moves
    by up to 6 points with the seed alone, so priors are compared on several seeds (docs/demo.md)."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for split in dict.fromkeys(r.split for run in runs for r in run):
        rows = [r for run in runs for r in run if r.split == split]
        for metric in ("patch_accuracy", "quadrant_accuracy"):
            values = [getattr(r, metric) for r in rows if getattr(r, metric) is not None]
            if values:
                out.setdefault(split, {})[metric] = (float(np.mean(values)), min(values), max(values))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="dataset folder with {train,val,test}.jsonl and region masks")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="run seeds SEED .. SEED + N - 1 and report each and "
                        "the mean / range (quadrant accuracy moves by several points with the seed alone)")
    parser.add_argument("--features", choices=FEATURES, default="stats", help="per-patch features (teacher: "
                        "a frozen ImageNet network, needs the demo extra)")
    from octopus_rt.training.recipes.teacher import TEACHERS

    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="efficientnet_lite0",
                        help="the frozen network of --features teacher / both")
    parser.add_argument("--teacher-size", type=int, default=None, help="resize the teacher's input to this many "
                        "pixels square first (default: the 256 px of the demo tower)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="absolute", help="relative adds the "
                        "within-image softmax over patches")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from octopus_rt.errors import OctopusError

    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    seeds, runs = range(args.seed, args.seed + args.seeds), []
    try:
        for seed in seeds:
            runs.append(run_probe(args.data_dir, steps=args.steps, seed=seed, features=args.features,
                                  objective=args.objective, teacher_name=args.teacher, teacher_size=args.teacher_size))
    except OctopusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'seed':>4} {'split':6} {'images':>6} {'patch':>6} {'quadrant':>8} {'distorted recall':>16} "
          f"{'clean recall':>12}")
    for seed, results in zip(seeds, runs):
        for r in results:
            quadrant = "n/a" if r.quadrant_accuracy is None else f"{100 * r.quadrant_accuracy:.1f}"
            clean = "n/a" if r.clean_recall is None else f"{100 * r.clean_recall:.1f}"
            print(f"{seed:4d} {r.split:6} {r.images:6d} {100 * r.patch_accuracy:6.1f} {quadrant:>8} "
                  f"{100 * r.distorted_recall:16.1f} {clean:>12}")
    if args.seeds > 1:
        for split, metrics in spread(runs).items():
            text = ", ".join(f"{name.split('_')[0]} {100 * m:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"
                             for name, (m, lo, hi) in metrics.items())
            print(f"mean (range) over {args.seeds} seeds, {split}: {text}")
    if args.json:
        rows = [{"seed": seed, **asdict(r)} for seed, results in zip(seeds, runs) for r in results]
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
