"""Phi-3(.5)-Vision image tokens from per-crop features: the `sub_glb` HD layout as a numpy gather.

The vision graph returns, per crop, the projected 2x2-merged patch features (`crop_features`,
n x m^2 x H, row-major within the crop's m x m grid; crop 0 is the global view, then the crops row
by row) and the two projected separators (`separators`, 2 x H: sub_GN, glb_GN). The official
embedding (image_embedding_phi3_v.py, `hd_feature_transform`) lays the 4C-wide merged features out
and *then* projects; the projection acts on each token alone, so projecting first and laying out
the projected rows gives the same tokens. The layout, for a grid of rows x cols crops:

- the crops tiled into one (rows * m) x (cols * m) grid, read row by row, `sub_GN` after each row;
- `glb_GN`;
- the global view's m x m grid, row by row, `sub_GN` after each row.

Token count: (rows * cols + 1) * m^2 + 1 + (rows + 1) * m (runtime.hd_transform.num_image_tokens).
"""

from __future__ import annotations

import numpy as np

from octopus_rt.errors import InputError

__all__ = ["image_token_order", "assemble_image_tokens"]

SUB_SEPARATOR = 0  # row of `separators` holding the projected sub_GN
GLOBAL_SEPARATOR = 1  # row of `separators` holding the projected glb_GN


def image_token_order(grid: tuple[int, int], tokens_per_side: int) -> np.ndarray:
    """int64 (T,): for each image token, its row in concat(crop_features.reshape(-1, H), separators)
    where crop_features has 1 + rows * cols crops of m^2 tokens."""
    rows, cols = int(grid[0]), int(grid[1])
    m = int(tokens_per_side)
    if rows < 1 or cols < 1 or m < 1:
        raise InputError(f"crop grid and tokens per side must be positive, got {grid}, {m}")
    sub = (1 + rows * cols) * m * m + SUB_SEPARATOR
    glb = (1 + rows * cols) * m * m + GLOBAL_SEPARATOR
    big_r = np.arange(rows * m)[:, None]
    big_c = np.arange(cols * m)[None, :]
    crop = 1 + (big_r // m) * cols + (big_c // m)
    tiled = crop * m * m + (big_r % m) * m + (big_c % m)
    tiled = np.concatenate([tiled, np.full((rows * m, 1), sub)], axis=1).reshape(-1)
    local = np.arange(m * m).reshape(m, m)
    global_view = np.concatenate([local, np.full((m, 1), sub)], axis=1).reshape(-1)
    return np.concatenate([tiled, [glb], global_view]).astype(np.int64)


def assemble_image_tokens(crop_features: np.ndarray, separators: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1 + rows * cols) x m^2 x H crop features + 2 x H separators -> T x H image-token embeddings."""
    crop_features = np.asarray(crop_features)
    rows, cols = int(grid[0]), int(grid[1])
    if crop_features.ndim != 3 or crop_features.shape[0] != 1 + rows * cols:
        raise InputError(f"expected {1 + rows * cols} crops of features for a {rows}x{cols} grid, got {crop_features.shape}")
    m = int(round(crop_features.shape[1] ** 0.5))
    if m * m != crop_features.shape[1] or separators.shape != (2, crop_features.shape[2]):
        raise InputError(f"crop features {crop_features.shape} and separators {separators.shape} do not fit together")
    table = np.concatenate([crop_features.reshape(-1, crop_features.shape[2]), separators.astype(crop_features.dtype)])
    return table[image_token_order((rows, cols), m)]
