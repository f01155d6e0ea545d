"""Mirrored twins of the demo's LLaVA training records (training/recipes/demo_augment.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from octopus_rt import vocab
from octopus_rt.training.recipes import demo_augment


@pytest.mark.parametrize(("text", "flip", "expected"), [
    ("The top left region is blurred.", "h", "The top right region is blurred."),
    ("The top left region is blurred.", "v", "The bottom left region is blurred."),
    ("The top left region is blurred.", "hv", "The bottom right region is blurred."),
    ("Left of the bright topic, right at the Bottom.", "hv", "Right of the bright topic, left at the Top."),
    ("overly high brightness in the upright bottomless cup", "hv", "overly high brightness in the upright bottomless cup"),
])
def test_swap_position_words(text, flip, expected):
    assert demo_augment.swap_position_words(text, flip) == expected


def _write_record(root, width=40, height=30):
    """One grounding record with a distorted box at the top left (x 2-14, y 3-11) of a random image."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[3:11, 2:14] = True
    (root / "seen" / "images").mkdir(parents=True)
    (root / "seen" / "masks").mkdir(parents=True)
    Image.fromarray(image).save(root / "seen/images/a.png")
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(root / "seen/masks/a_r0.png")
    region = {"id": 0, "mask": "seen/masks/a_r0.png", "bbox": [2, 3, 14, 11], "center": [8.0, 7.0],
              "position": ["left", "top"], "whole_image": False, "label": "small area at the top left",
              "distortions": [{"category": "blur", "subtype": "gaussian", "severity": 3}], "intensity": 3}
    record = {"id": "a-0", "image": "seen/images/a.png", "task": "grounding", "subtask": "SiD-G-max",
              "conversations": [{"from": "human", "value": "<image>\nWhere is the blur worst?"},
                                {"from": "gpt", "value": "The top left region, the small area at the top left."}],
              "regions": [region], "target_regions": [0], "answer_mask": "seen/masks/a_r0.png",
              "width": width, "height": height}
    return record, image, mask


@pytest.mark.parametrize("flip", demo_augment.FLIPS)
def test_twin_geometry_and_words_follow_the_pixels(tmp_path, flip):
    record, image, mask = _write_record(tmp_path)
    before = json.dumps(record)
    (twin,) = demo_augment.add_mirrored_twins(tmp_path, [record], (flip,))
    assert json.dumps(record) == before  # the original is untouched

    flipped = image[:, ::-1] if "h" in flip else image
    flipped = flipped[::-1] if "v" in flip else flipped
    assert np.array_equal(np.asarray(Image.open(tmp_path / twin["image"])), flipped)
    twin_mask = np.asarray(Image.open(tmp_path / twin["regions"][0]["mask"])) >= 128
    assert twin["answer_mask"] == twin["regions"][0]["mask"]

    # Independent truth: the flipped mask's own bounding box and eq. 1 on its centre.
    ys, xs = np.nonzero(twin_mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
    horizontal, vertical = vocab.position_terms(centre, 40, 30)
    region = twin["regions"][0]
    assert region["bbox"] == bbox and region["center"] == list(centre)
    assert region["position"] == [horizontal, vertical]
    assert twin["conversations"][1]["value"].startswith(f"The {vertical} {horizontal} region")
    assert region["label"] == f"small area at the {vertical} {horizontal}"
    assert twin["id"] == f"a-0-{flip}" and twin["image"].startswith(f"mirror_{flip}/")


def test_unknown_flip_is_refused(tmp_path):
    record, _, _ = _write_record(tmp_path)
    with pytest.raises(ValueError, match="unknown flip"):
        demo_augment.add_mirrored_twins(tmp_path, [record], ("d",))


def test_lmm_dataset_adds_twins_to_train_only(tmp_path):
    from octopus_rt.training.data.records import read_jsonl, write_jsonl
    from octopus_rt.training.recipes.build_demo import _lmm_dataset

    data = tmp_path / "data"
    record, _, _ = _write_record(data)
    write_jsonl([record], data / "train.jsonl")
    write_jsonl([dict(record, id="v-0")], data / "val.jsonl")
    out = _lmm_dataset(data, tmp_path / "lmm", 1.0, 0, ("h", "v"))
    train = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in train] == ["a-0", "a-0-h", "a-0-v"]
    assert [r["id"] for r in read_jsonl(out / "val.jsonl")] == ["v-0"]
    assert all((out / r["image"]).is_file() for r in train)
    assert not (data / "mirror_h").exists()  # the source dataset is left as it was
