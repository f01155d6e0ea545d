"""Phi-3(.5)-Vision conversations -> model inputs, exactly as inference builds them.

Training must see what inference sees, so the pieces are the runtime's own: the image goes through
`runtime.hd_transform.HDTransform` (the official HD transform) and the text through
`runtime.phi3v_prompt` (the official chat markup and placeholder handling: the prompt is split at
`<|image_1|>`, every chunk is tokenised with `<s>`, the tag becomes `-1` repeated once per image
token). A conversation is rendered in the checkpoint's chat markup,

    <|user|>\\n<|image_1|>\\n{q1}<|end|>\\n<|assistant|>\\n{a1}<|end|>\\n<|user|>\\n{q2}<|end|>\\n<|assistant|>\\n{a2}<|end|>\\n

whose first user turn up to `<|assistant|>\\n` is the runtime's prompt for q1. Labels: for every
assistant turn k, the ids of the rendering of turns [0, k] minus those of turns [0, k) (which must
be a prefix: checked) are the answer tokens (the answer, `<|end|>` and its newline); every other
position is IGNORE_INDEX. This is the Phi-3CookBook's masking (prompt ignored, answer + `<|end|>`
learned), generalised to several turns.

Batches are right-padded with the config's pad id (32000): each sample keeps its own number of
image tokens (457 for a 2:1 image, 757 for a square one at 4 crops), so rows differ in length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.runtime.hd_transform import HDTransform, hd_image_size, num_image_tokens
from octopus_rt.runtime.phi3v_prompt import IMAGE_TAG, phi3v_chat_prompt, phi3v_prompt_ids
from octopus_rt.training.collate import IGNORE_INDEX, EncodedText
from octopus_rt.training.dataset import TrainRecord, Turn
from octopus_rt.jsonfile import read_json_object

__all__ = ["Phi3VCollator", "TokenizerView", "render_conversation"]

END = "<|end|>"


def render_conversation(turns: list[Turn]) -> str:
    """The chat markup of alternating user / assistant turns (module docstring); the image tag goes
    into the first user turn. A conversation ending on a user turn ends on `<|assistant|>\\n`."""
    parts = []
    for index, turn in enumerate(turns):
        if IMAGE_TAG.search(turn.text):
            raise InputError("conversation text must not contain image tags such as <|image_1|>")
        if turn.role == "user":
            parts.append(phi3v_chat_prompt(turn.text, num_images=1 if index == 0 else 0))
        else:
            parts.append(f"{turn.text}{END}\n")
    return "".join(parts)


class TokenizerView:
    """The two calls the validation metrics make on a tokenizer (`encode(text, add_special_tokens)`
    -> ids, `decode(ids, skip_special_tokens)` -> text), over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer) -> None:
        self.backend = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


