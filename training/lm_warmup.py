"""A few minutes of plain language-model training for a model_factory LLaVA's text half.

Quantisation agreement (int8 / int4 vs fp32) means little on seeded random weights: their logits
are nearly flat, so tiny quantisation errors flip the top-1 and the cosine sits at 0.9-0.96 (issue
13). A model trained even briefly has the peaked next-token distributions of a real one. This
helper trains the language model and lm_head (the vision tower is left alone) on the factory
tokenizer's own corpus (model_factory's training corpus: the closed-set words, distortion names and
answer sentences), next-token cross-entropy, AdamW; the tests and benchmarks use it to measure the
export's agreement defaults on trained weights (docs/export.md).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["warm_up_text_model"]


def warm_up_text_model(
    model,
    tokenizer,
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` (LlavaForConditionalGeneration, fp32, in place) for `steps` AdamW steps on
    random `seq_len`-token windows of the factory corpus; returns the loss of every step."""
    import torch

    from octopus_rt.training.model_factory import training_corpus

    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(tokenizer("\n".join(training_corpus()), add_special_tokens=False)["input_ids"])
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses
