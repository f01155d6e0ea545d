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
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VISION_INPUT_NAMES", "VISION_OUTPUT_NAMES", "Phi3VVisionWrapper", "projected_separators"]

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
