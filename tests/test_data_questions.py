"""Question pools and answer wording."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from octopus_rt import vocab
from octopus_rt.training.data import questions as q
from octopus_rt.training.data.records import Region
from octopus_rt.training.data.stats import compute_stats
from octopus_rt.training.data.tasks import build_records

PLACEHOLDERS = {
    "global_description": set(), "HyD-G-max": set(), "HyD-G-min": set(),
    "local_description": {"region"}, "short-single": {"region"}, "long-single": {"region"},
    "short-multi": {"region"}, "long-multi": {"region"},
    "SiD-G-max": {"d"}, "SiD-G-min": {"d"},
    "DAO-G-pair": {"first", "second"}, "DAO-G-first": {"first"}, "DAO-G-last": {"second"},
}


@pytest.mark.parametrize("pool", sorted(PLACEHOLDERS))
def test_pools_have_twelve_distinct_phrasings_with_right_placeholders(pool):
    phrasings = q.POOLS[pool]
    assert len(phrasings) >= 12 and len(set(phrasings)) == len(phrasings)
    for text in phrasings:
        assert set(re.findall(r"{(\w+)}", text)) == PLACEHOLDERS[pool], text


def test_every_category_has_a_name_and_an_effect():
    assert set(q.EFFECTS) == set(vocab.DISTORTION_NAMES)
    assert q.names_phrase(["blur", "noise"]) == "blur and noise"
    assert q.names_phrase(["contrast_weaken", "contrast_weaken"]) == vocab.DISTORTION_NAMES["contrast_weaken"]


def _region(i, position, distortions, label):
    return Region(i, f"masks/r{i}.png", [0, 0, 1, 1], [0.5, 0.5], position, False, label, distortions)


def test_no_grounding_when_extreme_is_tied():
    d = {"category": "blur", "subtype": "gaussian", "severity": 3}
    regions = [_region(0, ["left", "top"], [d], "a"), _region(1, ["right", "top"], [d], "b"),
               _region(2, ["left", "bottom"], [], "c"), _region(3, ["right", "bottom"], [], "d")]
    records = build_records("x", "images/x.png", regions, np.random.default_rng(0), width=2, height=2, source="s")
    subtasks = Counter(r["subtask"] for r in records)
    assert "HyD-G-max" not in subtasks and "HyD-G-min" not in subtasks and "SiD-G-max" not in subtasks
    assert "SiD-G-min" not in subtasks  # both affected regions tie


def test_quality_word_is_a_level_word_and_monotonic():
    words = [q.quality_word(i, False) for i in range(0, 8)]
    assert all(w in vocab.LEVEL_WORDS for w in words)
    ranks = [vocab.LEVEL_WORDS.index(w) for w in words]
    assert ranks == sorted(ranks)


def test_stats_match_records(tmp_path):
    from octopus_rt.training.data import make_quadrant_dataset

    counts = make_quadrant_dataset(tmp_path, 12)
    stats = compute_stats(tmp_path)
    assert dict(stats.splits) == counts and stats.tasks["grounding"] == 12
    assert stats.categories["noise"] == 12 and stats.severities[5] == 12 and stats.images == 12
