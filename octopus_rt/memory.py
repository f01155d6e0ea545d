"""How much memory a bundle needs, computed from its manifest, and whether it fits Jetson boards.

Torch-free and onnxruntime-free: `octopus-rt doctor` prints it and docs/deploy.md tabulates it.

need = weights + KV cache + activations + runtime

- weights: the sizes of the files the runtime loads (the `lmm` and `sam` sections: ONNX graphs with
  their external data, the embedding table, tokenizer). A TensorRT engine holds the same weights in
  the same precision, and only one of the two copies is loaded per graph, so the ONNX sizes stand
  for both.
- KV cache at the configured maximum length L = max_past + 1 (the present of the last decode step;
  limits from the engines target's recorded limits, else `default_limits`, which also gives
  `octopus-rt export trt` its default engine limits):
  ``2 * layers * kv_heads * head_dim * L * bytes * batch`` (keys and values), bytes from the
  decoder's I/O dtype (float32 = 4: fp16 / int4 graphs keep float32 I/O).
- activations: the peak of the largest single stage (stages run one after another), estimated
  from sizes in the manifest: the decoder's prefill of max_seq tokens (a few hidden-size tensors
  per token, the MLP's intermediate at ~8 x hidden, attention scores heads x S x S, the logits
  row) and the SAM encoder's global-attention layer (heads x T x T scores for T = (S/16)^2 tokens
  plus the MLP). Attention matrices are counted as materialised (onnxruntime CPU and CUDA do);
  TensorRT's fused attention needs less, so the estimate errs on the safe side.
- runtime: CUDA context, cuDNN/cuBLAS/TensorRT libraries and onnxruntime arenas, a fixed
  allowance (RUNTIME_OVERHEAD_GPU / _CPU).

On Jetson the CPU and GPU share one memory, so the total is compared against the board's memory
minus what the OS keeps (OS_RESERVE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.manifest import ProfileLimits

__all__ = [
    "GIB",
    "TEXT_TOKENS_MARGIN",
    "OS_RESERVE",
    "RUNTIME_OVERHEAD_GPU",
    "RUNTIME_OVERHEAD_CPU",
    "Board",
    "JETSON_BOARDS",
    "MemoryEstimate",
    "BoardFit",
    "dtype_bytes",
    "kv_cache_bytes",
    "default_limits",
    "estimate_memory",
    "check_boards",
    "format_bytes",
    "format_report",
]

GIB = 1 << 30
# JetPack (L4T, headless) keeps roughly this much for the kernel, carve-outs and services.
OS_RESERVE = int(1.5 * GIB)
RUNTIME_OVERHEAD_GPU = 1 * GIB
RUNTIME_OVERHEAD_CPU = GIB // 4
# Prompt text around the image tokens (system text, question, options, chat markup) is far below
# this; the default prefill limit is num_image_tokens + this margin.
TEXT_TOKENS_MARGIN = 256
_SAM_ENCODERS = {  # model_type -> (embed_dim, heads, mlp_ratio)
    "vit_b": (768, 12, 4.0),
    "vit_l": (1024, 16, 4.0),
    "vit_h": (1280, 16, 4.0),
}
_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "int8": 1, "uint8": 1,
}


@dataclass(frozen=True)
class Board:
    """A deployment target: total memory (bytes, shared CPU/GPU) and memory bandwidth (GB/s)."""

    name: str
    memory_bytes: int
    bandwidth_gbs: float

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - OS_RESERVE


# Orin Nano 8GB: 102 GB/s in the MAXN SUPER mode that JetPack 6.2 ("Super") unlocks on the same
# module (68 GB/s before it, and in the 15 W / 7 W modes): NVIDIA's Jetson Orin Nano Super Developer
# Kit page and its blog post "NVIDIA Jetson Orin Nano Developer Kit Gets a 'Super' Boost" (Dec 2024).
JETSON_BOARDS: tuple[Board, ...] = (
    Board("Jetson Orin Nano 8GB", 8 * GIB, 102.0),
    Board("Jetson Orin NX 16GB", 16 * GIB, 102.4),
    Board("Jetson AGX Orin 32GB", 32 * GIB, 204.8),
    Board("Jetson AGX Orin 64GB", 64 * GIB, 204.8),
)


@dataclass
class MemoryEstimate:
    """Bytes per component; `total` is what must fit. `max_len` / `batch` are the KV assumptions."""

    weights: dict[str, int]
    kv_cache: int
    activations: int
    activations_detail: dict[str, int]
    runtime: int
    max_len: int
    batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.activations + self.runtime

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "weights_total": self.weights_total,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "activations_detail": dict(self.activations_detail),
            "runtime": self.runtime,
            "total": self.total,
            "max_len": self.max_len,
            "batch": self.batch,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class BoardFit:
    board: Board
    fits: bool
    headroom_bytes: int


def dtype_bytes(dtype: str | None, default: int = 4) -> int:
    """Bytes per element of a dtype name ("float32", "float16", "fp16", ...)."""
    if not dtype:
        return default
    return _DTYPE_BYTES.get(str(dtype).split()[0].lower(), default)


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, max_len: int, bytes_per_element: int, batch: int = 1) -> int:
    """Keys and values of every layer at length max_len: 2 * L * H_kv * D * max_len * bytes * B."""
    return 2 * num_layers * kv_heads * head_dim * max_len * bytes_per_element * batch


def _section_bytes(section: Mapping[str, Any]) -> int:
    return sum(int(record.get("size", 0)) for record in section.get("files", {}).values())


def _decoder_prefill(decoder: Mapping[str, Any], seq: int, batch: int) -> int:
    hidden = int(decoder["hidden_size"])
    heads = max(1, hidden // int(decoder["head_dim"]))
    vocab = int(decoder.get("vocab_size") or 0)
    per_token = (8 + 8) * hidden * 4  # residual/normed/q/k/v/out tensors + MLP intermediate, fp32
    scores = 2 * heads * seq * seq * 4  # scores and probabilities
    return batch * (seq * per_token + scores + vocab * 4)


def _sam_encoder_peak(sam: Mapping[str, Any]) -> int | None:
    source = sam.get("source", {})
    model_type = source.get("model_type")
    if model_type in _SAM_ENCODERS:
        embed, heads, ratio = _SAM_ENCODERS[model_type]
        patch = 16
    elif isinstance(source.get("config"), dict):
        cfg = source["config"]
        embed, heads = int(cfg.get("encoder_embed_dim", 768)), int(cfg.get("encoder_num_heads", 12))
        ratio, patch = float(cfg.get("mlp_ratio", 4.0)), int(cfg.get("patch_size", 16))
    else:
        return None
    size = int(sam.get("encoder", {}).get("input_size") or sam.get("preprocess", {}).get("input_size") or 1024)
    tokens = (size // patch) ** 2
    bytes_ = 2 if sam.get("precision") == "fp16" else 4
    scores = 2 * heads * tokens * tokens * bytes_
    mlp = int(tokens * embed * ratio * bytes_) + 4 * tokens * embed * bytes_
    return scores + mlp


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


def estimate_memory(
    manifest: Mapping[str, Any],
    *,
    max_len: int | None = None,
    batch: int | None = None,
    gpu: bool = True,
) -> MemoryEstimate:
    """Memory the bundle needs at the configured maximum length (see the module docstring).

    max_len / batch default to the engines target's recorded limits (the first target), else to
    default_limits(manifest): max_len = max_past + 1.
    """
    notes: list[str] = []
    limits: ProfileLimits | None = None
    targets = (manifest.get("engines") or {}).get("targets") or {}
    for name, target in sorted(targets.items()):
        if isinstance(target.get("limits"), dict):
            limits = ProfileLimits.from_dict(target["limits"], f"engines.targets.{name}.limits")
            notes.append(f"limits from engines target {name}")
            break
    lmm = manifest.get("lmm") if isinstance(manifest.get("lmm"), dict) else None
    if limits is None and lmm is not None:
        limits = default_limits(manifest)
    batch = int(batch if batch is not None else (limits.max_batch if limits else 1))

    weights: dict[str, int] = {}
    for name in ("lmm", "sam"):
        if isinstance(manifest.get(name), dict):
            weights[name] = _section_bytes(manifest[name])

    kv = 0
    detail: dict[str, int] = {}
    length = 0
    if lmm is not None and isinstance(lmm.get("decoder"), dict):
        decoder = lmm["decoder"]
        length = int(max_len if max_len is not None else limits.max_past + 1)
        kv = kv_cache_bytes(
            int(decoder["num_layers"]), int(decoder["num_key_value_heads"]), int(decoder["head_dim"]),
            length, dtype_bytes(decoder.get("dtype")), batch,
        )
        seq = min(limits.max_seq, length) if limits else length
        detail["decoder_prefill"] = _decoder_prefill(decoder, seq, batch)
        features = int(lmm.get("vision", {}).get("num_image_tokens", 0)) * int(decoder["hidden_size"]) * 4
        detail["vision_features"] = batch * features
    if isinstance(manifest.get("sam"), dict):
        peak = _sam_encoder_peak(manifest["sam"])
        if peak is None:
            notes.append("SAM encoder size unknown (no model_type/config): its activations are not counted")
        else:
            detail["sam_encoder"] = peak
    activations = max(detail.values(), default=0)
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv,
        activations=activations,
        activations_detail=detail,
        runtime=RUNTIME_OVERHEAD_GPU if gpu else RUNTIME_OVERHEAD_CPU,
        max_len=length,
        batch=batch,
        notes=notes,
    )


def check_boards(estimate: MemoryEstimate, boards: tuple[Board, ...] = JETSON_BOARDS) -> list[BoardFit]:
    """Whether `estimate.total` fits each board's usable memory (memory minus OS_RESERVE)."""
    return [BoardFit(b, estimate.total <= b.usable_bytes, b.usable_bytes - estimate.total) for b in boards]


