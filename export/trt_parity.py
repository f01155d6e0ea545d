"""Parity of a TensorRT engine with the CPU path: seeded inputs of a graph at given shapes, and the
per-output comparison against the thresholds below (used by `octopus-rt export trt` before it
commits an engine, and by benchmarks/bench_gpu.py for its inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octopus_rt.manifest import Manifest

__all__ = ["ParityResult", "parity_inputs", "compare_outputs"]

# Parity thresholds against the CPU fp32 path. fp16 engines differ by rounding; a broken engine
# (wrong profile, overflow to inf/NaN, a mis-parsed op) is far outside these.
_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
_MAX_REL_ERR = {"fp32": 1e-3, "fp16": 5e-2}
_MIN_MASK_IOU = {"fp32": 0.995, "fp16": 0.97}
_PARITY_SEED = 0


@dataclass
class ParityResult:
    """Per-output agreement of an engine with the CPU path; `failures` lists what broke a threshold."""

    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "ok": self.ok, "failures": list(self.failures)}


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def parity_inputs(
    manifest: Mapping[str, Any],
    graph: str,
    shapes: Mapping[str, Sequence[int]],
    types: Mapping[str, str] | None = None,
    *,
    embeddings: np.ndarray | None = None,
    seed: int = _PARITY_SEED,
) -> dict[str, np.ndarray]:
    """Seeded, realistic inputs of `graph` at `shapes` ({input name: shape}).

    types: onnxruntime type strings ("tensor(float)", ...) per input, default float32/int64 as the
    bundle contract says. Decoder: inputs_embeds are rows of the embedding table when given (real
    magnitudes), attention_mask ones, position_ids P..P+S-1. SAM decoder: one point inside the image
    plus the padding point (label -1), no mask input.
    """
    rng = np.random.default_rng(seed)
    types = types or {}
    feeds: dict[str, np.ndarray] = {}
    past = 0
    for name, shape in shapes.items():
        if name.startswith("past_key_values."):
            past = int(shape[2])
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        dtype = _NP_TYPES.get(types.get(name, ""), np.int64 if name in ("attention_mask", "position_ids") else np.float32)
        if name == "attention_mask":
            value = np.ones(shape)
        elif name == "position_ids":
            value = np.broadcast_to(np.arange(past, past + shape[1]), shape)
        elif name == "inputs_embeds" and embeddings is not None:
            ids = rng.integers(0, embeddings.shape[0], size=shape[:2])
            value = np.asarray(embeddings[ids.reshape(-1)], dtype=np.float32).reshape(shape)
        elif name == "point_coords":
            size = Manifest.lookup(manifest, "sam", "encoder", "input_size")
            value = rng.uniform(0.1 * size, 0.9 * size, size=shape)
        elif name == "point_labels":
            value = np.ones(shape)
            value[..., -1] = -1  # SAM's padding point, as the runtime appends it
        elif name in ("mask_input", "has_mask_input"):
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape)
        feeds[name] = np.ascontiguousarray(value, dtype=dtype)
    return feeds


def compare_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], precision: str
) -> ParityResult:
    """Agreement of `candidate` with `reference`, output by output.

    For every output: cosine similarity and max |a-b| / max |a| (thresholds per precision); for
    "low_res_masks": IoU of the masks (logit > 0); for "logits": whether the argmax agrees.
    """
    result = ParityResult()
    for name, ref in reference.items():
        if name not in candidate:
            result.failures.append(f"{name}: missing from the engine's outputs")
            continue
        ref64 = np.asarray(ref, dtype=np.float64)
        got64 = np.asarray(candidate[name], dtype=np.float64)
        if ref64.shape != got64.shape:
            result.failures.append(f"{name}: shape {got64.shape} != {ref64.shape}")
            continue
        if not np.all(np.isfinite(got64)):
            result.failures.append(f"{name}: non-finite values (fp16 overflow?)")
            continue
        a, b = ref64.ravel(), got64.ravel()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        rel = float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(b), initial=0.0))
        stats: dict[str, float] = {"cosine": cosine, "max_rel_err": rel}
        if cosine < _MIN_COSINE[precision]:
            result.failures.append(f"{name}: cosine {cosine:.5f} < {_MIN_COSINE[precision]}")
        if rel > _MAX_REL_ERR[precision]:
            result.failures.append(f"{name}: max relative error {rel:.3g} > {_MAX_REL_ERR[precision]}")
        if name == "low_res_masks":
            ma, mb = ref64 > 0, got64 > 0
            union = np.logical_or(ma, mb).sum()
            iou = float(np.logical_and(ma, mb).sum() / union) if union else 1.0
            stats["mask_iou"] = iou
            if iou < _MIN_MASK_IOU[precision]:
                result.failures.append(f"{name}: mask IoU {iou:.4f} < {_MIN_MASK_IOU[precision]}")
        if name == "logits" and ref64.ndim >= 2:
            top1 = got64.argmax(-1)
            stats["top1_agreement"] = float(np.mean(ref64.argmax(-1) == top1))
            # fp16 may swap near-tied tokens (untrained test models have many): the engine's
            # top-1 must then still be among the reference's top 5; fp32 must agree exactly.
            k = 1 if precision == "fp32" else 5
            top_k = np.argsort(-ref64, axis=-1)[..., :k]
            inside = float(np.mean(np.any(top_k == top1[..., None], axis=-1)))
            stats[f"top1_in_ref_top{k}"] = inside
            if inside < 1.0:
                result.failures.append(f"{name}: the top-1 token is outside the reference's top {k} ({inside:.2f})")
        result.outputs[name] = stats
    return result
