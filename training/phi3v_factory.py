"""Seeded tiny Phi-3(.5)-Vision checkpoints in the official layout, for tests and benchmarks.

No real weights can be downloaded here, so every Phi-3.5-Vision path is exercised on checkpoints
built by this module, written exactly as Microsoft's folder is (export.phi3v_checkpoint):
config.json with `architectures: ["Phi3VForCausalLM"]`, `model_type: "phi3_v"`, `embd_layer`,
`img_processor` and `rope_scaling: {type: "su", short_factor, long_factor}`; safetensors shards with
the official key names + index; preprocessor_config.json; a Llama-SentencePiece-style tokenizer.

Small by default: CLIP at the official crop geometry (336 px, 14 px patches -> 12 x 12 merged
tokens per crop, so every layout and token count is the real one) but 32 wide and 3 layers deep;
a 64-wide 2-layer Phi-3 with longrope and original_max_position_embeddings 512, so prompts on both
sides of the short/long switch are cheap. The small CLIP is spelled out in
`img_processor.clip_config` (our extension, see export.phi3v_config).

The tokenizer mirrors Phi-3-Vision's tokenizer.json: normaliser Prepend("▁") + Replace(" ", "▁"),
no pre-tokenizer, byte-fallback BPE, `<s>` added by the post-processor, ids 0-2 <unk> <s> </s>,
3-258 the byte tokens, learned word pieces (the closed-set words as single "▁left"-style tokens),
unused fillers up to 32000, then the official added tokens 32000 <|endoftext|> ... 32044 <|image|>.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from octopus_rt import vocab

__all__ = [
    "ADDED_TOKENS",
    "CHAT_TEMPLATE",
    "TinyPhi3VSpec",
    "build_phi3v_tokenizer",
    "phi3v_config_dict",
    "phi3v_preprocessor_dict",
    "build_phi3v_checkpoint",
    "build_clip_l_phi3v_checkpoint",
]

# Phi-3-Vision's added tokens: (id, content, rstrip), from its tokenizer_config.json. All special,
# none normalised; </s> is not special there but is kept in the model vocab like <unk> and <s>.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (32000, "<|endoftext|>", False),
    (32001, "<|assistant|>", True),
    *((32001 + k, f"<|placeholder{k}|>", True) for k in range(1, 5)),
    (32006, "<|system|>", False),
    (32007, "<|end|>", False),
    (32008, "<|placeholder5|>", True),
    (32009, "<|placeholder6|>", True),
    (32010, "<|user|>", False),
    *((32004 + k, f"<|placeholder{k}|>", True) for k in range(7, 40)),
    (32044, "<|image|>", True),
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)
_BASE_VOCAB = 32000
_SENTENCES = (
    "The top left region is the most degraded.",
    "The bottom right region shows the least distortion.",
    "Which region is most degraded? Which region of the image is least affected?",
    "Describe this image. Describe the quality of the image.",
    "The whole image is affected by noise and blur.",
    "How would you rate the quality of this image? The quality of the image is",
    "Choose between one of the options as follows: A. B. C. D.",
    "The sky, the grass, the building, the person, the water, the road, the tree, the wall.",
)


def _corpus() -> list[str]:
    words = list(vocab.POSITION_WORDS + vocab.LEVEL_WORDS + vocab.OPTION_LETTERS) + list(vocab.DISTORTION_NAMES.values())
    lines = list(_SENTENCES) * 20 + [" ".join(words)] * 40
    for word in vocab.POSITION_WORDS + vocab.LEVEL_WORDS:
        lines += [f"{word} {word.capitalize()} the {word} region"] * 30
    return lines


def build_phi3v_tokenizer(learned: int = 700):
    """A tokenizers.Tokenizer laid out like Phi-3-Vision's (module docstring). Deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Word pieces never span punctuation or a word start, as in Llama's SentencePiece vocabulary.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"-()/▁")
    trainer = trainers.BpeTrainer(vocab_size=learned, initial_alphabet=alphabet, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].get)
    table = {"<unk>": 0, "<s>": 1, "</s>": 2}
    table.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in pieces:
        table.setdefault(piece, len(table))
    # Fillers are never produced (no merge leads to them): they only pad the vocab to 32000 ids.
    for k in range(_BASE_VOCAB - len(table)):
        table[f"<unused{k}>"] = len(table)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=table, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>")])
    tokenizer.add_tokens([AddedToken("</s>", normalized=False, rstrip=True, special=False)])
    for token_id, content, rstrip in ADDED_TOKENS:
        tokenizer.add_special_tokens([AddedToken(content, normalized=False, rstrip=rstrip, special=True)])
        if tokenizer.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {token_id}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    for word in vocab.POSITION_WORDS + vocab.LEVEL_WORDS:
        if tokenizer.token_to_id("▁" + word) is None:
            raise RuntimeError(f"the tiny tokenizer lacks the piece ▁{word}")
    return tokenizer


