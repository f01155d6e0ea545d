"""Per-image cache: what several questions about one image can share.

Keyed by the image's content hash (runtime/images.py: file bytes for paths and bytes, pixels for
arrays and PIL images), bounded LRU over images. One entry holds
- `size`: (width, height) of the decoded, EXIF-rotated image;
- `features`: the image-token embeddings (N x hidden, runtime/image_stage.py) with the image stage's
  key they were made with (`features_key`: architecture and, for Phi-3-V, num_crops);
- `prefix`: the decoder's KV cache after the prompt's shared prefix up to and including the image
  tokens, with the token ids and the image stage key it was computed for (`prefix_ids`,
  `prefix_key`: a changed prompt prefix, image-token count or num_crops does not match), so a
  further question prefills only its own tokens;
- `sam_image`: the SAM stage's `SamImage` (image embedding and the sizes it was computed at).
Every cached value is immutable once stored (decoding makes new cache tensors), so sharing is safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from octopus_rt.runtime.generate import KVState

__all__ = ["ImageEntry", "ImageCache"]


@dataclass
class ImageEntry:
    size: tuple[int, int]
    features: np.ndarray | None = None
    features_key: tuple | None = None
    prefix_ids: tuple[int, ...] | None = None
    prefix_key: tuple | None = None
    prefix: KVState | None = None
    sam_image: Any = None  # runtime.sam_stage.SamImage


class ImageCache:
    """LRU of `ImageEntry` by content key; `max_images` = 0 disables caching."""

    def __init__(self, max_images: int = 4) -> None:
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self.max_images = max_images
        self._entries: OrderedDict[str, ImageEntry] = OrderedDict()

    def get(self, key: str) -> ImageEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: ImageEntry) -> ImageEntry:
        if self.max_images == 0:
            return entry
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_images:
            self._entries.popitem(last=False)
        return entry

    def keys(self) -> list[str]:
        """Content keys, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
