"""Stage timings of benchmarks/bench_gpu.py: PyTorch eager and onnxruntime (CPU, CUDA, TensorRT), and
the GPU's memory bandwidth.

Every figure is the median of `cfg.repeats` runs after `cfg.warmup` warm-up runs, in milliseconds,
with the device synchronised around each run; inputs and outputs stay on the device (torch tensors
moved once, onnxruntime IO binding), so the figures hold compute, not host transfers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench_gpu import BenchConfig

__all__ = ["STAGES", "median_ms", "time_torch", "time_ort", "measure_bandwidth_gbs"]

STAGES = ("vision", "prefill", "decode", "sam_encoder", "sam_decoder")


def median_ms(run: Callable[[], Any], sync: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median wall time of `run` in ms, `sync` (device synchronisation) inside each timed run."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_torch(model_dir: Path, checkpoint: Path, cfg: BenchConfig, feeds, device: str, dtype_name: str) -> dict[str, float]:
    """PyTorch eager through the export wrappers (the computation the graphs hold)."""
    import torch

    from octopus_rt.export.llava_graphs import check_model_dir, model_class
    from octopus_rt.export.llava_wrappers import DecoderWrapper, vision_wrapper
    from octopus_rt.export.sam_models import SamConfig, load_sam
    from octopus_rt.export.sam_wrappers import SamDecoderWrapper

    dtype = {"float16": torch.float16, "float32": torch.float32}[dtype_name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def t(name, array):
        value = torch.from_numpy(array).to(device)
        return value.to(dtype) if value.is_floating_point() else value

    results: dict[str, float] = {}
    with torch.inference_mode():
        model_type = check_model_dir(model_dir)["model_type"]  # LLaVA or FastVLM
        model = model_class(model_type).from_pretrained(model_dir, dtype=dtype).to(device).eval()
        vision, decoder = vision_wrapper(model), DecoderWrapper(model)
        pixels = t("pixel_values", feeds["vision"]["pixel_values"])
        results["vision"] = median_ms(lambda: vision(pixels), sync, cfg.repeats, cfg.warmup)
        for stage in ("prefill", "decode"):
            args = [t(n, a) for n, a in feeds[stage].items()]
            results[stage] = median_ms(lambda args=args: decoder(*args), sync, cfg.repeats, cfg.warmup)
        del model, vision, decoder
        sam_cfg = SamConfig.from_dict(cfg.sam_config) if cfg.sam_type == "custom" else None
        sam, _ = load_sam(checkpoint, cfg.sam_type, sam_cfg)
        sam = sam.to(device=device, dtype=dtype).eval()
        image = t("image", feeds["sam_encoder"]["image"])
        results["sam_encoder"] = median_ms(lambda: sam.image_encoder(image), sync, cfg.repeats, cfg.warmup)
        sam_decoder = SamDecoderWrapper(sam).to(device=device, dtype=dtype)
        args = [t(n, a) for n, a in feeds["sam_decoder"].items()]
        results["sam_decoder"] = median_ms(lambda: sam_decoder(*args), sync, cfg.repeats, cfg.warmup)
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def time_ort(bundle: Path, manifest, feeds, cfg: BenchConfig, device, provider: str) -> dict[str, float]:
    """onnxruntime with IO binding, inputs and outputs on the provider's device.

    provider "cpu" / "cuda" / "tensorrt"; the graph files and provider options come from
    runtime/provider_plan.plan_graph, exactly as the runtime chooses them."""
    import onnxruntime as ort

    from octopus_rt.runtime.provider_plan import plan_graph

    device_type = "cpu" if provider == "cpu" else "cuda"
    graph_of = {"vision": "vision", "prefill": "decoder", "decode": "decoder",
                "sam_encoder": "sam_encoder", "sam_decoder": "sam_decoder"}
    sessions: dict[str, Any] = {}
    results: dict[str, float] = {}
    for stage in STAGES:
        graph = graph_of[stage]
        if graph not in sessions:
            plan = plan_graph(bundle, manifest, graph, device, requested=provider)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if plan.disable_graph_optimizations:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sessions[graph] = ort.InferenceSession(
                str(plan.file), sess_options=options, providers=[p[0] for p in plan.providers],
                provider_options=[p[1] for p in plan.providers],
            )
        session = sessions[graph]
        binding = session.io_binding()
        for name, array in feeds[stage].items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device_type, 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, device_type)
        binding.synchronize_inputs()

        def run(session=session, binding=binding):
            session.run_with_iobinding(binding)

        results[stage] = median_ms(run, binding.synchronize_outputs, cfg.repeats, cfg.warmup)
    return results


def measure_bandwidth_gbs() -> float:
    """Device memory bandwidth from a 1 GiB device-to-device copy (read + write bytes / time)."""
    import torch

    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return 2 * src.numel() * 4 / seconds / 1e9
