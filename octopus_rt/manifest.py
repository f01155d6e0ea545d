"""The manifest schema: every field of `manifest.json`, defined once, as typed dataclasses.

Exporters build these objects and write them with `to_dict()` (export lmm, export sam); the runtime
reads a manifest with `parse_manifest` (or one section with `LmmSection.from_dict` etc.), which
checks that every required field is present and of its type and fills in the documented defaults,
raising `BundleError` with the field's path (`lmm.decoder.num_layers is missing`); code that needs a
few fields of a manifest that may be incomplete elsewhere (the provider plan, the TensorRT build)
reads each with `Manifest.lookup(manifest, "lmm", "decoder", "form")`, by the same declarations. docs/bundle.md
describes the fields; octopus_rt/bundle.py owns the folder layout, hashing and atomic commits.

Rules of the schema:
- a field without a default is required when reading; a field with a default may be absent (old
  bundles), and the default is what the runtime assumes;
- unknown keys are ignored when reading (a newer exporter may add fields), so a reader never
  refuses a bundle for what it does not use;
- fields marked `omit_if_none` are left out of `to_dict()` while None (`dir`, `files`, `written`:
  `bundle.commit_section` fills them in; `sam.source.config` exists for custom SAMs only).
The field machinery (reading with checks, writing) is octopus_rt/schema.py.

Where each part is defined (one home each): this module holds the header, the `sam` and `engines`
sections and `defaults`; octopus_rt/manifest_lmm.py the `lmm` section; octopus_rt/verification.py
its `verification` record; octopus_rt/manifest_section.py the fields every section with files has.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from octopus_rt.errors import InputError
from octopus_rt.manifest_lmm import LmmSection
from octopus_rt.manifest_section import Section
from octopus_rt.schema import ManifestError, Schema, optional

__all__ = [
    "GRAPHS",
    "Device",
    "DEVICE_NAMES",
    "ENGINES_FORMAT",
    "SamSource",
    "SamEncoderGraph",
    "SamDecoderGraph",
    "SamPreprocessSpec",
    "SamSection",
    "ProfileLimits",
    "EngineGraph",
    "EngineTarget",
    "EnginesSection",
    "read_engines",
    "DEFAULT_PROVIDERS",
    "Defaults",
    "Manifest",
    "parse_manifest",
]

# Graph key -> (section, key inside the section): where each ONNX graph's record lives.
GRAPHS: dict[str, tuple[str, str]] = {
    "vision": ("lmm", "vision"),
    "decoder": ("lmm", "decoder"),
    "sam_encoder": ("sam", "encoder"),
    "sam_decoder": ("sam", "decoder"),
}
# What a bundle may ask a graph to run on (defaults.providers); runtime/providers.py maps each to
# onnxruntime's provider name.
Device = Literal["cpu", "cuda", "tensorrt"]
DEVICE_NAMES: tuple[str, ...] = typing.get_args(Device)
# Value of engines.format: onnxruntime TensorRT EP-context models (docs/deploy.md explains why).
ENGINES_FORMAT = "onnxruntime-tensorrt-ep-context"
# defaults.providers of a graph the bundle records none for: TensorRT engines for vision and SAM, CUDA
# for the decoder loop (IO binding keeps the KV cache on the GPU; docs/deploy.md). `export trt` writes
# them, with its own graphs set to tensorrt.
DEFAULT_PROVIDERS: dict[str, Device] = {
    "vision": "tensorrt",
    "sam_encoder": "tensorrt",
    "sam_decoder": "tensorrt",
    "decoder": "cuda",
}


# ---------------------------------------------------------------------------------- sam
@dataclass(frozen=True)
class SamSource(Schema):
    checkpoint: str | None = None
    model_type: str = "vit_b"  # vit_b | vit_l | vit_h | custom
    config: dict[str, Any] | None = optional()  # custom only


@dataclass(frozen=True)
class SamEncoderGraph(Schema):
    """image 1 x 3 x S x S float32 (normalised, padded) -> image_embeddings embedding_shape."""

    file: str
    input_names: list[str] = field(default_factory=lambda: ["image"])
    output_names: list[str] = field(default_factory=lambda: ["image_embeddings"])
    input_size: int = 1024
    embedding_shape: list[int] = field(default_factory=lambda: [1, 256, 64, 64])
    dtype: str | None = None
    io_dtype: str | None = None


@dataclass(frozen=True)
class SamDecoderGraph(Schema):
    """Prompt encoder + mask decoder without orig_im_size (docs/bundle.md, `sam` section)."""

    file: str
    input_names: list[str] = field(default_factory=lambda: [
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"])
    output_names: list[str] = field(default_factory=lambda: ["low_res_masks", "iou_predictions"])
    mask_input_size: list[int] | None = None
    num_multimask_outputs: int | None = None
    dtype: str | None = None
    tensorrt_friendly: bool | None = None


@dataclass(frozen=True)
class SamPreprocessSpec(Schema):
    input_size: int | None = None  # None: the encoder's input_size
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    resize: str = "longest_side"
    resample: str = "bilinear"


@dataclass(frozen=True, kw_only=True)
class SamSection(Section):
    source: SamSource = field(default_factory=SamSource)
    encoder: SamEncoderGraph
    decoder: SamDecoderGraph
    preprocess: SamPreprocessSpec = field(default_factory=SamPreprocessSpec)
    mask_threshold: float = 0.0
    verification: dict[str, Any] | None = None

    @property
    def input_size(self) -> int:
        """Side of the encoder's square input (longest side after the resize)."""
        return int(self.preprocess.input_size if self.preprocess.input_size is not None else self.encoder.input_size)


