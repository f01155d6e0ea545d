"""The demo recipe end to end at --quick sizes (slow: several minutes of CPU)."""

from __future__ import annotations

import json

import pytest

from octopus_rt.training.recipes import demo_data


def test_held_out_photos_never_reach_training(tmp_path):
    train_src, heldout_src, groups = demo_data.prepare_photos(tmp_path, seed=0, scales=((1, 0.55, 0.85),))
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


def test_curriculum_data_is_easy_and_split_like_the_full_mix(tmp_path, monkeypatch):
    from octopus_rt.training.data.records import read_records

    monkeypatch.setattr(demo_data, "CROP_SCALES", ((1, 0.55, 0.85),))  # ~30 sources: 40 images reach them all
    demo_data.build_dataset(tmp_path, seed=0, num_seen=40, num_heldout=2, size=64, workers=1, progress=False,
                            num_easy=40)
    full, easy = read_records(tmp_path / "data"), read_records(tmp_path / "data_easy")
    assert not easy["test"] and easy["train"] and easy["val"]
    meta = json.loads((tmp_path / "data_easy" / "seen" / "dataset.json").read_text())
    assert (meta["max_regions"], meta["min_severity"]) == (1, 3)
    for record in easy["train"] + easy["val"]:
        distorted = [r for r in record["regions"] if r["distortions"]]
        assert len(distorted) == 1 and all(d["severity"] >= 3 for d in distorted[0]["distortions"])
        assert not record["source"].startswith(demo_data.HELD_OUT)
    split_of = {r["source"]: split for split in ("train", "val") for r in full[split]}
    for split in ("train", "val"):  # a photo's crops are on the same side in both datasets
        assert all(split_of.get(r["source"], split) == split for r in easy[split])


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


def test_lmm_dataset_keeps_every_part_of_a_merged_dataset(tmp_path):
    """The LLaVA stage's dataset folder holds every image a record names, the MORE_PHOTOS part included
    (it once linked only seen/ and heldout/, and training stopped at the first more/ record)."""
    from octopus_rt.training.data.quadrant import make_quadrant_dataset
    from octopus_rt.training.data.records import read_jsonl
    from octopus_rt.training.recipes.build_demo import _lmm_dataset

    data = tmp_path / "data"
    for part, seed in (("seen", 0), ("more", 1), ("heldout", 2)):
        make_quadrant_dataset(data / part, 12, seed=seed)
    demo_data.merge_datasets([data / "seen", data / "more"], data / "heldout", data)
    out = _lmm_dataset(data, tmp_path / "lmm", 1.0, 0)
    records = read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")
    assert {r["image"].split("/")[0] for r in records} == {"seen", "more"}
    for record in records:
        assert (out / record["image"]).is_file() and (out / record["answer_mask"]).is_file()


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


def test_the_recipe_threads_are_the_build_default(tmp_path, monkeypatch):
    """The bundle's bytes depend on the thread count, so the recipe carries it; --threads overrides it."""
    import dataclasses

    import torch

    from octopus_rt.training.recipes import build_demo as bd

    class Stop(Exception):
        pass

    seen = []

    def record(count):
        seen.append(count)
        raise Stop  # before the first stage: nothing is written

    monkeypatch.setattr(torch, "set_num_threads", record)
    with pytest.raises(Stop):
        bd.build_demo(tmp_path / "a", dataclasses.replace(bd.QUICK, threads=3))
    with pytest.raises(Stop):
        bd.build_demo(tmp_path / "b", dataclasses.replace(bd.QUICK, threads=3), threads=1)
    with pytest.raises(Stop):
        bd.main(["--work", str(tmp_path / "c"), "--no-install"])
    assert seen == [3, 1, bd.FULL.threads] and bd.FULL.threads == 1
    assert not any((tmp_path / name).exists() for name in "abc")


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


