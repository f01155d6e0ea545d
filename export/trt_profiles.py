"""TensorRT optimisation profiles and build options, computed from a bundle manifest (pure functions).

Build-time only (export/trt.py, benchmarks/bench_gpu.py); the runtime runs built engines through
runtime/provider_plan.py and never imports this. Plain Python over the manifest dict, whose fields
are read through the schema (`Manifest.lookup`: the types and defaults of octopus_rt/manifest.py):
no onnxruntime, no GPU. It knows

- the TensorRT optimisation-profile shapes of every graph input (min / opt / max), from the
  manifest's sizes and the build limits (`manifest.ProfileLimits`: batch, prefill length S, past
  length P; defaults from `memory.default_limits`). onnxruntime's TensorRT EP rebuilds engines
  whenever a shape leaves the profile it guessed from the first inputs, which makes it extremely
  slow without explicit profiles;
- the provider-options dict that builds one engine and dumps it as an EP-context model.

Shapes are tuples of ints. Input names follow docs/bundle.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.manifest import GRAPHS, Manifest, ProfileLimits
from octopus_rt.runtime.provider_plan import graph_record

__all__ = [
    "TRT_GRAPHS_DEFAULT",
    "MAX_SAM_POINTS",
    "ShapeRange",
    "graph_profile",
    "dynamic_only",
    "profile_strings",
    "tensorrt_build_options",
]

# Graphs `octopus-rt export trt` turns into engines unless told otherwise (the decoder is opt-in).
TRT_GRAPHS_DEFAULT = ("vision", "sam_encoder", "sam_decoder")
# The runtime sends one point + SAM's padding point; boxes add two corners. 16 leaves room.
MAX_SAM_POINTS = 16
_SAM_OPT_POINTS = 2


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one graph input, and whether any dimension varies."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def contains(self, shape: Sequence[int]) -> bool:
        """True if `shape` lies inside [min, max] dimension by dimension."""
        return len(shape) == len(self.min) and all(
            lo <= int(d) <= hi for lo, d, hi in zip(self.min, shape, self.max)
        )


def graph_profile(manifest: Mapping[str, Any], graph: str, limits: ProfileLimits) -> dict[str, ShapeRange]:
    """min/opt/max shape of every input of `graph`, in the graph's input order.

    vision      pixel_values  B x 3 x H x W                 (B in 1..max_batch)
    decoder     inputs_embeds B x S x hidden                (S in 1..max_seq)
                attention_mask B x (P + S), position_ids B x S
                past_key_values.{i}.key|value B x kv_heads x P x head_dim (P in 0..max_past)
    sam_encoder image 1 x 3 x S x S                         (static)
    sam_decoder image_embeddings 1 x C x h x w, point_coords 1 x N x 2, point_labels 1 x N
                (N in 1..MAX_SAM_POINTS), mask_input 1 x 1 x 4h x 4w, has_mask_input 1
    """
    if graph_record(manifest, graph) is None:
        raise InputError(f"the bundle has no {GRAPHS[graph][0]}.{GRAPHS[graph][1]} graph")

    def record_field(name: str) -> Any:  # a field of the graph's record, typed and defaulted by the schema
        return Manifest.lookup(manifest, *GRAPHS[graph], name)

    names = list(record_field("input_names") or [])
    b = (1, limits.opt_batch, limits.max_batch)
    shapes: dict[str, ShapeRange] = {}
    if graph == "vision":
        # The size the vision graph takes, as the runtime's preprocessing produces it.
        h = Manifest.lookup(manifest, "lmm", "preprocess", "input_height")
        w = Manifest.lookup(manifest, "lmm", "preprocess", "input_width")
        for name in names:
            shapes[name] = ShapeRange((b[0], 3, h, w), (b[1], 3, h, w), (b[2], 3, h, w))
    elif graph == "decoder":
        form = record_field("form")
        if form != "flat_kv":
            raise InputError(
                f"the bundle's decoder is in the {form} form (onnxruntime contrib ops), which TensorRT "
                "cannot build; re-export with `octopus-rt export lmm --decoder-form flat_kv` for a TensorRT decoder"
            )
        hidden = record_field("hidden_size")
        kv, hd = record_field("num_key_value_heads"), record_field("head_dim")
        s = (1, limits.opt_seq, limits.max_seq)
        # A decode step has P = past tokens; prefill has P = 0. TensorRT accepts zero-length dims.
        p = (0, limits.opt_past, limits.max_past)
        for name in names:
            if name == "inputs_embeds":
                shapes[name] = ShapeRange(*((b[i], s[i], hidden) for i in range(3)))
            elif name == "attention_mask":
                shapes[name] = ShapeRange(*((b[i], p[i] + s[i]) for i in range(3)))
            elif name == "position_ids":
                shapes[name] = ShapeRange(*((b[i], s[i]) for i in range(3)))
            elif name.startswith("past_key_values."):
                shapes[name] = ShapeRange(*((b[i], kv, p[i], hd) for i in range(3)))
            else:
                raise InputError(f"decoder input {name!r} is not in the bundle contract (docs/bundle.md)")
    elif graph == "sam_encoder":
        size = record_field("input_size")
        for name in names:
            shapes[name] = ShapeRange(*([(1, 3, size, size)] * 3))
    elif graph == "sam_decoder":
        emb = tuple(Manifest.lookup(manifest, "sam", "encoder", "embedding_shape"))
        low = tuple(record_field("mask_input_size") or (4 * emb[2], 4 * emb[3]))
        n = (1, _SAM_OPT_POINTS, MAX_SAM_POINTS)
        fixed = {
            "image_embeddings": emb,
            "mask_input": (1, 1, *low),
            "has_mask_input": (1,),
        }
        for name in names:
            if name in fixed:
                shapes[name] = ShapeRange(fixed[name], fixed[name], fixed[name])
            elif name == "point_coords":
                shapes[name] = ShapeRange(*((1, n[i], 2) for i in range(3)))
            elif name == "point_labels":
                shapes[name] = ShapeRange(*((1, n[i]) for i in range(3)))
            else:
                raise InputError(f"SAM decoder input {name!r} is not in the bundle contract (docs/bundle.md)")
    return shapes


def dynamic_only(
    profile: Mapping[str, ShapeRange],
    graph_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
) -> dict[str, ShapeRange]:
    """The inputs that need a TensorRT profile. onnxruntime wants explicit profiles for exactly the
    inputs with a dynamic dimension in the ONNX graph.

    Without `graph_shapes` those are the inputs whose range varies. With the graph's declared input
    shapes ({name: [1, "batch", ...]}, as onnxruntime's get_inputs() reports them) they are the
    inputs with a symbolic or unknown dimension, and a dimension the graph fixes is fixed in the
    profile too (a graph exported with batch 1 gets no batch range).
    """
    result: dict[str, ShapeRange] = {}
    for name, rng in profile.items():
        if graph_shapes is None:
            if rng.dynamic:
                result[name] = rng
            continue
        declared = graph_shapes.get(name)
        if declared is None or len(declared) != len(rng.min):
            continue
        if not any(not isinstance(d, int) or d <= 0 for d in declared):
            continue
        fixed = [d if isinstance(d, int) and d > 0 else None for d in declared]

        def pin(shape: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(f if f is not None else d for f, d in zip(fixed, shape))

        result[name] = ShapeRange(pin(rng.min), pin(rng.opt), pin(rng.max))
    return result


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def profile_strings(profile: Mapping[str, ShapeRange]) -> dict[str, str]:
    """The three onnxruntime options trt_profile_{min,opt,max}_shapes, "name:1x3x336x336,name2:..."."""
    if not profile:
        return {}
    return {
        "trt_profile_min_shapes": ",".join(f"{n}:{_fmt(r.min)}" for n, r in profile.items()),
        "trt_profile_opt_shapes": ",".join(f"{n}:{_fmt(r.opt)}" for n, r in profile.items()),
        "trt_profile_max_shapes": ",".join(f"{n}:{_fmt(r.max)}" for n, r in profile.items()),
    }


def tensorrt_build_options(
    profile: Mapping[str, ShapeRange],
    *,
    ctx_file: str,
    engine_cache_dir: str = "cache",
    timing_cache_dir: str,
    cache_prefix: str,
    fp16: bool = True,
    layer_norm_fp32: bool = False,
    workspace_bytes: int = 2 << 30,
    device_id: int = 0,
    builder_optimization_level: int = 3,
) -> dict[str, Any]:
    """TensorRT EP options that build one engine and dump it as an EP-context model.

    ctx_file: absolute path of the `<graph>_ctx.onnx` to write (trt_ep_context_file_path).
    engine_cache_dir: must be RELATIVE: the TensorRT EP resolves it against ctx_file's folder and
      writes that relative path into the EPContext node (an absolute path is rejected).
    timing_cache_dir: folder of the timing cache, shared by every graph and reused across builds.
    embed mode 0 keeps the engine in its own file: a decoder engine is larger than protobuf's
    2 GiB limit, and the context model then stays a few kB.
    """
    if Path(engine_cache_dir).is_absolute():
        raise InputError("engine_cache_dir must be relative to the EP-context model's folder")
    if workspace_bytes < 1 << 20:
        raise InputError(f"workspace must be at least 1 MiB, got {workspace_bytes} bytes")
    options: dict[str, Any] = {
        "device_id": int(device_id),
        "trt_max_workspace_size": int(workspace_bytes),
        "trt_fp16_enable": bool(fp16),
        # Pow + ReduceMean of LayerNorm in fp32: ViT activations overflow fp16 in the variance.
        "trt_layer_norm_fp32_fallback": bool(fp16 and layer_norm_fp32),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_cache_dir),
        "trt_engine_cache_prefix": str(cache_prefix),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_cache_dir),
        "trt_builder_optimization_level": int(builder_optimization_level),
        "trt_dump_ep_context_model": True,
        "trt_ep_context_file_path": str(ctx_file),
        "trt_ep_context_embed_mode": 0,
    }
    options.update(profile_strings(profile))
    return options
