"""Memory of a full Phi-3.5-Vision (4.15 B) + SAM bundle per precision, by octopus_rt/memory.py's estimator.

No 4.2 B checkpoint can be downloaded here, so the bundle's file sizes are computed from the real
configuration (Phi-3.5-vision-instruct's config.json, docs/phi3v.md source C: 32 layers, hidden 3072,
MLP 8192, 32 heads of 96, vocab 32064; CLIP ViT-L/14-336 + the 4096 -> 3072 -> 3072 projection)
and the storage of each precision as export/quantize.py writes it:

- fp16: every weight 2 bytes (vision and decoder graphs; embed_tokens.npy float16);
- int8: MatMul / Gemm weights 1 byte + per-channel fp32 scales (quantize_dynamic), the rest
  (norms, biases, CLIP's convolution and position table) fp32; embed_tokens.npy float32;
- int4: decoder MatMul weights 4 bits + an fp32 scale and a 4-bit zero point per block of 32
  (MatMulNBits, 0.64 bytes per weight), vision graph fp32 (export lmm keeps it), embed_tokens.npy fp32;
- SAM vit_h (the paper's segmentation head as LISA uses it) fp32: 2.56 GB encoder + 16 MB decoder,
  or vit_b (375 MB) with `--sam vit_b`.

The manifest then goes through `estimate_memory` (KV cache and activations at the default limits:
the largest image at num_crops + 256 text tokens + max_new_tokens) and `check_boards`.

`--measure BUNDLE` checks the estimator against a measurement instead: one `ask` on a square image
(the most image tokens at 4 crops) in a fresh CPU process, its peak RSS next to what the estimator
says for that bundle's own manifest on CPU (e.g. a bundle of benchmarks/phi3v_export_rss.py's
checkpoint: the full CLIP-L tower + a small Phi-3). Usage:

    .venv/bin/python benchmarks/phi3v_memory.py [--num-crops 4] [--sam vit_h|vit_b] [--json]
    .venv/bin/python benchmarks/phi3v_memory.py --measure BUNDLE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from octopus_rt.memory import JETSON_BOARDS, check_boards, estimate_memory, format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_rss import run_child  # noqa: E402 - the fresh-process RSS measurement shared by the phi3v_*_rss benchmarks

_ASK = """
import numpy as np
from octopus_rt.runtime import Octopus
octo = Octopus(sys.argv[1], device="cpu", threads=2)
rgb = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
before = rss_mb()
answer = octo.ask(rgb, "Which region is most degraded?", max_new_tokens=int(sys.argv[2]), segment=False)
print(json.dumps({"rss_after_load_mb": round(before), "peak_rss_mb": round(peak_rss_mb()),
                  "prompt_tokens": answer.prompt_tokens, "new_tokens": len(answer.token_ids)}))