def test_wallpaper_photos_join_training_in_their_own_groups(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    photo = tmp_path / "Meadow_by_Someone.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    monkeypatch.setattr(demo_data, "WALLPAPERS", {str(photo): "CC0-1.0"})
    train_src, heldout_src, groups = demo_data.prepare_photos(tmp_path / "work", seed=0, scales=((2, 0.55, 0.85),),
                                                              wallpapers=True)
    lines = dict(line.split(",") for line in groups.read_text().split())
    wallpaper_files = {f: g for f, g in lines.items() if f.startswith("wp_")}
    assert len(wallpaper_files) == 3 and set(wallpaper_files.values()) == {"wp_meadow"}
    assert all((train_src / f).is_file() for f in wallpaper_files)
    assert not any(p.name.startswith("wp_") for p in heldout_src.iterdir())


def test_crops_at_several_scales_and_package_photo_names(tmp_path):
    import numpy as np

    image = np.zeros((800, 1000, 3), np.uint8)
    crops = demo_data._crops(image, np.random.default_rng(0), ((2, 0.6, 0.8), (2, 0.2, 0.3), (1, 0.05, 0.08)))
    sides = sorted(c.shape[1] / 1000 for c in crops)
    assert len(crops) == 4  # the 5-8 % crop is under 96 px and skipped
    assert all(0.2 <= s < 0.3 for s in sides[:2]) and all(0.6 <= s < 0.8 for s in sides[2:])
    plasma = "/usr/share/wallpapers/Path/contents/images/1920x1080.jpg"
    assert demo_data._photo_name(plasma) == "wp_path"
    assert demo_data._photo_group("/x/aero3.jpg") == demo_data._photo_group("/x/aero1.jpg") == "wp_aero1"
    names = [demo_data._photo_name(p) for p in demo_data.WALLPAPERS]
    assert len(names) == len(set(names)) and len(names) >= 70


def test_missing_wallpapers_fail_with_the_install_command(tmp_path, monkeypatch):
    from octopus_rt.errors import InputError

    monkeypatch.setattr(demo_data, "WALLPAPERS", {str(tmp_path / "absent.jpg"): "CC0-1.0"})
    with pytest.raises(InputError, match="apt-get install"):
        demo_data.prepare_photos(tmp_path / "work", seed=0, wallpapers=True)


def test_more_photos_leave_the_other_photos_data_as_it_was(tmp_path, monkeypatch):
    """MORE_PHOTOS are synthesised in a folder of their own: with them, every file of the other photos'
    part (images, masks, records, their split) is byte for byte what it is without them, and the
    merged splits list their records after the others'."""
    import numpy as np
    from PIL import Image

    from octopus_rt.training.data.records import read_records

    rng = np.random.default_rng(3)
    photos = {}
    for name, shape in (("krank/levels/level-01", (600, 800, 3)), ("scratch/Nature/lake", (360, 480, 3)),
                        ("darknet/data/kite", (400, 500, 3))):
        path = tmp_path / "pkg" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        photos[str(path)] = "CC0-1.0"
    monkeypatch.setattr(demo_data, "MORE_PHOTOS", photos)
    monkeypatch.setattr(demo_data, "CROP_SCALES", ((1, 0.55, 0.85),))

    def build(work, more):
        demo_data.build_dataset(work, seed=0, num_seen=30, num_heldout=2, size=64, workers=1, progress=False,
                                num_easy=10, num_more=12 if more else 0, num_more_easy=6 if more else 0)

    build(tmp_path / "without", False)
    build(tmp_path / "with", True)
    for part in ("data/seen", "data/heldout", "data_easy/seen"):
        before = {p.relative_to(tmp_path / "without" / part): p.read_bytes()
                  for p in (tmp_path / "without" / part).rglob("*") if p.is_file() and p.name != "dataset.json"}
        after = {p.relative_to(tmp_path / "with" / part): p.read_bytes()
                 for p in (tmp_path / "with" / part).rglob("*") if p.is_file() and p.name != "dataset.json"}
        assert before and before == after, part
    old, new = read_records(tmp_path / "without" / "data"), read_records(tmp_path / "with" / "data")
    for split in ("train", "val"):
        assert new[split][:len(old[split])] == old[split]
        assert all(r["image"].startswith("more/") for r in new[split][len(old[split]):])
    assert len(new["train"]) + len(new["val"]) > len(old["train"]) + len(old["val"]) and new["test"] == old["test"]
    easy = read_records(tmp_path / "with" / "data_easy")
    assert any(r["image"].startswith("more/") for r in easy["train"] + easy["val"])
    # One group per photo; crops of the 480 x 360 photo whose longer side is under 192 px are not made.
    lines = dict(line.split(",") for line in (tmp_path / "with" / "groups_more.csv").read_text().split())
    assert set(lines.values()) == {"wp_krlevel01", "wp_lake", "wp_dnkite"}
    for filename in lines:
        with Image.open(tmp_path / "with" / "src_more" / filename) as image:
            assert max(image.size) >= 192


def test_more_photo_names_are_unique_and_missing_ones_name_the_packages(tmp_path, monkeypatch):
    from octopus_rt.errors import InputError

    names = [demo_data._photo_name(p) for p in [*demo_data.WALLPAPERS, *demo_data.MORE_PHOTOS]]
    assert len(names) == len(set(names)) and len(demo_data.MORE_PHOTOS) >= 100
    assert demo_data._photo_group("/s/city-with-water2.jpg") == demo_data._photo_group("/s/city-with-water.jpg")
    monkeypatch.setattr(demo_data, "MORE_PHOTOS", {str(tmp_path / "absent.jpg"): "CC0-1.0"})
    with pytest.raises(InputError, match="apt-get install krank scratch"):
        demo_data.prepare_more_photos(tmp_path / "work")


def test_closed_set_hook_is_the_axis_softmax_at_position_words(tiny_llava_dir):
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from octopus_rt.training.validation_metrics import closed_set_token_ids
    from octopus_rt.training.recipes.demo_losses import closed_set_loss_hook

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir("llama_siglip"))
    (left, right), (top, bottom) = (closed_set_token_ids(tokenizer, w) for w in (("left", "right"), ("top", "bottom")))
    vocab_size = len(tokenizer)
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[0, 4], labels[1, 3] = bottom[0], left[0], top[0]
    logits = torch.randn(2, 6, vocab_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = closed_set_loss_hook(tokenizer, 2.0)(None, {"labels": labels}, type("O", (), {"logits": logits}), [])

    def axis_nll(row, col, ids, target):  # logits at t predict the label at t + 1
        z = logits.detach().numpy()[row, col - 1]
        words = np.array([np.log(np.exp(z[w]).sum()) for w in ids])
        return -(words[target] - np.log(np.exp(words).sum()))

    expected = 2.0 * np.mean([axis_nll(0, 2, [top, bottom], 1), axis_nll(0, 4, [left, right], 0),
                              axis_nll(1, 3, [top, bottom], 0)])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # Raising the wrong word's logit where "left" is the answer must raise the loss.
    assert float(logits.grad[0, 3, right[0]]) > 0 and float(logits.grad[0, 3, left[0]]) < 0
    empty = closed_set_loss_hook(tokenizer, 2.0)(None, {"labels": torch.full((1, 4), -100)},
                                             type("O", (), {"logits": torch.zeros(1, 4, vocab_size)}), [])
    assert float(empty) == 0.0


def test_feature_probe_finds_the_noisy_quadrant_on_unseen_images(tmp_path):
    from octopus_rt.training.data.quadrant import make_quadrant_dataset
    from octopus_rt.training.recipes.feature_probe import patch_statistics, run_probe

    make_quadrant_dataset(tmp_path, 80, size=64, seed=0, severity=4)
    results = {r.split: r for r in run_probe(tmp_path, steps=300, seed=0)}
    test = results["test"]
    # One noisy quadrant on a smooth texture: local statistics must find it far above chance (25 %).
    assert test.images > 0 and test.quadrant_accuracy >= 0.7
    assert 0.0 <= test.clean_recall <= 1.0 and 0.0 <= test.distorted_recall <= 1.0
    from PIL import Image

    flat = patch_statistics(Image.new("RGB", (100, 60), (120, 60, 30)))
    assert flat.shape == (64, 26) and abs(flat[0, 0] - 120 / 255) < 1e-6 and abs(flat[:, 13:]).max() < 1e-6


def test_feature_probe_spread_over_seeds():
    from octopus_rt.training.recipes.feature_probe import ProbeResult, spread

    def run(patch, quadrant):
        return [ProbeResult("val", 10, patch, quadrant, 0.5, 0.5), ProbeResult("test", 10, patch / 2, None, 0.5, None)]

    got = spread([run(0.8, 0.5), run(0.6, 0.7), run(0.7, 0.6)])
    assert got["val"]["patch_accuracy"] == pytest.approx((0.7, 0.6, 0.8))
    assert got["val"]["quadrant_accuracy"] == pytest.approx((0.6, 0.5, 0.7))
    assert got["test"] == {"patch_accuracy": pytest.approx((0.35, 0.3, 0.4))}  # no quadrant: left out


def test_feature_probe_cli_runs_several_seeds(tmp_path, capsys):
    from octopus_rt.training.data.quadrant import make_quadrant_dataset
    from octopus_rt.training.recipes.feature_probe import main

    make_quadrant_dataset(tmp_path / "d", 40, size=64, seed=0, severity=4)
    argv = [str(tmp_path / "d"), "--steps", "20", "--seed", "3", "--seeds", "2", "--json", str(tmp_path / "p.json")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [3, 4] and {r["split"] for r in rows} >= {"train", "test"}
    assert "mean (range) over 2 seeds, test" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "d"), "--seeds", "0"])


