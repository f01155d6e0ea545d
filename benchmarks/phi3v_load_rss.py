"""Peak RSS of loading an official-layout Phi-3-Vision checkpoint (export/phi3v_checkpoint.py).

Builds a checkpoint with the full CLIP ViT-L/14-336 tower (the official `img_processor`, no
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


def build(out_dir: Path, seed: int | None = None, text: dict | None = None) -> None:
    """The CLIP-L/336 + tiny Phi-3 checkpoint in bf16: constant weights, or seeded N(0, 0.02) ones
    (`seed`, for exports whose verification needs a model that is not degenerate). `text`: other
    TinyPhi3VSpec sizes for the Phi-3 (e.g. {"text_hidden": 1536, "text_layers": 16, ...})."""
    import torch

    from octopus_rt.export.phi3v_checkpoint import save_official_layout
    from octopus_rt.export.phi3v_config import phi3v_spec_from_dicts
    from octopus_rt.export.phi3v_model import Phi3VForCausalLM
    from octopus_rt.training.phi3v_factory import TinyPhi3VSpec, phi3v_preprocessor_dict, phi3v_config_dict

    config = phi3v_config_dict(TinyPhi3VSpec(**(text or {})))
    config["img_processor"] = {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                               "name": "clip_vision_model", "num_img_tokens": 144}
    spec = phi3v_spec_from_dicts(config, phi3v_preprocessor_dict(TinyPhi3VSpec()))
    with torch.device("meta"):
        model = Phi3VForCausalLM(spec)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, param in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if generator is None:
            value = torch.full(param.shape, 0.01, dtype=torch.bfloat16)
        elif name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
            value = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value)
    save_official_layout(model, out_dir, dtype=torch.bfloat16, max_shard_bytes=512 * 1024**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "phi3v-clipl"
        if not (folder / "config.json").is_file():
            build(folder)
        shards = sorted(p.stat().st_size // 2**20 for p in folder.glob("*.safetensors"))
        print(json.dumps({"checkpoint": str(folder), "shard_mb": shards}))
        for dtype in args.dtypes:
            print(json.dumps(run_child(_CHILD, folder, dtype)))


if __name__ == "__main__":
    main()
