"""Seconds per training step of the demo recipe's two long stages at 1 and 2 torch threads, interleaved.

    .venv/bin/python benchmarks/bench_recipe_threads.py [--repeats 3] [--json benchmarks/results/recipe_threads.json]

Why: `build_demo` ran every stage on one thread until issue 16 round 8, leaving the second core of the
2-core CPU it is sized for idle. Both stages use the FULL recipe's model (`demo_spec(FULL)`: the
EfficientNet-Lite0 tower with its ImageNet weights, the small Llama) built in a temporary folder:

- vision step: the core of one `vision_pretrain` step, 16 random 256 x 256 images through the tower with its
  input layers and first `FULL.freeze_vision_stages` stages frozen, a linear probe, the probe loss,
  backward and an AdamW step (random targets: the cost does not depend on them); without the step's
  dihedral augmentation and gradient clipping, so below a real step's time (0.84 s at two threads in
  the recipe's runs of docs/demo.md round 8);
- LLaVA step: `train()` at the recipe's batch size, `--group-by-image`, full tuning, on a small
  dataset the data engine makes from the scikit-image photos (every task); the recipe's extra loss hooks
  are left out (they reuse the forward's logits). Seconds per step = batch / the trainer's samples/s,
  which counts optimizer steps only.

Thread counts alternate within each repeat (1, 2, 2, 1, ...), so a busy neighbour slows both alike.
Prints one JSON object (per-repeat seconds, medians, speed-ups) and writes it to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _vision_seconds(torch, model, features, steps: int, batch: int, side: int) -> float:
    from octopus_rt.training.recipes.vision_pretrain import N_TARGETS, _loss

    width = model.config.text_config.hidden_size
    probe = torch.nn.Linear(width, N_TARGETS)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters())
    optimiser = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, side, side, generator=generator)
    with torch.no_grad():
        tokens = features(pixels[:1]).shape[1]
    target = torch.rand(batch, tokens, N_TARGETS, generator=generator)
    model.train()
    began = time.perf_counter()
    for _ in range(steps):
        loss = _loss(torch, probe(features(pixels)), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision-steps", type=int, default=5)
    parser.add_argument("--lmm-steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    from octopus_rt.export.llava_wrappers import vision_wrapper
    from octopus_rt.training.architectures import load_llava
    from octopus_rt.training.lora import freeze_stages
    from octopus_rt.training.options import TrainOptions
    from octopus_rt.training.recipes.build_demo import FULL, _build_base
    from octopus_rt.training.recipes.demo_data import build_dataset
    from octopus_rt.training.train import train

    counts = (1, 2)
    seconds: dict[str, dict[int, list[float]]] = {"vision_step": {c: [] for c in counts},
                                                  "lmm_step": {c: [] for c in counts}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.set_num_threads(2)
        _build_base(root / "base", FULL, seed=0)
        build_dataset(root / "work", seed=0, num_seen=48, num_heldout=4, size=FULL.size, workers=1, progress=False)
        model, processor = load_llava(root / "base")
        freeze_stages(model.model.vision_tower, FULL.freeze_vision_stages)
        features = vision_wrapper(model)
        side = processor.image_processor.size["height"]
        for repeat in range(args.repeats):
            order = counts if repeat % 2 == 0 else counts[::-1]
            for count in order:
                torch.set_num_threads(count)
                seconds["vision_step"][count].append(_vision_seconds(torch, model, features, args.vision_steps,
                                                                     16, side))
            for count in order:
                torch.set_num_threads(count)
                out = root / f"lmm_{repeat}_{count}"
                result = train(TrainOptions(base_model=root / "base", data=[root / "work" / "data"], out=out,
                                            work_dir=root / f"{out.name}.train", lm_tuning="full",
                                            freeze_vision_stages=FULL.freeze_vision_stages, lr=FULL.lmm_lr,
                                            batch_size=FULL.lmm_batch, max_steps=args.lmm_steps, warmup_steps=1,
                                            eval_max_samples=4, seed=0, group_by_image=True, log_every=1000,
                                            progress=False, precision="fp32", merge=False))
                seconds["lmm_step"][count].append(FULL.lmm_batch / result.samples_per_s)
    report = {"cpu_count": os.cpu_count(), "repeats": args.repeats, "vision_steps": args.vision_steps,
              "lmm_steps": args.lmm_steps, "lmm_batch": FULL.lmm_batch}
    for stage, by_count in seconds.items():
        medians = {c: statistics.median(v) for c, v in by_count.items()}
        report[stage] = {"seconds_per_step": {str(c): [round(x, 3) for x in v] for c, v in by_count.items()},
                         "median": {str(c): round(m, 3) for c, m in medians.items()},
                         "speedup_2_over_1": round(medians[1] / medians[2], 2)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