def test_examples_are_picked_by_ground_truth_one_per_quadrant_and_a_whole_image():
    from octopus_rt.training.recipes.demo_report import pick_examples

    def record(i, position, severities, whole=False, subtask="HyD-G-max", photo="coffee"):
        regions = [{"id": 0, "whole_image": whole, "position": None if whole else position,
                    "distortions": [{"category": "blur", "subtype": "gaussian", "severity": s} for s in severities[0]]},
                   *[{"id": k, "whole_image": False, "position": ["left", "top"],
                      "distortions": [{"category": "noise", "subtype": "poisson", "severity": s} for s in chain]}
                     for k, chain in enumerate(severities[1:], 1)]]
        return {"id": f"r{i}", "task": "grounding", "subtask": subtask, "regions": regions, "target_regions": [0],
                "source": f"{photo}_0.png"}

    records = [record(0, ["right", "bottom"], [[2]]),  # severity too low
               record(1, ["right", "bottom"], [[4], [3]]),  # two distorted regions
               record(2, ["right", "bottom"], [[4]], subtask="SiD-G-max"),  # not "most degraded"
               record(3, ["right", "bottom"], [[3]]),
               record(4, ["right", "bottom"], [[5]], photo="rocket"),  # a later one of the same quadrant
               record(5, ["left", "top"], [[3]], photo="rocket"),
               record(6, ["left", "bottom"], [[4]], photo="chelsea"),
               record(7, None, [[2]], whole=True, photo="coins"),
               record(8, ["right", "top"], [[5]], photo="coffee")]  # only photo left for top right
    picked = pick_examples(records)
    assert [(kind, r["id"]) for kind, r in picked] == [("top left", "r5"), ("top right", "r8"), ("bottom left", "r6"),
                                                       ("bottom right", "r3"), ("whole image", "r7")]


