"""Read an official-layout Phi-3(.5)-Vision checkpoint's configuration into transformers configs.

The checkpoint's config.json (`architectures: ["Phi3VForCausalLM"]`, `model_type: "phi3_v"`) names
remote code through `auto_map`; we never load or run that code. Instead this module reads the JSON
and builds the two transformers configs our native model (export.phi3v_model) is assembled from:

- `Phi3Config` for the decoder. The checkpoint's `rope_scaling` has `type: "su"` (Phi-3.5) with
  short and long factors; it becomes transformers' `rope_type: "longrope"` with
  `original_max_position_embeddings` inside the rope parameters (transformers 5 rejects the raw "su"
  dict: the original length is not carried over before the rename). `type: "yarn"` becomes longrope
  with the official yarn attention factor 0.1 ln(max / original) + 1.
- `CLIPVisionConfig` for the vision tower. The official code always builds CLIP ViT-L/14-336
  (`img_processor.model_name == "openai/clip-vit-large-patch14-336"`, config below). Our extension
  for smaller towers: `img_processor.clip_config`, a dict of CLIPVisionConfig fields, which wins
  when present (the official code ignores unknown keys but would build ViT-L; such a checkpoint is
  ours, not Microsoft's).

preprocessor_config.json gives `num_crops` (4 for Phi-3.5-Vision, 16 for Phi-3-Vision); without
the file we assume Phi-3.5-Vision's 4. Shapes and sources of every fact: docs/phi3v.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.jsonfile import read_json_object

__all__ = [
    "CLIP_VIT_L_336",
    "OFFICIAL_CLIP_NAME",
    "Phi3VSpec",
    "is_phi3v_config",
    "read_phi3v_spec",
    "phi3v_spec_from_dicts",
]

OFFICIAL_CLIP_NAME = "openai/clip-vit-large-patch14-336"
# image_embedding_phi3_v.py, CLIP_VIT_LARGE_PATCH14_336_CONFIG (same in vLLM's phi3v.py).
CLIP_VIT_L_336: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-5,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}
DEFAULT_NUM_CROPS = 4  # Phi-3.5-vision-instruct's preprocessor_config.json

# The embd_layer the official Phi3ImageEmbedding supports for HD images (anything else raises there too).
_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
# Phi3Config fields read from config.json (others, e.g. auto_map or embd_layer, are not decoder settings).
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
    "max_position_embeddings", "original_max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
)


def is_phi3v_config(config: dict) -> bool:
    """True for a Phi-3(-.5)-Vision config.json (by architecture or model type)."""
    return "Phi3VForCausalLM" in (config.get("architectures") or []) or config.get("model_type") == "phi3_v"


@dataclass(frozen=True)
class Phi3VSpec:
    """Everything the native model needs, parsed once from config.json + preprocessor_config.json.

    raw_config / preprocessor hold the JSON as read, so save_official_layout writes them back.
    layer_idx: CLIP hidden state the features come from (-2: second-to-last layer's output).
    """

    raw_config: dict
    preprocessor: dict
    text_kwargs: dict
    clip_kwargs: dict
    layer_idx: int
    num_crops: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    warnings: tuple[str, ...] = field(default=())

    @property
    def image_dim_out(self) -> int:
        return int(self.clip_kwargs["hidden_size"])

    @property
    def crop_size(self) -> int:
        """Side of a crop in pixels: the CLIP input size (336 for the official tower)."""
        return int(self.clip_kwargs["image_size"])

    @property
    def tokens_per_side(self) -> int:
        """Merged tokens per crop side: (image_size / patch_size) / 2 (12 for the official tower)."""
        return int(self.clip_kwargs["image_size"]) // int(self.clip_kwargs["patch_size"]) // 2

    @property
    def feature_layers(self) -> int:
        """CLIP encoder layers that run: hidden_states[layer_idx] is the output after this many."""
        total = int(self.clip_kwargs["num_hidden_layers"])
        return total + self.layer_idx + 1 if self.layer_idx < 0 else self.layer_idx

    def text_config(self):
        """transformers Phi3Config of the decoder."""
        from transformers import Phi3Config

        return Phi3Config(**self.text_kwargs)

    def clip_config(self):
        """transformers CLIPVisionConfig of the vision tower."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**self.clip_kwargs)


def read_phi3v_spec(model_dir: str | Path, num_crops: int | None = None) -> Phi3VSpec:
    """Parse model_dir/config.json (+ preprocessor_config.json); InputError on anything unsupported."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json", required=True)
    preprocessor = _read_json(model_dir / "preprocessor_config.json", required=False)
    return phi3v_spec_from_dicts(config, preprocessor, num_crops=num_crops)


def phi3v_spec_from_dicts(config: dict, preprocessor: dict | None = None, num_crops: int | None = None) -> Phi3VSpec:
    """Phi3VSpec from the parsed config.json and preprocessor_config.json dicts."""
    if not is_phi3v_config(config):
        raise InputError("config.json is not a Phi-3-Vision config (architectures lacks Phi3VForCausalLM)")
    preprocessor = dict(preprocessor or {})
    notes: list[str] = []
    embd = config.get("embd_layer")
    if not isinstance(embd, dict):
        raise InputError("config.json has no embd_layer dict; not an HD Phi-3-Vision checkpoint")
    for key, expected in _EMBD_LAYER.items():
        if embd.get(key) != expected:
            raise InputError(f"unsupported embd_layer.{key}={embd.get(key)!r} (supported: {expected!r})")
    clip_kwargs, layer_idx = _clip_kwargs(config.get("img_processor"))
    if num_crops is None:
        num_crops = preprocessor.get("num_crops")
        if num_crops is None:
            notes.append(f"no num_crops in preprocessor_config.json; using Phi-3.5-Vision's {DEFAULT_NUM_CROPS}")
            num_crops = DEFAULT_NUM_CROPS
    if int(num_crops) < 1:
        raise InputError(f"num_crops must be >= 1, got {num_crops}")
    from octopus_rt.runtime.hd_transform import CLIP_MEAN, CLIP_STD

    return Phi3VSpec(
        raw_config=config,
        preprocessor=preprocessor,
        text_kwargs=_text_kwargs(config),
        clip_kwargs=clip_kwargs,
        layer_idx=layer_idx,
        num_crops=int(num_crops),
        image_mean=tuple(float(v) for v in preprocessor.get("image_mean", CLIP_MEAN)),
        image_std=tuple(float(v) for v in preprocessor.get("image_std", CLIP_STD)),
        warnings=tuple(notes),
    )


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file() and not required:
        return {}
    return read_json_object(path, missing=f"{path} not found: not a checkpoint directory")


def _clip_kwargs(img_processor: Any) -> tuple[dict, int]:
    if not isinstance(img_processor, dict) or img_processor.get("name") != "clip_vision_model":
        raise InputError(f"unsupported img_processor {img_processor!r} (the official one is clip_vision_model)")
    if img_processor.get("type_feature", "patch") != "patch":
        raise InputError(f"unsupported img_processor.type_feature {img_processor['type_feature']!r} (official: patch)")
    custom = img_processor.get("clip_config")
    if isinstance(custom, dict):
        clip = {**CLIP_VIT_L_336, **custom}
    elif img_processor.get("model_name") == OFFICIAL_CLIP_NAME:
        clip = dict(CLIP_VIT_L_336)
    else:
        raise InputError(
            f"unknown vision tower {img_processor.get('model_name')!r}: expected {OFFICIAL_CLIP_NAME} "
            "or an img_processor.clip_config dict"
        )
    if int(img_processor.get("image_dim_out", clip["hidden_size"])) != int(clip["hidden_size"]):
        raise InputError(f"img_processor.image_dim_out {img_processor['image_dim_out']} != CLIP hidden size {clip['hidden_size']}")
    grid = int(clip["image_size"]) // int(clip["patch_size"])
    if grid % 2 or grid * int(clip["patch_size"]) != int(clip["image_size"]):
        raise InputError(f"CLIP image_size {clip['image_size']} must be an even multiple of patch_size {clip['patch_size']}")
    if "num_img_tokens" in img_processor and int(img_processor["num_img_tokens"]) != (grid // 2) ** 2:
        raise InputError(f"img_processor.num_img_tokens {img_processor['num_img_tokens']} != ({grid} / 2)^2 merged tokens")
    layer_idx = int(img_processor.get("layer_idx", -2))
    layers = int(clip["num_hidden_layers"])
    if not -layers - 1 <= layer_idx <= layers:
        raise InputError(f"img_processor.layer_idx {layer_idx} is outside the {layers}-layer CLIP tower")
    return clip, layer_idx


def _text_kwargs(config: dict) -> dict:
    kwargs = {key: config[key] for key in _TEXT_KEYS if key in config}
    kwargs["rope_theta"] = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("su", "longrope", "yarn"):
            raise InputError(f"unsupported rope_scaling type {kind!r} (Phi-3 uses su / longrope)")
        original = int(config.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings", 4096)))
        rope = {
            "rope_type": "longrope",
            "rope_theta": kwargs["rope_theta"],
            "short_factor": [float(v) for v in scaling["short_factor"]],
            "long_factor": [float(v) for v in scaling["long_factor"]],
            "original_max_position_embeddings": original,
        }
        scale = int(config.get("max_position_embeddings", original)) / original
        if scale >= 1.0:
            # The ratio transformers would derive itself; explicit, it silences a deprecation warning.
            rope["factor"] = scale
        if kind == "yarn":
            # modeling_phi3_v.py, Phi3YarnScaledRotaryEmbedding: cos/sin scaled by 0.1 ln(s) + 1.
            rope["attention_factor"] = 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0
        kwargs["rope_scaling"] = rope
        kwargs["original_max_position_embeddings"] = original
    return kwargs
