"""Bundle directory mechanics: atomic section commits, composition in any order, file checks."""

from __future__ import annotations

import json

import pytest

from octopus_rt import bundle
from octopus_rt.bundle import BundleError


def _stage_with(bundle_dir, name, files):
    staging = bundle.stage_section(bundle_dir, name)
    for rel, data in files.items():
        (staging / rel).write_bytes(data)
    return staging


def test_sections_compose_in_any_order_and_replace_only_themselves(tmp_path):
    out = tmp_path / "bundle"
    bundle.commit_section(out, "sam", _stage_with(out, "sam", {"enc.onnx": b"s1"}), {"precision": "fp32"})
    bundle.commit_section(out, "lmm", _stage_with(out, "lmm", {"dec.onnx": b"l1"}), {"opset": 17})
    first_lmm_dir = bundle.read_manifest(out)["lmm"]["dir"]
    manifest = bundle.commit_section(out, "lmm", _stage_with(out, "lmm", {"dec.onnx": b"l22"}), {"opset": 18})
    assert manifest["sam"]["files"]["enc.onnx"]["size"] == 2
    assert manifest["lmm"]["opset"] == 18
    assert manifest["lmm"]["files"]["dec.onnx"]["size"] == 3
    assert not (out / first_lmm_dir).exists(), "the replaced section's folder is removed"
    assert bundle.check_files(out, manifest, hashes=True) == []
    assert manifest["defaults"]["tau"] == bundle.DEFAULTS["tau"]


def test_interrupted_step_leaves_previous_bundle_intact(tmp_path):
    out = tmp_path / "bundle"
    bundle.commit_section(out, "lmm", _stage_with(out, "lmm", {"a.bin": b"old"}), {})
    before = (out / bundle.MANIFEST_NAME).read_text()
    _stage_with(out, "lmm", {"a.bin": b"half-written"})  # never committed: a crash mid-export
    assert (out / bundle.MANIFEST_NAME).read_text() == before
    assert bundle.check_files(out, bundle.read_manifest(out), hashes=True) == []
    # The next step cleans the stale staging folder up.
    bundle.stage_section(out, "lmm")
    assert len(list(out.glob(".staging-lmm-*"))) == 1


def test_check_files_reports_missing_truncated_and_corrupt(tmp_path):
    out = tmp_path / "bundle"
    manifest = bundle.commit_section(
        out, "lmm", _stage_with(out, "lmm", {"a.bin": b"abcd", "b.bin": b"efgh", "c.bin": b"ijkl"}), {}
    )
    folder = out / manifest["lmm"]["dir"]
    (folder / "a.bin").unlink()
    (folder / "b.bin").write_bytes(b"ef")
    (folder / "c.bin").write_bytes(b"ijkX")
    sizes_only = bundle.check_files(out, manifest)
    assert len(sizes_only) == 2
    assert any("missing" in line for line in sizes_only)
    with_hashes = bundle.check_files(out, manifest, hashes=True)
    assert len(with_hashes) == 3 and any("sha256" in line for line in with_hashes)


def test_read_manifest_refuses_other_versions_and_non_bundles(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        bundle.read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        bundle.read_manifest(tmp_path)
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps({"format": bundle.FORMAT, "format_version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        bundle.read_manifest(tmp_path)


def test_refuses_non_empty_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not empty"):
        bundle.stage_section(tmp_path, "lmm")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_update_defaults_merges(tmp_path):
    out = tmp_path / "bundle"
    bundle.commit_section(out, "lmm", _stage_with(out, "lmm", {"a.bin": b"x"}), {})
    manifest = bundle.update_defaults(out, {"tau": 0.5, "point_mapping": "quadrant"})
    assert manifest["defaults"]["tau"] == 0.5
    assert manifest["defaults"]["max_new_tokens"] == bundle.DEFAULTS["max_new_tokens"]


def test_staged_section_cleans_up_on_failure(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with bundle.staged_section(fresh, "sam") as staging:
            (staging / "enc.onnx").write_bytes(b"partial")
            raise RuntimeError("verification failed")
    assert not fresh.exists(), "a folder this step created must not survive a failure"

    existing = tmp_path / "existing"
    bundle.commit_section(existing, "lmm", _stage_with(existing, "lmm", {"a.bin": b"keep"}), {})
    before = (existing / bundle.MANIFEST_NAME).read_text()
    with pytest.raises(KeyboardInterrupt):
        with bundle.staged_section(existing, "sam") as staging:
            raise KeyboardInterrupt
    assert (existing / bundle.MANIFEST_NAME).read_text() == before
    assert not list(existing.glob(".staging-*"))
    assert bundle.check_files(existing, bundle.read_manifest(existing), hashes=True) == []


def test_package_versions_reads_installed_metadata():
    from importlib.metadata import version

    found = bundle.package_versions("numpy", "octopus-rt", "no-such-distribution-xyz")
    assert found["numpy"] == version("numpy")
    assert found["octopus_rt"] == version("octopus-rt")
    assert found["no_such_distribution_xyz"] == "unknown"