@dataclass
class TinyPhi3VSpec:
    """Sizes of a tiny Phi-3-Vision (module docstring). ~4.7M parameters, mostly the 32064-row tables."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 512
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    vision_intermediate: int = 64
    image_size: int = 336
    patch_size: int = 14
    num_crops: int = 4
    seed: int = 0


def _factors(count: int, top: float) -> list[float]:
    """count increasing factors from 1 to top (distinct short / long sets make the switch visible)."""
    return [round(1.0 + (top - 1.0) * i / max(count - 1, 1), 4) for i in range(count)]


def phi3v_config_dict(spec: TinyPhi3VSpec) -> dict:
    """config.json of the tiny checkpoint: Phi-3.5-vision-instruct's keys with small sizes."""
    half_dim = spec.text_hidden // spec.text_heads // 2
    grid = spec.image_size // spec.patch_size
    return {
        "_name_or_path": "octopus-rt/tiny-phi3v",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig", "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden,
        "img_processor": {
            "image_dim_out": spec.vision_hidden,
            "model_name": "octopus-rt/tiny-clip",
            "name": "clip_vision_model",
            "num_img_tokens": (grid // 2) ** 2,
            "clip_config": {
                "hidden_size": spec.vision_hidden, "intermediate_size": spec.vision_intermediate,
                "num_hidden_layers": spec.vision_layers, "num_attention_heads": spec.vision_heads,
                "image_size": spec.image_size, "patch_size": spec.patch_size, "projection_dim": spec.vision_hidden,
            },
        },
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "phi3_v",
        "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers,
        "num_key_value_heads": spec.text_kv_heads,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": _factors(half_dim, 40.0), "short_factor": _factors(half_dim, 3.0), "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 2 * spec.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }


def phi3v_preprocessor_dict(spec: TinyPhi3VSpec) -> dict:
    from octopus_rt.runtime.hd_transform import CLIP_MEAN, CLIP_STD

    return {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor", "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor"},
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": list(CLIP_STD),
        "num_crops": spec.num_crops,
        "num_img_tokens": (spec.image_size // spec.patch_size // 2) ** 2,
        "processor_class": "Phi3VProcessor",
    }


def _tokenizer_files(tokenizer, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    decoder = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": r, "single_word": False, "special": True}
               for i, c, r in ADDED_TOKENS}
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
               "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def build_phi3v_checkpoint(out_dir: str | os.PathLike[str], spec: TinyPhi3VSpec | None = None, *, max_shard_bytes: int = 12 * 1024**2) -> Path:
    """Build a seeded random tiny Phi-3-Vision and write it to out_dir in the official layout.

    The separators and projection get random values (official init is zeros for the separators),
    so tests can tell every piece apart. Returns out_dir."""
    import torch

    from octopus_rt.export.phi3v_checkpoint import save_official_layout
    from octopus_rt.export.phi3v_config import phi3v_spec_from_dicts
    from octopus_rt.export.phi3v_model import Phi3VForCausalLM

    spec = spec or TinyPhi3VSpec()
    model_spec = phi3v_spec_from_dicts(phi3v_config_dict(spec), phi3v_preprocessor_dict(spec))
    torch.manual_seed(spec.seed)
    model = Phi3VForCausalLM(model_spec).eval()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for separator in (model.vision_embed_tokens.glb_GN, model.vision_embed_tokens.sub_GN):
            separator.copy_(torch.randn(separator.shape, generator=generator))
    out_dir = Path(out_dir)
    save_official_layout(model, out_dir, max_shard_bytes=max_shard_bytes)
    _tokenizer_files(build_phi3v_tokenizer(), out_dir)
    return out_dir


def build_clip_l_phi3v_checkpoint(out_dir: str | os.PathLike[str], *, seed: int | None = None, text: dict | None = None,
                                  max_shard_bytes: int = 512 * 1024**2) -> Path:
    """The official CLIP ViT-L/14-336 tower (`img_processor` names it, no clip_config: 303 M
    parameters) + the tiny Phi-3 (or one of TinyPhi3VSpec's `text` sizes, e.g. {"text_hidden": 1536,
    "text_layers": 16, ...}), in bf16 shards of `max_shard_bytes`, with the tiny tokenizer files.

    Weights: constant 0.01 (seed None: cheap, for memory measurements of loading and merging), or
    seeded N(0, 0.02) with unit norm weights (`seed`, for exports whose verification needs a model
    that is not degenerate). Built on the meta device, each tensor created once. Returns out_dir."""
    import torch

    from octopus_rt.export.phi3v_checkpoint import save_official_layout
    from octopus_rt.export.phi3v_config import phi3v_spec_from_dicts
    from octopus_rt.export.phi3v_model import Phi3VForCausalLM

    tiny = TinyPhi3VSpec(**(text or {}))
    config = phi3v_config_dict(tiny)
    config["img_processor"] = {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                               "name": "clip_vision_model", "num_img_tokens": 144}
    spec = phi3v_spec_from_dicts(config, phi3v_preprocessor_dict(tiny))
    with torch.device("meta"):
        model = Phi3VForCausalLM(spec)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    norms = ("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")
    for name, param in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if generator is None:
            value = torch.full(param.shape, 0.01, dtype=torch.bfloat16)
        elif name.endswith(norms):
            value = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value)
    out_dir = Path(out_dir)
    save_official_layout(model, out_dir, dtype=torch.bfloat16, max_shard_bytes=max_shard_bytes)
    _tokenizer_files(build_phi3v_tokenizer(), out_dir)
    return out_dir
