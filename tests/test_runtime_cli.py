"""`octopus-rt infer` / `infer-batch`: outputs, resumable batches, one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octopus_rt.cli import main
from image_files import png_header_bytes

QUESTION = "Which region is most degraded?"


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_json_mask_overlay_profile(runtime_bundle, runtime_images, tmp_path, capsys):
    from octopus_rt.runtime import Octopus

    image = runtime_images[0]
    mask_png, overlay_png, profile = tmp_path / "m.png", tmp_path / "o.png", tmp_path / "p.json"
    code, out, err = _run(
        capsys, "infer", image, QUESTION, "--bundle", runtime_bundle, "--json", "--mask", mask_png,
        "--overlay", overlay_png, "--profile", profile, "--max-new-tokens", 12, "--threads", 1, "--device", "cpu",
    )
    assert code == 0, err
    record = json.loads(out)
    for key in ("text", "token_ids", "point", "probs", "whole_image", "mask", "mask_iou", "timings_ms", "device"):
        assert key in record
    expected = Octopus(runtime_bundle, device="cpu", threads=1).ask(image, QUESTION, max_new_tokens=12)
    assert record["text"] == expected.text and record["token_ids"] == expected.token_ids
    assert record["point"] == pytest.approx(list(expected.point))
    assert record["probs"] == pytest.approx(expected.probs)
    assert record["mask"] == str(mask_png)
    written = np.asarray(Image.open(mask_png))
    assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
    np.testing.assert_array_equal(written == 255, expected.mask)
    with Image.open(overlay_png) as overlay, Image.open(image) as original:
        assert overlay.mode == "RGB" and overlay.width % original.width == 0
        assert overlay.height > original.height * (overlay.width // original.width)  # caption band
    trace = json.loads(profile.read_text())
    stages = {e["name"] for e in trace if e.get("cat") == "octopus_stage"}
    assert {"vision", "prefill", "decode", "sam_encoder", "sam_decoder"} <= stages
    assert any(e.get("cat") == "Node" for e in trace)  # onnxruntime's per-node events


def test_infer_human_output(runtime_bundle, runtime_images, capsys):
    code, out, _ = _run(capsys, "infer", runtime_images[1], QUESTION, "--bundle", runtime_bundle,
                        "--max-new-tokens", 6, "--point-mapping", "quadrant", "--tau", 2.0)
    assert code == 0
    assert out.startswith("answer: ") and "time:" in out


def test_infer_bad_inputs_fail_with_one_line(runtime_bundle, tiny_lmm_bundle, runtime_images, tmp_path, capsys, monkeypatch):
    image = runtime_images[0]
    lmm_only = tiny_lmm_bundle("phi3_clip")
    capsys.readouterr()  # drop the fixture's export progress
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not an image")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_bytes(10_000, 10_000))
    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[:200])
    bad_version = tmp_path / "v99"
    shutil.copytree(runtime_bundle, bad_version)
    manifest = json.loads((bad_version / "manifest.json").read_text())
    (bad_version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    missing_file = tmp_path / "missing_file"
    shutil.copytree(runtime_bundle, missing_file)
    (missing_file / manifest["lmm"]["dir"] / "tokenizer.json").unlink()
    cases = [
        ((empty, QUESTION, "--bundle", runtime_bundle), "empty"),
        ((garbage, QUESTION, "--bundle", runtime_bundle), "not a readable image"),
        ((cut, QUESTION, "--bundle", runtime_bundle), "truncated"),
        ((tmp_path / "nope.png", QUESTION, "--bundle", runtime_bundle), "image not found"),
        ((huge, QUESTION, "--bundle", runtime_bundle), "above the limit"),
        ((image, "  ", "--bundle", runtime_bundle), "question is empty"),
        ((image, "blur " * 3000, "--bundle", runtime_bundle), "question too long"),
        ((image, QUESTION, "--bundle", tmp_path / "no_bundle"), "bundle not found"),
        ((image, QUESTION, "--bundle", bad_version), "format version 99"),
        ((image, QUESTION, "--bundle", missing_file), "file missing"),
        ((image, QUESTION, "--bundle", lmm_only, "--mask", tmp_path / "m.png"), "no sam section"),
        ((image, QUESTION, "--bundle", runtime_bundle, "--device", "quantum"), "unknown device"),
        ((image, QUESTION, "--bundle", runtime_bundle, "--point-mapping", "corner"), "unknown point mapping"),
    ]
    for args, message in cases:
        code, out, err = _run(capsys, "infer", *args, "--max-new-tokens", 2)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, err)
    # No --bundle, no $OCTOPUS_BUNDLE, no demo bundle installed: says what to do.
    monkeypatch.delenv("OCTOPUS_BUNDLE", raising=False)
    monkeypatch.setattr("octopus_rt.runtime.cli.demo_bundle", lambda: tmp_path / "demo" / "bundle")
    code, _, err = _run(capsys, "infer", image, QUESTION)
    assert code == 2 and "pass --bundle DIR or set OCTOPUS_BUNDLE" in err
    monkeypatch.setenv("OCTOPUS_BUNDLE", str(runtime_bundle))
    code, out, _ = _run(capsys, "infer", image, QUESTION, "--max-new-tokens", 2, "--json")
    assert code == 0 and json.loads(out)["bundle"] == str(runtime_bundle)


def test_infer_batch_resumes_and_records_errors(runtime_bundle, runtime_images, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    images = tmp_path / "imgs"
    images.mkdir()
    for path in runtime_images:
        shutil.copy(path, images / path.name)
    lines = [
        {"id": "a", "image": f"imgs/{runtime_images[0].name}", "question": QUESTION},
        {"id": "b", "image": "imgs/missing.png", "question": QUESTION},
        {"id": "c", "image": f"imgs/{runtime_images[1].name}", "question": "Where is the blur?"},
        {"id": "d", "image": f"imgs/{runtime_images[2].name}", "task": "score"},
        {"id": "e", "image": f"imgs/{runtime_images[2].name}", "question": "Is it sharp?", "options": ["yes", "no"]},
    ]
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out.jsonl"
    masks = tmp_path / "masks"
    args = ("infer-batch", source, "--out", out, "--bundle", runtime_bundle, "--max-new-tokens", 6, "--masks", masks)
    code, _, err = _run(capsys, *args)
    assert code == 1  # some lines failed; the others were answered
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e", "line-6"]
    by_id = {r["id"]: r for r in records}
    assert "error" in by_id["b"] and "image not found" in by_id["b"]["error"]
    assert "error" in by_id["line-6"]
    assert "text" in by_id["a"] and "error" not in by_id["a"]
    assert 0.0 <= by_id["d"]["score"] <= 1.0 and by_id["e"]["letter"] in ("A", "B")
    if by_id["a"]["mask"] is not None:  # the id, file-safe, plus a hash of it (docs/runtime.md)
        assert Path(by_id["a"]["mask"]).parent == masks and Path(by_id["a"]["mask"]).name.startswith("a-")
        assert Path(by_id["a"]["mask"]).is_file()
    # Resume: a new line is answered, the finished ones are skipped (not duplicated).
    with open(source, "a") as handle:
        handle.write(json.dumps({"id": "f", "image": f"imgs/{runtime_images[0].name}", "question": "Where?"}) + "\n")
    before = out.read_text()
    code, _, err = _run(capsys, *args)
    after = out.read_text()
    assert after.startswith(before)
    new = [json.loads(x) for x in after[len(before):].splitlines()]
    assert [r["id"] for r in new] == ["f"] and "already in" in err
    # A folder of images with one question.
    folder_out = tmp_path / "folder.jsonl"
    code, _, _ = _run(capsys, "infer-batch", images, "--question", QUESTION, "--out", folder_out,
                      "--bundle", runtime_bundle, "--max-new-tokens", 3)
    assert code == 0
    assert sorted(json.loads(x)["id"] for x in folder_out.read_text().splitlines()) == sorted(p.name for p in runtime_images)
