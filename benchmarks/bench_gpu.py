"""GPU benchmark for users: PyTorch eager fp16 vs onnxruntime CUDA vs TensorRT fp16, in one run.

    python benchmarks/bench_gpu.py --out bench_gpu.json

On a machine with an NVIDIA GPU this

1. builds a realistic-size configuration with random weights: segment-anything vit_b (from
   segment_anything's registry, no checkpoint) and a LLaVA whose decoder has --layers (2-4)
   layers of Phi-3-mini's shape (hidden 3072, 32 heads, intermediate 8192, vocab 32064) behind a
   CLIP ViT-L/14-336 shaped tower (1024 wide, 24 layers, 16 heads, 576 image tokens);
2. exports it with the project's exporters (`export_lmm`, `export_sam`, fp16) and builds the
   TensorRT engines with `octopus-rt export trt`'s `build_engines` (decoder included);
3. times every stage (vision, decoder prefill, one decode step, SAM encoder, SAM decoder) for
   PyTorch eager fp16, onnxruntime CUDA and TensorRT fp16 (median of repeated runs, inputs and
   outputs resident on the GPU; benchmarks/gpu_timing.py), and reports ratios against PyTorch eager;
4. extrapolates the decoder stages per layer to Phi-3-mini's 32 layers (time scales with the
   weight bytes read: layers x per-layer bytes + embedding/head bytes), and compares the decode
   rate with the memory-bandwidth limit: bytes read per token (32-layer fp16 weights + the KV
   cache at the measured past length) / the GPU's bandwidth, measured with a device-to-device copy.

It writes JSON (--out). A backend that cannot run (no onnxruntime-gpu, no TensorRT provider, a
failed engine build, the time budget spent) is reported as skipped with the reason. On a machine
without a CUDA GPU it exits with status 2 and a one-line message; `--tiny --allow-cpu` runs the same
pipeline on tiny models on the CPU (a smoke test of the script itself, not a benchmark).

Nothing here was executed on a GPU by its authors (no GPU, TensorRT or onnxruntime-gpu was
available); the CPU smoke path was.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import STAGES, measure_bandwidth_gbs, time_ort, time_torch  # noqa: E402 - the stage timings, benchmarks/gpu_timing.py

PHI3_MINI = {"hidden": 3072, "heads": 32, "kv_heads": 32, "intermediate": 8192, "vocab": 32064, "layers": 32}
CLIP_L_336 = {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096, "image": 336, "patch": 14}
BACKENDS = ("torch_eager_fp16", "ort_cuda", "tensorrt_fp16")
_TEXT_TOKENS = 48  # question + chat markup around the image tokens in the prefill


@dataclass
class BenchConfig:
    """Sizes of the benchmark models (the realistic default, or --tiny for the CPU smoke test)."""

    layers: int = 2
    text: dict[str, int] = field(default_factory=lambda: dict(PHI3_MINI))
    vision: dict[str, int] = field(default_factory=lambda: dict(CLIP_L_336))
    sam_type: str = "vit_b"
    sam_config: dict[str, Any] | None = None
    repeats: int = 20
    warmup: int = 3

    @classmethod
    def tiny(cls) -> "BenchConfig":
        return cls(
            layers=2,
            text={"hidden": 64, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 1024, "layers": 32},
            vision={"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "image": 64, "patch": 16},
            sam_type="custom",
            sam_config={"image_size": 128, "encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
                        "encoder_global_attn_indexes": [1], "window_size": 4, "prompt_embed_dim": 64,
                        "decoder_mlp_dim": 128, "decoder_num_heads": 2, "iou_head_hidden_dim": 64},
            repeats=3,
            warmup=1,
        )


class Budget:
    """Wall-clock budget: stages that would start after it is spent are skipped, with that reason."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str, need: float = 0.0) -> None:
        if self.left() < need:
            raise TimeoutError(f"time budget spent before {what}")


def _log(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)



# ---------------------------------------------------------------- models


