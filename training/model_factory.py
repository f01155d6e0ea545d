"""Build small LLaVA-style models from configs (seeded random weights), with tokenizer and processor.

No weights can be downloaded here, so every path (export, runtime, training, the demo model) is
exercised on models built by this module: a CLIP or SigLIP vision tower, the LLaVA projector and a
Phi-3 (fused qkv / gate_up projections), Llama (grouped-query attention) or Qwen2 language model,
saved with `save_pretrained` exactly like a real checkpoint (`LlavaForConditionalGeneration`
directory + processor + tokenizer files). `octopus-rt train` also starts the demo model from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from octopus_rt import vocab

__all__ = ["TinyLlavaSpec", "CHAT_TEMPLATES", "SPECIAL_TOKENS", "TIMM_TOWERS", "TIMM_STRIDE", "training_corpus",
           "build_tokenizer", "build_llava"]

# Vision towers built from timm networks (`vision_model` -> timm architecture, channels of its last
# feature map); they make a FastVLM.
TIMM_TOWERS = {"efficientnet_lite0": ("tf_efficientnet_lite0", 1280),
               "efficientnet_lite2": ("tf_efficientnet_lite2", 1280)}
TIMM_STRIDE = 32

# The special tokens of the tokenizers we build. "<image>" is the LLaVA image placeholder.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Chat templates in the style of the real checkpoints: llava-phi-3-mini (Phi-3 chat markup) and
# llava-1.5 (USER/ASSISTANT). Content is LLaVA's list form [{"type": "image"}, {"type": "text", ...}].
CHAT_TEMPLATES = {
    "phi3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "llava": (
        "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}

# Words the tokenizer must know as whole tokens: the closed sets and the answer vocabulary.
_CORPUS_WORDS = (
    " ".join(vocab.POSITION_WORDS + vocab.LEVEL_WORDS + vocab.OPTION_LETTERS)
    + " "
    + " ".join(vocab.DISTORTION_NAMES.values())
    + " "
    + " ".join(vocab.WHOLE_IMAGE_PHRASES)
)
_CORPUS_SENTENCES = (
    "The top left region is the most degraded.",
    "The bottom right region shows the least distortion.",
    "Which region is most degraded? Which region of the image is least affected?",
    "The whole image is affected by noise and blur.",
    "The quality of the image is excellent good fair poor bad.",
    "What distortions appear in the region? Describe the quality of the image.",
    "Choose between one of the options as follows: A. B. C. D.",
    "The sky, the grass, the building, the person, the water, the road, the tree, the wall.",
    "It suffers from blur and compression, so details are lost and edges look blocky.",
    "How would you rate the quality of this image? Rate the quality of the image.",
)


def training_corpus() -> list[str]:
    """The lines the factory tokenizer is trained on (closed-set words, distortion names, answer
    sentences); training/lm_warmup.py trains the text model on them too."""
    words = _CORPUS_WORDS.split()
    lines = list(_CORPUS_SENTENCES) * 20
    lines += [_CORPUS_WORDS] * 50
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 5
    for word in vocab.POSITION_WORDS + vocab.LEVEL_WORDS:
        lines += [f"{word} {word.capitalize()} The {word} region is {word}."] * 20
    return lines


def build_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048):
    """A sentencepiece-style BPE tokenizer (Metaspace, byte fallback off) trained on a small corpus.

    Returns a transformers PreTrainedTokenizerFast with bos "<s>", eos "</s>", pad "<pad>" and the
    chat special tokens of SPECIAL_TOKENS. Deterministic for a given vocab_size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"-()/ \n"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>", "<pad>")],
        model_max_length=model_max_length,
        padding_side="left",
    )
    return fast


@dataclass
class TinyLlavaSpec:
    """Sizes of a small LLaVA. Defaults give a ~0.3M-parameter model that exports in seconds."""

    text_model: str = "phi3"  # phi3 | llama | qwen2
    vision_model: str = "clip"  # clip | siglip | a TIMM_TOWERS name (a FastVLM: timm CNN tower, see build_llava)
    chat_template: str = "phi3"  # key of CHAT_TEMPLATES
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    seed: int = 0
    extra_text_config: dict = field(default_factory=dict)


