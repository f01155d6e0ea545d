"""One collated batch through the model, the pieces the training step (training/train.py) and its
validation (training/validation_metrics.run_validation) share: the records' images, the model's
inputs, the summed answer-token loss and the autocast context of a precision.
"""

from __future__ import annotations

import contextlib

from octopus_rt.errors import InputError

__all__ = ["load_images", "model_inputs", "answer_loss_sum", "autocast"]


def load_images(records, on_error: str, log):
    """(kept records, their PIL images); with on_error="skip" unloadable images are dropped and logged.

    Records that name the same image file share one decoded PIL image (the same object): batches grouped
    by image (`--group-by-image`) hold several questions about each image, and the callers never modify
    the images they are given."""
    from octopus_rt.training.dataset import load_image

    kept, images = [], []
    decoded: dict[str, object] = {}
    for record in records:
        key = str(record.image)
        try:
            if key not in decoded:
                decoded[key] = load_image(record)
            images.append(decoded[key])
        except InputError as exc:
            if on_error == "stop":
                raise InputError(f"{exc} (use --on-error skip to drop bad records)") from None
            log(f"skipped: {exc}")
            continue
        kept.append(record)
    return kept, images


def model_inputs(batch: dict) -> dict:
    """The model's keyword inputs of a collated batch: every key but the labels."""
    return {key: value for key, value in batch.items() if key != "labels"}


def answer_loss_sum(logits, labels):
    """Sum of next-token cross-entropies over answer positions. logits (B, L, V), labels (B, L)."""
    import torch.nn.functional as F

    from octopus_rt.training.collate import IGNORE_INDEX

    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1][keep].float(), shifted[keep], reduction="sum")


def autocast(device, precision: str):
    """Mixed precision for `precision` ("fp32": none; "bf16" / "fp16": torch.autocast on `device`)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