def build_models(work: Path, cfg: BenchConfig) -> tuple[Path, Path]:
    """Save the LLaVA (random weights, Phi-3-mini-shaped layers) and a SAM checkpoint; return paths."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from octopus_rt.export.sam_models import SamConfig, build_sam, save_custom_checkpoint
    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

    t, v = cfg.text, cfg.vision
    spec = TinyLlavaSpec(
        text_model="phi3", vision_model="clip", chat_template="phi3", image_size=v["image"], patch_size=v["patch"],
        vision_hidden=v["hidden"], vision_layers=v["layers"], vision_heads=v["heads"], text_hidden=t["hidden"],
        text_layers=cfg.layers, text_heads=t["heads"], text_kv_heads=t["kv_heads"], text_intermediate=t["intermediate"],
        max_position_embeddings=4096,
    )
    model_dir = work / "llava"
    model, _ = build_llava(model_dir, spec)
    # The factory's tokenizer has ~1k tokens and its CLIP MLP is 2x wide; give the model Phi-3's
    # vocabulary (embedding + lm_head rows: bytes read per token) and CLIP-L's 4x MLP.
    config, generation = model.config, model.generation_config
    del model
    config.vision_config.intermediate_size = v["intermediate"]
    config.text_config.vocab_size = t["vocab"]
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = generation
    model.save_pretrained(model_dir)
    del model

    checkpoint = work / "sam.pth"
    if cfg.sam_type == "custom":
        sam_cfg = SamConfig.from_dict(cfg.sam_config)
        save_custom_checkpoint(build_sam(sam_cfg, seed=0), sam_cfg, checkpoint)
    else:
        from segment_anything import sam_model_registry

        torch.manual_seed(0)
        torch.save(sam_model_registry[cfg.sam_type](checkpoint=None).state_dict(), checkpoint)
    return model_dir, checkpoint


def export_bundle(work: Path, model_dir: Path, checkpoint: Path, cfg: BenchConfig, precision: str) -> Path:
    from octopus_rt.export.lmm import export_lmm
    from octopus_rt.export.sam import export_sam

    bundle = work / "bundle"
    # flat_kv: the benchmark builds TensorRT engines, and TensorRT has no GroupQueryAttention (the gqa form).
    export_lmm(model_dir, bundle, precision=precision, progress=_log, decoder_form="flat_kv")
    export_sam(checkpoint, bundle, model_type=cfg.sam_type, precision=precision, log=_log)
    return bundle


# ---------------------------------------------------------------- inputs


def stage_inputs(manifest: dict[str, Any], past: int) -> dict[str, dict[str, Any]]:
    """numpy inputs per stage (fp32 / int64 as the bundle contract says)."""
    import numpy as np

    from octopus_rt.export.trt_parity import parity_inputs
    from octopus_rt.export.trt_profiles import graph_profile
    from octopus_rt.manifest import ProfileLimits

    prompt = int(manifest["lmm"]["vision"]["num_image_tokens"]) + _TEXT_TOKENS
    limits = ProfileLimits(max_batch=1, max_seq=prompt, max_past=past, opt_seq=prompt, opt_past=0)
    decode = ProfileLimits(max_batch=1, max_seq=prompt, max_past=past, opt_seq=1, opt_past=past)
    feeds = {}
    for stage, graph, lim in (("vision", "vision", limits), ("prefill", "decoder", limits), ("decode", "decoder", decode),
                              ("sam_encoder", "sam_encoder", limits), ("sam_decoder", "sam_decoder", limits)):
        shapes = {n: r.opt for n, r in graph_profile(manifest, graph, lim).items()}
        feeds[stage] = parity_inputs(manifest, graph, shapes)
        if graph == "decoder":  # realistic scale for embeddings
            feeds[stage]["inputs_embeds"] = (feeds[stage]["inputs_embeds"] * 0.02).astype(np.float32)
    return feeds



# ---------------------------------------------------------------- extrapolation


def decoder_bytes(text: dict[str, int], layers: int, bytes_per_weight: int = 2) -> dict[str, int]:
    """Weight bytes of a Phi-3 decoder: per layer (fused qkv, o, gate_up, down, two norms), and the
    per-token fixed part (lm_head + final norm + one embedding row)."""
    h, i = text["hidden"], text["intermediate"]
    head_dim = h // text["heads"]
    qkv = h * (h + 2 * text["kv_heads"] * head_dim)
    per_layer = (qkv + h * h + h * 2 * i + i * h + 2 * h) * bytes_per_weight
    fixed = (text["vocab"] * h + h + h) * bytes_per_weight
    return {"per_layer": per_layer, "fixed": fixed, "total": per_layer * layers + fixed}


def kv_bytes(text: dict[str, int], layers: int, past: int, bytes_per_value: int = 2) -> int:
    return 2 * layers * text["kv_heads"] * (text["hidden"] // text["heads"]) * past * bytes_per_value


def extrapolate(ms: float, text: dict[str, int], built_layers: int, target_layers: int) -> float:
    """Scale a decoder stage by the weight bytes it reads (bandwidth-bound decode, and matmul FLOPs
    proportional to weights for prefill): t_32 = t_L * bytes(32) / bytes(L)."""
    built = decoder_bytes(text, built_layers)["total"]
    target = decoder_bytes(text, target_layers)["total"]
    return ms * target / built


def summarize(results: dict[str, Any], cfg: BenchConfig, past: int, bandwidth_gbs: float | None) -> dict[str, Any]:
    timings = {b: r["ms"] for b, r in results.items() if r.get("ms")}
    base = "torch_eager_fp16" if "torch_eager_fp16" in timings else next(iter(timings), None)
    ratios: dict[str, dict[str, float]] = {}
    if base:
        for backend, ms in timings.items():
            ratios[backend] = {s: round(timings[base][s] / ms[s], 3) for s in ms if s in timings[base] and ms[s] > 0}
    target = cfg.text["layers"]
    per_token = decoder_bytes(cfg.text, target)["total"] + kv_bytes(cfg.text, target, past)
    limit = bandwidth_gbs * 1e9 / per_token if bandwidth_gbs else None
    decode = {}
    for backend, ms in timings.items():
        if "decode" in ms:
            ms32 = extrapolate(ms["decode"], cfg.text, cfg.layers, target)
            tps = 1e3 / ms32
            decode[backend] = {
                "decode_ms_measured": round(ms["decode"], 3),
                f"decode_ms_{target}_layers": round(ms32, 3),
                "prefill_ms_32_layers": round(extrapolate(ms.get("prefill", 0.0), cfg.text, cfg.layers, target), 3),
                "tokens_per_s": round(tps, 2),
                "fraction_of_bandwidth_limit": round(tps / limit, 3) if limit else None,
            }
    return {
        "ratios_vs": base,
        "speedup": ratios,
        "decode": decode,
        "bandwidth_limit": {
            "bytes_per_token": per_token,
            "weights_bytes_32_layers_fp16": decoder_bytes(cfg.text, target)["total"],
            "kv_bytes_read": kv_bytes(cfg.text, target, past),
            "gpu_bandwidth_gbs": round(bandwidth_gbs, 1) if bandwidth_gbs else None,
            "tokens_per_s_limit": round(limit, 2) if limit else None,
        },
    }


# ---------------------------------------------------------------- main


def _has_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "PyTorch sees no CUDA GPU"
    return True, torch.cuda.get_device_name(0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from octopus_rt.bundle import read_manifest
    from octopus_rt.runtime.device_info import probe_device

    torch.manual_seed(0)
    budget = Budget(args.budget_s)
    cfg = BenchConfig.tiny() if args.tiny else BenchConfig(layers=args.layers)
    if not 1 <= cfg.layers <= 4:
        raise SystemExit("--layers must be 1..4")
    on_gpu = torch.cuda.is_available()
    env = probe_device()
    report: dict[str, Any] = {
        "config": {"layers_built": cfg.layers, "layers_extrapolated": cfg.text["layers"], "text": cfg.text,
                   "vision": cfg.vision, "sam": cfg.sam_type, "tiny": args.tiny, "repeats": cfg.repeats},
        "machine": {"gpu": torch.cuda.get_device_name(0) if on_gpu else None, "platform": platform.platform(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                    "tensorrt": env.tensorrt, "compute_capability": env.compute_capability, "cuda": env.cuda},
        "backends": {},
        "stages": list(STAGES),
        "units": "milliseconds, median",
    }
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="octopus-bench-"))
    started = time.monotonic()
    _log(f"building models in {work}")
    model_dir, checkpoint = build_models(work, cfg)
    _log("exporting the bundle (fp16)" if on_gpu else "exporting the bundle (fp32, CPU smoke test)")
    bundle = export_bundle(work, model_dir, checkpoint, cfg, "fp16" if on_gpu else "fp32")
    report["export_seconds"] = round(time.monotonic() - started, 1)
    manifest = read_manifest(bundle)
    past = int(manifest["lmm"]["vision"]["num_image_tokens"]) + _TEXT_TOKENS + 32
    feeds = stage_inputs(manifest, past)
    device = env

    def attempt(name: str, fn: Callable[[], dict[str, float]], need_s: float) -> None:
        try:
            budget.check(name, need_s)
            _log(f"timing {name}")
            report["backends"][name] = {"ms": {k: round(v, 3) for k, v in fn().items()}}
        except TimeoutError as exc:
            report["backends"][name] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failing backend is reported, the others still run
            report["backends"][name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        _log(f"{name}: {report['backends'][name]}")

    if on_gpu:
        attempt("torch_eager_fp16", lambda: time_torch(model_dir, checkpoint, cfg, feeds, "cuda", "float16"), 30)
    else:
        report["backends"]["torch_eager_fp16"] = {"skipped": "no CUDA GPU"}
        attempt("torch_eager_fp32_cpu", lambda: time_torch(model_dir, checkpoint, cfg, feeds, "cpu", "float32"), 0)
        attempt("ort_cpu", lambda: time_ort(bundle, manifest, feeds, cfg, device, "cpu"), 0)

    if device.can_run("cuda"):
        attempt("ort_cuda", lambda: time_ort(bundle, manifest, feeds, cfg, device, "cuda"), 20)
    else:
        report["backends"]["ort_cuda"] = {"skipped": "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)"}

    from octopus_rt.export.trt import TensorRTUnavailable, TrtBuildOptions, build_engines, require_tensorrt

    try:
        require_tensorrt(env)
        budget.check("the TensorRT engine build", 90)
        _log("building TensorRT engines (vision, decoder, SAM) with build_engines")
        build_start = time.monotonic()
        result = build_engines(bundle, TrtBuildOptions(fp16=True, max_seq=past, max_past=past, graphs=("vision", "decoder", "sam_encoder", "sam_decoder"),
                                                       workspace_gib=args.workspace), env=env, log=_log)
        report["tensorrt_build_seconds"] = round(time.monotonic() - build_start, 1)
        report["tensorrt_parity"] = {g: r.parity for g, r in result.target.graphs.items()}
        manifest = read_manifest(bundle)
        attempt("tensorrt_fp16", lambda: time_ort(bundle, manifest, feeds, cfg, device, "tensorrt"), 10)
    except (TensorRTUnavailable, TimeoutError) as exc:
        report["backends"]["tensorrt_fp16"] = {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - e.g. an engine failing its parity check
        report["backends"]["tensorrt_fp16"] = {"skipped": f"engine build failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"}

    bandwidth = measure_bandwidth_gbs() if on_gpu else None
    report["summary"] = summarize(report["backends"], cfg, past, bandwidth)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_gpu.json", help="JSON report path")
    parser.add_argument("--layers", type=int, default=2, help="Phi-3-mini-shaped decoder layers to build (1..4)")
    parser.add_argument("--work", default=None, help="folder for models and the bundle (default: a temp folder)")
    parser.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace in GiB")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new stages after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (with --tiny: CPU smoke test)")
    args = parser.parse_args(argv)
    ok, detail = _has_cuda()
    if not ok and not args.allow_cpu:
        print(f"bench_gpu: needs an NVIDIA GPU with CUDA ({detail}); nothing was run. "
              "See docs/deploy.md for what to install.", file=sys.stderr)
        return 2
    if not ok and not args.tiny:
        print("bench_gpu: --allow-cpu needs --tiny (the realistic models are GPU-sized)", file=sys.stderr)
        return 2
    if args.tiny:
        import torch

        torch.set_num_threads(1)
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _log(f"wrote {args.out} in {report['total_seconds']} s")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
