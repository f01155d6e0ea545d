"""Issue 11: a manifest never makes octopus-rt read or delete outside the bundle, and a malformed
manifest gives one clear line (verify, the runtime's load and every exporter)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from octopus_rt import bundle
from octopus_rt.bundle import BundleError
from octopus_rt.cli import main

DEMO = Path(bundle.__file__).resolve().parent / "demo" / "bundle"


@pytest.fixture()
def demo_copy(tmp_path) -> Path:
    target = tmp_path / "lib" / "bundle"
    shutil.copytree(DEMO, target, ignore=shutil.ignore_patterns(".lock", ".staging-*"))
    return target


def _edit(bundle_dir: Path, change) -> dict:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    change(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "lib" / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("mine")
    return victim


def _one_error_line(err: str, *needles: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in needles)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_section_dir_outside_the_bundle_is_refused_and_never_deleted(demo_copy, tmp_path, tiny_sam_checkpoint,
                                                                     capsys, where):
    """The issue's reproduction: sam.dir = "../victim" (or an absolute path), then verify and export sam."""
    victim = _victim(tmp_path)
    shutil.copytree(demo_copy / json.loads((demo_copy / "manifest.json").read_text())["sam"]["dir"], victim,
                    dirs_exist_ok=True)
    target = "../victim" if where == "relative" else str(victim)
    _edit(demo_copy, lambda m: m["sam"].__setitem__("dir", target))
    capsys.readouterr()

    assert main(["verify", str(demo_copy)]) == 2
    assert _one_error_line(capsys.readouterr().err, "sam.dir")
    with pytest.raises(BundleError, match="sam.dir"):
        from octopus_rt.runtime import Octopus

        Octopus(demo_copy, device="cpu")
    code = main(["export", "sam", str(tiny_sam_checkpoint), "--model-type", "custom", "--out", str(demo_copy)])
    err = capsys.readouterr().err
    assert code == 2 and "sam.dir" in err.strip().splitlines()[-1]
    assert (victim / "precious.txt").read_text() == "mine"
    assert not list(demo_copy.glob(".staging-*"))  # refused before any work


def test_section_folder_symlinked_outside_is_refused(demo_copy, tmp_path, capsys):
    manifest = json.loads((demo_copy / "manifest.json").read_text())
    victim = tmp_path / "elsewhere"
    shutil.move(demo_copy / manifest["sam"]["dir"], victim)
    os.symlink(victim, demo_copy / manifest["sam"]["dir"])
    assert main(["verify", str(demo_copy)]) == 2
    assert _one_error_line(capsys.readouterr().err, "symbolic link")
    with pytest.raises(BundleError, match="symbolic link"):
        bundle.stage_section(demo_copy, "sam")
    assert victim.is_dir() and any(victim.iterdir())


def test_file_symlinked_outside_is_refused(demo_copy, tmp_path, capsys):
    manifest = json.loads((demo_copy / "manifest.json").read_text())
    secret = tmp_path / "secret.json"
    tokenizer = demo_copy / manifest["lmm"]["dir"] / "tokenizer.json"
    secret.write_bytes(tokenizer.read_bytes())  # same size and hash: only the link gives it away
    tokenizer.unlink()
    os.symlink(secret, tokenizer)
    assert main(["verify", str(demo_copy)]) == 2
    assert _one_error_line(capsys.readouterr().err, "tokenizer.json", "outside")


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["lmm"]["files"].__setitem__("../../x.onnx", {"size": 1, "sha256": "0"}), "'..'"),
    (lambda m: m["lmm"]["files"].__setitem__("/etc/passwd", {"size": 1, "sha256": "0"}), "absolute"),
    (lambda m: m["lmm"]["decoder"].__setitem__("file", "../sam/sam_decoder.onnx"), "lmm.decoder.file"),
    (lambda m: m["sam"].__setitem__("dir", m["lmm"]["dir"]), "share the folder"),
    (lambda m: m["sam"].__setitem__("dir", "."), "sam.dir"),
    (lambda m: m["sam"].__setitem__("dir", ".staging-sam-1"), "sam.dir"),
])
def test_bad_paths_in_the_manifest_are_refused(demo_copy, capsys, change, needle):
    _edit(demo_copy, change)
    with pytest.raises(BundleError, match=None) as caught:
        bundle.read_manifest(demo_copy)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_commit_deletes_only_its_own_previous_folder(demo_copy, tmp_path):
    """commit_section removes the section's previous folder; a crafted one is refused before that."""
    victim = _victim(tmp_path)
    _edit(demo_copy, lambda m: m["sam"].__setitem__("dir", "../victim"))
    staging = demo_copy / ".staging-sam-manual"
    staging.mkdir()
    (staging / "x.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="sam.dir"):
        bundle.commit_section(demo_copy, "sam", staging, {})
    assert (victim / "precious.txt").exists()


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["lmm"].pop("prompt"), "lmm.prompt is missing"),
    (lambda m: m["lmm"].pop("decoder"), "lmm.decoder is missing"),
    (lambda m: m["lmm"]["decoder"].pop("max_position_embeddings"), "lmm.decoder.max_position_embeddings is missing"),
    (lambda m: m["lmm"]["prompt"].__setitem__("num_image_tokens", "64"), "lmm.prompt.num_image_tokens must be an integer"),
    (lambda m: m["lmm"]["closed_set"].pop("left"), "lmm.closed_set.left"),
    (lambda m: m["sam"].pop("decoder"), "sam.decoder is missing"),
    (lambda m: m.__setitem__("format_version", "1"), "format_version must be the integer 1, got str '1'"),
    (lambda m: m.__setitem__("format_version", 1.0), "format_version must be the integer 1"),
    (lambda m: m["defaults"].__setitem__("tau", "hot"), "defaults.tau must be a number"),
    (lambda m: m.__setitem__("sam", []), "section sam must be an object"),
])
def test_malformed_manifest_gives_one_clear_line(demo_copy, tmp_path, capsys, change, needle):
    _edit(demo_copy, change)
    image = Path(bundle.__file__).resolve().parents[1] / "examples" / "example_1.png"
    code = main(["infer", str(image), "where?", "--bundle", str(demo_copy), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err, needle), err
    assert "KeyError" not in err and "reads version 1" not in err


def test_valid_bundles_still_load_and_verify(demo_copy, capsys):
    assert main(["verify", str(demo_copy)]) == 0
    bundle.validate_manifest(json.loads((demo_copy / "manifest.json").read_text()), demo_copy, runnable=True)
