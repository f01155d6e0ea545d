"""Text-to-point of the PyTorch reference pipeline (paper eqs. 2-4), in torch, apart from the runtime.

The runtime's numpy version (runtime/closed_set.py) is what the parity tests check; computing the
reference with the same code would make that check prove nothing, so this is a second, independent
implementation from the paper and the documented conventions (README "Text-to-point"):

- a word's score is the logsumexp of the raw logits of its token forms (the log of the word's summed
  unnormalised probability);
- eq. 2, read as e^(chi / tau): p = softmax(scores / tau) over the closed set of words;
- the step that scores an axis is the first generated token that is one of that axis' word tokens;
  an axis the answer never names has no probability and its coordinate is the image centre;
- eq. 4 ("paper"): x = p_right * W, y = p_bottom * H; "quadrant": x = (1/4 + p_right / 2) * W;
- the quality score (Q-Align) is sum_i p_i * w_i over the level words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from octopus_rt import vocab

__all__ = ["word_probabilities", "axis_steps", "axis_probabilities", "point_for", "weighted_score"]


def word_probabilities(logits, words_token_ids: Sequence[Sequence[int]], tau: float = 1.0) -> list[float]:
    """Probabilities of K words from raw next-token logits (V,) at temperature tau."""
    row = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    scores = torch.stack([torch.logsumexp(row[torch.tensor(list(ids), dtype=torch.long)], dim=0)
                          for ids in words_token_ids])
    return torch.softmax(scores / float(tau), dim=0).tolist()


def axis_steps(tokens: Sequence[int], closed_set: dict[str, Sequence[int]]) -> dict[str, int]:
    """{"horizontal" / "vertical": index of the first generated token naming a word of that axis}."""
    axes = {"horizontal": vocab.HORIZONTAL_WORDS, "vertical": vocab.VERTICAL_WORDS}
    found: dict[str, int] = {}
    for axis, words in axes.items():
        members = {int(t) for word in words for t in closed_set[word]}
        hits = [index for index, token in enumerate(tokens) if int(token) in members]
        if hits:
            found[axis] = hits[0]
    return found


def axis_probabilities(step_logits: Sequence, tokens: Sequence[int], closed_set: dict[str, Sequence[int]],
                       tau: float) -> dict[str, float]:
    """{"left", "right", "top", "bottom"} probabilities (only the named axes) from each generation
    step's raw logits (`step_logits[i]` produced `tokens[i]`)."""
    axes = {"horizontal": vocab.HORIZONTAL_WORDS, "vertical": vocab.VERTICAL_WORDS}
    probs: dict[str, float] = {}
    for axis, step in axis_steps(tokens, closed_set).items():
        words = axes[axis]
        probs.update(zip(words, word_probabilities(step_logits[step], [closed_set[w] for w in words], tau)))
    return probs


def point_for(probs: dict[str, float], width: int, height: int, mapping: str) -> tuple[float, float] | None:
    """Eq. 4 (or the quadrant mapping) from `axis_probabilities`; None when no axis is named."""
    if not probs:
        return None

    def place(p: float | None, size: int) -> float:
        if p is None:
            return size / 2.0
        return p * size if mapping == "paper" else (0.25 + 0.5 * p) * size

    return place(probs.get("right"), width), place(probs.get("bottom"), height)


def weighted_score(probs: Sequence[float], weights: Sequence[float]) -> float:
    """sum_i p_i * w_i (Q-Align's expected level)."""
    return float(torch.dot(torch.tensor(list(probs), dtype=torch.float64), torch.tensor(list(weights), dtype=torch.float64)))