def _text_config(spec: TinyLlavaSpec, tokenizer, vocab_size: int):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec.extra_text_config,
    )
    if spec.text_model == "phi3":
        return Phi3Config(**common, original_max_position_embeddings=spec.max_position_embeddings)
    if spec.text_model == "llama":
        return LlamaConfig(**common)
    if spec.text_model == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown text model {spec.text_model!r}; choose phi3, llama or qwen2")


def _vision_parts(spec: TinyLlavaSpec):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, SiglipImageProcessor, SiglipVisionConfig
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    common = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if spec.vision_model == "clip":
        config = CLIPVisionConfig(**common, projection_dim=spec.vision_hidden)
        processor = CLIPImageProcessor(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
            do_center_crop=True,
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        # CLIP prepends a CLS token; LLaVA's "default" strategy drops it.
        return config, processor, 1, "default"
    # SigLIP-style preprocessing (square resize, no crop, mean / std 0.5): patch (i, j) of the token grid
    # covers patch (i, j) of the image. 0.5 is also timm's pretrained_cfg of tf_efficientnet_lite0.
    square = SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    if spec.vision_model == "siglip":
        # SigLIP has no CLS token: keep every patch.
        return SiglipVisionConfig(**common), square, 0, "full"
    if spec.vision_model in TIMM_TOWERS:
        from transformers.models.timm_wrapper import TimmWrapperConfig

        # The CNN's last feature map (stride 32) becomes the image tokens (FastVLM flattens it row-major).
        architecture, channels = TIMM_TOWERS[spec.vision_model]
        return TimmWrapperConfig(architecture=architecture, do_pooling=False, hidden_size=channels), square, 0, "full"
    raise ValueError(f"unknown vision model {spec.vision_model!r}; choose clip, siglip or "
                     + " or ".join(TIMM_TOWERS))


def build_llava(out_dir: str | os.PathLike[str], spec: TinyLlavaSpec | None = None):
    """Build a seeded random LlavaForConditionalGeneration and save it (model, processor, tokenizer,
    generation config) to `out_dir` with save_pretrained. Returns (model, processor).

    With a timm CNN tower (`spec.vision_model` in TIMM_TOWERS) the model is transformers'
    FastVlmForConditionalGeneration instead: the LLaVA design (tower -> 2-layer GELU projector -> image
    tokens spliced at the `<image>` placeholders, LlavaProcessor) whose tower is a timm network and whose
    tokens are its last feature map, flattened row-major (image_size / 32 squared of them). Its tower
    weights are random here; the demo recipe loads ImageNet weights (training/recipes/teacher.py)."""
    import torch
    from transformers import (FastVlmConfig, FastVlmForConditionalGeneration, GenerationConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    spec = spec or TinyLlavaSpec()
    tokenizer = build_tokenizer(spec.vocab_size, spec.max_position_embeddings)
    tokenizer.chat_template = CHAT_TEMPLATES[spec.chat_template]
    vocab_size = len(tokenizer)
    vision_config, image_processor, extra_tokens, strategy = _vision_parts(spec)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    timm_tower = spec.vision_model in TIMM_TOWERS
    if timm_tower and spec.patch_size != TIMM_STRIDE:
        raise ValueError(f"a {spec.vision_model} tower has stride {TIMM_STRIDE}: give patch_size={TIMM_STRIDE}")
    num_image_tokens = (spec.image_size // spec.patch_size) ** 2
    common = dict(
        vision_config=vision_config,
        text_config=_text_config(spec, tokenizer, vocab_size),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        image_seq_length=num_image_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    if timm_tower:
        import timm

        model = FastVlmForConditionalGeneration(FastVlmConfig(**common, vision_feature_layer=-1)).eval()
        # timm's own initialisation for the tower: the transformers wrapper's generic one (normal 0.02 for
        # every convolution) makes activations vanish through the depth (features ~1e-22: an image-blind
        # model that no parity test could tell from a broken one).
        torch.manual_seed(spec.seed)
        fresh = timm.create_model(vision_config.architecture, pretrained=False, num_classes=0)
        model.model.vision_tower.timm_model.load_state_dict(fresh.state_dict())
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common, vision_feature_layer=-2)).eval()
    end_ids = [tokenizer.eos_token_id]
    if spec.chat_template == "phi3":
        end_ids.append(tokenizer.convert_tokens_to_ids("<|end|>"))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=CHAT_TEMPLATES[spec.chat_template],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor
