"""The manifest schema: every field of `manifest.json`, defined once, as typed dataclasses.

Exporters build these objects and write them with `to_dict()` (export lmm, export sam); the runtime
reads a manifest with `parse_manifest` (or one section with `LmmSection.from_dict` etc.), which
checks that every required field is present and of its type and fills in the documented defaults,
raising `BundleError` with the field's path (`lmm.decoder.num_layers is missing`). docs/bundle.md
describes the fields; octopus_rt/bundle.py owns the folder layout, hashing and atomic commits.

Rules of the schema:
- a field without a default is required when reading; a field with a default may be absent (old
  bundles), and the default is what the runtime assumes;
- unknown keys are ignored when reading (a newer exporter may add fields), so a reader never
  refuses a bundle for what it does not use;
- fields marked `omit_if_none` are left out of `to_dict()` while None (`dir`, `files`, `written`:
  `bundle.commit_section` fills them in; `sam.source.config` exists for custom SAMs only).
The field machinery (reading with checks, writing) is octopus_rt/schema.py.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from octopus_rt import vocab
from octopus_rt.errors import InputError
from octopus_rt.schema import ManifestError, Schema, optional
from octopus_rt.verification import LmmVerification, VerifyOverrides, VerifyThresholds

__all__ = [
    "GRAPHS",
    "Device",
    "DEVICE_NAMES",
    "ENGINES_FORMAT",
    "FileRecord",
    "LmmSource",
    "VisionGraph",
    "EmbeddingTable",
    "DECODER_FORMS",
    "DecoderQuantization",
    "DecoderGraph",
    "TokenizerSpec",
    "VisionPreprocessSpec",
    "PromptSpec",
    "HDSeparators",
    "HDTransformSpec",
    "ScorePrompt",
    "ARCHITECTURES",
    "LmmVerification",
    "VerifyThresholds",
    "VerifyOverrides",
    "LmmSection",
    "SamSource",
    "SamEncoderGraph",
    "SamDecoderGraph",
    "SamPreprocessSpec",
    "SamSection",
    "ProfileLimits",
    "EngineGraph",
    "EngineTarget",
    "EnginesSection",
    "Defaults",
    "Manifest",
    "ManifestError",
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
# lmm.architecture: how the runtime turns an image + question into decoder inputs
# (runtime/image_stage.py): "llava" (one resized image, a fixed number of image tokens) or "phi3v"
# (Phi-3(.5)-Vision's HD crops, a per-image number of tokens, lmm.hd).
ARCHITECTURES = ("llava", "phi3v")


# ------------------------------------------------------------------------------ shared pieces
@dataclass(frozen=True)
class FileRecord(Schema):
    """One file of a section (path relative to the section's `dir`)."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Section(Schema):
    """Fields of every section that owns files (docs/bundle.md, "Every section with files has")."""

    dir: str | None = optional()  # folder relative to the bundle
    files: dict[str, FileRecord] | None = optional()
    written: str | None = optional()  # UTC ISO time of the commit
    versions: dict[str, str] = field(default_factory=dict)  # {package: version} that wrote it
    opset: int | None = None
    ir_version: int | None = None
    precision: str | None = None  # fp32 | fp16 | int8 | int4

    def check(self, where: str) -> None:
        if self.files is not None and self.dir is None:
            raise ManifestError(f"{where}.dir is missing")


# ---------------------------------------------------------------------------------- lmm
@dataclass(frozen=True)
class LmmSource(Schema):
    model_dir: str
    architectures: list[str] = field(default_factory=list)
    text_model_type: str | None = None
    vision_model_type: str | None = None
    num_parameters: int | None = None


@dataclass(frozen=True)
class VisionGraph(Schema):
    """pixel_values B x 3 x H x W float32 -> image_features B x num_image_tokens x hidden_size float32."""

    file: str
    input_names: list[str] = field(default_factory=lambda: ["pixel_values"])
    output_names: list[str] = field(default_factory=lambda: ["image_features"])
    num_image_tokens: int | None = None
    hidden_size: int | None = None


@dataclass(frozen=True)
class EmbeddingTable(Schema):
    """The LM's input embedding table, vocab_size x hidden_size, a .npy file."""

    file: str
    vocab_size: int | None = None
    hidden_size: int | None = None
    dtype: str | None = None


# lmm.decoder.form -> its KV cache contract (docs/bundle.md, "Decoder graph I/O"):
# "flat_kv": standard ONNX ops (every provider, TensorRT included), inputs_embeds + attention_mask +
#   position_ids + 2L past tensors -> logits + 2L presents, a new (concatenated) cache per call;
# "gqa": onnxruntime contrib ops (GroupQueryAttention with fused rotary), inputs_embeds + seqlens_k +
#   total_sequence_length + 2L buffers that past and present share, written in place (CPU provider).
DECODER_FORMS: dict[str, str] = {"flat_kv": "concat", "gqa": "shared"}


@dataclass(frozen=True)
class DecoderQuantization(Schema):
    """How the decoder's weights were quantised (export/quantize.py). method "MatMulNBits": weight-only,
    `bits` per weight in blocks of `block_size` (asymmetric unless `symmetric`), `accuracy_level` 4 =
    int8 activations and int8 dot products on the CPU, the lm_head at `lm_head_bits`; method
    "quantize_dynamic": per-channel int8 weights, activations quantised at run time."""

    method: str
    bits: int
    block_size: int | None = optional()
    accuracy_level: int | None = optional()
    symmetric: bool | None = optional()
    lm_head_bits: int | None = optional()
    per_channel: bool | None = optional()


@dataclass(frozen=True)
class DecoderGraph(Schema):
    """The decoder graph (docs/bundle.md, "Decoder graph I/O"); `form` says which contract it keeps
    (DECODER_FORMS) and `kv_buffer` how its cache is held ("concat": a new cache per call; "shared":
    one buffer bound as past and present). form_reason: why export chose the form."""

    file: str
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    max_position_embeddings: int
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    vocab_size: int | None = None
    dtype: str | None = None
    form: str = "flat_kv"
    kv_buffer: str = "concat"
    form_reason: str | None = optional()
    quantization: DecoderQuantization | None = optional()
    # Longrope (Phi-3): a sequence longer than this is rotated with the long factors; the graph picks the
    # table per call from max(position_ids) + 1, and the runtime re-prefills a cache computed at or below
    # this length when the sequence grows past it, as the official generate() does. None: no switch.
    original_max_position_embeddings: int | None = None

    def check(self, where: str) -> None:
        if self.form not in DECODER_FORMS:
            raise ManifestError(f"{where}.form must be one of {', '.join(DECODER_FORMS)}, got {self.form!r}")
        if self.kv_buffer != DECODER_FORMS[self.form]:
            raise ManifestError(f"{where}.kv_buffer of the {self.form} form is {DECODER_FORMS[self.form]!r}, "
                                f"got {self.kv_buffer!r}")
        if self.form != "flat_kv" and self.original_max_position_embeddings is not None:
            # The longrope cache re-run lives in the flat_kv Decoder only (runtime/generate.py).
            raise ManifestError(f"{where}: a longrope decoder (original_max_position_embeddings) must be flat_kv, "
                                f"got {self.form!r}")


@dataclass(frozen=True)
class TokenizerSpec(Schema):
    file: str = "tokenizer.json"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None


@dataclass(frozen=True)
class VisionPreprocessSpec(Schema):
    """The image processor's recipe (runtime/preprocess.py applies it)."""

    image_mean: list[float]
    image_std: list[float]
    input_height: int
    input_width: int
    size: dict[str, int] | None = None  # {"shortest_edge": n} or {"height", "width"}
    image_processor_type: str | None = None
    backend: str | None = "torchvision"  # "torchvision" or "pil"
    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: str | int | None = "bicubic"
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True


@dataclass(frozen=True)
class PromptSpec(Schema):
    """Pre-rendered chat template: prefix + image_token * num_image_tokens + infix + question + suffix."""

    prefix: str
    image_token: str
    image_token_id: int
    num_image_tokens: int
    infix: str
    suffix: str
    add_special_tokens: bool = False
    # True (Phi-3-V): the text before and after the image tag is tokenised separately, each chunk with
    # add_special_tokens (so <s> follows the image), and the tag becomes image_token_id repeated.
    tokenize_chunks: bool = False
    # True (Phi-3-V): each image's token count comes from lmm.hd (its crop grid); num_image_tokens is
    # then the largest count an image can get at hd.num_crops (the size limits are planned for).
    variable_image_tokens: bool = False

    def render(self, question: str) -> str:
        """The prompt text; with `tokenize_chunks` the image tag appears once (it is not tokenised)."""
        count = 1 if self.tokenize_chunks else self.num_image_tokens
        return self.prefix + self.image_token * count + self.infix + question + self.suffix


@dataclass(frozen=True)
class HDSeparators(Schema):
    """The projected layout separators, float 2 x hidden (.npy): row 0 sub_GN (after each row of
    tokens), row 1 glb_GN (between the crops and the global view)."""

    file: str
    dtype: str | None = None


@dataclass(frozen=True)
class HDTransformSpec(Schema):
    """Phi-3(.5)-Vision's HD transform (runtime/hd_transform.py) and `sub_glb` token layout
    (runtime/phi3v_layout.py); normalisation from lmm.preprocess.image_mean / image_std."""

    num_crops: int
    separators: HDSeparators
    crop_size: int = 336
    tokens_per_side: int = 12
    layout: str = "sub_glb"

    def check(self, where: str) -> None:
        if self.num_crops < 1 or self.crop_size < 1 or self.tokens_per_side < 1:
            raise ManifestError(f"{where}: num_crops, crop_size and tokens_per_side must be >= 1")
        if self.layout != "sub_glb":
            raise ManifestError(f"{where}.layout must be sub_glb, got {self.layout!r}")


@dataclass(frozen=True)
class ScorePrompt(Schema):
    question: str = vocab.SCORE_QUESTION
    answer_prefix: str = vocab.SCORE_ANSWER_PREFIX


@dataclass(frozen=True, kw_only=True)
class LmmSection(Section):
    architecture: str = "llava"  # ARCHITECTURES
    source: LmmSource | None = None
    vision: VisionGraph
    embedding: EmbeddingTable
    decoder: DecoderGraph
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    preprocess: VisionPreprocessSpec
    prompt: PromptSpec
    closed_set: dict[str, list[int]]  # {word: token ids}, vocab.closed_set_words()
    closed_set_forms: dict[str, dict[str, list[int]]] | None = None
    whole_image_phrases: list[str] = field(default_factory=lambda: list(vocab.WHOLE_IMAGE_PHRASES))
    score_prompt: ScorePrompt = field(default_factory=ScorePrompt)
    hd: HDTransformSpec | None = optional()  # phi3v only
    verification: LmmVerification | None = None

    def check(self, where: str) -> None:
        super().check(where)
        if self.architecture not in ARCHITECTURES:
            raise ManifestError(f"{where}.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "phi3v" and self.hd is None:
            raise ManifestError(f"{where}.hd is missing (a phi3v section needs its HD transform)")
        for words in vocab.closed_set_words().values():
            for word in words:
                if not self.closed_set.get(word):
                    raise ManifestError(f"{where}.closed_set.{word} must be a non-empty list of token ids")


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
