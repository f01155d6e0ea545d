"""Peak RSS of loading an official-layout Phi-3-Vision checkpoint (export/phi3v_checkpoint.py).

Builds (training/phi3v_factory.build_clip_l_phi3v_checkpoint) a checkpoint with the full CLIP ViT-L/14-336 tower (the official `img_processor`, no
`clip_config`) and the tiny Phi-3 of training/phi3v_factory.py, in bf16 shards (constant weights:
random init of 300M parameters only costs time), then loads it once per target dtype in a fresh
process and reports the RSS before the call, the parameter bytes, the peak and the RSS afterwards.
Peak minus the RSS before, divided by the parameter bytes, is the loader's overhead factor.
Usage:

    .venv/bin/python benchmarks/phi3v_load_rss.py [--dtypes float32 float16 bfloat16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_rss import run_child  # noqa: E402 - the fresh-process RSS measurement shared by the phi3v_*_rss benchmarks

_CHILD = """
import torch
from octopus_rt.export.phi3v_checkpoint import load_phi3v

before = rss_mb()
start = time.perf_counter()
model = load_phi3v(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"dtype": sys.argv[2], "rss_before_mb": round(before), "params_mb": round(params),
                  "peak_rss_mb": round(peak_rss_mb()), "rss_after_mb": round(rss_mb()), "load_s": round(seconds, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "phi3v-clipl"
        if not (folder / "config.json").is_file():
            from octopus_rt.training.phi3v_factory import build_clip_l_phi3v_checkpoint

            build_clip_l_phi3v_checkpoint(folder)
        shards = sorted(p.stat().st_size // 2**20 for p in folder.glob("*.safetensors"))
        print(json.dumps({"checkpoint": str(folder), "shard_mb": shards}))
        for dtype in args.dtypes:
            print(json.dumps(run_child(_CHILD, folder, dtype)))


if __name__ == "__main__":
    main()
