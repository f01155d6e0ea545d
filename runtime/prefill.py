"""The prompt prefill of `Octopus` (runtime/api.py), with what it shares per image (runtime/cache.py).

    prefill = PromptPrefill(model)                # an Octopus: its cache, image stage, decoder, tokenizer
    logits, state, entry, rgb, prompt_tokens = prefill.run(pending, question, "", timer, cached)

Steps (stage names as in `Answer.timings_ms`): the image's cache entry (`decode_image` on a miss),
the prompt ids (runtime/image_stage.py, per architecture), the shared prefix up to and including the
image tokens (`prefill_prefix`, cached per image with its ids and the image stage's key), then the
question's own tokens on a fork of that cache (`prefill`). `cached` collects the names of what was
reused ("vision", "prefix"), as `Answer.cached` reports them.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from octopus_rt.runtime.cache import ImageCache, ImageEntry
from octopus_rt.runtime.generate import Decoder, KVState
from octopus_rt.runtime.image_stage import ImageStage
from octopus_rt.runtime.images import PendingImage
from octopus_rt.runtime.profiling import StageTimer
from octopus_rt.runtime.prompt import PromptIds, check_context, check_text

__all__ = ["PrefillModel", "PromptPrefill", "decoded_rgb"]


class PrefillModel(Protocol):
    """What the prefill reads from its model (`Octopus`), at each call: the model may swap its image
    stage (e.g. for another num_crops; its `key` keeps the cached entries apart), and creates its
    decoder and tokenizer lazily. context: the decoder's max_position_embeddings."""

    cache: ImageCache
    image_stage: ImageStage
    context: int

    @property
    def decoder(self) -> Decoder: ...

    @property
    def tokenizer(self) -> Any: ...


def decoded_rgb(pending: PendingImage, rgb: np.ndarray | None, timer: StageTimer) -> np.ndarray:
    """`rgb` (H x W x 3 uint8) when the image was already decoded in this call, else the image decoded
    now under the "decode_image" stage (a cache hit skips decoding until a stage needs the pixels)."""
    if rgb is not None:
        return rgb
    with timer.stage("decode_image"):
        return pending.decode()


class PromptPrefill:
    """Prefills the prompts of one model (`PrefillModel`)."""

    def __init__(self, model: PrefillModel) -> None:
        self.model = model

    def prompt_ids(self, question: str, answer_prefix: str, image_size: tuple[int, int]) -> PromptIds:
        """The prompt's token ids (runtime/image_stage.py) for an image of (width, height)."""
        model = self.model
        return check_context(model.image_stage.prompt(model.tokenizer, question, answer_prefix, image_size), model.context)

    def entry(self, pending: PendingImage, timer: StageTimer) -> tuple[ImageEntry, np.ndarray | None]:
        """The image's cache entry (created, decoding the image, on a miss) and the RGB image if decoded."""
        entry = self.model.cache.get(pending.key)
        rgb = None
        if entry is None:
            rgb = decoded_rgb(pending, None, timer)
            entry = self.model.cache.put(pending.key, ImageEntry(size=(int(rgb.shape[1]), int(rgb.shape[0]))))
        return entry, rgb

    def features(self, entry: ImageEntry, pending: PendingImage, rgb, timer: StageTimer, cached: list[str]) -> np.ndarray:
        """Image-token embeddings T x hidden (cached per image and image-stage recipe)."""
        stage = self.model.image_stage
        if entry.features is not None and entry.features_key == stage.key:
            cached.append("vision")
            return entry.features
        entry.features = stage.image_tokens(decoded_rgb(pending, rgb, timer), timer)
        entry.features_key = stage.key
        return entry.features

    def run(
        self, pending: PendingImage, question: str, answer_prefix: str, timer: StageTimer, cached: list[str],
        new_tokens: int = 0,
    ) -> tuple[np.ndarray, KVState, ImageEntry, np.ndarray | None, int]:
        """Prefill the prompt: the shared prefix (cached per image) then the rest. Returns the last
        position's logits (V,), the cache after the prompt, the image's cache entry, the RGB image
        when it had to be decoded, and the prompt's length in tokens. `new_tokens`: the answer's token
        budget, so that a gqa-form KV buffer is allocated once for prompt + answer."""
        check_text(question, "question")
        entry, rgb = self.entry(pending, timer)
        prompt = self.prompt_ids(question, answer_prefix, entry.size)
        split = prompt.split
        prefix_ids = tuple(prompt.ids[:split].tolist())
        decoder, key = self.model.decoder, self.model.image_stage.key
        if entry.prefix is not None and entry.prefix_ids == prefix_ids and entry.prefix_key == key:
            cached.append("prefix")
            state = entry.prefix
        else:
            features = self.features(entry, pending, rgb, timer, cached)
            with timer.stage("prefill_prefix"):
                embeds = decoder.embed(prompt.lookup_ids[:split])
                embeds[0, prompt.image_positions] = features.astype(embeds.dtype)
                _, state = decoder.forward(embeds, decoder.empty_state(split))
            entry.prefix_ids, entry.prefix_key, entry.prefix = prefix_ids, key, state
        total = len(prompt.ids)
        with timer.stage("prefill"):
            # The cached prefix is never extended in place (a no-op for the immutable flat_kv states).
            state = decoder.fork(state, total + max(0, min(new_tokens, self.model.context - total)))
            logits, state = decoder.forward(decoder.embed(prompt.lookup_ids[split:]), state)
        return logits, state, entry, rgb, total
