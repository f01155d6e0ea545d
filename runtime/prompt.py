"""The prompt of a question: text checks, token ids and where the image tokens go.

LLaVA-style bundles pre-render their chat template (`PromptSpec.render`: prefix + image_token *
num_image_tokens + infix + question + suffix, docs/bundle.md) and tokenise it in one call
(`template_prompt_ids`). Phi-3-Vision bundles tokenise the chunks around the image tag separately
(runtime/phi3v_prompt.py); both end as a `PromptIds`, whose image positions are where `Octopus`
puts the image-token embeddings (runtime/image_stage.py picks the recipe per architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.manifest_lmm import PromptSpec

__all__ = ["PromptIds", "check_text", "check_context", "locate_image_tokens", "template_prompt_ids"]


@dataclass(frozen=True)
class PromptIds:
    """One prompt's token ids.

    ids: int64 (S,); image positions hold the manifest's image_token_id (negative for Phi-3-V).
    split: length of the image prefix (everything up to the last image token), which depends on the
    image only and whose KV cache is shared by further questions about it.
    image_positions: int64 (T,), positions receiving the image tokens, in order.
    """

    ids: np.ndarray
    split: int
    image_positions: np.ndarray

    @property
    def lookup_ids(self) -> np.ndarray:
        """Ids for the embedding table: placeholders (negative ids) clamped to 0, as Phi-3-V does."""
        return np.maximum(self.ids, 0)


def check_text(text: object, what: str) -> None:
    """InputError unless `text` is a non-blank str that is valid Unicode (no lone surrogates, which a
    non-UTF-8 command-line argument becomes and which the tokenizer cannot take)."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text (it holds a lone surrogate: bytes in another encoding?)") from None


def check_context(prompt: PromptIds, context: int) -> PromptIds:
    """`prompt` unchanged, or InputError when it leaves no room in the model's context for an answer."""
    if len(prompt.ids) >= context:
        raise InputError(f"question too long: the prompt is {len(prompt.ids)} tokens and the model's context is {context}")
    return prompt


def locate_image_tokens(ids: np.ndarray, image_token_id: int, expected: int) -> PromptIds:
    """PromptIds of int64 `ids` whose `expected` image tokens carry `image_token_id`; OctopusError
    when the count differs (the question itself holds the image token's text)."""
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != expected:
        raise OctopusError(
            f"prompt has {len(where)} image tokens, the bundle expects {expected} "
            "(does the question contain the image token text?)"
        )
    return PromptIds(ids, int(where[-1]) + 1, where.astype(np.int64))


def template_prompt_ids(tokenizer: Any, spec: PromptSpec, question: str, answer_prefix: str = "") -> PromptIds:
    """The pre-rendered template's prompt (`answer_prefix` appended: the start of the answer, for
    scoring) tokenised in one call; spec.num_image_tokens image tokens expected."""
    check_text(question, "question")
    encoded = tokenizer.encode(spec.render(question) + answer_prefix, add_special_tokens=spec.add_special_tokens)
    return locate_image_tokens(np.asarray(encoded.ids, dtype=np.int64), spec.image_token_id, spec.num_image_tokens)
