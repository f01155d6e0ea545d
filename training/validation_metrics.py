"""Validation of a training run (`run_validation`, on the val split while training), scored with the runtime's closed-set code.

- Grounding positional-word accuracy (teacher forced): in each answer, at the position of the first
  horizontal word (left/right) and of the first vertical word (top/bottom), the model's next-token
  logits go through `octopus_rt.runtime.closed_set.closed_set_probs` over that axis's word token ids
  (the runtime's own closed-set softmax); the argmax word is compared with the reference word.
  Reported per axis and for both axes of a record at once.
- Referring accuracy: for records of task "referring", a greedy answer is generated and counts as
  right when the set of distortion names it mentions equals the set the reference answer mentions
  (`eval_metrics.distortion_keywords`, the same matching `octopus-rt eval` uses).
The torch side only produces logits; every probability is computed by the numpy closed-set module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from octopus_rt import vocab
from octopus_rt.runtime.closed_set import closed_set_probs
from octopus_rt.training.batches import answer_loss_sum, autocast, load_images, model_inputs

__all__ = ["closed_set_token_ids", "PositionTally", "position_tally", "ValidationResult", "run_validation"]


def closed_set_token_ids(tokenizer, words: tuple[str, ...]) -> list[list[int]]:
    """For each word, the token ids of its surface forms (`vocab.word_forms`): the form's single token,
    or its first sub-token that is not bare whitespace. Deduplicated, order kept."""
    result = []
    for word in words:
        ids: list[int] = []
        for form in vocab.word_forms(word):
            tokens = tokenizer.encode(form, add_special_tokens=False)
            for token in tokens:
                if tokenizer.decode([token]).strip():
                    if token not in ids:
                        ids.append(int(token))
                    break
        if not ids:
            raise ValueError(f"the tokenizer cannot write the closed-set word {word!r}")
        result.append(ids)
    return result


@dataclass
class PositionTally:
    """Counts of positional-word predictions: per axis (horizontal, vertical) and both at once."""

    horizontal_correct: int = 0
    horizontal_total: int = 0
    vertical_correct: int = 0
    vertical_total: int = 0
    both_correct: int = 0
    both_total: int = 0

    def add(self, other: "PositionTally") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in self.__dataclass_fields__], dtype=np.int64)

    @classmethod
    def from_array(cls, values) -> "PositionTally":
        return cls(*[int(v) for v in values])

    def accuracies(self) -> dict[str, float | None]:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {
            "pos_acc_horizontal": ratio(self.horizontal_correct, self.horizontal_total),
            "pos_acc_vertical": ratio(self.vertical_correct, self.vertical_total),
            "pos_acc": ratio(self.both_correct, self.both_total),
        }


def _axis_prediction(logits_row: np.ndarray, labels_row: np.ndarray, word_ids: list[list[int]]) -> tuple[int, int] | None:
    """(predicted word index, reference word index) at the first answer token of this axis, or None."""
    id_to_word = {token: index for index, ids in enumerate(word_ids) for token in ids}
    for position in np.flatnonzero(labels_row >= 0):
        word = id_to_word.get(int(labels_row[position]))
        if word is not None and position > 0:
            # The logits at position - 1 predict the token at `position`.
            probs = closed_set_probs(logits_row[position - 1], word_ids)
            return int(np.argmax(probs)), word
    return None


def position_tally(logits: np.ndarray, labels: np.ndarray, horizontal_ids, vertical_ids) -> PositionTally:
    """Tally positional-word accuracy over a batch. logits: float (B, L, V) at the label positions'
    predecessors (full teacher-forced logits); labels: int64 (B, L), -100 outside answers."""
    tally = PositionTally()
    for row in range(labels.shape[0]):
        h = _axis_prediction(logits[row], labels[row], horizontal_ids)
        v = _axis_prediction(logits[row], labels[row], vertical_ids)
        if h is not None:
            tally.horizontal_total += 1
            tally.horizontal_correct += int(h[0] == h[1])
        if v is not None:
            tally.vertical_total += 1
            tally.vertical_correct += int(v[0] == v[1])
        if h is not None and v is not None:
            tally.both_total += 1
            tally.both_correct += int(h[0] == h[1] and v[0] == v[1])
    return tally


@dataclass
class ValidationResult:
    """One validation pass: the validation loss, positional tallies and referring counts."""

    loss: float | None
    answer_tokens: int
    position: PositionTally = field(default_factory=PositionTally)
    referring_correct: int = 0
    referring_total: int = 0

    def as_dict(self) -> dict:
        out = {"val_loss": self.loss, "val_answer_tokens": self.answer_tokens, **self.position.accuracies(),
               "pos_n": self.position.both_total, "referring_n": self.referring_total,
               "referring_acc": self.referring_correct / self.referring_total if self.referring_total else None}
        return out


def run_validation(model, collator, records, *, dist=None, batch_size: int = 4, precision: str = "fp32",
                   max_samples: int | None = None, referring_max_new_tokens: int = 48, on_error: str = "stop"):
    """Validation loss, positional-word accuracy and referring accuracy (see
    training/validation_metrics.py) of `model` on `records` (sharded over processes when `dist` is
    given). Positional accuracy counts records of task "grounding", referring accuracy those of task
    "referring". Returns a ValidationResult. (`octopus-rt eval`, training/evaluate.py, measures an
    exported bundle instead.)"""
    import torch

    from octopus_rt.training.eval_metrics import distortion_keywords
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    device = next(model.parameters()).device
    records = list(records)[: max_samples] if max_samples else list(records)
    mine = records[rank::world]
    tokenizer = collator.tokenizer
    horizontal = closed_set_token_ids(tokenizer, vocab.HORIZONTAL_WORDS)
    vertical = closed_set_token_ids(tokenizer, vocab.VERTICAL_WORDS)
    was_training = model.training
    model.eval()
    loss_sum, tokens, tally = 0.0, 0, PositionTally()
    ref_ok, ref_n = 0, 0
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk, images = load_images(mine[start: start + batch_size], on_error, lambda _text: None)
            if not chunk:
                continue
            batch = {k: v.to(device) for k, v in collator.collate_records(chunk, images).items()}
            with autocast(device, precision):
                logits = model(**model_inputs(batch)).logits
            loss_sum += float(answer_loss_sum(logits, batch["labels"]))
            tokens += int((batch["labels"][:, 1:] >= 0).sum())
            # Positional accuracy is a grounding metric: other tasks may restate a region the question named.
            rows = [i for i, record in enumerate(chunk) if record.task == "grounding"]
            if rows:
                tally.add(position_tally(logits[rows].float().cpu().numpy(), batch["labels"][rows].cpu().numpy(),
                                         horizontal, vertical))
            for record, image in zip(chunk, images):
                if record.task != "referring":
                    continue
                text = collator.generate(model, record.turns[:1], image, referring_max_new_tokens)
                ref_n += 1
                ref_ok += int(distortion_keywords(text) == distortion_keywords(record.turns[1].text))
    model.train(was_training)
    sums = np.concatenate([[loss_sum, tokens, ref_ok, ref_n], tally.as_array()]).astype(np.float64)
    if dist is not None:
        sums = dist.all_sum(list(sums))
    loss = float(sums[0] / sums[1]) if sums[1] else None
    return ValidationResult(loss, int(sums[1]), PositionTally.from_array(sums[4:]), int(sums[2]), int(sums[3]))
