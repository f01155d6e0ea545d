"""Closed-set softmax and text-to-point mapping (paper eqs. 2-4) against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from octopus_rt import vocab
from octopus_rt.runtime.closed_set import closed_set_probs, level_score, point_from_probs, word_scores


def test_single_form_words_reduce_to_plain_softmax_with_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50)
    ids = [[3], [17]]
    for tau in (0.25, 1.0, 4.0):
        expected = np.exp(logits[[3, 17]] / tau)
        expected /= expected.sum()
        np.testing.assert_allclose(closed_set_probs(logits, ids, tau), expected, rtol=1e-12)


def test_temperature_is_not_cancelled():
    # Eq. 2 as printed (e^chi / tau) would make tau irrelevant; e^(chi / tau) must sharpen as tau falls.
    logits = np.zeros(10)
    logits[1], logits[2] = 2.0, 1.0
    sharp = closed_set_probs(logits, [[1], [2]], tau=0.5)[0]
    soft = closed_set_probs(logits, [[1], [2]], tau=2.0)[0]
    assert sharp > soft > 0.5


def test_word_forms_combine_by_logsumexp():
    logits = np.array([0.0, 1.0, 2.0, -1.0, 0.5])
    scores = word_scores(logits, [[1, 2], [3, 4]])
    assert scores[0] == pytest.approx(math.log(math.exp(1.0) + math.exp(2.0)))
    assert scores[1] == pytest.approx(math.log(math.exp(-1.0) + math.exp(0.5)))
    probs = closed_set_probs(logits, [[1, 2], [3, 4]], tau=1.0)
    total = math.exp(1) + math.exp(2) + math.exp(-1) + math.exp(0.5)
    assert probs[0] == pytest.approx((math.exp(1) + math.exp(2)) / total)


def test_batched_logits_and_extreme_values_stay_finite():
    logits = np.array([[1000.0, 999.0, -1000.0], [-1e4, -1e4, 0.0]])
    probs = closed_set_probs(logits, [[0], [1]], tau=0.1)
    assert probs.shape == (2, 2)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)


def test_bad_temperature_and_empty_word_are_rejected():
    with pytest.raises(ValueError):
        closed_set_probs(np.zeros(4), [[0], [1]], tau=0.0)
    with pytest.raises(ValueError):
        word_scores(np.zeros(4), [[0], []])


def test_point_mappings():
    assert point_from_probs(1.0, 0.0, 200, 100, "paper") == (200.0, 0.0)
    assert point_from_probs(0.3, 0.8, 200, 100, "paper") == pytest.approx((60.0, 80.0))
    # Quadrant mapping: a confident answer lands at the quadrant centre, never on the border.
    assert point_from_probs(1.0, 0.0, 200, 100, "quadrant") == pytest.approx((150.0, 25.0))
    assert point_from_probs(0.5, 0.5, 200, 100, "quadrant") == pytest.approx((100.0, 50.0))
    # An axis the answer never named falls back to the centre of that axis.
    assert point_from_probs(None, 1.0, 200, 100, "paper") == (100.0, 100.0)
    with pytest.raises(ValueError):
        point_from_probs(0.5, 0.5, 10, 10, "diagonal")


def test_level_score_uses_weights():
    probs = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    expected = sum(p * w for p, w in zip(probs, vocab.LEVEL_WEIGHTS))
    assert level_score(probs, vocab.LEVEL_WEIGHTS) == pytest.approx(expected)


def test_position_terms_follow_equation_one():
    assert vocab.position_terms((49.9, 10), 100, 100) == ("left", "top")
    assert vocab.position_terms((50.0, 50.0), 100, 100) == ("right", "bottom")
    assert vocab.position_phrase("left", "top") == "top left"


def test_word_forms_cover_spacing_and_case_but_not_lowercase_letters():
    assert set(vocab.word_forms("left")) == {"left", " left", "Left", " Left"}
    assert set(vocab.word_forms("A")) == {"A", " A"}


def test_whole_image_detection_and_mcq_layout():
    assert vocab.says_whole_image("The Whole Image suffers from noise.")
    assert not vocab.says_whole_image("The top left region is blurred.")
    text = vocab.format_mcq_question("Is it blurry?", ["Yes", "No"])
    assert text.endswith("A. Yes\nB. No")
    with pytest.raises(ValueError):
        vocab.format_mcq_question("Too many?", ["1", "2", "3", "4", "5"])


def test_the_reference_closed_set_follows_the_same_equations():
    """export/reference_closed_set.py (torch, the parity reference) against direct computations."""
    pytest.importorskip("torch")
    from octopus_rt.export import reference_closed_set as ref

    logits = np.array([0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    closed = {"left": [1, 2], "right": [3, 4], "top": [5], "bottom": [0]}
    tau = 0.5
    left, right = math.exp(1.0) + math.exp(2.0), math.exp(-1.0) + math.exp(0.5)
    p_left = math.exp(math.log(left) / tau) / (math.exp(math.log(left) / tau) + math.exp(math.log(right) / tau))
    assert ref.word_probabilities(logits, [closed["left"], closed["right"]], tau) == pytest.approx([p_left, 1 - p_left])
    # Only the first naming token of each axis counts; the step's own logits score it.
    tokens = [9, 4, 0, 2]  # "right" at step 1 (first horizontal), "bottom" at step 2
    assert ref.axis_steps(tokens, closed) == {"horizontal": 1, "vertical": 2}
    steps = [np.zeros(6), logits, -logits, np.zeros(6)]
    probs = ref.axis_probabilities(steps, tokens, closed, tau)
    assert probs["left"] == pytest.approx(p_left)
    p_top = math.exp(-3.0 / tau) / (math.exp(-3.0 / tau) + math.exp(-0.0 / tau))
    assert probs["top"] == pytest.approx(p_top)
    assert ref.point_for(probs, 200, 100, "paper") == pytest.approx((200 * (1 - p_left), 100 * (1 - p_top)))
    assert ref.point_for({"left": 0.0, "right": 1.0}, 200, 100, "quadrant") == pytest.approx((150.0, 50.0))
    assert ref.point_for({}, 200, 100, "paper") is None
    assert ref.weighted_score([0.5, 0.5, 0, 0, 0], vocab.LEVEL_WEIGHTS) == pytest.approx(0.875)
