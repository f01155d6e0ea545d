"""Native Phi-3(.5)-Vision in PyTorch: transformers' CLIPVisionModel + Phi3ForCausalLM + our own glue.

No remote code: the official `Phi3VForCausalLM` (modeling_phi3_v.py) is a Phi-3 decoder whose input
embedding (`Phi3ImageEmbedding`, image_embedding_phi3_v.py) writes image features over placeholder
positions. This module re-assembles it from transformers classes and states the glue here:

- vision features: CLIP up to `spec.feature_layers` encoder layers (hidden_states[-2] for the
  official layer_idx -2; the last layer and post_layernorm are in the checkpoint but unused), CLS
  dropped -> N x g^2 x C (g = 24 patches per side, C = 1024 for ViT-L/14-336).
- 2 x 2 merge: each 2 x 2 block of patches concatenated along channels in the order top-left,
  top-right, bottom-left, bottom-right -> N x m x m x 4C (m = g / 2 = 12).
- `sub_glb` layout per image: the crops tiled into (rows m) x (cols m) with `sub_GN` after each row,
  `glb_GN`, the global view m x m with `sub_GN` after each row; then the projection
  Linear(4C, H) -> GELU (erf) -> Linear(H, H).
- placeholders: ids < 0 (and > -1e9) are image positions; all ids are clamped to [0, vocab) for the
  token lookup, and the image tokens of all images, concatenated in image order, overwrite the
  placeholder positions in sequence order (official `index_put` on `nonzero` positions).

State-dict names: `language_model.<official key>` for decoder keys and `vision_embed_tokens.<rest>`
for `model.vision_embed_tokens.<rest>` keys (see export.phi3v_checkpoint for the exact mapping).
"""

from __future__ import annotations

import torch
from torch import nn

from octopus_rt.errors import InputError
from octopus_rt.export.phi3v_config import Phi3VSpec

__all__ = ["MAX_INPUT_ID", "Phi3VImageEmbedding", "Phi3VForCausalLM"]

MAX_INPUT_ID = int(1e9)  # image_embedding_phi3_v.py: ids in (-1e9, 0) are image placeholders