def format_bytes(value: int) -> str:
    """1536 MiB -> '1.50 GiB'; small values in MiB."""
    if abs(value) >= GIB:
        return f"{value / GIB:.2f} GiB"
    return f"{value / (1 << 20):.1f} MiB"


def format_report(estimate: MemoryEstimate, boards: tuple[Board, ...] = JETSON_BOARDS) -> list[str]:
    """Human-readable lines (doctor prints them)."""
    lines = [
        "memory needed (estimate from the manifest):",
        *[f"  weights {name:<4} {format_bytes(size)}" for name, size in estimate.weights.items()],
        f"  KV cache     {format_bytes(estimate.kv_cache)} (length {estimate.max_len}, batch {estimate.batch})",
        f"  activations  {format_bytes(estimate.activations)} (peak stage: "
        + (max(estimate.activations_detail, key=estimate.activations_detail.get) if estimate.activations_detail else "none")
        + ")",
        f"  runtime      {format_bytes(estimate.runtime)}",
        f"  total        {format_bytes(estimate.total)}",
    ]
    for fit in check_boards(estimate, boards):
        verdict = "fits" if fit.fits else "does NOT fit"
        lines.append(f"  {fit.board.name:<22} {verdict} ({format_bytes(fit.headroom_bytes)} headroom of "
                     f"{format_bytes(fit.board.usable_bytes)} usable)")
    lines += [f"  note: {note}" for note in estimate.notes]
    return lines
