"""`Octopus` / `octopus-rt infer` on a Phi-3(.5)-Vision bundle against the independent PyTorch
reference (export/phi3v_reference.Phi3VReferencePipeline: torchvision HD transform, the official
prompt ids through transformers' tokenizer, the native model's own layout, a greedy loop with the
official cache re-run, the reference closed set and SamPredictor). Tiny seeded models: parity is
exact in tokens, 1e-4 in closed-set probabilities (tests/test_runtime_pipeline.py's standard)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from octopus_rt.cli import main  # noqa: E402
from octopus_rt.runtime import Octopus  # noqa: E402

QUESTIONS = ("Which region is most degraded?", "Where is the blur?")
# (width, height): landscape 2:1 (1 x 2 crops), portrait 1:3 (3 x 1, transposed), square (2 x 2).
SIZES = ((120, 60), (40, 120), (90, 90))


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 220
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3v_images")
    paths = []
    for index, (width, height) in enumerate(SIZES):
        path = folder / f"img{index}.png"
        Image.fromarray(_image(width, height, index)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def octo(phi3v_bundle):
    return Octopus(phi3v_bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def reference(phi3v_bundle):
    from octopus_rt.export.reference import reference_pipeline

    return reference_pipeline(phi3v_bundle, threads=1)


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _assert_same(ours, ref):
    assert ours.token_ids == ref.token_ids and ours.text == ref.text
    assert (ours.probs is None) == (ref.probs is None)
    if ours.probs is not None:
        assert ours.probs.keys() == ref.probs.keys()
        assert max(abs(ours.probs[w] - ref.probs[w]) for w in ours.probs) <= 1e-4
        width, height = ours.image_size
        assert abs(ours.point[0] - ref.point[0]) <= 1e-4 * width and abs(ours.point[1] - ref.point[1]) <= 1e-4 * height
    assert (ours.mask is None) == (ref.mask is None)
    if ours.mask is not None:
        assert _iou(ours.mask, ref.mask) >= 0.99 and abs(ours.mask_iou - ref.mask_iou) <= 1e-3


@pytest.mark.parametrize("tau, mapping", [(1.0, "paper"), (8.0, "quadrant")])
def test_ask_matches_the_reference(octo, reference, images, tau, mapping):
    grounded = 0
    for path in images:
        for question in QUESTIONS:
            ours = octo.ask(path, question, max_new_tokens=12, tau=tau, point_mapping=mapping)
            ref = reference.ask(path, question, max_new_tokens=12, tau=tau, point_mapping=mapping)
            _assert_same(ours, ref)
            grounded += ours.mask is not None
    assert grounded >= 2  # points and masks were really compared


def test_score_and_choose_match_the_reference(octo, reference, images):
    for path in images[:2]:
        ours, ref = octo.score(path), reference.score(path)
        assert abs(ours.score - ref.score) <= 1e-4
        assert max(abs(ours.probs[w] - ref.probs[w]) for w in ours.probs) <= 1e-4
        ours, ref = octo.choose(path, "Is it blurry?", ["Yes", "No", "Unsure"]), reference.choose(path, "Is it blurry?", ["Yes", "No", "Unsure"])
        assert ours.letter == ref.letter and max(abs(ours.probs[k] - ref.probs[k]) for k in ours.probs) <= 1e-4


def _spy(monkeypatch, graph):
    calls = []
    original = graph.run

    def run(inputs, outputs=None):
        calls.append({k: tuple(v.shape) if isinstance(v, np.ndarray) else tuple(v.shape()) for k, v in inputs.items()})
        return original(inputs, outputs)

    monkeypatch.setattr(graph, "run", run)
    return calls


def test_prefix_reuse_with_variable_token_counts(phi3v_bundle, images, monkeypatch):
    """Questions on one image share its prefix (image tokens: its own count); another aspect ratio
    gets its own count and prefix; answers equal a fresh instance's."""
    octo = Octopus(phi3v_bundle, device="cpu", threads=1)
    first = octo.ask(images[0], QUESTIONS[0], max_new_tokens=8, segment=False)
    vision = _spy(monkeypatch, octo.backend.loaded["vision"])
    decoder = _spy(monkeypatch, octo.decoder.graph)
    second = octo.ask(images[0], QUESTIONS[1], max_new_tokens=8, segment=False)
    assert "prefix" in second.cached and not vision
    entry = octo.cache.get(octo.cache.keys()[-1])
    # 2:1 at 4 crops: a 1 x 2 grid -> (2 + 1) * 144 + 1 + 2 * 12 = 457 image tokens after 4 prompt ids.
    assert len(entry.prefix_ids) == 4 + 457 and decoder[0]["past_key_values.0.key"][2] == 4 + 457
    other = octo.ask(images[1], QUESTIONS[1], max_new_tokens=8, segment=False)
    assert other.cached == () and len(vision) == 1 and vision[0]["pixel_values"][0] == 1 + 3  # global + 3 x 1 crops
    assert other.prompt_tokens - second.prompt_tokens == (4 * 144 + 1 + 4 * 12) - 457
    fresh = Octopus(phi3v_bundle, device="cpu", threads=1)
    for path, question, answer in ((images[0], QUESTIONS[1], second), (images[1], QUESTIONS[1], other)):
        assert fresh.ask(path, question, max_new_tokens=8, segment=False).token_ids == answer.token_ids
    assert first.timings_ms["vision_per_crop"] > 0


