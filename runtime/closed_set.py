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

from octopus_rt import vocab

__all__ = [
    "POINT_MAPPINGS",
    "word_scores",
    "closed_set_probs",
    "point_from_probs",
    "level_score",
    "AXES",
    "axis_token_ids",
    "first_mentions",
    "position_probs",
    "point_from_position_probs",
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


# --- Positional mentions in generated text (used by the runtime loop and the reference pipeline) ---

AXES: dict[str, tuple[str, ...]] = {"horizontal": vocab.HORIZONTAL_WORDS, "vertical": vocab.VERTICAL_WORDS}


def axis_token_ids(closed_set: dict[str, Sequence[int]]) -> dict[int, str]:
    """{token id: axis} for the positional words' token ids recorded in the manifest's `closed_set`.

    A generated token whose id is in this map *mentions* that axis (e.g. " left" -> "horizontal").
    For a word whose forms all span several tokens the manifest records the first sub-token, which
    then counts as the mention (documented limitation of single-token detection).
    """
    mapping: dict[int, str] = {}
    for axis, words in AXES.items():
        for word in words:
            for token_id in closed_set[word]:
                mapping.setdefault(int(token_id), axis)
    return mapping


def first_mentions(token_ids: Sequence[int], axis_ids: dict[int, str]) -> dict[str, int]:
    """{axis: index of the first generated token that mentions it}; axes never mentioned are absent.

    Only the first mention per axis counts ("top left ... the right part" uses "left").
    """
    steps: dict[str, int] = {}
    for step, token_id in enumerate(token_ids):
        axis = axis_ids.get(int(token_id))
        if axis is not None and axis not in steps:
            steps[axis] = step
    return steps


def position_probs(
    axis_logits: dict[str, np.ndarray], closed_set: dict[str, Sequence[int]], tau: float = 1.0
) -> dict[str, float]:
    """Closed-set probabilities per mentioned axis from the raw logits (V,) of the step that emitted
    the axis' first word: {"left", "right"} and/or {"top", "bottom"}, each pair summing to 1."""
    probs: dict[str, float] = {}
    for axis, logits in axis_logits.items():
        words = AXES[axis]
        values = closed_set_probs(np.asarray(logits), [closed_set[w] for w in words], tau)
        probs.update({w: float(p) for w, p in zip(words, values)})
    return probs


def point_from_position_probs(
    probs: dict[str, float], width: int, height: int, mapping: str = "paper"
) -> tuple[float, float] | None:
    """The point for `position_probs` output: None when no axis was mentioned, else eq. 4 (or the
    quadrant mapping) with the centre on an unmentioned axis."""
    if not probs:
        return None
    return point_from_probs(probs.get("right"), probs.get("bottom"), width, height, mapping)
