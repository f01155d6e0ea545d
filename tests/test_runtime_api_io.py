"""What the thin CLI leaves to the API: results' JSON, the merged profile trace, the overlay drawn from
the RGB the call decoded, the SAM pre-check, and batches of records (runtime/batch.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from fixtures_serve import DEMO, EXAMPLES, QUESTION
from octopus_rt.bundle import BundleError
from octopus_rt.runtime.api import Octopus
from octopus_rt.runtime.batch import BatchRun, answer_record, mask_name
from octopus_rt.runtime.overlay import render_overlay
from octopus_rt.runtime.results import AskOptions


@pytest.fixture(scope="module")
def model() -> Octopus:
    return Octopus(DEMO, threads=1)


def _decodes(model: Octopus) -> int:
    return sum(1 for name, _, _ in model.last_stage_events if name == "decode_image")


def test_overlay_is_drawn_from_the_one_decode_of_the_call(model):
    fresh = Octopus(DEMO, threads=1)
    answer = fresh.ask(EXAMPLES[1], QUESTION, overlay=True)
    assert _decodes(fresh) == 1  # the pixels the model saw are the ones drawn on
    with Image.open(EXAMPLES[1]) as image:
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))  # decoded independently, by Pillow
    expected = render_overlay(rgb, answer.mask, answer.point, answer.text)
    assert np.array_equal(np.asarray(answer.overlay), np.asarray(expected))
    # A cache hit skips decoding; asking for an overlay then decodes once, and only then.
    again = fresh.ask(EXAMPLES[1], QUESTION)
    assert again.overlay is None and _decodes(fresh) == 0 and "prefix" in again.cached
    drawn = fresh.ask(EXAMPLES[1], QUESTION, options=AskOptions(overlay=True))
    assert _decodes(fresh) == 1 and np.array_equal(np.asarray(drawn.overlay), np.asarray(expected))


def test_end_profiling_writes_one_trace_with_the_stages(tmp_path):
    profiled = Octopus(DEMO, threads=1, profile_dir=tmp_path / "ort")
    profiled.ask(EXAMPLES[0], QUESTION, max_new_tokens=4)
    stages = [name for name, _, _ in profiled.last_stage_events]
    files = profiled.end_profiling(tmp_path / "trace.json")
    assert files and all(f.parent == tmp_path / "ort" for f in files)
    events = json.loads((tmp_path / "trace.json").read_text())
    ort_events = [e for f in files for e in json.loads(f.read_text())]
    ours = [e for e in events if e.get("cat") == "octopus_stage"]
    assert [e["name"] for e in ours] == stages and min(e["ts"] for e in ours) == 0
    assert len(events) == len(ort_events) + len(ours) and any(e.get("cat") == "Node" for e in events)


def test_results_serialise_to_plain_json(model):
    score = model.score(EXAMPLES[0])
    assert score.to_json() == json.loads(json.dumps(score.to_json()))
    assert (score.to_json()["score"], score.to_json()["probs"]) == (score.score, score.probs)
    choice = model.choose(EXAMPLES[0], "Is the image blurry?", ["yes", "no"])
    assert {k: choice.to_json()[k] for k in ("letter", "index", "option", "probs")} == {
        "letter": choice.letter, "index": choice.index, "option": choice.option, "probs": choice.probs}


def test_require_sam_names_the_missing_section(tmp_path):
    bundle = tmp_path / "lmm-only"
    import shutil

    shutil.copytree(DEMO, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    shutil.rmtree(bundle / manifest.pop("sam")["dir"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    Octopus(DEMO, threads=1).require_sam()
    with pytest.raises(BundleError, match="has no sam section"):
        Octopus(bundle, threads=1).require_sam()


def test_a_batch_run_equals_the_api_record_by_record(model, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "image": str(EXAMPLES[0]), "question": QUESTION},
        {"id": "b", "image": str(EXAMPLES[1]), "task": "score"},
        {"id": "c", "image": str(EXAMPLES[2]), "question": "Is the image blurry?", "options": ["yes", "no"]},
        {"id": "d", "image": str(EXAMPLES[2])},
    ]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    out, masks = tmp_path / "out.jsonl", tmp_path / "masks"
    with BatchRun(source, out, masks=masks) as run:
        report = run.run(model, AskOptions(max_new_tokens=6))
    assert (report.done, report.errors, report.skipped) == (3, 2, 0)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    fresh = Octopus(DEMO, threads=1)
    answer = fresh.ask(EXAMPLES[0], QUESTION, max_new_tokens=6)
    assert records["a"]["text"] == answer.text and records["a"]["point"] == (
        None if answer.point is None else list(answer.point))
    if answer.mask is not None:
        assert records["a"]["mask"] == str(masks / mask_name("a"))
        assert np.array_equal(np.asarray(Image.open(records["a"]["mask"])) > 127, answer.mask)
    assert records["b"]["score"] == fresh.score(EXAMPLES[1]).score
    assert records["c"]["letter"] == fresh.choose(EXAMPLES[2], "Is the image blurry?", ["yes", "no"]).letter
    assert "question" in records["d"]["error"] and records["d"]["line"] == 4
    assert records["line-5"]["error"].startswith("line 5 is not a JSON object")
    with BatchRun(source, out) as again:  # resume: everything is in the output already
        assert again.run(model).skipped == 5
    with pytest.raises(Exception, match="question"):
        answer_record(model, {"image": str(EXAMPLES[0])})
