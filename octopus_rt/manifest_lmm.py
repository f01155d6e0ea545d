"""The `lmm` section of the manifest, typed: the vision and decoder graphs, the embedding table, the
tokenizer, the image recipe, the prompt, Phi-3-V's HD transform and the closed-set token ids
(docs/bundle.md, the `lmm` section). The schema's rules are in octopus_rt/manifest.py's docstring;
`LmmSection.verification` is octopus_rt/verification.py's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from octopus_rt import vocab
from octopus_rt.manifest_section import Section
from octopus_rt.schema import ManifestError, Schema, optional
from octopus_rt.verification import LmmVerification

__all__ = [
    "ARCHITECTURES",
    "DECODER_FORMS",
    "LmmSource",
    "VisionGraph",
    "EmbeddingTable",
    "DecoderQuantization",
    "DecoderGraph",
    "TokenizerSpec",
    "VisionPreprocessSpec",
    "PromptSpec",
    "HDSeparators",
    "HDTransformSpec",
    "ScorePrompt",
    "LmmSection",
]

# lmm.architecture: how the runtime turns an image + question into decoder inputs
# (runtime/image_stage.py): "llava" (one resized image, a fixed number of image tokens) or "phi3v"
# (Phi-3(.5)-Vision's HD crops, a per-image number of tokens, lmm.hd).
ARCHITECTURES = ("llava", "phi3v")


@dataclass(frozen=True)
class LmmSource(Schema):
    model_dir: str
    architectures: list[str] = field(default_factory=list)
    text_model_type: str | None = None
    vision_model_type: str | None = None
    num_parameters: int | None = None


@dataclass(frozen=True)
class VisionGraph(Schema):
    """pixel_values B x 3 x H x W float32 -> image_features B x num_image_tokens x hidden_size float32.

    precision: the graph's weights and compute (fp32 | fp16 | int8; its I/O stays float32); absent in
    bundles written before `export lmm --vision-precision` existed, whose vision graph followed the
    section's precision (int4: fp32)."""

    file: str
    input_names: list[str] = field(default_factory=lambda: ["pixel_values"])
    output_names: list[str] = field(default_factory=lambda: ["image_features"])
    num_image_tokens: int | None = None
    hidden_size: int | None = None
    precision: str | None = optional()


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
