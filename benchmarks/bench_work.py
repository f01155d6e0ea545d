"""The benchmarks' --work folder and the seeded models built into it (bench_runtime, bench_serve, bench_peers).

--work holds what is built (models, bundles) and is reused by later runs; the benchmarks delete and
rebuild sub-folders of it, so they only use a folder that is new, empty, or marked as their own
(WORK_MARKER, written when one is claimed): anything else is refused before a file is touched.

`prepare` builds a size of SIZES once: a seeded random LLaVA from training/model_factory.py with the
lm_head scaled (peaky logits, as trained models have) and the eos rows zeroed so answers run to the
token limit (or its text model trained `train_steps` steps, training/lm_warmup.py), a custom-size
segment-anything model, and their fp32 bundle (other precisions exported next to it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["WORK_MARKER", "claim_work", "SIZES", "prepare"]

WORK_MARKER = ".octopus-bench-work"


def claim_work(work: Path) -> Path:
    """`work`, made the benchmark's own: created if absent, marked if empty; SystemExit when it holds
    anything and no marker (a folder the benchmark did not make is never deleted into)."""
    if work.is_dir() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        raise SystemExit(f"--work {work} is not empty and was not made by the octopus-rt benchmarks "
                         f"(no {WORK_MARKER} in it); give a new or empty folder")
    if work.exists() and not work.is_dir():
        raise SystemExit(f"--work {work} is not a folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()
    return work


SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "llava": dict(text_model="phi3", vision_model="clip", chat_template="phi3", text_heads=4, text_kv_heads=2),
        "sam": {"image_size": 128, "patch_size": 16, "encoder_embed_dim": 64, "encoder_depth": 2,
                "encoder_num_heads": 2, "encoder_global_attn_indexes": [1], "window_size": 4,
                "prompt_embed_dim": 64, "decoder_mlp_dim": 128, "decoder_num_heads": 2, "iou_head_hidden_dim": 64},
    },
    "100m": {
        "llava": dict(text_model="phi3", vision_model="clip", chat_template="phi3", image_size=224, patch_size=16,
                      vision_hidden=384, vision_layers=6, vision_heads=6, text_hidden=768, text_layers=14,
                      text_heads=12, text_kv_heads=4, text_intermediate=2048, vocab_size=1024),
        "sam": {"image_size": 512, "patch_size": 16, "encoder_embed_dim": 384, "encoder_depth": 6,
                "encoder_num_heads": 6, "encoder_global_attn_indexes": [2, 5], "window_size": 8,
                "prompt_embed_dim": 256, "decoder_mlp_dim": 1024, "decoder_num_heads": 8, "iou_head_hidden_dim": 256},
    },
}


def prepare(size: str, work: Path, precision: str = "fp32", train_steps: int = 0) -> Path:
    """Build (once) the model dir, SAM checkpoint and bundle of a size; returns the bundle path.

    A precision other than fp32 exports the same model dir (and SAM) into `bundle-<precision>`; the
    reference still runs the fp32 PyTorch model. With `train_steps`, the text model is first trained
    that many steps (training/lm_warmup.py) instead of getting a scaled random head, in its own work
    folder `trained<steps>/<size>`, so that quantised exports pass the default agreement checks.
    `work` must be claimable (`claim_work`).
    """
    claim_work(work)
    if train_steps:
        work = claim_work(work / f"trained{train_steps}")
    bundle = work / size / "bundle"
    if precision != "fp32":
        fp32 = prepare(size, work.parent if train_steps else work, train_steps=train_steps)
        other = work / size / f"bundle-{precision}"
        if not ((other / "manifest.json").is_file() and "sam" in json.loads((other / "manifest.json").read_text())):
            import shutil

            from octopus_rt.export.lmm import export_lmm
            from octopus_rt.export.sam import export_sam

            shutil.rmtree(other, ignore_errors=True)
            print(f"[{size}] exporting lmm at {precision}", flush=True)
            export_lmm(work / size / "model", other, precision=precision)
            export_sam(work / size / "sam.pth", other, model_type="custom")
        del fp32
        return other
    if (bundle / "manifest.json").is_file() and "sam" in json.loads((bundle / "manifest.json").read_text()):
        return bundle
    import shutil

    import torch

    from octopus_rt.export.lmm import export_lmm
    from octopus_rt.export.sam import export_sam
    from octopus_rt.export.sam_models import SamConfig, build_sam, save_custom_checkpoint
    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

    torch.set_num_threads(2)
    if (work / size).exists():
        shutil.rmtree(work / size)  # inside a claimed --work: a half-built size of an earlier run
    model_dir = work / size / "model"
    model, processor = build_llava(model_dir, TinyLlavaSpec(**SIZES[size]["llava"]))
    if train_steps:
        from octopus_rt.training.lm_warmup import warm_up_text_model

        tick = time.perf_counter()
        losses = warm_up_text_model(model, processor.tokenizer, steps=train_steps, batch_size=8, lr=1e-3)
        (work / size).mkdir(parents=True, exist_ok=True)
        (work / size / "training.json").write_text(json.dumps(
            {"steps": train_steps, "loss_first": losses[0], "loss_last": losses[-1],
             "seconds": time.perf_counter() - tick}))
        print(f"[{size}] trained {train_steps} steps: loss {losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)
    with torch.no_grad():
        if not train_steps:
            # Peaky logits like a trained LM (fixtures_models.LM_HEAD_SCALE).
            model.lm_head.weight.mul_(25.0)
        # No eos: answers run to the token limit, so the per-token figures at token 200 exist.
        for eos in model.generation_config.eos_token_id:
            model.lm_head.weight[eos] = 0.0
    model.save_pretrained(model_dir)
    print(f"[{size}] exporting lmm ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)
    del model
    export_lmm(model_dir, bundle, precision="fp32")
    config = SamConfig.from_dict(SIZES[size]["sam"])
    checkpoint, _ = save_custom_checkpoint(build_sam(config, seed=0), config, work / size / "sam.pth")
    print(f"[{size}] exporting sam", flush=True)
    export_sam(checkpoint, bundle, model_type="custom")
    return bundle
