"""Well-posed grounding targets and difficulty control of `data synth` (--max-regions, --min-severity),
and what `data stats` says about position answers. Expected values are recomputed from the masks and
the pixels, not read from the records under test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from octopus_rt.cli import main
from octopus_rt.training.data.records import read_records
from octopus_rt.training.data.stats import compute_stats
from octopus_rt.training.data.synth import SynthOptions, synthesize

SIZE = 96


def _sources(folder: Path) -> Path:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina"):
        image = getattr(data, name)()
        h, w = image.shape[:2]
        small = cv2.resize(image, (SIZE * w // max(h, w), SIZE * h // max(h, w)), interpolation=cv2.INTER_AREA)
        Image.fromarray(small).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory.mktemp("difficulty") / "src")


def _make(sources: Path, out: Path, **knobs):
    synthesize(sources, out, SynthOptions(num=40, seed=5, size=SIZE, workers=1, progress=False, **knobs))
    return [r for split in read_records(out).values() for r in split]


def _mask(out: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(out / rel)) > 127


def _eq1_from_mask(mask: np.ndarray) -> tuple[float, float, str]:
    """(x / W, y / H) of the box centre and the "vertical horizontal" phrase, from the mask alone."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / mask.shape[1], (ys.min() + ys.max() + 1) / 2 / mask.shape[0]
    return cx, cy, f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


@pytest.fixture(scope="module")
def default_set(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    return out, _make(sources, out)


def test_grounding_targets_lie_clear_of_both_midlines(default_set):
    out, records = default_set
    local = 0
    for record in records:
        if record["task"] != "grounding":
            continue
        region = {r["id"]: r for r in record["regions"]}[record["target_regions"][0]]
        if region["whole_image"]:
            continue
        cx, cy, phrase = _eq1_from_mask(_mask(out, region["mask"]))
        assert abs(cx - 0.5) >= 0.1 and abs(cy - 0.5) >= 0.1, (record["id"], cx, cy)
        assert record["conversations"][1]["value"].lower().startswith(f"the {phrase}")
        local += 1
    assert local >= 10


def test_stats_position_distribution_and_no_ambiguous_target(default_set, capsys):
    out, records = default_set
    expected = Counter()
    for record in records:
        if record["task"] == "grounding":
            region = {r["id"]: r for r in record["regions"]}[record["target_regions"][0]]
            if not region["whole_image"]:
                expected[_eq1_from_mask(_mask(out, region["mask"]))[2]] += 1
    stats = compute_stats(out)
    assert stats.positions == expected
    assert stats.ambiguous_targets == 0 and stats.ambiguous_share == 0.0
    assert stats.top_position_share == pytest.approx(max(expected.values()) / sum(expected.values()))
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ambiguous targets 0 (0.0%)" in text and "position answer:" in text


def test_stats_counts_ambiguous_targets_of_other_data(tmp_path):
    """A hand-made dataset with one full-width target (centre on the vertical midline): 1 of 2."""
    def record(i: int, bbox: list[int]) -> dict:
        center = [(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2]
        position = ["left" if center[0] < 50 else "right", "top" if center[1] < 50 else "bottom"]
        region = {"id": 0, "mask": "m.png", "bbox": bbox, "center": center, "position": position,
                  "whole_image": False, "label": "area", "distortions": [], "intensity": 0}
        return {"id": f"r{i}", "image": "i.png", "task": "grounding", "subtask": "HyD-G-max",
                "conversations": [], "regions": [region], "target_regions": [0], "answer_mask": "m.png",
                "width": 100, "height": 100}
    lines = [record(0, [0, 0, 100, 30]), record(1, [0, 0, 30, 30])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    stats = compute_stats(tmp_path)
    assert stats.ambiguous_targets == 1 and stats.ambiguous_share == 0.5
    assert stats.positions == Counter({"top right": 1, "top left": 1})


def _distorted_regions_from_pixels(out: Path, sources: Path, record: dict) -> int:
    """How many regions' interiors (2 px feather eroded away) differ from the clean source."""
    source = np.asarray(Image.open(sources / record["source"]).convert("RGB")).astype(np.int16)
    image = np.asarray(Image.open(out / record["image"]).convert("RGB")).astype(np.int16)
    changed = np.abs(image - source).max(-1) > 0
    count = 0
    for region in record["regions"]:
        core = cv2.erode(_mask(out, region["mask"]).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        count += int(changed[core].any())
    return count


def test_max_regions_one_and_min_severity(sources, tmp_path):
    out = tmp_path / "easy"
    records = _make(sources, out, max_regions=1, min_severity=3)
    images = {r["image"]: r for r in records}
    assert len(images) == 40
    for record in images.values():
        assert _distorted_regions_from_pixels(out, sources, record) <= 1, record["image"]
        for region in record["regions"]:
            assert all(d["severity"] >= 3 for d in region["distortions"])
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["max_regions"], meta["min_severity"], meta["format"]) == (1, 3, "octopus-rt-synth")


def test_min_severity_above_pair_range_gives_single_distortions(sources, tmp_path):
    records = _make(sources, tmp_path / "hard", min_severity=4)
    chains = [reg["distortions"] for r in records for reg in r["regions"] if reg["distortions"]]
    assert chains and all(len(c) == 1 and c[0]["severity"] >= 4 for c in chains)


def test_default_knobs_recorded_and_multi_region_images_exist(default_set, sources):
    out, records = default_set
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["max_regions"], meta["min_severity"]) == (3, 1)
    images = {r["image"]: r for r in records}
    counts = [_distorted_regions_from_pixels(out, sources, r) for r in images.values()
              if not r["regions"][0]["whole_image"]]
    assert max(counts) >= 2  # the default mix still has several distorted regions per image


@pytest.mark.parametrize("option,value", [("--max-regions", "0"), ("--max-regions", "4"),
                                          ("--min-severity", "0"), ("--min-severity", "6")])
def test_bad_difficulty_options(sources, tmp_path, capsys, option, value):
    assert main(["data", "synth", str(sources), "--out", str(tmp_path / "o"), option, value, "--quiet"]) == 2
    assert option in capsys.readouterr().err


def test_cli_passes_difficulty_options(sources, tmp_path):
    out = tmp_path / "cli"
    assert main(["data", "synth", str(sources), "--out", str(out), "--num", "5", "--size", str(SIZE), "--workers",
                 "1", "--max-regions", "2", "--min-severity", "2", "--quiet"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["max_regions"], meta["min_severity"]) == (2, 2)
