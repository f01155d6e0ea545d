"""CPU (or GPU) throughput of `octopus-rt train` on a seeded random LLaVA of a stated size.

    .venv/bin/python benchmarks/train_throughput.py --preset small --steps 30

Builds the model with training/model_factory.py, a quadrant dataset with the data engine, runs
`train()` for --steps optimizer steps (LoRA recipe, fp32 on CPU, no checkpoints) and prints one JSON
line: parameters, tokens per second (all non-padding input tokens, image tokens included) and
samples per second, over the optimizer steps' time (model loading, the final validation pass and
the merge are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PRESETS = {
    # the test model: CLIP 64 px / patch 16 (16 image tokens), Phi-3 2 x 64
    "tiny": dict(extra_text_config={"initializer_range": 0.2}),
    # a small model: CLIP 128 px / patch 16 (64 image tokens) 4 x 128, Phi-3 4 x 256
    "small": dict(image_size=128, patch_size=16, vision_hidden=128, vision_layers=4, vision_heads=4,
                  text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=4, text_intermediate=1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from octopus_rt.training.data.quadrant import make_quadrant_dataset
    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava
    from octopus_rt.training.options import TrainOptions
    from octopus_rt.training.train import train

    spec = TinyLlavaSpec(**PRESETS[args.preset])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, _ = build_llava(root / "base", spec)
        parameters = sum(p.numel() for p in model.parameters())
        make_quadrant_dataset(root / "data", args.steps * args.batch_size + 8, size=spec.image_size, seed=0)
        began = time.perf_counter()
        result = train(TrainOptions(base_model=root / "base", data=[root / "data"], out=root / "out",
                                    max_steps=args.steps, batch_size=args.batch_size, progress=False, merge=False))
        wall = time.perf_counter() - began
    print(json.dumps({
        "preset": args.preset, "parameters": parameters, "trainable": result.trainable_parameters,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": args.threads,
        "batch_size": args.batch_size, "steps": args.steps,
        "tokens_per_s": round(result.tokens_per_s, 1), "samples_per_s": round(result.samples_per_s, 2),
        "wall_s_including_load": round(wall, 1),
    }))


if __name__ == "__main__":
    main()