class Phi3VImageEmbedding(nn.Module):
    """The official `model.vision_embed_tokens` (minus `wte`, which is the decoder's embed_tokens)."""

    def __init__(self, spec: Phi3VSpec, hidden_size: int):
        super().__init__()
        from transformers import CLIPVisionModel

        width = 4 * spec.image_dim_out
        self.img_processor = CLIPVisionModel(spec.clip_config())
        # Official init is zeros; the checkpoint holds the trained values.
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.img_projection = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.feature_layers = spec.feature_layers
        self.tokens_per_side = spec.tokens_per_side
        self.crop_size = spec.crop_size

    @property
    def _tower(self) -> nn.Module:
        # transformers 5 flattened CLIPVisionModel; 4.x kept the modules under `.vision_model`.
        return getattr(self.img_processor, "vision_model", self.img_processor)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """N x 3 x S x S normalised crops -> N x g^2 x C patch features of the feature layer (no CLS)."""
        tower = self._tower
        dtype = tower.embeddings.patch_embedding.weight.dtype
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(dtype)))
        for layer in tower.encoder.layers[: self.feature_layers]:
            hidden = layer(hidden, attention_mask=None)
        return hidden[:, 1:]

    def merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """N x g^2 x C -> N x m x m x 4C, channels [top-left, top-right, bottom-left, bottom-right]."""
        n, length, channels = features.shape
        g = 2 * self.tokens_per_side
        if length != g * g:
            raise InputError(f"expected {g * g} patch features per crop, got {length}")
        m = self.tokens_per_side
        blocks = features.reshape(n, m, 2, m, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, m, m, 4 * channels)

    def crop_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """N x 3 x S x S -> N x m^2 x 4C merged (not yet projected) tokens, row-major per crop."""
        merged = self.merge_2x2(self.patch_features(pixel_values))
        return merged.reshape(merged.shape[0], -1, merged.shape[-1])

    def hd_layout(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image: (1 + rows cols) x m x m x 4C merged crops (global view first) -> T x 4C in the
        official `sub_glb` order (module docstring), before the projection."""
        m, width = self.tokens_per_side, merged.shape[-1]
        sub = self.sub_GN.reshape(1, 1, width)
        crops = merged[1 : 1 + rows * cols].reshape(rows, cols, m, m, width).permute(0, 2, 1, 3, 4)
        crops = crops.reshape(rows * m, cols * m, width)
        tiled = torch.cat([crops, sub.expand(rows * m, 1, width)], dim=1).reshape(-1, width)
        global_view = torch.cat([merged[0], sub.expand(m, 1, width)], dim=1).reshape(-1, width)
        return torch.cat([tiled, self.glb_GN.reshape(1, width), global_view])

    def forward(self, pixel_values: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """pixel_values B x K x 3 x S x S (K = num_crops + 1, zero crops allowed) and image_sizes
        B x 2 (padded height, width) -> per image a T_i x H tensor of image-token embeddings."""
        if pixel_values.ndim != 5:
            raise InputError(f"pixel_values must be images x crops x 3 x S x S, got {tuple(pixel_values.shape)}")
        images, crops = pixel_values.shape[:2]
        merged = self.crop_tokens(pixel_values.flatten(0, 1))
        m = self.tokens_per_side
        merged = merged.reshape(images, crops, m, m, merged.shape[-1])
        out = []
        for index in range(images):
            height, width = (int(v) for v in image_sizes[index])
            rows, cols = height // self.crop_size, width // self.crop_size
            if rows < 1 or cols < 1 or 1 + rows * cols > crops:
                raise InputError(f"image size {height}x{width} needs {1 + rows * cols} crops, pixel_values has {crops}")
            layout = self.hd_layout(merged[index], rows, cols)
            out.append(self.img_projection(layout.to(self.img_projection[0].weight.dtype)))
        return out


class Phi3VForCausalLM(nn.Module):
    """Native Phi-3(.5)-Vision: `language_model` (transformers Phi3ForCausalLM) + `vision_embed_tokens`.

    Build it with export.phi3v_checkpoint.load_phi3v (official checkpoint directory) or from a spec.
    """

    def __init__(self, spec: Phi3VSpec):
        super().__init__()
        from transformers import Phi3ForCausalLM

        self.spec = spec
        self.language_model = Phi3ForCausalLM(spec.text_config())
        self.vision_embed_tokens = Phi3VImageEmbedding(spec, self.language_model.config.hidden_size)

    @property
    def config(self):
        """The decoder's Phi3Config."""
        return self.language_model.config

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_sizes=None) -> torch.Tensor:
        """input_ids B x S (image k's positions hold -k) -> inputs_embeds B x S x H.

        With pixel_values (images x K x 3 x S x S) and image_sizes (images x 2), the image tokens of all
        images, concatenated in image order, fill the placeholder positions in row-major order."""
        embed_tokens = self.language_model.get_input_embeddings()
        placeholders = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
        ids = input_ids.clamp(min=0, max=embed_tokens.num_embeddings - 1)
        embeds = embed_tokens(ids)
        if pixel_values is None or image_sizes is None or not bool(placeholders.any()):
            return embeds
        features = torch.cat(self.vision_embed_tokens(pixel_values, image_sizes)).to(embeds.dtype)
        count = int(placeholders.sum())
        if features.shape[0] != count:
            raise InputError(f"the prompt has {count} image placeholder ids but the images give {features.shape[0]} tokens")
        return embeds.index_put(torch.nonzero(placeholders, as_tuple=True), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """Logits (and the KV cache when use_cache) of the decoder over the embedded prompt."""
        return self.language_model(
            inputs_embeds=self.embed(input_ids, pixel_values, image_sizes),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
