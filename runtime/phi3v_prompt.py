"""Phi-3(.5)-Vision prompts: the chat markup and the official image-placeholder handling (pure python).

Microsoft's `Phi3VProcessor._convert_images_texts_to_inputs` (processing_phi3_v.py) turns a prompt
into ids like this, and the model was trained on exactly these ids:

- the prompt is split at the tags `<|image_k|>` (k = 1, 2, ... numbering the images);
- every text chunk, also an empty one, is tokenised **separately and with special tokens**, so each
  chunk starts with `<s>` (id 1): `<s>` appears again right after the image tokens;
- the tag `<|image_k|>` becomes the id `-k` repeated num_img_tokens[k - 1] times; the model's embedding
  clamps negative ids to 0 and writes the image features over those positions.

So "<|user|>\\n<|image_1|>\\nDescribe this image.<|end|>\\n<|assistant|>\\n" with one 672x672 image
(757 image tokens) is 4 + 757 + 12 = 773 ids with Phi-3.5-Vision's tokenizer (docs/phi3v.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from octopus_rt.errors import InputError

__all__ = ["IMAGE_TAG", "Phi3VPrompt", "phi3v_chat_prompt", "phi3v_prompt_ids", "embedding_ids"]

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")

# Phi-3.5-Vision's chat template for one user turn with one image, ending on the generation prompt.
# `<|assistant|>` strips whitespace to its right (rstrip), so the trailing newline adds no token.
_CHAT = "<|user|>\n{images}{question}<|end|>\n<|assistant|>\n"


def phi3v_chat_prompt(question: str, num_images: int = 1) -> str:
    """The chat markup of one user turn: "<|user|>\\n<|image_1|>\\n{question}<|end|>\\n<|assistant|>\\n"."""
    if IMAGE_TAG.search(question):
        raise InputError("the question must not contain image tags such as <|image_1|>")
    images = "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1))
    return _CHAT.format(images=images, question=question)


@dataclass(frozen=True)
class Phi3VPrompt:
    """Token ids of one prompt.

    input_ids: int64 (S,); the positions of image k hold -k.
    image_spans: (start, length) of each image tag's run of placeholder ids, in prompt order.
    """

    input_ids: np.ndarray
    image_spans: tuple[tuple[int, int], ...]

    @property
    def image_prefix_length(self) -> int:
        """Ids up to the end of the last image run: with one image and the chat markup, this prefix
        depends on the image only, so its KV cache can be reused across questions."""
        return max((start + length for start, length in self.image_spans), default=0)


def phi3v_prompt_ids(tokenizer, prompt: str, num_img_tokens: Sequence[int], add_special_tokens: bool = True) -> Phi3VPrompt:
    """Official placeholder handling (module docstring). `tokenizer` is a `tokenizers.Tokenizer` loaded
    from the checkpoint's tokenizer.json (its post-processor adds `<s>`); num_img_tokens[k - 1] is
    the token count of image k (runtime.hd_transform); add_special_tokens: per chunk (the official
    processor's True; the bundle's `lmm.prompt.add_special_tokens`)."""
    tags = IMAGE_TAG.findall(prompt)
    numbers = [int(tag[len("<|image_") : -len("|>")]) for tag in tags]
    unique = sorted(set(numbers))
    if unique != list(range(1, len(unique) + 1)):
        raise InputError(f"image tags must be numbered 1..n without gaps, got {unique}")
    if len(unique) != len(num_img_tokens):
        raise InputError(f"the prompt has {len(unique)} image tag(s) but {len(num_img_tokens)} image(s) were given")
    if any(int(n) < 1 for n in num_img_tokens):
        raise InputError(f"image token counts must be positive, got {list(num_img_tokens)}")
    chunks = [tokenizer.encode(chunk, add_special_tokens=add_special_tokens).ids for chunk in IMAGE_TAG.split(prompt)]
    ids: list[int] = list(chunks[0])
    spans = []
    for number, chunk in zip(numbers, chunks[1:]):
        spans.append((len(ids), int(num_img_tokens[number - 1])))
        ids.extend([-number] * int(num_img_tokens[number - 1]))
        ids.extend(chunk)
    return Phi3VPrompt(np.asarray(ids, dtype=np.int64), tuple(spans))


def embedding_ids(input_ids: np.ndarray) -> np.ndarray:
    """Ids for the token-embedding lookup: placeholders (negative) clamped to 0, as the model does."""
    return np.maximum(np.asarray(input_ids, dtype=np.int64), 0)
