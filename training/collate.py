"""LLaVA conversations -> model inputs with labels on the answer tokens only.

The text is rendered with the model's own chat template (the processor's), so training sees exactly
the token sequence that export and the runtime feed the model: the runtime's prompt
``prefix + image_token * N + infix + question + suffix`` is this rendering cut after the
assistant tag. Answer tokens are found by character spans: for every assistant turn k, the
rendering of turns [0, k) with the generation prompt is a prefix of the rendering of turns [0, k];
the characters in between (the answer and the template's end-of-turn marker) are the answer span,
and every token that overlaps an answer span gets its own id as label (all others -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.training.dataset import IMAGE_TOKEN, TrainRecord, Turn

__all__ = ["EncodedText", "Collator", "IGNORE_INDEX", "messages_from_turns"]

IGNORE_INDEX = -100


@dataclass
class EncodedText:
    """One tokenized conversation. input_ids / labels: int64 arrays of equal length L."""

    input_ids: np.ndarray
    labels: np.ndarray

    @property
    def num_answer_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def messages_from_turns(turns: list[Turn]) -> list[dict]:
    """Chat messages in LLaVA's list-content form; the image item goes first in the first user turn."""
    messages = []
    for index, turn in enumerate(turns):
        content: list[dict] = [{"type": "text", "text": turn.text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": turn.role, "content": content})
    return messages


class Collator:
    """Tokenize conversations and batch them (right padding) with the processor's image transform.

    `encode(turns) -> EncodedText`; `batch(encoded, images) -> dict` of torch tensors:
    input_ids int64 (B, L), attention_mask int64 (B, L), labels int64 (B, L) with -100 outside
    answers and on padding, pixel_values float32 (B, 3, H, W).
    Right padding keeps the position ids of real tokens at 0..len-1, as at inference.
    """

    def __init__(self, processor, max_length: int | None = None) -> None:
        from PIL import Image

        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(processor, "chat_template", None):
            raise InputError("the base model's processor has no chat template (chat_template.jinja)")
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN) or IMAGE_TOKEN
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.max_length = max_length
        # How many placeholder tokens the processor puts per image: ask it, rather than re-deriving
        # patch size and CLS handling (processor-specific).
        size = processor.image_processor.crop_size if getattr(processor.image_processor, "do_center_crop", False) \
            else processor.image_processor.size
        height = size.get("height", size.get("shortest_edge", 224))
        width = size.get("width", size.get("shortest_edge", 224))
        probe = processor(images=[Image.new("RGB", (width, height))], text=[self.image_token], return_tensors="np")
        self.num_image_tokens = int(np.count_nonzero(probe["input_ids"][0] == self.image_token_id))
        bos = self.tokenizer.bos_token
        rendered = self.render([Turn("user", "x"), Turn("assistant", "y")], generation_prompt=False)
        # The template writes BOS itself when it starts with it; then the tokenizer must not add another.
        self.add_special_tokens = not (bos and rendered.startswith(bos))

    def render(self, turns: list[Turn], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages_from_turns(turns), tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt_text(self, question: str) -> str:
        """The single-turn inference prompt (what the runtime builds), image placeholder unexpanded."""
        return self.render([Turn("user", question)], generation_prompt=True)

    def encode(self, turns: list[Turn], image=None) -> EncodedText:
        """Token ids and answer-only labels of a conversation (see the module docstring). `image` is
        unused: a LLaVA image always takes num_image_tokens placeholders."""
        full = self.render(turns, generation_prompt=False)
        spans = []
        for k, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = self.render(turns[:k], generation_prompt=True)
            upto = self.render(turns[: k + 1], generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise InputError("the chat template does not render conversations incrementally; cannot mask answers")
            spans.append((len(before), len(upto)))
        ids, offsets = self._tokenize(full)
        # Spans are in the unexpanded text; shift those after the placeholder by the expansion.
        image_at = full.find(self.image_token)
        extra = len(self.image_token) * (self.num_image_tokens - 1)
        spans = [(a + extra, b + extra) if a > image_at else (a, b) for a, b in spans]
        in_answer = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            in_answer |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
        labels = np.where(in_answer, ids, IGNORE_INDEX)
        if self.max_length is not None and len(ids) > self.max_length:
            raise InputError(f"conversation of {len(ids)} tokens exceeds the maximum length {self.max_length}")
        return EncodedText(ids, labels)

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (L,), character offsets int64 (L, 2)) of `text` after expanding the image
        placeholder to num_image_tokens copies, as the processor does."""
        if self.image_token not in text:
            raise InputError(f"the chat template did not write the image placeholder {self.image_token!r}")
        expanded = text.replace(self.image_token, self.image_token * self.num_image_tokens, 1)
        encoding = self.tokenizer(expanded, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        return ids, np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    def encode_prompt(self, turns: list[Turn]) -> np.ndarray:
        """Token ids int64 (L,) of `turns` (ending with a user turn) plus the generation prompt: what
        the model sees before it answers."""
        return self._tokenize(self.render(turns, generation_prompt=True))[0]

    def pixel_values(self, images: list) -> "torch.Tensor":  # noqa: F821 - torch imported lazily
        import torch

        values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(values, dtype=torch.float32)

    def batch(self, encoded: list[EncodedText], images: list) -> dict:
        """Right-padded batch; see the class docstring for shapes."""
        import torch

        length = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.int64)
        for row, item in enumerate(encoded):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.from_numpy(item.input_ids)
            labels[row, :n] = torch.from_numpy(item.labels)
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": self.pixel_values(images),
        }

    def collate_records(self, records: list[TrainRecord], images: list) -> dict:
        return self.batch([self.encode(r.turns) for r in records], images)

    def generate(self, model, turns: list[Turn], image, max_new_tokens: int) -> str:
        """Greedy answer of `model` (LLaVA, LoRA-wrapped or not) to `turns` (ending with a user turn)
        about `image`, decoded without special tokens."""
        import torch

        device = next(model.parameters()).device
        ids = torch.from_numpy(self.encode_prompt(turns)).unsqueeze(0).to(device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   pixel_values=self.pixel_values([image]).to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
