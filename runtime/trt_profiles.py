"""TensorRT / CUDA execution-provider settings computed from a bundle manifest (pure functions).

Everything here is plain Python over the manifest dict: no onnxruntime, no GPU. It is the single
place that knows

- which graphs of a bundle exist (`GRAPHS`: vision, decoder, sam_encoder, sam_decoder) and where
  their ONNX files are;
- the TensorRT optimisation-profile shapes of every graph input (min / opt / max), from the
  manifest's sizes and the build limits (`ProfileLimits`: batch, prefill length S, past length P).
  onnxruntime's TensorRT EP rebuilds engines whenever a shape leaves the profile it guessed from
  the first inputs, which makes it extremely slow without explicit profiles;
- how an engine target is named (`engine_name`, e.g. ``sm87-trt10.3.0``: a serialized TensorRT
  engine only deserializes on the compute capability and the exact TensorRT version that built it,
  so a patch upgrade needs a new target; `find_engine_target` also compares the version recorded
  in the target with the libnvinfer this machine loads before an engine is used);
- the provider-options dicts passed to onnxruntime for the TensorRT EP (build and load) and the
  CUDA EP, and the per-graph provider plan the runtime uses (`plan_graph`): TensorRT EP-context
  models for vision + SAM when the bundle's `engines` section has a target matching this machine,
  CUDA for the decoder loop by default (IO binding keeps the KV cache on the GPU; see
  docs/deploy.md for why the decoder is not a TensorRT engine by default), CPU otherwise.

Shapes are tuples of ints. Input names follow docs/bundle.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.runtime.providers import PROVIDERS

__all__ = [
    "GRAPHS",
    "TRT_GRAPHS_DEFAULT",
    "ENGINES_FORMAT",
    "PROVIDER_NAMES",
    "DEFAULT_PROVIDERS",
    "TEXT_TOKENS_MARGIN",
    "MAX_SAM_POINTS",
    "ShapeRange",
    "ProfileLimits",
    "DeviceInfo",
    "GraphPlan",
    "graph_record",
    "default_limits",
    "graph_profile",
    "dynamic_only",
    "profile_strings",
    "engine_name",
    "parse_engine_name",
    "tensorrt_version",
    "tensorrt_build_options",
    "tensorrt_load_options",
    "cuda_options",
    "find_engine_target",
    "requested_provider",
    "plan_graph",
]

# Graph key -> (manifest section, key inside the section).
GRAPHS: dict[str, tuple[str, str]] = {
    "vision": ("lmm", "vision"),
    "decoder": ("lmm", "decoder"),
    "sam_encoder": ("sam", "encoder"),
    "sam_decoder": ("sam", "decoder"),
}
# Graphs `octopus-rt export trt` turns into engines unless told otherwise (the decoder is opt-in).
TRT_GRAPHS_DEFAULT = ("vision", "sam_encoder", "sam_decoder")
# Value of engines["format"]: onnxruntime TensorRT EP-context models (docs/deploy.md explains why).
ENGINES_FORMAT = "onnxruntime-tensorrt-ep-context"
PROVIDER_NAMES = PROVIDERS  # one table: runtime/providers.py
# Preferred provider per graph on a GPU machine; written to manifest defaults["providers"].
DEFAULT_PROVIDERS: dict[str, str] = {
    "vision": "tensorrt",
    "sam_encoder": "tensorrt",
    "sam_decoder": "tensorrt",
    "decoder": "cuda",
}
# Prompt text around the image tokens (system text, question, options, chat markup) is far below
# this; the default prefill limit is num_image_tokens + this margin.
TEXT_TOKENS_MARGIN = 256
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


@dataclass(frozen=True)
class ProfileLimits:
    """Build limits of the engines: batch B, prefill length S, past length P (tokens).

    opt_* are the shapes TensorRT tunes its kernels for; the decoder's opt is a decode step
    (S = 1, P = opt_past) because generation calls the decoder once per new token.
    """

    max_batch: int = 1
    max_seq: int = 832
    max_past: int = 895
    opt_batch: int = 1
    opt_seq: int = 1
    opt_past: int = 672

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq", "max_past", "opt_batch", "opt_seq"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.opt_past < 0:
            raise InputError(f"opt-past must be >= 0, got {self.opt_past}")
        if self.opt_batch > self.max_batch or self.opt_seq > self.max_seq or self.opt_past > self.max_past:
            raise InputError(f"opt shapes must not exceed the max shapes: {self}")

    @property
    def max_total(self) -> int:
        """Longest attention span (P + S) any call inside the profile can have."""
        return self.max_past + self.max_seq

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class DeviceInfo:
    """What the runtime learned about this machine (filled by runtime/doctor.py's probes).

    compute_capability: "8.7" style or None without an NVIDIA GPU; tensorrt: version ("10.3.0") of
    the libnvinfer onnxruntime's TensorRT provider loads, or None; providers: the providers that
    really run here (probed by runtime/doctor.py, not merely listed by onnxruntime).
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    compute_capability: str | None = None
    tensorrt: str | None = None
    gpu_name: str | None = None
    cuda: str | None = None
    memory_bytes: int | None = None
    unusable: dict[str, str] = field(default_factory=dict)
    """{provider name: why it cannot run} for providers onnxruntime lists but the probe refused."""

    def missing(self, provider: str) -> str:
        """Why `provider` ("tensorrt", "cuda") is not among the usable providers."""
        name = PROVIDERS[provider]
        if name in self.unusable:
            return self.unusable[name]
        return f"onnxruntime here has no {name}" + (" (install onnxruntime-gpu)" if provider == "cuda" else "")

    @property
    def engine_name(self) -> str | None:
        if self.compute_capability is None or self.tensorrt is None:
            return None
        return engine_name(self.compute_capability, self.tensorrt)


@dataclass
class GraphPlan:
    """How the runtime opens one graph: file, providers (name, options) in priority order, and
    whether ORT's own graph optimisations must be off (EP-context models must stay one node)."""

    graph: str
    file: Path
    provider: str
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    disable_graph_optimizations: bool = False
    reason: str = ""


def graph_record(manifest: Mapping[str, Any], graph: str) -> dict[str, Any] | None:
    """The manifest record of `graph` (e.g. manifest["sam"]["encoder"]), or None if absent."""
    if graph not in GRAPHS:
        raise InputError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")
    section_name, key = GRAPHS[graph]
    section = manifest.get(section_name)
    if not isinstance(section, dict) or not isinstance(section.get(key), dict):
        return None
    return section[key]


def default_limits(
    manifest: Mapping[str, Any],
    *,
    max_batch: int | None = None,
    max_seq: int | None = None,
    max_past: int | None = None,
) -> ProfileLimits:
    """Limits from the manifest, each overridable.

    max_seq  = num_image_tokens + TEXT_TOKENS_MARGIN (the prompt the runtime prefills at once),
    max_past = max_seq + defaults.max_new_tokens - 1 (the past of the last decode step),
    both capped by the decoder's max_position_embeddings; opt_past is the midpoint of generation.
    """
    lmm = manifest.get("lmm") if isinstance(manifest.get("lmm"), dict) else {}
    image_tokens = int(lmm.get("vision", {}).get("num_image_tokens") or lmm.get("prompt", {}).get("num_image_tokens") or 0)
    max_positions = int(lmm.get("decoder", {}).get("max_position_embeddings") or 1 << 30)
    new_tokens = int(manifest.get("defaults", {}).get("max_new_tokens") or 64)
    seq = int(max_seq) if max_seq is not None else min(image_tokens + TEXT_TOKENS_MARGIN, max_positions)
    past = int(max_past) if max_past is not None else min(seq + new_tokens - 1, max_positions - 1)
    batch = int(max_batch) if max_batch is not None else 1
    if seq < 1 or past < 1 or batch < 1:
        raise InputError(f"max-batch, max-seq and max-past must be >= 1 (got {batch}, {seq}, {past})")
    if seq > max_positions or past >= max_positions:
        # P + S of one call never exceeds the model's positions; a longer limit is a mistake.
        raise InputError(
            f"max-seq {seq} / max-past {past} exceed the decoder's max_position_embeddings {max_positions}"
        )
    opt_past = min(past, min(image_tokens + TEXT_TOKENS_MARGIN // 4, seq) + new_tokens // 2)
    return ProfileLimits(
        max_batch=batch, max_seq=seq, max_past=past, opt_batch=1, opt_seq=1, opt_past=max(0, opt_past)
    )


def _vision_input_hw(lmm: Mapping[str, Any]) -> tuple[int, int]:
    pre = lmm.get("preprocess", {})
    if pre.get("input_height") and pre.get("input_width"):
        return int(pre["input_height"]), int(pre["input_width"])
    crop = pre.get("crop_size") or pre.get("size") or {}
    if "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    raise InputError("manifest lmm.preprocess has no input_height/input_width; re-export the lmm section")


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
    record = graph_record(manifest, graph)
    if record is None:
        raise InputError(f"the bundle has no {GRAPHS[graph][0]}.{GRAPHS[graph][1]} graph")
    names = list(record.get("input_names") or [])
    b = (1, limits.opt_batch, limits.max_batch)
    shapes: dict[str, ShapeRange] = {}
    if graph == "vision":
        h, w = _vision_input_hw(manifest["lmm"])
        for name in names:
            shapes[name] = ShapeRange((b[0], 3, h, w), (b[1], 3, h, w), (b[2], 3, h, w))
    elif graph == "decoder":
        hidden = int(record["hidden_size"])
        kv, hd = int(record["num_key_value_heads"]), int(record["head_dim"])
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
        size = int(record["input_size"])
        for name in names:
            shapes[name] = ShapeRange(*([(1, 3, size, size)] * 3))
    elif graph == "sam_decoder":
        emb = tuple(int(d) for d in manifest["sam"]["encoder"]["embedding_shape"])
        low = tuple(int(d) for d in record.get("mask_input_size") or (4 * emb[2], 4 * emb[3]))
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


_CC = re.compile(r"^\s*(?:sm_?)?(\d+)(?:\.(\d+))?\s*$")
_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")
_NAME = re.compile(r"^sm(\d+)(\d)-trt(\d+)\.(\d+)(?:\.(\d+))?$")


def tensorrt_version(version: str) -> str:
    """"10.3.0.30" / "10.3.0" -> "10.3.0"; "10.3" -> "10.3" (an old record without the patch)."""
    match = _VERSION.match(str(version))
    if not match:
        raise InputError(f"not a TensorRT version: {version!r} (expected e.g. '10.3.0')")
    return ".".join(str(int(g)) for g in match.groups() if g is not None)


def engine_name(compute_capability: str | tuple[int, int], tensorrt_version_: str) -> str:
    """``sm<major><minor>-trt<major>.<minor>.<patch>``: "8.7" + "10.3.0.30" -> "sm87-trt10.3.0".

    A serialized engine only deserializes on the compute capability and the TensorRT version that
    built it (a patch release is another version), so the name carries both in full.
    """
    if isinstance(compute_capability, tuple):
        major, minor = int(compute_capability[0]), int(compute_capability[1])
    else:
        match = _CC.match(str(compute_capability))
        if not match:
            raise InputError(f"not a compute capability: {compute_capability!r} (expected e.g. '8.7')")
        digits = match.group(1)
        if match.group(2) is not None:
            major, minor = int(digits), int(match.group(2))
        elif len(digits) >= 2:  # "87" / "sm_87"
            major, minor = int(digits[:-1]), int(digits[-1])
        else:
            raise InputError(f"not a compute capability: {compute_capability!r} (expected e.g. '8.7')")
    return f"sm{major}{minor}-trt{tensorrt_version(tensorrt_version_)}"


def parse_engine_name(name: str) -> tuple[str, str]:
    """"sm87-trt10.3.0" -> ("8.7", "10.3.0"); names of older bundles ("sm87-trt10.3") -> ("8.7", "10.3").
    Raises InputError for other strings."""
    match = _NAME.match(name)
    if not match:
        raise InputError(f"not an engine target name: {name!r} (expected e.g. 'sm87-trt10.3.0')")
    version = ".".join(g for g in match.groups()[2:] if g is not None)
    return f"{match.group(1)}.{match.group(2)}", version


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


def tensorrt_load_options(*, device_id: int = 0, fp16: bool = True, workspace_bytes: int = 2 << 30) -> dict[str, Any]:
    """TensorRT EP options to run an EP-context model: the engine comes from the EPContext node
    (its path is relative to the context model), so no profile or cache options are needed."""
    return {
        "device_id": int(device_id),
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_bytes),
    }


def cuda_options(*, device_id: int = 0, gpu_mem_limit: int | None = None) -> dict[str, Any]:
    """CUDA EP options. kSameAsRequested avoids the arena doubling its blocks, which on an 8 GB
    Jetson (CPU and GPU share the memory) can cost gigabytes for a growing KV cache."""
    options: dict[str, Any] = {
        "device_id": int(device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": True,
    }
    if gpu_mem_limit is not None:
        options["gpu_mem_limit"] = int(gpu_mem_limit)
    return options


def find_engine_target(
    manifest: Mapping[str, Any], device: DeviceInfo
) -> tuple[str | None, dict[str, Any] | None, str]:
    """(name, target record, reason) of the engines built for this machine, or (None, None, why not)."""
    engines = manifest.get("engines")
    if not isinstance(engines, dict) or not engines.get("targets"):
        return None, None, "the bundle has no TensorRT engines (run `octopus-rt export trt` on the target)"
    built = ", ".join(sorted(engines["targets"]))
    if engines.get("format") != ENGINES_FORMAT:
        return None, None, f"engines format {engines.get('format')!r} is not {ENGINES_FORMAT!r}"
    if "TensorrtExecutionProvider" not in device.providers:
        return None, None, f"engines built for {built}, but {device.missing('tensorrt')}"
    if device.compute_capability is None:
        return None, None, f"engines built for {built}, but no NVIDIA GPU was found"
    if device.tensorrt is None:
        return None, None, f"engines built for {built}, but the TensorRT libraries were not found"
    name = device.engine_name
    here = tensorrt_version(device.tensorrt)
    candidates = [name] if name in engines["targets"] else []
    candidates += [t for t in engines["targets"] if t != name and _same_gpu(t, name)]
    for target in candidates:
        record = engines["targets"][target]
        built_with = record.get("tensorrt")
        if (built_with is None and target == name) or (built_with is not None and tensorrt_version(built_with) == here):
            return target, record, f"engines {target} match this machine (TensorRT {here})"
    if candidates:
        record = engines["targets"][candidates[0]]
        return None, None, (
            f"engines {candidates[0]} were built with TensorRT {record.get('tensorrt', 'of an unrecorded version')}, "
            f"but this machine loads TensorRT {here}; an engine only loads in the TensorRT that built it: "
            "rebuild with `octopus-rt export trt`"
        )
    return None, None, f"engines built for {built}; this machine needs {name}"


def _same_gpu(target: str, name: str) -> bool:
    try:
        return parse_engine_name(target)[0] == parse_engine_name(name)[0]
    except InputError:
        return False


def requested_provider(manifest: Mapping[str, Any], graph: str, device: str) -> str:
    """What `plan_graph` is asked for when the user picks `device` for the whole bundle.

    "tensorrt" means TensorRT engines where the bundle prefers them (vision, SAM) and CUDA for the
    rest (the decoder loop, unless its engine was built with --decoder); auto / cuda / cpu apply
    to every graph as they are.
    """
    if device != "tensorrt":
        return device
    preferred = dict(DEFAULT_PROVIDERS, **manifest.get("defaults", {}).get("providers", {})).get(graph, "cuda")
    return "tensorrt" if preferred == "tensorrt" else "cuda"


def _available(device: DeviceInfo, provider: str) -> bool:
    return PROVIDER_NAMES[provider] in device.providers


def plan_graph(
    bundle_dir: str | Path,
    manifest: Mapping[str, Any],
    graph: str,
    device: DeviceInfo,
    *,
    requested: str = "auto",
    device_id: int = 0,
) -> GraphPlan:
    """Choose file and providers for `graph`.

    requested: "auto" (manifest defaults["providers"][graph], else DEFAULT_PROVIDERS, falling back
    tensorrt -> cuda -> cpu to what is available), or "tensorrt" / "cuda" / "cpu" (an error if not
    available). TensorRT runs the matching EP-context model; without matching engines the TensorRT
    EP would build an engine at every start, so auto falls back to CUDA and an explicit
    "tensorrt" is refused with the reason.
    """
    record = graph_record(manifest, graph)
    if record is None:
        raise InputError(f"the bundle has no {GRAPHS[graph][0]}.{GRAPHS[graph][1]} graph")
    if requested not in ("auto", *PROVIDER_NAMES):
        raise InputError(f"device must be auto, tensorrt, cuda or cpu; got {requested!r}")
    bundle_dir = Path(bundle_dir)
    section = manifest[GRAPHS[graph][0]]
    onnx_file = bundle_dir / section["dir"] / record["file"]
    cpu = ("CPUExecutionProvider", {})
    name, target, why = find_engine_target(manifest, device)
    engine_graph = (target or {}).get("graphs", {}).get(graph)
    current_sha = section.get("files", {}).get(record["file"], {}).get("sha256")
    if engine_graph is not None and engine_graph.get("source_sha256") not in (None, current_sha):
        # The graph was re-exported after the engine was built: the engine is stale.
        why = f"engines {name} were built from another export of {graph}; rebuild with `octopus-rt export trt`"
        engine_graph, target = None, None
    preferred = requested
    if requested == "auto":
        preferred = dict(DEFAULT_PROVIDERS, **manifest.get("defaults", {}).get("providers", {})).get(graph, "cuda")
    order = {"tensorrt": ["tensorrt", "cuda", "cpu"], "cuda": ["cuda", "cpu"], "cpu": ["cpu"]}[preferred]
    reasons: list[str] = []
    for provider in order:
        if provider == "tensorrt":
            if engine_graph is None:
                reasons.append(why if target is None else f"engines {name} have no {graph} graph")
                if requested == "tensorrt":
                    raise InputError(f"cannot run {graph} on TensorRT: {reasons[-1]}")
                continue
            ctx = bundle_dir / manifest["engines"]["dir"] / engine_graph["file"]
            providers = [
                ("TensorrtExecutionProvider", tensorrt_load_options(device_id=device_id, fp16=target.get("precision") == "fp16")),
                ("CUDAExecutionProvider", cuda_options(device_id=device_id)),
            ]
            return GraphPlan(graph, ctx, "tensorrt", providers, True, why)
        if provider == "cuda":
            if not _available(device, "cuda"):
                reasons.append(device.missing("cuda"))
                if requested == "cuda":
                    raise InputError(f"cannot run {graph} on CUDA: {reasons[-1]}")
                continue
            reason = "; ".join(reasons + ["CUDA execution provider"])
            return GraphPlan(graph, onnx_file, "cuda", [("CUDAExecutionProvider", cuda_options(device_id=device_id)), cpu], False, reason)
        return GraphPlan(graph, onnx_file, "cpu", [cpu], False, "; ".join(reasons + ["CPU execution provider"]))
    raise AssertionError("unreachable: cpu is always the last choice")
