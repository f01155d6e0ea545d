"""One vision-tower pass per distinct image of a batch (`octopus-rt train --group-by-image`).

Why: the data engine asks several questions about each image (4.7 per image in the demo recipe's LLaVA
training data), and in a small LLaVA with a CNN tower the tower is most of a training step (measured on the
demo model, 256 px, batch 8, one thread: tower forward + backward 1.2 s of a 1.4 s step). When a batch holds
the records of a few images (`MixedDataset(group_by_image=True)` keeps each image's records together in the
epoch order), the tower runs once per distinct image and its projected features are copied onto every
record's image tokens.

The result equals the plain per-record forward: the features are a function of the image alone and the
gradients of the copies add up in the backward pass. One exception: BatchNorm layers in training mode take
their batch statistics over the distinct images instead of over the records.

Supported: transformers LLaVA-family models (LlavaForConditionalGeneration, FastVLM), bare or inside a PEFT
wrapper: anything whose base model has `model.get_image_features(pixel_values=...)`, `get_input_embeddings()`
and `config.image_token_id`.
"""

from __future__ import annotations

__all__ = ["distinct_rows", "forward_shared_images"]


def distinct_rows(keys: list) -> tuple[list[int], list[int]]:
    """(first row of each distinct key in order of appearance, index into that list for every row)."""
    firsts: list[int] = []
    inverse: list[int] = []
    seen: dict = {}
    for row, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(row)
        inverse.append(seen[key])
    return firsts, inverse


def forward_shared_images(model, inputs: dict, inverse: list[int]):
    """The model's outputs for a batch whose `pixel_values` (U, 3, H, W) hold each distinct image once.

    inputs: the collated keyword inputs, `input_ids` / `attention_mask` (B, L) for B records and
    `pixel_values` for the U distinct images; inverse: for each of the B rows, its image's index in 0..U-1.
    Returns the model's output object with `image_hidden_states` (B * T, D): the projected features of each
    row's image (T image tokens of width D), as the plain forward returns them.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    input_ids = inputs["input_ids"]
    features = base.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))
    if features.shape[0] != max(inverse) + 1:
        raise ValueError(f"{features.shape[0]} images for rows that name {max(inverse) + 1}")
    per_row = features[torch.as_tensor(inverse, device=features.device)]  # (B, T, D)
    embeds = base.get_input_embeddings()(input_ids)
    slots = input_ids == base.config.image_token_id
    if int(slots.sum()) != per_row.shape[0] * per_row.shape[1]:
        raise ValueError(f"{int(slots.sum())} image tokens for {per_row.shape[0]} x {per_row.shape[1]} image features")
    flat = per_row.reshape(-1, per_row.shape[-1]).to(embeds.dtype)
    embeds = embeds.masked_scatter(slots.unsqueeze(-1), flat)
    outputs = model(inputs_embeds=embeds, **rest)
    outputs.image_hidden_states = flat
    return outputs
