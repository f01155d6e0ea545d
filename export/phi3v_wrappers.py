"""Export-only wrapper of the Phi-3(.5)-Vision vision path (export.phi3v_model) for torch.onnx.export.

`Phi3VVisionWrapper`: pixel_values float32 N x 3 x S x S (the global view and the real crops of one
image, N = 1 + rows * cols, any N >= 1; S = 336 for the official tower)
-> crop_features float32 N x m^2 x H: per crop, the 2 x 2-merged CLIP features after the projection
   MLP, row-major over the crop's m x m grid (m = 12 officially, H = the decoder width).

`projected_separators(model)`: float32 2 x H, the projected sub_GN (row 0) and glb_GN (row 1). They
do not depend on the image, so the exporter stores them next to the graph rather than as a graph
output (a constant output folds into an initializer; kept away from TensorRT engines as a precaution).

Why the `sub_glb` layout is not in the graph: an image's token count and order depend on its crop
grid (rows x cols), which differs per aspect ratio. The projection acts on each token alone, so it
runs here on the crop tokens and on the two separators, and the runtime lays the projected rows
out with a gather (runtime.phi3v_layout) - pure data movement, no arithmetic. The graph then has one
dynamic dimension (the crop count) and no data-dependent shapes, which keeps TensorRT profiles
simple, and the zero padding crops of the official processor need not run at all.

`Phi3VDecoderWrapper`: the Phi-3 decoder in the flat-KV form of every octopus-rt decoder graph
(export/llava_wrappers.FlatKVDecoder: inputs_embeds, attention_mask, position_ids, past keys/values
-> last logits, presents), with the checkpoint's rope scaling. transformers' longrope picks the short
or long factors in Python from max(position_ids) + 1, which a traced graph would freeze into one
branch; `LongRopeSelect` computes both inverse-frequency tables and picks one per call with a `Where`
on the same condition, so the graph does what the PyTorch model does on every call (docs/phi3v.md,
"The longrope switch").
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from octopus_rt.export.llava_wrappers import FlatKVDecoder

__all__ = [
    "VISION_INPUT_NAMES",
    "VISION_OUTPUT_NAMES",
    "Phi3VVisionWrapper",
    "projected_separators",
    "LongRopeSelect",
    "Phi3VDecoderWrapper",
    "rope_switch_length",
]

VISION_INPUT_NAMES = ["pixel_values"]
VISION_OUTPUT_NAMES = ["crop_features"]


class Phi3VVisionWrapper(nn.Module):
    """CLIP tower + 2 x 2 merge + projection of a Phi3VForCausalLM's vision_embed_tokens (module doc)."""

    def __init__(self, model):
        super().__init__()
        self.vision = model.vision_embed_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision.img_projection(self.vision.crop_tokens(pixel_values))


def projected_separators(model) -> torch.Tensor:
    """2 x H float32: img_projection(sub_GN) and img_projection(glb_GN) of a Phi3VForCausalLM."""
    vision = model.vision_embed_tokens
    width = vision.glb_GN.shape[-1]
    with torch.no_grad():
        separators = torch.cat([vision.sub_GN.reshape(1, width), vision.glb_GN.reshape(1, width)])
        return vision.img_projection(separators).float()


def rope_switch_length(config) -> int | None:
    """original_max_position_embeddings of a longrope Phi-3 config (the sequence length above which
    the long factors apply), None without longrope."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") != "longrope":
        return None
    return int(params["original_max_position_embeddings"])


class LongRopeSelect(nn.Module):
    """Rotary cos/sin of a longrope Phi-3 with the short/long choice inside the graph.

    forward(x: any tensor of the output dtype, position_ids: int64 B x S) -> (cos, sin), each
    B x S x rotary_dim. Both inverse-frequency tables and the attention factor come from
    transformers' own longrope initialiser (the values its Phi3RotaryEmbedding uses); the table is
    the long one when max(position_ids) + 1 > original_max_position_embeddings, as in
    modeling_phi3_v.py's Phi3SuScaledRotaryEmbedding and transformers' longrope_frequency_update.
    Without longrope the single default table is used (`long_inv_freq` = `short_inv_freq`).
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        switch = rope_switch_length(config)
        if switch is None:
            from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

            short, scaling = Phi3RotaryEmbedding.compute_default_rope_parameters(config)
            long = short
            switch = 1 << 62
        else:
            initialise = ROPE_INIT_FUNCTIONS["longrope"]
            short, scaling = initialise(config, None)
            long, long_scaling = initialise(config, None, seq_len=switch + 1)
            if abs(long_scaling - scaling) > 1e-12:
                raise ValueError("longrope attention factor differs between the tables")
        self.register_buffer("short_inv_freq", short.float().clone(), persistent=False)
        self.register_buffer("long_inv_freq", long.float().clone(), persistent=False)
        self.switch = int(switch)
        self.attention_scaling = float(scaling)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longer = position_ids.max() + 1 > self.switch
        inv_freq = torch.where(longer, self.long_inv_freq, self.short_inv_freq)
        expanded = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = (expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


class Phi3VDecoderWrapper(FlatKVDecoder):
    """The Phi-3 decoder of a Phi3VForCausalLM as a flat-KV graph with in-graph longrope selection.

    The decoder runs on a shallow copy of transformers' Phi3Model whose `rotary_emb` is a
    LongRopeSelect: the layers and weights are shared with the model, which itself stays unchanged
    (tests compare the graph against it)."""

    def __init__(self, model) -> None:
        causal_lm = model.language_model
        inner = copy.copy(causal_lm.model)
        inner._modules = dict(inner._modules)  # a module table of its own: the model keeps its rotary_emb
        inner._modules["rotary_emb"] = LongRopeSelect(causal_lm.config)
        super().__init__(inner, causal_lm.lm_head, causal_lm.config.num_hidden_layers)
