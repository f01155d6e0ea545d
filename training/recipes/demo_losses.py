"""Auxiliary losses of the demo recipe's LLaVA phase, as the trainer's `loss_hook(model, batch, outputs,
records) -> scalar tensor` (training/train.py adds each micro-batch's hook loss, averaged over the global
batch, to the answer loss).

Why they exist: the trainer's answer loss is the token-summed cross-entropy divided by the batch's answer
tokens, so the few tokens that carry a decision (two position words, the word "whole", a two-word distortion
name of a short referring answer) get a small share of a gradient dominated by template text and long
descriptions. Measured on the shipped round-4 model on its own training images: short referring answers
right 26.7 % (n=60), "least degraded" (HyD-G-min) both axes 1.7 % (n=60): under-fitted decisions, not only
a generalisation gap (docs/demo.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["patch_loss_hook", "closed_set_loss_hook", "whole_image_loss_hook", "answer_mean_loss_hook",
           "sum_hooks"]


def patch_loss_hook(data_dir: Path, probe_path: Path, grid: int, weight: float = 0.5, relative: float = 0.0):
    """loss_hook for the trainer: the dense per-patch loss of vision pretraining, through the frozen
    probe, on the image tokens the LLaVA just computed (keeps the vision features grounded while the
    language model learns to read them)."""
    import numpy as np
    import torch
    from PIL import Image

    from octopus_rt.training.recipes.vision_pretrain import _loss, load_probe, patch_targets

    probe = load_probe(probe_path)
    probe.requires_grad_(False)
    cache: dict[str, torch.Tensor] = {}

    def targets_of(record) -> torch.Tensor:
        key = str(record.image)
        if key not in cache:
            regions = record.raw["regions"]
            masks = {r["mask"]: np.asarray(Image.open(data_dir / r["mask"]).convert("L")) >= 128 for r in regions}
            cache[key] = torch.from_numpy(patch_targets(regions, masks, grid)).reshape(grid * grid, -1)
        return cache[key]

    def hook(model, batch, outputs, records):
        features = outputs.image_hidden_states
        if features is None:
            raise RuntimeError("the LLaVA returned no image_hidden_states; the per-patch loss needs them")
        features = features.reshape(len(records), grid * grid, -1)
        target = torch.stack([targets_of(r) for r in records])
        return weight * _loss(torch, probe(features), target, relative)

    return hook


def closed_set_loss_hook(tokenizer, weight: float):
    """loss_hook for the trainer: at every answer token that is a position word, the paper's
    closed-set softmax over that axis's words ({left, right} or {top, bottom}; a word's logit is the
    logsumexp over its surface forms' token ids) against the reference word, averaged over those
    tokens. Why: the plain answer loss averages over ~20 template tokens per answer, so the two
    position words that text-to-point reads get a tenth of the gradient; measured on the first demo
    build, training loss 0.07 while position words stayed near chance even on training images."""
    import torch

    from octopus_rt import vocab
    from octopus_rt.training.validation_metrics import closed_set_token_ids

    axes = [closed_set_token_ids(tokenizer, words) for words in (vocab.HORIZONTAL_WORDS, vocab.VERTICAL_WORDS)]
    id_tensors = [[torch.tensor(ids) for ids in word_ids] for word_ids in axes]

    def hook(model, batch, outputs, records):
        labels = batch["labels"][:, 1:]
        logits = outputs.logits[:, :-1]
        losses = []
        for word_ids, tensors in zip(axes, id_tensors):
            for index, ids in enumerate(tensors):
                at = torch.isin(labels, ids.to(labels.device))
                if not at.any():
                    continue
                picked = logits[at]  # (n, V)
                word_logits = torch.stack([picked[:, w].logsumexp(-1) for w in word_ids], dim=-1)
                target = torch.full((len(picked),), index, dtype=torch.long, device=picked.device)
                losses.append(torch.nn.functional.cross_entropy(word_logits, target, reduction="none"))
        if not losses:
            return outputs.logits.new_zeros(())
        return weight * torch.cat(losses).mean()

    return hook


def sum_hooks(*hooks):
    """One loss_hook that adds the given hooks' losses (None entries skipped)."""
    active = [h for h in hooks if h is not None]

    def hook(model, batch, outputs, records):
        return sum(h(model, batch, outputs, records) for h in active)

    return hook


def whole_image_loss_hook(tokenizer, weight: float):
    """loss_hook: the whole-image decision of grounding answers as a closed-set softmax. At the first answer
    token of a grounding record that is " whole" or a position word (the word after "The" in "The whole
    image is uniformly affected ..." / "The top left region ..."), two classes: "whole" (that token's logit)
    against "local" (logsumexp of the four position words' logits), cross-entropy against the reference,
    averaged over the grounding rows that have such a token. Rows are records in order (the collator's
    batch); other tasks are ignored."""
    import torch

    from octopus_rt import vocab
    from octopus_rt.errors import InputError

    def single(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = [i for i in ids if tokenizer.decode([i]).strip()]
        if len(ids) != 1:
            raise InputError(f"the whole-image loss needs {text!r} to be one token of this tokenizer, got {ids}; "
                             "train with whole_image_weight 0 or a tokenizer that keeps the position words whole")
        return int(ids[0])

    whole = single(" whole")
    local = torch.tensor([single(" " + w) for w in vocab.POSITION_WORDS])
    decisive = torch.cat([torch.tensor([whole]), local])

    def hook(model, batch, outputs, records):
        labels = batch["labels"][:, 1:]
        logits = outputs.logits[:, :-1]
        picked, targets = [], []
        for row, record in enumerate(records):
            if record.task != "grounding":
                continue
            at = torch.isin(labels[row], decisive.to(labels.device)).nonzero()
            if len(at) == 0:
                continue
            t = int(at[0])
            picked.append(logits[row, t])
            targets.append(0 if int(labels[row, t]) == whole else 1)
        if not picked:
            return outputs.logits.new_zeros(())
        z = torch.stack(picked)
        two = torch.stack([z[:, whole], z[:, local.to(z.device)].logsumexp(-1)], dim=-1)
        target = torch.tensor(targets, dtype=torch.long, device=z.device)
        return weight * torch.nn.functional.cross_entropy(two, target)

    return hook


def answer_mean_loss_hook(kinds: tuple[str, ...], weight: float):
    """loss_hook: for records of the given kinds ("task" or "task/subtask-prefix", e.g. "referring/short"),
    the mean next-token cross-entropy over the record's own answer tokens, averaged over those rows: each
    such answer counts as much as any other, whatever its length (the trainer's loss weights by tokens)."""
    import torch

    from octopus_rt.training.batches import answer_loss_sum
    from octopus_rt.training.collate import IGNORE_INDEX

    def wanted(record) -> bool:
        for kind in kinds:
            task, _, sub = kind.partition("/")
            if record.task == task and str(record.subtask or "").startswith(sub):
                return True
        return False

    def hook(model, batch, outputs, records):
        labels = batch["labels"]
        means = []
        for row, record in enumerate(records):
            count = int((labels[row, 1:] != IGNORE_INDEX).sum())  # answer tokens (labels shift by one)
            if wanted(record) and count:
                means.append(answer_loss_sum(outputs.logits[row:row + 1], labels[row:row + 1]) / count)
        if not means:
            return outputs.logits.new_zeros(())
        return weight * torch.stack(means).mean()

    return hook
