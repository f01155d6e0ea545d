"""The demo recipe end to end at --quick sizes (slow: several minutes of CPU)."""

from __future__ import annotations

import json

import pytest

from octopus_rt.training.recipes import demo_data


def test_held_out_photos_never_reach_training(tmp_path):
    train_src, heldout_src, groups = demo_data.prepare_photos(tmp_path, seed=0, crops_per_photo=1)
    train_names = {p.name.split("_")[0] for p in train_src.iterdir()}
    heldout_names = {p.name.rsplit("_", 1)[0] for p in heldout_src.iterdir()}
    assert heldout_names == set(demo_data.HELD_OUT)
    assert not any(name.startswith(h) for name in (p.name for p in train_src.iterdir()) for h in demo_data.HELD_OUT)
    # Every training file is in the group file, with its photo's group (crops and stereo views together).
    lines = dict(line.split(",") for line in groups.read_text().split())
    assert set(lines) == {p.name for p in train_src.iterdir()}
    motorcycle = {g for f, g in lines.items() if f.startswith("stereo_motorcycle")}
    assert motorcycle == {"motorcycle"} and len([f for f in lines if f.startswith("stereo_motorcycle")]) == 4
    assert train_names  # something to train on


def test_merge_puts_heldout_only_in_test(tmp_path):
    from octopus_rt.training.data.quadrant import make_quadrant_dataset

    make_quadrant_dataset(tmp_path / "seen", 20, seed=0)
    make_quadrant_dataset(tmp_path / "heldout", 10, seed=1)
    counts = demo_data.merge_datasets(tmp_path / "seen", tmp_path / "heldout", tmp_path)
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert counts["test"] == 10 and all(r["image"].startswith("heldout/") for r in test)
    assert all(r["image"].startswith("seen/") for r in train)
    for record in test + train:
        assert (tmp_path / record["image"]).is_file() and (tmp_path / record["answer_mask"]).is_file()
        assert all((tmp_path / region["mask"]).is_file() for region in record["regions"])


@pytest.mark.slow
def test_quick_recipe_builds_an_evaluated_bundle(tmp_path):
    from octopus_rt.runtime.api import Octopus
    from octopus_rt.training.recipes.build_demo import main

    assert main(["--quick", "--work", str(tmp_path / "work"), "--no-install"]) == 0
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert set(summary["stages"]) >= {"data", "vision_pretrain", "lmm_train", "export_lmm", "segmenter",
                                      "export_sam", "eval"}
    bundle = tmp_path / "work" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    best = summary["stages"]["eval"]["sweep_best"]
    assert manifest["defaults"]["tau"] == best["tau"] and manifest["defaults"]["point_mapping"] == best["point_mapping"]
    image = next((tmp_path / "work" / "data" / "heldout" / "images").iterdir())
    answer = Octopus(bundle, threads=1).ask(image, "Which region is the most degraded?")
    assert answer.image_size[0] > 0


def test_patch_targets_follow_the_masks():
    import numpy as np

    from octopus_rt.training.recipes.vision_pretrain import CATEGORIES, patch_targets

    mask_left = np.zeros((40, 80), bool)
    mask_left[:, :40] = True
    regions = [{"mask": "a", "distortions": [{"category": "noise", "subtype": "x", "severity": 3}]},
               {"mask": "b", "distortions": []}]
    out = patch_targets(regions, {"a": mask_left, "b": ~mask_left}, grid=4)
    assert out.shape == (4, 4, 2 + len(CATEGORIES) + 2)
    assert np.allclose(out[:, :2, 0], 1.0) and np.allclose(out[:, 2:, 0], 0.0)
    assert np.allclose(out[:, :2, 1], 3 / 6)
    noise = 2 + CATEGORIES.index("noise")
    assert np.allclose(out[:, :2, noise], 1.0) and np.allclose(out[..., 2 + CATEGORIES.index("blur")], 0.0)
    assert np.allclose(out[0, :, -2], [0.125, 0.375, 0.625, 0.875]) and np.allclose(out[:, 0, -1], out[0, :, -2])
