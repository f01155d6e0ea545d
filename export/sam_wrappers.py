"""Export-only wrappers around segment-anything modules (traced by `export/sam.py`, never shipped as code).

- `SamEncoderWrapper`: normalised, zero-padded image 1 x 3 x S x S float32 -> image_embeddings
  1 x C x h x w float32 (1 x 256 x 64 x 64 for official SAM). It is traced in fp32; fp16 is made
  from the graph (export/sam.py), keeping the nodes that `layer_norm_scopes` names in fp32.
- `SamDecoderWrapper`: the TensorRT-friendly prompt encoder + mask decoder. Unlike segment-anything's
  `SamOnnxModel` it has no `orig_im_size` input (a shape tensor in TensorRT; upscaling happens in
  the runtime, see runtime/sam_transforms.py) and it replaces `torch.repeat_interleave` in
  `MaskDecoder.predict_masks` (exported as OneHot nodes, which TensorRT refuses in shape
  computations) with broadcasting/`expand`. It returns the low-res logits of all 1 + K masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SamEncoderWrapper", "SamDecoderWrapper", "layer_norm_scopes"]


def layer_norm_scopes(module: nn.Module) -> list[str]:
    """Name fragments that the TorchScript ONNX exporter gives the nodes of every LayerNorm in `module`.

    The exporter names a node "/<scope>/.../<Op>", one scope per called module: the module's
    attribute name, or "<list>.<index>" for a child of a ModuleList / Sequential (e.g.
    "/encoder/blocks.0/norm1/LayerNormalization", "/encoder/neck/neck.1/ReduceMean"). A LayerNorm's
    nodes are those whose name contains "/<parent scope>/<own scope>/".
    """
    from segment_anything.modeling.common import LayerNorm2d

    def scope(parts: list[str]) -> str:
        return f"{parts[-2]}.{parts[-1]}" if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    fragments = []
    for name, child in module.named_modules():
        if isinstance(child, (nn.LayerNorm, LayerNorm2d)):
            parts = name.split(".")
            fragments.append(f"/{scope(parts[:-1])}/{scope(parts)}/" if len(parts) > 1 else f"/{parts[0]}/")
    return fragments


class SamEncoderWrapper(nn.Module):
    """image (1 x 3 x S x S float32, normalised + padded) -> image_embeddings (1 x C x S/p x S/p float32)."""

    def __init__(self, sam: Any) -> None:
        super().__init__()
        self.encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class SamDecoderWrapper(nn.Module):
    """Prompt encoder + mask decoder without orig_im_size and without repeat_interleave.

    Inputs (batch 1, N points dynamic):
      image_embeddings  1 x C x h x w float32
      point_coords      1 x N x 2 float32, XY in the encoder's input frame (after the resize)
      point_labels      1 x N float32 (1 fg, 0 bg, 2/3 box corners, -1 padding point)
      mask_input        1 x 1 x 4h x 4w float32 low-res logits of a previous prediction
      has_mask_input    1 float32 (1 uses mask_input, 0 ignores it)
    Outputs:
      low_res_masks     1 x M x 4h x 4w float32 logits, M = 1 + num_multimask_outputs (0 = single-mask)
      iou_predictions   1 x M float32
    """

    def __init__(self, sam: Any) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.img_size = sam.image_encoder.img_size
        # Constant of the graph: the dense positional encoding of the embedding grid.
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # As PromptEncoder._embed_points, with masks instead of boolean-index assignment (traceable).
        pe = self.prompt_encoder.pe_layer._pe_encoding((coords + 0.5) / self.img_size)
        labels = labels.unsqueeze(-1)
        embedding = pe * (labels != -1).to(pe.dtype)
        embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * (labels == -1).to(pe.dtype)
        for i in range(self.prompt_encoder.num_point_embeddings):
            embedding = embedding + self.prompt_encoder.point_embeddings[i].weight * (labels == i).to(pe.dtype)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        dense = has_mask_input * self.prompt_encoder.mask_downscaling(mask_input)
        return dense + (1 - has_mask_input) * self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.mask_decoder
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)

        # MaskDecoder.predict_masks, with the per-prompt batch expanded by broadcasting instead of
        # repeat_interleave(image_embeddings, tokens.shape[0]) (batch is 1 on both sides).
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = image_embeddings + dense
        pos_src = self.image_pe.expand(src.shape[0], -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = decoder.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = decoder.output_upscaling(src)
        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = decoder.iou_prediction_head(iou_token_out)
        return masks, iou_pred
