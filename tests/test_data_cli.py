"""`octopus-rt data` commands: happy paths and bad input (one-line errors, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octopus_rt.cli import main
from octopus_rt.training.data import synth as synth_mod
from octopus_rt.training.data.quadrant import smooth_texture


def _sources(folder: Path, n: int = 3, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(smooth_texture(rng, size)).save(folder / f"img{i}.png")
    return folder


def test_synth_stats_show(tmp_path, capsys):
    src = _sources(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["data", "synth", str(src), "--out", str(out), "--num", "3", "--size", "64",
                 "--workers", "1", "--quiet"]) == 0
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "global_description" in text and "severity:" in text
    record_id = (out / "train.jsonl").read_text().splitlines()[0].split('"id":"')[1].split('"')[0]
    png = tmp_path / "sample.png"
    assert main(["data", "show", str(out), record_id, "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.width > 64 and im.height > 64


def test_existing_output_refused_then_overwrite(tmp_path, capsys):
    src = _sources(tmp_path / "src", n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("x")
    args = ["data", "synth", str(src), "--out", str(out), "--num", "2", "--size", "64", "--workers", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--overwrite"]) == 2  # not a folder we wrote: --overwrite never touches it
    assert "dataset octopus-rt wrote" in capsys.readouterr().err and (out / "something.txt").exists()
    (out / "something.txt").unlink()
    assert main(args) == 0
    (out / "notes.txt").write_text("x")
    assert main(args + ["--overwrite"]) == 0
    assert (out / "notes.txt").exists()  # only our own files are replaced


def test_empty_source_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "synth", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err


def test_all_sources_unusable(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"garbage")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / "b.png")
    assert main(["data", "synth", str(src), "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"]) == 2
    assert "none of the 2 images" in capsys.readouterr().err


def test_invalid_sam_checkpoint(tmp_path, capsys):
    src = _sources(tmp_path / "src", n=1)
    bad = tmp_path / "sam_vit_b.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["data", "synth", str(src), "--out", str(tmp_path / "o"), "--sam", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid SAM checkpoint" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "synth", str(src), "--out", str(tmp_path / "o"), "--sam", str(tmp_path / "nope.pth")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_record_and_missing_dataset(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"id": "a", "image": "x.png"}\n')
    assert main(["data", "show", str(tmp_path / "ds"), "zzz", "--out", str(tmp_path / "s.png")]) == 2
    assert "no record with id" in capsys.readouterr().err


def test_resume_finishes_interrupted_run_identically(tmp_path, monkeypatch):
    src = _sources(tmp_path / "src", n=4)
    options = synth_mod.SynthOptions(num=5, seed=1, size=64, workers=1, progress=False)
    full = tmp_path / "full"
    synth_mod.synthesize(src, full, options)

    real = synth_mod.make_sample
    calls = {"n": 0}

    def flaky(task):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(task)

    partial = tmp_path / "partial"
    monkeypatch.setattr(synth_mod, "make_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth_mod.synthesize(src, partial, options)
    monkeypatch.setattr(synth_mod, "make_sample", real)
    assert len(list((partial / ".work").glob("s0*.json"))) == 2
    with pytest.raises(synth_mod.InputError):  # refuses without --resume
        synth_mod.synthesize(src, partial, options)
    with pytest.raises(synth_mod.InputError):  # refuses a resume with other options
        synth_mod.synthesize(src, partial, synth_mod.SynthOptions(**{**options.__dict__, "seed": 2, "resume": True}))
    synth_mod.synthesize(src, partial, synth_mod.SynthOptions(**{**options.__dict__, "resume": True}))
    for split in ("train", "val", "test"):
        assert (partial / f"{split}.jsonl").read_bytes() == (full / f"{split}.jsonl").read_bytes()
    assert not (partial / ".work").exists()


@pytest.mark.parametrize("option,value,message", [("--num", "0", "--num"), ("--size", "16", "--size"),
                                                  ("--uniform", "1.5", "--uniform"), ("--workers", "0", "--workers")])
def test_bad_numeric_options(tmp_path, capsys, option, value, message):
    src = _sources(tmp_path / "src", n=1)
    assert main(["data", "synth", str(src), "--out", str(tmp_path / "o"), option, value, "--quiet"]) == 2
    assert message in capsys.readouterr().err
