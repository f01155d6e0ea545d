"""make_quadrant_dataset: the tiny dataset the training tests use."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from octopus_rt import vocab
from octopus_rt.training.data import make_quadrant_dataset
from octopus_rt.training.data.quadrant import QUADRANT_QUESTION
from octopus_rt.training.data.records import read_records


def test_quadrant_dataset_form_and_balance(tmp_path):
    counts = make_quadrant_dataset(tmp_path, 22, size=64, seed=0)
    by_split = read_records(tmp_path)
    assert {k: len(v) for k, v in by_split.items()} == counts and sum(counts.values()) == 22
    assert all(counts[s] >= 1 for s in ("train", "val", "test"))
    for records in by_split.values():
        labels = Counter(r["target_regions"][0] for r in records)
        assert max(labels.values()) - min(labels.get(i, 0) for i in range(4)) <= 1  # balanced
        for r in records:
            assert r["task"] == "grounding" and r["conversations"][0]["value"] == "<image>\n" + QUADRANT_QUESTION
            target = r["regions"][r["target_regions"][0]]
            assert r["conversations"][1]["value"].startswith(f"The {vocab.position_phrase(*target['position'])} region")
            image = np.asarray(Image.open(tmp_path / r["image"])).astype(np.float32)
            mask = np.asarray(Image.open(tmp_path / r["answer_mask"])) > 127
            assert image.shape == (64, 64, 3) and mask.mean() == 0.25
            # the noisy quadrant is the one with the strongest pixel-to-pixel variation
            rough = [np.abs(np.diff(image[np.asarray(Image.open(tmp_path / reg["mask"])) > 127].reshape(32, 32, 3),
                                    axis=1)).mean() for reg in r["regions"]]
            assert int(np.argmax(rough)) == target["id"]


def test_quadrant_dataset_deterministic_and_custom_question(tmp_path):
    make_quadrant_dataset(tmp_path / "a", 8, seed=5, question="Where is it?")
    make_quadrant_dataset(tmp_path / "b", 8, seed=5, question="Where is it?")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "images/quad_000003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    record = read_records(tmp_path / "a")["train"][0]
    assert record["conversations"][0]["value"] == "<image>\nWhere is it?"
