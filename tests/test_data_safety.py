"""Issue 11: the data engine deletes only its own output, skips sources it cannot safely decode, and
never reads an image outside the dataset's image root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from octopus_rt.cli import main
from octopus_rt.training.data.importers import import_dataset
from octopus_rt.training.data.quadrant import smooth_texture
from image_files import write_png_header


def _photos(folder: Path, names: tuple[str, ...] = ("a.png", "b.png"), size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(smooth_texture(rng, size)).save(folder / name)
    return folder


def _synth(src: Path, out: Path, *extra: str) -> int:
    return main(["data", "synth", str(src), "--out", str(out), "--size", "64", "--workers", "1", "--quiet", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ synth
def test_overwrite_never_deletes_the_source_photos(tmp_path, capsys):
    """The issue's reproduction: photos in lib/images, `data synth lib/images --out lib --overwrite`."""
    images = _photos(tmp_path / "lib" / "images")
    before = _snapshot(images)
    assert _synth(images, tmp_path / "lib", "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lies inside --out" in err
    assert _snapshot(images) == before


def test_overwrite_replaces_our_dataset_but_never_follows_a_link(tmp_path, capsys):
    src = _photos(tmp_path / "src")
    out = tmp_path / "out"
    assert _synth(src, out) == 0
    assert json.loads((out / "dataset.json").read_text())["format"] == "octopus-rt-synth"
    keep = _photos(tmp_path / "keep", ("mine.png",))
    before = _snapshot(keep)
    os.rename(out / "masks", tmp_path / "old_masks")
    os.symlink(keep, out / "masks")  # someone linked their own folder in
    assert _synth(src, out, "--overwrite") == 0, capsys.readouterr().err
    assert _snapshot(keep) == before and (out / "masks").is_dir() and not (out / "masks").is_symlink()


def test_bombs_and_oversize_sources_are_skipped_with_a_reason(tmp_path, capsys):
    src = _photos(tmp_path / "src", ("b.png", "c.png"))
    write_png_header(src / "a_bomb.png", 15000, 15000)  # Pillow itself refuses to open it (DecompressionBombError)
    write_png_header(src / "z_big.png", 12000, 12000)  # 144 MP: over our limit, tiny on disk
    out = tmp_path / "out"
    assert _synth(src, out) == 0, capsys.readouterr().err
    skipped = {s["file"]: s["reason"] for s in json.loads((out / "report.json").read_text())["skipped"]}
    assert set(skipped) == {"a_bomb.png", "z_big.png"}
    assert "too large" in skipped["a_bomb.png"] and "above the limit of 64000000" in skipped["z_big.png"]
    assert not (out / ".work").exists()


def test_bomb_label_maps_skip_their_source_with_a_reason(tmp_path, capsys):
    """--labels: a label map whose header claims a huge size is refused before decoding; its source is
    skipped with the reason in report.json and on stderr, the other sources are still made."""
    src = _photos(tmp_path / "src", ("a.png", "b.png", "c.png"))
    labels = tmp_path / "labels"
    labels.mkdir()
    write_png_header(labels / "a.png", 15000, 15000)  # Pillow itself refuses to open it (DecompressionBombError)
    write_png_header(labels / "b.png", 12000, 12000)  # 144 MP: over our limit, tiny on disk
    out = tmp_path / "out"
    assert _synth(src, out, "--labels", str(labels)) == 0, capsys.readouterr().err
    skipped = {s["file"]: s["reason"] for s in json.loads((out / "report.json").read_text())["skipped"]}
    assert set(skipped) == {"a.png", "b.png"}
    assert "label map a.png is too large" in skipped["a.png"]
    assert "label map b.png has 12000x12000" in skipped["b.png"] and "above the limit of 64000000" in skipped["b.png"]
    assert "a.png: label map a.png" in capsys.readouterr().err
    sources = {json.loads(line)["source"] for split in ("train", "val", "test")
               for line in (out / f"{split}.jsonl").read_text().splitlines()}
    assert sources == {"c.png"}


def test_a_failed_run_leaves_no_work_folder(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_png_header(src / "a.png", 15000, 15000)
    out = tmp_path / "out"
    assert _synth(src, out) == 2
    assert "none of the 1 images" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    assert _synth(src, out) == 2 and list(out.iterdir()) == []  # a folder that was there stays, empty


# ----------------------------------------------------------------------------------------- import
def test_import_keeps_images_inside_the_root_and_records_bad_rows(tmp_path):
    root = _photos(tmp_path / "root", ("ok.png",))
    _photos(tmp_path, ("outside.png",))
    os.symlink(tmp_path / "outside.png", root / "link.png")
    turns = [{"from": "human", "value": "<image>\nHow is it?"}, {"from": "gpt", "value": "Good."}]
    rows = [{"id": "ok", "image": "ok.png", "conversations": turns},
            {"id": "up", "image": "../outside.png", "conversations": turns},
            {"id": "abs", "image": "/etc/passwd", "conversations": turns},
            {"id": "link", "image": "link.png", "conversations": turns},
            {"id": "number", "image": 5, "conversations": turns},
            {"id": "list", "image": ["ok.png"], "conversations": turns},
            "not an object",
            {"id": "turns", "image": "ok.png", "conversations": "nope"}]
    src = tmp_path / "labels.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "out"
    report = import_dataset("q-instruct", src, out, image_root=root, split="train")
    assert report.records["train"] == 1
    reasons = dict(report.skipped)
    assert set(reasons) == {"up", "abs", "link", "number", "list", "6", "turns"}
    assert "'..'" in reasons["up"] and "absolute" in reasons["abs"] and "symbolic link" in reasons["link"]
    assert "path string" in reasons["number"] and "path string" in reasons["list"]


def test_import_overwrite_only_replaces_our_own_folder(tmp_path, capsys):
    root = _photos(tmp_path / "root", ("ok.png",))
    src = tmp_path / "labels.json"
    src.write_text(json.dumps([{"id": "a", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train.jsonl").write_text("their own file\n")
    args = ["data", "import", "q-instruct", str(src), "--image-root", str(root), "--split", "train"]
    assert main(args + ["--out", str(theirs), "--overwrite"]) == 2
    assert "dataset octopus-rt wrote" in capsys.readouterr().err
    assert (theirs / "train.jsonl").read_text() == "their own file\n"
    ours = tmp_path / "ours"
    assert main(args + ["--out", str(ours)]) == 0 and main(args + ["--out", str(ours), "--overwrite"]) == 0
    inside = ours / "train.jsonl"  # the input may not be one of the files the import writes
    before = inside.read_bytes()
    assert main(["data", "import", "q-instruct", str(inside), "--out", str(ours), "--overwrite"]) == 2
    assert inside.read_bytes() == before


# ------------------------------------------------------------------------------------------- show
def test_show_never_reads_outside_the_dataset(tmp_path, capsys):
    data = tmp_path / "data"
    _photos(data / "images", ("s.png",))
    _photos(tmp_path, ("secret.png",))
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    (data / "masks").mkdir()
    Image.fromarray(mask).save(data / "masks" / "m.png")
    records = [{"id": "up", "image": "../secret.png"}, {"id": "abs", "image": str(tmp_path / "secret.png")},
               {"id": "mask", "image": "images/s.png", "regions": [{"id": 0, "mask": "../secret.png"}]},
               {"id": "fine", "image": "images/s.png", "regions": [{"id": 0, "mask": "masks/m.png"}]}]
    (data / "train.jsonl").write_text("{broken line up\n" + "".join(json.dumps(r) + "\n" for r in records))
    for rid, needle in (("up", "'..'"), ("abs", "absolute"), ("mask", "'..'")):
        code = main(["data", "show", str(data), rid, "--out", str(tmp_path / f"{rid}.png")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (rid, err)
        assert not (tmp_path / f"{rid}.png").exists()
    assert main(["data", "show", str(data), "fine", "--out", str(tmp_path / "fine.png")]) == 0
    before = (data / "images" / "s.png").read_bytes()  # --out may not be the record's own image
    assert main(["data", "show", str(data), "fine", "--out", str(data / "images" / "s.png")]) == 2
    assert "is an input" in capsys.readouterr().err and (data / "images" / "s.png").read_bytes() == before
