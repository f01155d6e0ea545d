"""Export-only nn.Module wrappers around a transformers LlavaForConditionalGeneration (or its
timm-tower sibling FastVlmForConditionalGeneration, export/llava_graphs.LLAVA_FAMILY).

`torch.onnx.export` cannot take what the model's own methods take or return: `get_image_features`
returns a per-image Python list (which freezes the batch size in the graph) and the decoder's
`past_key_values` is a transformers `DynamicCache` object (which neither exporter accepts). These
wrappers expose flat tensors instead, and compute exactly what the model computes:

- `VisionWrapper`: pixel_values float32 ``B x 3 x H x W`` (normalised, as the processor produces)
  -> image_features float32 ``B x N x hidden`` (vision tower, feature layer, select strategy,
  projector; N = image tokens per image). `FastVlmVisionWrapper`: the same I/O from a timm CNN
  tower (its last feature map ``B x C x h x w`` flattened row-major to N = h*w tokens, projector);
  `vision_wrapper(model)` picks the one the model's config calls for.
- `DecoderWrapper`: inputs_embeds ``B x S x hidden``, attention_mask int64 ``B x (P+S)``, position_ids
  int64 ``B x S`` and 2*L past tensors ``B x kv_heads x P x head_dim`` -> logits of the last
  position ``B x V`` and 2*L present tensors ``B x kv_heads x (P+S) x head_dim``. The
  `DynamicCache` is built inside `forward`, from the flat tensors.

The graph I/O names are the contract of docs/bundle.md ("Decoder graph I/O").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DecoderDims",
    "VisionWrapper",
    "FastVlmVisionWrapper",
    "vision_wrapper",
    "FlatKVDecoder",
    "DecoderWrapper",
    "decoder_dims",
    "decoder_input_names",
    "decoder_output_names",
    "VISION_INPUT_NAMES",
    "VISION_OUTPUT_NAMES",
]

VISION_INPUT_NAMES = ["pixel_values"]
VISION_OUTPUT_NAMES = ["image_features"]


@dataclass(frozen=True)
class DecoderDims:
    """Sizes of the language model that the decoder graph's I/O depends on."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int


def decoder_dims(text_config) -> DecoderDims:
    """Read the decoder sizes from a transformers text config (Phi-3, Llama, Qwen2, ...)."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return DecoderDims(
        num_layers=text_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=text_config.hidden_size,
        vocab_size=text_config.vocab_size,
        max_position_embeddings=text_config.max_position_embeddings,
    )


def decoder_input_names(num_layers: int) -> list[str]:
    """inputs_embeds, attention_mask, position_ids, then past_key_values.{i}.key/.value per layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past]


def decoder_output_names(num_layers: int) -> list[str]:
    """logits, then present.{i}.key/.value per layer."""
    return ["logits", *[f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]]


class VisionWrapper(nn.Module):
    """Vision tower + feature selection + projector for a batch, as `LlavaModel.get_image_features`.

    forward(pixel_values: float32 B x 3 x H x W) -> float32 B x N x hidden_size.
    Unlike `get_image_features` it returns one batched tensor (no per-image list), so the batch stays
    dynamic in the exported graph.
    """

    def __init__(self, llava_model: nn.Module) -> None:
        super().__init__()
        inner = llava_model.model
        config = llava_model.config
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [outputs.hidden_states[index] for index in layers]
        if self.select_strategy == "default":
            # "default" drops the CLS token that CLIP prepends; "full" keeps every position.
            selected = [hidden[:, 1:] for hidden in selected]
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return self.projector(features)


class FastVlmVisionWrapper(nn.Module):
    """Timm tower + projector, as `FastVlmModel.get_image_features` (which allows only the last layer
    and the "full" strategy): forward(pixel_values: float32 B x 3 x H x W) -> float32 B x (h*w) x
    hidden_size, token index i*w + j = feature-map cell (row i, column j)."""

    def __init__(self, fast_vlm_model: nn.Module) -> None:
        super().__init__()
        self.vision_tower = fast_vlm_model.model.vision_tower
        self.projector = fast_vlm_model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # do_pooling=False: the pooled output is never used; last_hidden_state is the same either way.
        features = self.vision_tower(pixel_values, do_pooling=False, return_dict=True).last_hidden_state
        return self.projector(features.flatten(2).transpose(1, 2))


def vision_wrapper(model: nn.Module) -> nn.Module:
    """The vision wrapper of a LLaVA-family model: FastVlmVisionWrapper for model_type "fast_vlm",
    else VisionWrapper."""
    return FastVlmVisionWrapper(model) if model.config.model_type == "fast_vlm" else VisionWrapper(model)


class FlatKVDecoder(nn.Module):
    """A transformers base decoder (`*Model`: embeddings-in, hidden states out) + lm_head with a flat
    KV cache; see the module docstring for shapes. Shared by every architecture's decoder graph
    (export/phi3v_wrappers.py uses it with its own rotary embedding).

    Only the last position's logits are returned: prefill would otherwise write S x V floats that
    nobody reads.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.num_layers = int(num_layers)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # Imported here: transformers is heavy and only export needs it.
        from transformers import DynamicCache

        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        # DynamicCache.from_legacy_cache is gone in transformers 5; the constructor takes the pairs.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state[:, -1, :])
        presents: list[torch.Tensor] = []
        for layer in outputs.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


class DecoderWrapper(FlatKVDecoder):
    """The decoder graph of a LlavaForConditionalGeneration (its language model + lm_head)."""

    def __init__(self, llava_model: nn.Module) -> None:
        super().__init__(
            llava_model.model.language_model, llava_model.lm_head, llava_model.config.get_text_config().num_hidden_layers
        )