# ------------------------------------------------------------------------------ engines
@dataclass(frozen=True)
class ProfileLimits(Schema):
    """Build limits of TensorRT engines: batch B, prefill length S, past length P (tokens); recorded
    as an engines target's `limits` and read by the memory estimate.

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
class EngineGraph(Schema):
    """One graph's engine: its EP-context model (`file`, in the engines section) and what it was built from."""

    file: str
    source: str | None = None  # "<section>/<file>" of the ONNX graph it was built from
    source_sha256: str | None = None  # that file's hash at build time (a re-export makes the engine stale)
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # {input: {min, opt, max}}
    layer_norm_fp32_fallback: bool = False
    build_seconds: float | None = None
    parity: dict[str, Any] | None = None  # export/trt_parity.ParityResult.to_dict()


@dataclass(frozen=True)
class EngineTarget(Schema):
    """Engines built on one machine kind, named by runtime/provider_plan.engine_name ("sm87-trt10.3.0")."""

    graphs: dict[str, EngineGraph]
    precision: str | None = None  # fp16 | fp32
    tensorrt: str | None = None  # the libnvinfer version that built them; an engine loads only there
    compute_capability: str | None = None
    gpu_name: str | None = None
    jetson: str | None = None
    cuda: str | None = None
    driver: str | None = None
    onnxruntime: str | None = None
    limits: ProfileLimits | None = None
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None
    built: str | None = None  # UTC ISO time

    def check(self, where: str) -> None:
        unknown = [g for g in self.graphs if g not in GRAPHS]
        if unknown:
            raise ManifestError(f"{where}.graphs.{unknown[0]} is not a graph ({', '.join(GRAPHS)})")


@dataclass(frozen=True, kw_only=True)
class EnginesSection(Section):
    format: str  # ENGINES_FORMAT
    targets: dict[str, EngineTarget] = field(default_factory=dict)


def read_engines(manifest: Mapping[str, Any]) -> tuple[EnginesSection | None, str]:
    """The manifest's `engines` section, typed, when it lists targets in ENGINES_FORMAT; else (None, why
    not). Format and targets are looked at before the section is parsed (like a manifest's header): a
    section another exporter wrote in another format is reported as such, not read as this one."""
    raw = manifest.get("engines")
    if not isinstance(raw, dict) or not raw.get("targets"):
        return None, "the bundle has no TensorRT engines (run `octopus-rt export trt` on the target)"
    if raw.get("format") != ENGINES_FORMAT:
        return None, f"engines format {raw.get('format')!r} is not {ENGINES_FORMAT!r}"
    return EnginesSection.from_dict(raw, "engines"), ""


# ------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class Defaults(Schema):
    """Per-bundle defaults of the runtime's options (`octopus-rt eval --sweep` rewrites tau and the mapping)."""

    tau: float = 1.0
    point_mapping: str = "paper"
    max_new_tokens: int = 64
    multimask: bool = True
    providers: dict[str, Device] | None = optional()  # {graph: device}, runtime/provider_plan.plan_graph

    def check(self, where: str) -> None:
        unknown = [g for g in (self.providers or {}) if g not in GRAPHS]
        if unknown:
            raise ManifestError(f"{where}.providers.{unknown[0]} is not a graph ({', '.join(GRAPHS)})")

    def provider(self, graph: str) -> str:
        """The device the bundle prefers for `graph`: providers[graph], else DEFAULT_PROVIDERS."""
        return (self.providers or {}).get(graph, DEFAULT_PROVIDERS.get(graph, "cuda"))


@dataclass(frozen=True)
class Manifest(Schema):
    format: str
    format_version: int
    lmm: LmmSection | None = optional()
    sam: SamSection | None = optional()
    engines: EnginesSection | None = optional()
    defaults: Defaults = field(default_factory=Defaults)


def parse_manifest(data: Any) -> Manifest:
    """The typed manifest of a manifest.json's content; ManifestError (a BundleError) names the first
    missing, mistyped or disallowed field. The header's values (format name, supported version) and
    the paths' containment are checked where the file is read (`bundle.validate_manifest`)."""
    return Manifest.from_dict(data)
