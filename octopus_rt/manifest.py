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
The `engines` section (TensorRT) is read as a plain dict until its owner types it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from octopus_rt import vocab
from octopus_rt.errors import BundleError

__all__ = [
    "FileRecord",
    "LmmSource",
    "VisionGraph",
    "EmbeddingTable",
    "DecoderGraph",
    "TokenizerSpec",
    "VisionPreprocessSpec",
    "PromptSpec",
    "HDSeparators",
    "HDTransformSpec",
    "ScorePrompt",
    "ARCHITECTURES",
    "DECODER_FORMS",
    "LmmSection",
    "SamSource",
    "SamEncoderGraph",
    "SamDecoderGraph",
    "SamPreprocessSpec",
    "SamSection",
    "Defaults",
    "Manifest",
    "ManifestError",
    "parse_manifest",
]

T = TypeVar("T", bound="Schema")

# lmm.architecture: how the runtime turns an image + question into decoder inputs
# (runtime/image_stage.py): "llava" (one resized image, a fixed number of image tokens) or "phi3v"
# (Phi-3(.5)-Vision's HD crops, a per-image number of tokens, lmm.hd).
ARCHITECTURES = ("llava", "phi3v")
# lmm.decoder.form: the decoder graph's I/O contract. "flat_kv" = docs/bundle.md "Decoder graph I/O"
# (inputs_embeds, attention_mask, position_ids, 2L past tensors -> last logits, 2L presents).
DECODER_FORMS = ("flat_kv",)


class ManifestError(BundleError):
    """A manifest field is missing, mistyped or out of its allowed values; `problem` names it
    ("lmm.decoder.num_layers is missing") without the "bundle manifest: " prefix."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"bundle manifest: {problem}")
        self.problem = problem


def _optional(default: Any = None) -> Any:
    """A field that `to_dict` leaves out while it is None."""
    return field(default=default, metadata={"omit_if_none": True})


class Schema:
    """Reading (`from_dict`, validating) and writing (`to_dict`) for the dataclasses below."""

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str = "") -> T:
        """Validated instance from JSON data; `where` is the field path used in messages ("lmm")."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where or cls.__name__} must be an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{path} is missing")
                continue
            values[f.name] = _read(hints[f.name], data[f.name], path)
        instance = cls(**values)
        instance.check(where)
        return instance

    def check(self, where: str) -> None:
        """Rules across or inside fields beyond their types (ManifestError); none by default."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _write(value)
        return out


def _write(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_write(v) for v in value]
    return value


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def _read(kind: Any, value: Any, where: str) -> Any:
    """`value` checked against the type annotation `kind` (and nested schemas built)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message names the nested field
            return _read(options[0], value, where)
        for option in options:
            try:
                return _read(option, value, where)
            except ManifestError:
                continue
        wanted = " or ".join(_NAMES.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a))) for a in options)
        raise ManifestError(f"{where} must be {wanted}, got {type(value).__name__}")
    if isinstance(kind, type) and issubclass(kind, Schema):
        return kind.from_dict(value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where} must be a list, got {type(value).__name__}")
        return [_read(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} must be an object, got {type(value).__name__}")
        return {str(k): _read(args[1], v, f"{where}.{k}") for k, v in value.items()}
    ok = (type(value) is bool if kind is bool else
          isinstance(value, (int, float)) and type(value) is not bool if kind is float else
          isinstance(value, int) and type(value) is not bool if kind is int else
          isinstance(value, kind))
    if not ok:
        raise ManifestError(f"{where} must be {_NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------ shared pieces
@dataclass(frozen=True)
class FileRecord(Schema):
    """One file of a section (path relative to the section's `dir`)."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Section(Schema):
    """Fields of every section that owns files (docs/bundle.md, "Every section with files has")."""

    dir: str | None = _optional()  # folder relative to the bundle
    files: dict[str, FileRecord] | None = _optional()
    written: str | None = _optional()  # UTC ISO time of the commit
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


@dataclass(frozen=True)
class DecoderGraph(Schema):
    """The decoder graph with a flat KV cache (docs/bundle.md, "Decoder graph I/O")."""

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
    form: str = "flat_kv"  # DECODER_FORMS
    # Longrope (Phi-3): a sequence longer than this is rotated with the long factors; the graph picks the
    # table per call from max(position_ids) + 1, and the runtime re-prefills a cache computed at or below
    # this length when the sequence grows past it, as the official generate() does. None: no switch.
    original_max_position_embeddings: int | None = None

    def check(self, where: str) -> None:
        if self.form not in DECODER_FORMS:
            raise ManifestError(f"{where}.form must be one of {', '.join(DECODER_FORMS)}, got {self.form!r}")


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
    hd: HDTransformSpec | None = _optional()  # phi3v only
    verification: dict[str, Any] | None = None

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
    config: dict[str, Any] | None = _optional()  # custom only


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


# ------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class Defaults(Schema):
    """Per-bundle defaults of the runtime's options (`octopus-rt eval --sweep` rewrites tau and the mapping)."""

    tau: float = 1.0
    point_mapping: str = "paper"
    max_new_tokens: int = 64
    multimask: bool = True
    providers: dict[str, str] | None = _optional()  # {graph: "tensorrt" | "cuda" | "cpu"}


@dataclass(frozen=True)
class Manifest(Schema):
    format: str
    format_version: int
    lmm: LmmSection | None = _optional()
    sam: SamSection | None = _optional()
    engines: dict[str, Any] | None = _optional()
    defaults: Defaults = field(default_factory=Defaults)


def parse_manifest(data: Any) -> Manifest:
    """The typed manifest of a manifest.json's content; ManifestError (a BundleError) names the first
    missing, mistyped or disallowed field. The header's values (format name, supported version) and
    the paths' containment are checked where the file is read (`bundle.validate_manifest`)."""
    return Manifest.from_dict(data)
