"""Validation metrics of a training run (`train.run_validation`, on the val split while training), scored with the runtime's closed-set code.

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

__all__ = ["closed_set_token_ids", "PositionTally", "position_tally", "ValidationResult"]


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