def test_num_crops_is_part_of_the_cache_key(phi3v_bundle, images):
    from octopus_rt.export.phi3v_reference import Phi3VReferencePipeline

    octo = Octopus(phi3v_bundle, device="cpu", threads=1)
    four = octo.ask(images[2], QUESTIONS[0], max_new_tokens=8, segment=False)
    octo.image_stage = octo.image_stage.with_num_crops(16)  # same instance, same per-image cache
    sixteen = octo.ask(images[2], QUESTIONS[0], max_new_tokens=8, segment=False)
    assert "vision" not in sixteen.cached and "prefix" not in sixteen.cached
    # A square image: 2 x 2 grid at 4 crops (757 tokens), 4 x 4 at 16 (2509).
    assert sixteen.prompt_tokens - four.prompt_tokens == 2509 - 757
    reference = Phi3VReferencePipeline(phi3v_bundle, num_crops=16, threads=1)
    assert sixteen.token_ids == reference.ask(images[2], QUESTIONS[0], max_new_tokens=8, segment=False).token_ids
    direct = Octopus(phi3v_bundle, device="cpu", threads=1, num_crops=16)
    assert direct.ask(images[2], QUESTIONS[0], max_new_tokens=8, segment=False).token_ids == sixteen.token_ids


def test_question_that_crosses_the_rope_switch_in_its_prefill(phi3v_bundle, reference, images):
    """The cached image prefix (461 tokens, short rope) + a long question passes 512 in the question's
    prefill: the runtime re-runs the whole prompt with the long table, like the reference's one pass."""
    octo = Octopus(phi3v_bundle, device="cpu", threads=1)
    octo.ask(images[0], QUESTIONS[0], max_new_tokens=4, segment=False)
    question = "Which region is most degraded? " + " ".join(["Look at the sky, the grass and the road."] * 8)
    ours = octo.ask(images[0], question, max_new_tokens=6, segment=False)
    assert "prefix" in ours.cached and 461 < 512 < ours.prompt_tokens
    assert ours.token_ids == reference.ask(images[0], question, max_new_tokens=6, segment=False).token_ids
    # Probabilities show the rotation (tokens of this bigram-like model barely do): measured 2e-3 apart
    # when the short-rotated prefix is kept.
    options = ["Yes", "No", "Unsure"]
    ours, ref = octo.choose(images[0], question, options), reference.choose(images[0], question, options)
    assert max(abs(ours.probs[k] - ref.probs[k]) for k in ours.probs) <= 1e-4


def test_ask_batch_equals_single_asks(octo, images):
    results = octo.ask_batch([images[0], images[1], images[0]], [QUESTIONS[0], QUESTIONS[1], "<|image_1|> again"])
    assert isinstance(results[2], Exception) and "image tags" in str(results[2])
    for result, path, question in zip(results[:2], images, QUESTIONS):
        assert result.token_ids == octo.ask(path, question).token_ids


def test_infer_cli_json_and_profile_show_the_crops(phi3v_bundle, images, tmp_path, capsys):
    profile = tmp_path / "trace.json"
    code = main(["infer", str(images[1]), QUESTIONS[0], "--bundle", str(phi3v_bundle), "--json", "--device", "cpu",
                 "--max-new-tokens", "6", "--profile", str(profile), "--threads", "1"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"preprocess", "vision", "vision_per_crop", "layout", "prefill_prefix"} <= set(record["timings_ms"])
    events = json.loads(profile.read_text())
    assert any(e.get("cat") == "octopus_stage" and e["name"] == "vision" for e in events)
    # onnxruntime's own node events of the vision session carry the crop batch (global view + 3 crops).
    shapes = [json.dumps(e.get("args", {})) for e in events if e.get("cat") == "Node"]
    assert any("4,3,336,336" in s.replace(" ", "") for s in shapes)
