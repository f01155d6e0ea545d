"""`octopus-rt verify BUNDLE`: re-hashes every file of a bundle against its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from octopus_rt.cli import main


@pytest.fixture()
def bundle_copy(tiny_lmm_bundle, tmp_path) -> Path:
    """A private copy of the session's tiny phi3+clip bundle (safe to damage)."""
    target = tmp_path / "bundle"
    shutil.copytree(tiny_lmm_bundle("phi3_clip"), target)
    return target


def _lmm_file(bundle_dir: Path, name: str) -> Path:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return bundle_dir / manifest["lmm"]["dir"] / name


def _verify(bundle_dir: Path, capsys) -> tuple[int, str, str]:
    code = main(["verify", str(bundle_dir)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_bundle_is_ok(bundle_copy, capsys):
    code, out, err = _verify(bundle_copy, capsys)
    assert code == 0, err
    assert out.startswith("OK ") and "lmm" in out


def test_flipped_byte_same_size_is_caught(bundle_copy, capsys):
    path = _lmm_file(bundle_copy, "decoder.onnx")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = _verify(bundle_copy, capsys)
    assert code != 0
    assert "decoder.onnx sha256 does not match" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 problem(s)")


def test_truncated_file_is_caught(bundle_copy, capsys):
    path = _lmm_file(bundle_copy, "embed_tokens.npy")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    code, _, err = _verify(bundle_copy, capsys)
    assert code != 0
    assert f"embed_tokens.npy has {len(data) - 7} bytes, manifest says {len(data)}" in err


def test_missing_file_is_caught(bundle_copy, capsys):
    _lmm_file(bundle_copy, "tokenizer.json").unlink()
    code, _, err = _verify(bundle_copy, capsys)
    assert code != 0
    assert "file missing" in err and "tokenizer.json" in err


def test_wrong_format_version_is_refused(bundle_copy, capsys):
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    code, _, err = _verify(bundle_copy, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "format version 99" in lines[0]


def test_not_a_bundle(tmp_path, capsys):
    code, _, err = _verify(tmp_path, capsys)
    assert code != 0 and "not a model bundle" in err
