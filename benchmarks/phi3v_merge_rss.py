"""Peak RSS and time of `octopus-rt merge` (training/phi3v_merge.py) on a checkpoint with the full
CLIP ViT-L/14-336 tower.

Builds the checkpoint of benchmarks/phi3v_load_rss.py (training/phi3v_factory.build_clip_l_phi3v_checkpoint:
full CLIP-L + the tiny Phi-3, bf16 shards of 512 MB) and a rank-64 PEFT adapter on every linear layer of CLIP (q/k/v/out_proj, fc1, fc2 of the
23 layers that run), img_projection and the decoder's four projections, in Microsoft's key names;
then merges it once per (dtype, shard size) in a fresh process and reports the RSS before, the peak,
the bytes written and the time. The merge holds one output shard in memory, so the peak should
follow the shard size, not the model size. Usage:

    .venv/bin/python benchmarks/phi3v_merge_rss.py [--keep DIR]
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
from pathlib import Path
from octopus_rt.training.phi3v_merge import merge_adapter

before = rss_mb()
start = time.perf_counter()
out, changed = merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], dtype=sys.argv[4], max_shard_bytes=int(sys.argv[5]))
seconds = time.perf_counter() - start
written = sum(p.stat().st_size for p in Path(out).glob("*.safetensors")) / 2**20
shards = sorted(round(p.stat().st_size / 2**20) for p in Path(out).glob("*.safetensors"))
print(json.dumps({"dtype": sys.argv[4], "max_shard_mb": int(sys.argv[5]) // 2**20, "tensors_changed": changed,
                  "rss_before_mb": round(before), "peak_rss_mb": round(peak_rss_mb()),
                  "written_mb": round(written), "largest_shard_mb": shards[-1], "merge_s": round(seconds, 1)}))
"""


def make_adapter(base: Path, out: Path, rank: int = 64) -> None:
    import torch
    from safetensors.torch import save_file

    from octopus_rt.training.phi3v_merge import checkpoint_tensors

    generator = torch.Generator().manual_seed(0)
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2",
               "qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    tensors = {}
    for key, info in checkpoint_tensors(base).items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(info.shape) != 2 or not module.endswith(targets):
            continue
        if ".encoder.layers.23." in module:  # the layer the official forward never runs
            continue
        rows, cols = info.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.01
    out.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
    (out / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the checkpoint and adapter here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        base, adapter = root / "phi3v-clipl", root / "adapter"
        if not (base / "config.json").is_file():
            from octopus_rt.training.phi3v_factory import build_clip_l_phi3v_checkpoint

            build_clip_l_phi3v_checkpoint(base)  # the loader benchmark's checkpoint
        if not (adapter / "adapter_config.json").is_file():
            make_adapter(base, adapter)
        shards = sorted(p.stat().st_size // 2**20 for p in base.glob("*.safetensors"))
        print(json.dumps({"checkpoint": str(base), "shard_mb": shards,
                          "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size // 2**20}))
        for dtype, shard_mb in (("float32", 4096), ("float32", 256), ("bfloat16", 4096)):
            out = Path(tmp) / f"merged-{dtype}-{shard_mb}"
            print(json.dumps(run_child(_CHILD, base, adapter, out, dtype, shard_mb * 2**20)))


if __name__ == "__main__":
    main()
