"""Closed-set softmax and text-to-point mapping (paper eqs. 2-4), in numpy.

This is the one implementation of the closed-set math: the runtime, the evaluation, the training
metrics and the PyTorch reference pipeline all call it.

Eq. 2 as printed, e^chi / tau, would cancel tau; we read it as e^(chi / tau). A word usually has
several token forms (" left", "Left", ...): their raw logits are first combined with logsumexp into
one score per word (the log of the summed un-normalised probability of the word), then the softmax
runs over the words' scores divided by tau.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "POINT_MAPPINGS",
    "word_scores",
    "closed_set_probs",
    "point_from_probs",
    "level_score",
]

POINT_MAPPINGS = ("paper", "quadrant")


def _logsumexp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    peak = np.max(values, axis=axis, keepdims=True)
    return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


def word_scores(logits: np.ndarray, word_token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """One score per word: logsumexp over the raw logits of the word's token forms.

    logits: (..., V) float, raw next-token logits. word_token_ids: K lists of token ids (non-empty).
    Returns (..., K) float64.
    """
    logits = np.asarray(logits, dtype=np.float64)
    scores = []
    for ids in word_token_ids:
        if len(ids) == 0:
            raise ValueError("every closed-set word needs at least one token id")
        scores.append(_logsumexp(logits[..., list(ids)], axis=-1))
    return np.stack(scores, axis=-1)


def closed_set_probs(
    logits: np.ndarray, word_token_ids: Sequence[Sequence[int]], tau: float = 1.0
) -> np.ndarray:
    """Softmax over the closed set of K words at temperature tau (paper eq. 2, read as e^(chi/tau)).

    logits: (..., V) raw next-token logits. Returns (..., K) probabilities summing to 1.
    """
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    scaled = word_scores(logits, word_token_ids) / tau
    scaled -= np.max(scaled, axis=-1, keepdims=True)
    weights = np.exp(scaled)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def point_from_probs(
    p_right: float | None,
    p_bottom: float | None,
    width: int,
    height: int,
    mapping: str = "paper",
) -> tuple[float, float]:
    """Point (x, y) in pixels of the original width x height image from the closed-set probabilities.

    "paper" (eq. 4): x = p_right * W, y = p_bottom * H.
    "quadrant": x = (1/4 + p_right / 2) * W, y likewise, so a confident answer lands at the centre of
    its quadrant instead of on the image border.
    An axis whose probability is None (the answer named no word of that axis) gets the centre, W/2 or H/2.
    """
    if mapping not in POINT_MAPPINGS:
        raise ValueError(f"unknown point mapping {mapping!r}; choose one of {', '.join(POINT_MAPPINGS)}")

    def coordinate(p: float | None, size: int) -> float:
        if p is None:
            return size / 2.0
        if mapping == "paper":
            return float(p) * size
        return (0.25 + 0.5 * float(p)) * size

    return coordinate(p_right, width), coordinate(p_bottom, height)


def level_score(level_probs: np.ndarray, weights: Sequence[float]) -> float:
    """Scalar quality score: the probability-weighted sum of the level weights (Q-Align convention)."""
    probs = np.asarray(level_probs, dtype=np.float64)
    return float(np.dot(probs, np.asarray(weights, dtype=np.float64)))
