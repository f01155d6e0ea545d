"""Issue 11: checkpoints and probes are data, never code; training and evaluation read images inside
the dataset only, oriented as the runtime orients them; the demo recipe only rewrites its own folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from octopus_rt.errors import InputError, OctopusError


class _Evil:
    """Unpickling this creates a file: proof that a load executed code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(tmp_path: Path) -> Path:
    from octopus_rt.training.checkpoint import CheckpointState, save_checkpoint

    state = CheckpointState({"w": torch.arange(4.0)}, {"state": {}, "param_groups": []}, {"last_epoch": 1}, None,
                            {"step": 1})
    return save_checkpoint(tmp_path, state, rank=0, world_size=1, keep=2)


def test_a_crafted_checkpoint_is_never_unpickled(tmp_path):
    from octopus_rt.training.checkpoint import load_checkpoint

    path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"w": _Evil(marker)}, path / "trainable.pt")
    with pytest.raises(OctopusError, match="not loaded") as caught:
        load_checkpoint(path, rank=0)
    assert not marker.exists() and "\n" not in str(caught.value)


def test_checkpoint_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    from octopus_rt.training.checkpoint import load_checkpoint

    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    path = _checkpoint(tmp_path)
    expected = (np.random.random(3), random.random(), torch.rand(2))
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(path, rank=0)  # restores the RNG states it saved
    assert torch.equal(state.trainable["w"], torch.arange(4.0))
    np.testing.assert_array_equal(np.random.random(3), expected[0])
    assert random.random() == expected[1] and torch.equal(torch.rand(2), expected[2])


def test_a_crafted_probe_is_never_unpickled(tmp_path):
    from octopus_rt.training.recipes.demo_losses import patch_loss_hook

    marker = tmp_path / "pwned"
    evil = tmp_path / "vision_probe.pt"
    torch.save(_Evil(marker), evil)
    with pytest.raises(Exception):
        patch_loss_hook(tmp_path, evil, grid=2)
    assert not marker.exists()
    probe = torch.nn.Linear(3, 2)
    torch.save(probe.state_dict(), tmp_path / "good.pt")
    from octopus_rt.training.recipes.vision_pretrain import load_probe

    assert torch.equal(load_probe(tmp_path / "good.pt").weight, probe.weight)


def _rotated_photo(path: Path) -> Path:
    """A 40 x 24 photo whose EXIF says "rotate 90° clockwise to view" (orientation 6)."""
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_evaluation_and_training_see_images_oriented_like_the_runtime(tmp_path):
    from octopus_rt.training.dataset import TrainRecord, load_image
    from octopus_rt.training.eval_data import load_record_rgb

    photo = _rotated_photo(tmp_path / "data" / "images" / "p.png")
    with Image.open(photo) as image:
        viewed = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))  # Pillow, independently
    assert viewed.shape == (40, 24, 3)
    np.testing.assert_array_equal(load_record_rgb(tmp_path / "data", "images/p.png"), viewed)
    record = TrainRecord("r", photo, [], "", "", "train.jsonl:1")
    np.testing.assert_array_equal(np.asarray(load_image(record)), viewed)
    with pytest.raises(InputError, match="'..'"):
        load_record_rgb(tmp_path / "data", "../data/images/p.png")


def test_training_records_may_not_leave_the_dataset(tmp_path):
    from octopus_rt.training.dataset import read_split

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "inside.png")
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    lines = [{"image": "inside.png", "conversations": turns}, {"image": "../outside.png", "conversations": turns},
             {"image": str(tmp_path / "outside.png"), "conversations": turns}]
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = read_split(data, "train", on_error="skip")
    assert [r.image.name for r in report.records] == ["inside.png"]
    assert len(report.skipped) == 2 and "'..'" in report.skipped[0] and "absolute" in report.skipped[1]


def test_the_demo_recipe_refuses_a_work_folder_it_did_not_make(tmp_path, monkeypatch):
    from octopus_rt.training.recipes import build_demo, demo_data

    def stop(*args, **kwargs):
        raise RuntimeError("the recipe started working in a foreign folder")

    monkeypatch.setattr(demo_data, "build_dataset", stop)
    work = tmp_path / "home"
    (work / "data").mkdir(parents=True)
    (work / "data" / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match="not made by build_demo"):
        build_demo.build_demo(work, build_demo.QUICK, install=False)
    assert (work / "data" / "thesis.txt").read_text() == "years of work"


def test_evaluation_names_a_broken_record_line(tmp_path):
    from octopus_rt.training.eval_data import load_split

    (tmp_path / "test.jsonl").write_text('{"id": "a"}\n{cut off\n')
    with pytest.raises(InputError, match=r"test.jsonl:2: not a JSON record"):
        load_split(tmp_path, "test")
