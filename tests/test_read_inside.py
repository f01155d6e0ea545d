"""octopus_rt.paths.read_inside: the readers of dataset files check the path before the open and the opened
file after it, so a symbolic link swapped in between (a race) cannot make them read outside the root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octopus_rt.errors import InputError
from octopus_rt.paths import read_inside

LINUX_FDS = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.bin").write_bytes(b"inside")
    (tmp_path / "secret.bin").write_bytes(b"outside")
    return root


def test_reads_a_file_inside_the_root(tree):
    assert read_inside(tree, "images/a.bin", "record file") == b"inside"


def test_a_link_out_of_the_root_is_refused_before_the_open(tree):
    (tree / "images" / "b.bin").symlink_to(tree.parent / "secret.bin")
    with pytest.raises(InputError, match="leads outside"):
        read_inside(tree, "images/b.bin", "record file")


@LINUX_FDS
def test_a_link_swapped_in_after_the_check_is_refused_on_the_open_file(tree, monkeypatch):
    import octopus_rt.paths as paths

    checked = paths.resolve_inside

    def check_then_swap(root, rel, what):  # the race: the check passes, then a directory becomes a link
        joined = checked(root, rel, what)
        os.rename(tree / "images", tree.parent / "moved")
        (tree / "images").symlink_to(tree.parent / "elsewhere", target_is_directory=True)
        return joined

    (tree.parent / "elsewhere").mkdir()
    (tree.parent / "elsewhere" / "a.bin").write_bytes(b"outside")
    monkeypatch.setattr(paths, "resolve_inside", check_then_swap)
    with pytest.raises(InputError, match="changed while it was opened"):
        read_inside(tree, "images/a.bin", "record file")


def test_missing_directories_and_fifos_are_clear_errors(tree):
    with pytest.raises(InputError, match="not found"):
        read_inside(tree, "images/none.bin", "record file")
    with pytest.raises(InputError, match="not a regular file"):
        read_inside(tree, "images", "record file")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tree / "images" / "pipe")
        with pytest.raises(InputError, match="not a regular file"):  # and it does not wait for a writer
            read_inside(tree, "images/pipe", "record file")


@LINUX_FDS
def test_a_training_image_swapped_for_a_link_after_parsing_is_not_read(tmp_path):
    from octopus_rt.training.dataset import load_image, read_split

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(data / "images" / "p.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "outside.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    (data / "train.jsonl").write_text(json.dumps({"id": "r", "image": "images/p.png", "conversations": turns}) + "\n")
    record = read_split(data, "train").records[0]
    assert np.asarray(load_image(record))[0, 0, 0] == 7
    (data / "images" / "p.png").unlink()
    (data / "images" / "p.png").symlink_to(tmp_path / "outside.png")  # after the record was checked
    with pytest.raises(InputError, match="leads outside"):
        load_image(record)
