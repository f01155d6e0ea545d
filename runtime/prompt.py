"""The prompt of a question: text checks and token ids (the manifest's pre-rendered chat template).

The template is `PromptSpec.render`: prefix + image_token * num_image_tokens + infix + question +
suffix (docs/bundle.md). The image-token positions are where `Octopus` puts the vision features.
"""

from __future__ import annotations

from typing import Any

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.manifest import PromptSpec

__all__ = ["check_text", "prompt_ids"]


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


def prompt_ids(tokenizer: Any, spec: PromptSpec, context: int, question: str, answer_prefix: str = "") -> tuple[list[int], int]:
    """Token ids of the full prompt (`answer_prefix` appended: the start of the answer, for scoring)
    and the index just after the last image token. InputError for a bad or too long question;
    OctopusError when the question itself holds the image token text."""
    check_text(question, "question")
    ids = tokenizer.encode(spec.render(question) + answer_prefix, add_special_tokens=spec.add_special_tokens).ids
    positions = [i for i, t in enumerate(ids) if t == spec.image_token_id]
    if len(positions) != spec.num_image_tokens:
        raise OctopusError(
            f"prompt has {len(positions)} image tokens, the bundle expects {spec.num_image_tokens} "
            "(does the question contain the image token text?)"
        )
    if len(ids) >= context:
        raise InputError(
            f"question too long: the prompt is {len(ids)} tokens and the model's context is {context}"
        )
    return ids, positions[-1] + 1