def test_whole_image_hook_refuses_a_tokenizer_that_splits_its_words():
    """A clear input error at construction (the recipe's CLI prints it), not a bare ValueError mid-build."""
    from octopus_rt.errors import InputError
    from octopus_rt.training.recipes.demo_losses import whole_image_loss_hook

    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [7, 8]

        def decode(self, ids):
            return "w"

    with pytest.raises(InputError, match="one token of this tokenizer"):
        whole_image_loss_hook(Splitting(), 1.0)


class _Row:
    """The two TrainRecord fields the decision hooks read."""

    def __init__(self, task: str, subtask: str | None) -> None:
        self.task, self.subtask = task, subtask


def test_whole_image_hook_is_the_two_class_softmax_at_the_first_decisive_word(tiny_llava_dir):
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from octopus_rt.training.recipes.demo_losses import whole_image_loss_hook

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir("llama_siglip"))
    tid = {w: tokenizer.encode(" " + w, add_special_tokens=False)[-1] for w in ("whole", "top", "bottom", "left", "right")}
    labels = torch.full((3, 7), -100)
    labels[0, 2], labels[0, 3] = tid["whole"], tid["left"]  # "whole" first: the reference is "whole"
    labels[1, 3], labels[1, 4] = tid["bottom"], tid["whole"]  # a position word first: "local"
    labels[2, 2] = tid["whole"]  # not a grounding record: ignored
    logits = torch.randn(3, 7, len(tokenizer), generator=torch.Generator().manual_seed(1), requires_grad=True)
    rows = [_Row("grounding", "HyD-G-max"), _Row("grounding", "SiD-G-max"), _Row("referring", "short-single")]
    loss = whole_image_loss_hook(tokenizer, 3.0)(None, {"labels": labels}, type("O", (), {"logits": logits}), rows)

    z = logits.detach().numpy()
    local = [tid[w] for w in ("top", "bottom", "left", "right")]

    def nll(row, col, target):  # logits at t predict the label at t + 1
        pair = np.array([z[row, col - 1, tid["whole"]], np.log(np.exp(z[row, col - 1, local]).sum())])
        return -(pair[target] - np.log(np.exp(pair).sum()))

    assert float(loss.detach()) == pytest.approx(3.0 * (nll(0, 2, 0) + nll(1, 3, 1)) / 2, rel=1e-5)
    loss.backward()
    assert float(logits.grad[0, 1, tid["whole"]]) < 0 < float(logits.grad[0, 1, tid["top"]])
    assert float(logits.grad[1, 2, tid["whole"]]) > 0 > float(logits.grad[1, 2, tid["bottom"]])
    assert float(logits.grad[2].abs().sum()) == 0.0 and float(logits.grad[0, 2].abs().sum()) == 0.0