class Phi3VCollator:
    """Tokenize conversations and batch them with the HD transform.

    `encode(turns, image) -> EncodedText` (input_ids int64 (L,) with -1 at the image positions,
    labels int64 (L,)); `batch(encoded, images) -> dict` of torch tensors: input_ids int64 (B, L)
    right-padded with pad_id, attention_mask int64 (B, L), labels int64 (B, L), pixel_values float32
    (B, num_crops + 1, 3, S, S) (global view, crops row-major, zero crops), image_sizes int64 (B, 2)
    (padded HD height, width). Every key but labels is a keyword input of Phi3VForCausalLM.
    """

    def __init__(self, model_dir: str | Path, spec) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{model_dir} has no tokenizer.json (the Phi-3.5-Vision tokenizer file)")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise InputError(f"cannot read {path}: {exc}") from None
        self.tokenizer = TokenizerView(backend)
        self.transform = HDTransform(num_crops=spec.num_crops, crop=spec.crop_size,
                                     tokens_per_side=spec.tokens_per_side, image_mean=spec.image_mean,
                                     image_std=spec.image_std)
        config = spec.raw_config
        end_id = backend.token_to_id(END)
        if end_id is None:
            raise InputError(f"{path} lacks the {END} token of the Phi-3 chat markup")
        pad = config.get("pad_token_id")
        self.pad_id = int(pad if pad is not None else backend.token_to_id("<|endoftext|>") or 0)
        self.stop_ids = {end_id, *_eos_ids(config), *_eos_ids(_read_json(model_dir / "generation_config.json"))}

    # ------------------------------------------------------------------ text

    def image_tokens(self, image) -> int:
        """Image tokens of `image` (a PIL image) after the HD transform, from its size alone."""
        t = self.transform
        return num_image_tokens(hd_image_size(image.width, image.height, t.num_crops, t.crop), t.crop, t.tokens_per_side)

    def prompt_ids(self, text: str, image_tokens: int) -> np.ndarray:
        """Official ids of `text` (holding `<|image_1|>`) for an image of `image_tokens` tokens."""
        return phi3v_prompt_ids(self.tokenizer.backend, text, [image_tokens]).input_ids

    def encode(self, turns: list[Turn], image) -> EncodedText:
        """Ids and answer-only labels of a conversation about `image` (module docstring)."""
        count = self.image_tokens(image)
        ids = self.prompt_ids(render_conversation(turns), count)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        for k, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = self.prompt_ids(render_conversation(turns[:k]), count)
            upto = self.prompt_ids(render_conversation(turns[: k + 1]), count)
            if not (np.array_equal(upto[: len(before)], before) and np.array_equal(ids[: len(upto)], upto)):
                raise InputError("the conversation does not tokenise incrementally; cannot mask the answers")
            labels[len(before): len(upto)] = upto[len(before):]
        return EncodedText(ids, labels)

    def encode_prompt(self, turns: list[Turn], image) -> np.ndarray:
        """Ids int64 (L,) of `turns` (ending with a user turn) up to `<|assistant|>`: the runtime's prompt."""
        return self.prompt_ids(render_conversation(turns), self.image_tokens(image))

    # ------------------------------------------------------------------ batches

    def pixel_inputs(self, images: list) -> tuple:
        """(pixel_values float32 (B, num_crops + 1, 3, S, S), image_sizes int64 (B, 2), token counts)."""
        import torch

        processed = [self.transform(image) for image in images]
        pixel_values = torch.from_numpy(np.stack([p.pixel_values for p in processed]))
        image_sizes = torch.tensor([p.image_size for p in processed], dtype=torch.int64)
        return pixel_values, image_sizes, [p.num_img_tokens for p in processed]

    def batch(self, encoded: list[EncodedText], images: list) -> dict:
        """Right-padded batch; see the class docstring for shapes."""
        import torch

        pixel_values, image_sizes, counts = self.pixel_inputs(images)
        length = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.int64)
        for row, (item, count) in enumerate(zip(encoded, counts)):
            placeholders = int(np.count_nonzero(item.input_ids < 0))
            if placeholders != count:  # encode() and the transform disagree: a bug, not bad input
                raise RuntimeError(f"sample {row}: {placeholders} image positions but the image gives {count} tokens")
            n = len(item.input_ids)
            input_ids[row, :n] = torch.from_numpy(item.input_ids)
            labels[row, :n] = torch.from_numpy(item.labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": pixel_values, "image_sizes": image_sizes}

    def collate_records(self, records: list[TrainRecord], images: list) -> dict:
        return self.batch([self.encode(r.turns, image) for r, image in zip(records, images)], images)

    # ------------------------------------------------------------------ generation

    def generate(self, model, turns: list[Turn], image, max_new_tokens: int) -> str:
        """Greedy answer of `model` (Phi3VForCausalLM, LoRA-wrapped or not) to `turns` (ending with a
        user turn) about `image`, decoded without special tokens; stops at `<|end|>` or an eos id."""
        import torch

        device = next(model.parameters()).device
        ids = torch.from_numpy(self.encode_prompt(turns, image)).unsqueeze(0).to(device)
        pixel_values, image_sizes, _ = self.pixel_inputs([image])
        generated: list[int] = []
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixel_values.to(device), image_sizes=image_sizes, use_cache=True)
            for _ in range(max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                if token in self.stop_ids:
                    break
                generated.append(token)
                step = torch.tensor([[token]], dtype=torch.int64, device=device)
                out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        return self.tokenizer.decode(generated, skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_json_object(path)


def _eos_ids(config: dict) -> list[int]:
    value = config.get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]