"""

# Phi-3.5-vision-instruct (docs/phi3v.md, source C) and CLIP ViT-L/14-336 (source E).
LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, VOCAB, MAX_POSITIONS = 32, 3072, 8192, 32, 32, 32064, 131072
CLIP_WIDTH, CLIP_LAYERS, CLIP_MLP, CLIP_PATCHES = 1024, 24, 4096, 577
SAM_BYTES = {"vit_h": 2_564_000_000 + 16_500_000, "vit_b": 358_000_000 + 16_500_000}


def parameter_groups() -> dict[str, int]:
    """Parameters by storage group: decoder MatMuls, decoder other, embedding, vision MatMuls, vision other."""
    head_dim = HIDDEN // HEADS
    qkv = HIDDEN * (HEADS + 2 * KV_HEADS) * head_dim
    per_layer = qkv + HIDDEN * HIDDEN + HIDDEN * 2 * MLP + MLP * HIDDEN
    clip_layer = 4 * (CLIP_WIDTH * CLIP_WIDTH) + 2 * CLIP_WIDTH * CLIP_MLP
    clip_other = CLIP_LAYERS * (4 * CLIP_WIDTH + CLIP_MLP + 5 * CLIP_WIDTH) + 3 * 14 * 14 * CLIP_WIDTH \
        + CLIP_PATCHES * CLIP_WIDTH + 5 * CLIP_WIDTH
    return {
        "decoder_matmul": LAYERS * per_layer + VOCAB * HIDDEN,  # + lm_head
        "decoder_other": LAYERS * 2 * HIDDEN + HIDDEN,
        "embedding": VOCAB * HIDDEN,
        "vision_matmul": CLIP_LAYERS * clip_layer + 4 * CLIP_WIDTH * HIDDEN + HIDDEN * HIDDEN,
        "vision_other": clip_other + 2 * HIDDEN + 4 * CLIP_WIDTH * 2,
    }


def section_bytes(precision: str) -> dict[str, int]:
    p = parameter_groups()
    if precision == "fp16":
        return {"vision": 2 * (p["vision_matmul"] + p["vision_other"]),
                "decoder": 2 * (p["decoder_matmul"] + p["decoder_other"]), "embedding": 2 * p["embedding"]}
    if precision == "int8":
        return {"vision": p["vision_matmul"] + 4 * p["vision_other"],
                "decoder": p["decoder_matmul"] + 4 * p["decoder_other"], "embedding": 4 * p["embedding"]}
    if precision == "int4":
        return {"vision": 4 * (p["vision_matmul"] + p["vision_other"]),
                "decoder": int(0.64 * p["decoder_matmul"]) + 4 * p["decoder_other"], "embedding": 4 * p["embedding"]}
    raise ValueError(precision)


def manifest(precision: str, num_crops: int, sam: str | None) -> dict:
    from octopus_rt.export.phi3v_graphs import max_image_tokens

    sizes = section_bytes(precision)
    tokens = max_image_tokens(num_crops, 12)
    lmm = {
        "files": {name: {"size": size, "sha256": ""} for name, size in sizes.items()},
        "vision": {"num_image_tokens": tokens, "hidden_size": HIDDEN},
        "decoder": {"num_layers": LAYERS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
                    "hidden_size": HIDDEN, "vocab_size": VOCAB, "max_position_embeddings": MAX_POSITIONS,
                    "dtype": "float32"},
        "prompt": {"num_image_tokens": tokens},
    }
    out = {"lmm": lmm, "defaults": {"max_new_tokens": 64}}
    if sam:
        out["sam"] = {"files": {"sam": {"size": SAM_BYTES[sam], "sha256": ""}}, "source": {"model_type": sam},
                      "encoder": {"input_size": 1024}, "precision": "fp32"}
    return out


def measure(bundle: Path) -> dict:
    """Peak RSS of one CPU `ask` on `bundle` next to the estimator's CPU figure for its manifest."""
    from octopus_rt.bundle import read_manifest

    manifest = read_manifest(bundle)
    estimate = estimate_memory(manifest, gpu=False)
    measured = run_child(_ASK, bundle, manifest.get("defaults", {}).get("max_new_tokens", 64))
    mib = 2**20
    return dict(measured, estimate_total_mb=round(estimate.total / mib), estimate_weights_mb=round(estimate.weights_total / mib),
                estimate_kv_mb=round(estimate.kv_cache / mib), estimate_activations_mb=round(estimate.activations / mib),
                estimate_runtime_mb=round(estimate.runtime / mib), precision=manifest["lmm"].get("precision"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--sam", default="vit_h", choices=["vit_h", "vit_b", "none"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", type=Path, help="a Phi-3-V bundle: measure one ask against the estimate")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sam = None if args.sam == "none" else args.sam
    total_params = sum(parameter_groups().values())
    rows = []
    for precision in ("fp16", "int8", "int4"):
        estimate = estimate_memory(manifest(precision, args.num_crops, sam), gpu=True)
        fits = {fit.board.name: fit.fits for fit in check_boards(estimate)}
        rows.append({"precision": precision, "weights": estimate.weights_total, "kv_cache": estimate.kv_cache,
                     "activations": estimate.activations, "runtime": estimate.runtime, "total": estimate.total,
                     "max_len": estimate.max_len, "fits": fits})
    if args.json:
        print(json.dumps({"parameters": total_params, "num_crops": args.num_crops, "sam": args.sam, "rows": rows}))
        return
    print(f"Phi-3.5-Vision {total_params / 1e9:.2f} B parameters, num_crops {args.num_crops}, SAM {args.sam}")
    header = "| precision | weights | KV cache | activations | runtime | total | " + " | ".join(b.name for b in JETSON_BOARDS) + " |"
    print(header)
    print("|" + "---|" * (6 + len(JETSON_BOARDS)))
    for row in rows:
        cells = [format_bytes(row[k]) for k in ("weights", "kv_cache", "activations", "runtime", "total")]
        verdicts = ["fits" if row["fits"][b.name] else "no" for b in JETSON_BOARDS]
        print(f"| {row['precision']} | " + " | ".join(cells + verdicts) + " |")


if __name__ == "__main__":
    main()