def test_answer_mean_hook_weights_each_chosen_answer_equally(tiny_llava_dir):
    import numpy as np
    import torch

    from octopus_rt.training.recipes.demo_losses import answer_mean_loss_hook

    vocab_size = 11
    labels = torch.full((3, 8), -100)
    labels[0, 1:3] = torch.tensor([4, 5])  # short referring answer: 2 tokens
    labels[1, 1:7] = torch.tensor([1, 2, 3, 4, 5, 6])  # grounding answer: 6 tokens
    labels[2, 2:4] = torch.tensor([7, 8])  # referring long: not chosen below
    logits = torch.randn(3, 8, vocab_size, generator=torch.Generator().manual_seed(2), requires_grad=True)
    rows = [_Row("referring", "short-single"), _Row("grounding", "HyD-G-max"), _Row("referring", "long-multi")]
    hook = answer_mean_loss_hook(("referring/short", "grounding"), 0.5)
    loss = hook(None, {"labels": labels}, type("O", (), {"logits": logits}), rows)

    z = logits.detach().numpy()

    def mean_nll(row):
        cols = [c for c in range(1, 8) if int(labels[row, c]) != -100]
        return np.mean([np.log(np.exp(z[row, c - 1]).sum()) - z[row, c - 1, int(labels[row, c])] for c in cols])

    assert float(loss.detach()) == pytest.approx(0.5 * (mean_nll(0) + mean_nll(1)) / 2, rel=1e-5)
    none = answer_mean_loss_hook(("global_description",), 1.0)(None, {"labels": labels},
                                                                type("O", (), {"logits": logits}), rows)
    assert float(none) == 0.0
