"""The runtime against the PyTorch reference pipeline (export/reference.py), and its cache / decode
loop mechanics. Tiny seeded models: parity is exact in tokens, 1e-4 in closed-set probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from octopus_rt.bundle import BundleError  # noqa: E402
from octopus_rt.errors import InputError  # noqa: E402
from octopus_rt.runtime import Octopus  # noqa: E402
from octopus_rt.runtime.backends import Graph  # noqa: E402

QUESTIONS = ("Which region is most degraded?", "Where is the blur?")


@pytest.fixture(scope="module")
def octo(runtime_bundle):
    return Octopus(runtime_bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def reference(runtime_bundle):
    from octopus_rt.export.reference import ReferencePipeline

    return ReferencePipeline(runtime_bundle, threads=1)


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _assert_same_answer(ours, ref, image_size):
    assert ours.token_ids == ref.token_ids
    assert ours.text == ref.text
    assert ours.whole_image == ref.whole_image
    assert (ours.probs is None) == (ref.probs is None)
    if ours.probs is not None:
        assert ours.probs.keys() == ref.probs.keys()
        for word in ours.probs:
            assert abs(ours.probs[word] - ref.probs[word]) <= 1e-4
        width, height = image_size
        assert abs(ours.point[0] - ref.point[0]) <= 1e-4 * width
        assert abs(ours.point[1] - ref.point[1]) <= 1e-4 * height
    assert (ours.mask is None) == (ref.mask is None)
    if ours.mask is not None:
        assert ours.mask.shape == ref.mask.shape == (image_size[1], image_size[0])
        assert _iou(ours.mask, ref.mask) >= 0.99
        assert abs(ours.mask_iou - ref.mask_iou) <= 1e-3


@pytest.mark.parametrize(
    "tau, mapping, multimask", [(1.0, "paper", True), (8.0, "quadrant", True), (20.0, "paper", False)]
)
def test_ask_matches_reference(octo, reference, runtime_images, tau, mapping, multimask):
    assert octo.lmm.decoder.form == "gqa"  # auto's choice; the flat_kv form: the test below
    grounded = 0
    for path in runtime_images:
        for question in QUESTIONS:
            kwargs = dict(max_new_tokens=16, tau=tau, point_mapping=mapping, multimask=multimask)
            ours = octo.ask(path, question, **kwargs)
            ref = reference.ask(path, question, **kwargs)
            _assert_same_answer(ours, ref, ours.image_size)
            grounded += ours.mask is not None
    # The comparison is only meaningful if some answers were grounded and segmented.
    assert grounded >= 2


def test_flat_kv_form_matches_reference(flat_kv_runtime_bundle, reference, runtime_images):
    """The traced flat_kv decoder form (the TensorRT / CUDA one) through the same runtime API."""
    octo = Octopus(flat_kv_runtime_bundle, device="cpu", threads=1)
    assert octo.lmm.decoder.form == "flat_kv"
    grounded = 0
    for path in runtime_images:
        for question in QUESTIONS:
            ours = octo.ask(path, question, max_new_tokens=16, tau=8.0)
            ref = reference.ask(path, question, max_new_tokens=16, tau=8.0)
            _assert_same_answer(ours, ref, ours.image_size)
            grounded += ours.mask is not None
    assert grounded >= 2


def test_other_architecture_matches_reference(tiny_lmm_bundle, runtime_images):
    """Llama (GQA) text model, SigLIP vision, LLaVA-1.5 chat template; no SAM section."""
    from octopus_rt.export.reference import ReferencePipeline

    bundle = tiny_lmm_bundle("llama_siglip")
    octo = Octopus(bundle, device="cpu", threads=1)
    reference = ReferencePipeline(bundle, threads=1)
    for path in runtime_images[:2]:
        ours = octo.ask(path, QUESTIONS[0], max_new_tokens=12, tau=4.0)
        ref = reference.ask(path, QUESTIONS[0], max_new_tokens=12, tau=4.0)
        _assert_same_answer(ours, ref, ours.image_size)
        assert ours.mask is None  # no sam section: answer and point only


def test_score_and_choose_match_reference(octo, reference, runtime_images):
    for path in runtime_images:
        ours, ref = octo.score(path), reference.score(path)
        assert abs(ours.score - ref.score) <= 1e-4
        for word, p in ref.probs.items():
            assert abs(ours.probs[word] - p) <= 1e-4
        options = ["sharp", "blurry", "noisy"]
        ours_c, ref_c = octo.choose(path, "What is wrong?", options), reference.choose(path, "What is wrong?", options)
        assert ours_c.letter == ref_c.letter and ours_c.option == options[ours_c.index]
        assert set(ours_c.probs) == {"A", "B", "C"}
        for letter, p in ref_c.probs.items():
            assert abs(ours_c.probs[letter] - p) <= 1e-4


def _spy(monkeypatch, graph: Graph):
    """Record every call of one graph: {input name: shape} (numpy arrays and OrtValues alike)."""
    calls: list[dict[str, tuple[int, ...]]] = []
    original = graph.run

    def run(inputs, outputs=None):
        calls.append({k: tuple(v.shape) if isinstance(v, np.ndarray) else tuple(v.shape()) for k, v in inputs.items()})
        return original(inputs, outputs)

    monkeypatch.setattr(graph, "run", run)
    return calls


def _spy_decoder(monkeypatch, decoder):
    """Record every decoder call as (new tokens, cache length before the call, KV storage id), for
    either form: the flat_kv graph's inputs, or the gqa decoder's lengths and shared buffer."""
    calls: list[tuple[int, int, int]] = []
    if decoder.graph.input_names[1] == "attention_mask":  # flat_kv
        original = decoder.graph.run

        def run(inputs, outputs=None):
            past = inputs["past_key_values.0.key"]
            shape = past.shape if isinstance(past, np.ndarray) else past.shape()
            assert inputs["attention_mask"].shape == (1, shape[2] + inputs["inputs_embeds"].shape[1])
            assert inputs["position_ids"].shape == inputs["inputs_embeds"].shape[:2]
            for name in decoder.past_names:
                value = inputs[name]
                assert (value.shape if isinstance(value, np.ndarray) else value.shape())[2] == shape[2]
            calls.append((inputs["inputs_embeds"].shape[1], shape[2], id(past)))
            return original(inputs, outputs)

        monkeypatch.setattr(decoder.graph, "run", run)
    else:
        original = decoder.run_buffers

        def run_buffers(embeds, lengths, buffers):
            calls.append((embeds.shape[1], int(lengths[0]) - embeds.shape[1], id(buffers[0])))
            return original(embeds, lengths, buffers)

        monkeypatch.setattr(decoder, "run_buffers", run_buffers)
    return calls


@pytest.fixture(params=["gqa", "flat_kv"])
def any_form_bundle(request):
    return request.getfixturevalue("runtime_bundle" if request.param == "gqa" else "flat_kv_runtime_bundle")


def test_every_decode_call_is_one_token_with_a_growing_past(any_form_bundle, runtime_images, monkeypatch):
    octo = Octopus(any_form_bundle, device="cpu", threads=1)
    calls = _spy_decoder(monkeypatch, octo.decoder)
    answer = octo.ask(runtime_images[0], QUESTIONS[0], max_new_tokens=10, segment=False)
    prompt = octo.manifest["lmm"]["prompt"]  # the raw manifest strings (docs/bundle.md, `prompt`)
    ids = octo.tokenizer.encode(
        prompt["prefix"] + prompt["image_token"] * prompt["num_image_tokens"] + prompt["infix"]
        + QUESTIONS[0] + prompt["suffix"],
        add_special_tokens=prompt["add_special_tokens"],
    ).ids
    # Prefill: the shared prefix from an empty cache, then the question's own tokens.
    prefix_len = calls[0][0]
    assert calls[0][1] == 0
    assert calls[1][1] == prefix_len and prefix_len + calls[1][0] == len(ids)
    decode = calls[2:]
    assert len(decode) == len(answer.token_ids) - 1 and len(decode) >= 3
    for step, (new, past, _) in enumerate(decode):
        assert (new, past) == (1, len(ids) + step)
    if octo.lmm.decoder.form == "gqa":
        # One buffer, allocated for prompt + answer, is written in place by the question and every
        # step; the cached prefix's own buffer is another one (never extended).
        assert len({storage for _, _, storage in calls[1:]}) == 1 and calls[0][2] != calls[1][2]


def test_second_question_reuses_the_image_cache(any_form_bundle, runtime_images, monkeypatch):
    octo = Octopus(any_form_bundle, device="cpu", threads=1)
    path = runtime_images[1]
    first = octo.ask(path, QUESTIONS[0], max_new_tokens=16)
    assert first.mask is not None and first.cached == ()
    decoder_calls = _spy_decoder(monkeypatch, octo.decoder)
    vision_calls = _spy(monkeypatch, octo.backend.loaded["vision"])
    encoder_calls = _spy(monkeypatch, octo.backend.loaded["sam_encoder"])
    second = octo.ask(path, QUESTIONS[1], max_new_tokens=16)
    third = octo.ask(path, QUESTIONS[0], max_new_tokens=16)
    assert "prefix" in second.cached and "decode_image" not in second.timings_ms
    assert not vision_calls and not encoder_calls
    # The second question's first decoder call starts after the cached prefix: only its own tokens.
    prefix_len = len(octo.cache.get(octo.cache.keys()[0]).prefix_ids)
    assert decoder_calls[0][1] == prefix_len
    assert all(past >= prefix_len for _, past, _ in decoder_calls)
    # Same results as a fresh instance (and as the first time for a repeated question).
    fresh = Octopus(any_form_bundle, device="cpu", threads=1).ask(path, QUESTIONS[1], max_new_tokens=16)
    assert second.token_ids == fresh.token_ids and second.text == fresh.text
    assert (second.probs is None) == (fresh.probs is None)
    if second.probs is not None:
        assert second.probs == pytest.approx(fresh.probs, abs=1e-6)
        np.testing.assert_array_equal(second.mask, fresh.mask)
    assert third.token_ids == first.token_ids and third.probs == pytest.approx(first.probs, abs=1e-6)
    np.testing.assert_array_equal(third.mask, first.mask)


def test_cache_is_bounded_and_keyed_by_content(runtime_bundle, runtime_images):
    octo = Octopus(runtime_bundle, device="cpu", threads=1, cache_images=2)
    for path in runtime_images:
        octo.ask(path, QUESTIONS[0], max_new_tokens=2, segment=False)
    assert len(octo.cache) == 2
    # The same pixels given as bytes hit the entry made from the path (key = file content).
    again = octo.ask(runtime_images[2].read_bytes(), QUESTIONS[1], max_new_tokens=2, segment=False)
    assert "prefix" in again.cached


def test_whole_image_answer_skips_sam(runtime_bundle, runtime_images, tmp_path):
    octo = Octopus(runtime_bundle, device="cpu", threads=1)
    answer = octo.ask(runtime_images[0], QUESTIONS[0], max_new_tokens=8, segment=False)
    words = answer.text.split()
    assert words, "the tiny model gave an empty answer"
    bundle = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    # Declare a phrase of this very answer a whole-image phrase (a trained model says "the whole image").
    manifest["lmm"]["whole_image_phrases"] = [words[0].upper()]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    whole = Octopus(bundle, device="cpu", threads=1).ask(runtime_images[0], QUESTIONS[0], max_new_tokens=8)
    assert whole.whole_image and whole.text == answer.text
    assert whole.mask.dtype == bool and whole.mask.all() and whole.mask.shape == (72, 96)
    assert whole.mask_iou == 1.0
    assert "sam_encoder" not in whole.timings_ms and "sam_decoder" not in whole.timings_ms


def test_bundle_without_sam_answers_without_mask(tiny_lmm_bundle, runtime_images):
    octo = Octopus(tiny_lmm_bundle("phi3_clip"), device="cpu", threads=1)
    assert not octo.has_sam
    answer = octo.ask(runtime_images[0], QUESTIONS[0], max_new_tokens=8)
    assert answer.mask is None
    with pytest.raises(BundleError, match="no sam section"):
        octo.sam  # noqa: B018


def test_bad_questions_and_options(octo, runtime_images):
    with pytest.raises(InputError, match="question is empty"):
        octo.ask(runtime_images[0], "   ")
    with pytest.raises(InputError, match="question too long"):
        octo.ask(runtime_images[0], "blur " * (octo.context + 10))
    with pytest.raises(InputError, match="tau"):
        octo.ask(runtime_images[0], "Where?", tau=0)
    with pytest.raises(InputError, match="point mapping"):
        octo.ask(runtime_images[0], "Where?", point_mapping="corner")
    with pytest.raises(InputError, match="1 to 4 options"):
        octo.choose(runtime_images[0], "Which?", ["a"] * 5)


def test_load_time_checks(runtime_bundle, tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        Octopus(tmp_path / "nope")
    bundle = tmp_path / "b"
    shutil.copytree(runtime_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        Octopus(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    decoder = bundle / manifest["lmm"]["dir"] / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:-10])
    with pytest.raises(BundleError, match="decoder.onnx has .* bytes, manifest says"):
        Octopus(bundle)
    decoder.unlink()
    with pytest.raises(BundleError, match="file missing"):
        Octopus(bundle)


def test_segment_at_given_points_matches_sam_predictor(octo, reference, runtime_images):
    """SAM stage alone, at points all over the image (corners included), both multimask settings."""
    from octopus_rt.runtime.images import load_image

    for path in runtime_images[:2]:
        rgb = load_image(path).rgb
        height, width = rgb.shape[:2]
        for point in [(0.0, 0.0), (width / 2, height / 2), (width * 0.8, height * 0.3), (width - 1.0, height - 1.0)]:
            for multimask in (True, False):
                ours = octo.segment(path, point, multimask=multimask)
                mask, iou = reference.segment(rgb, point, multimask)
                assert ours.mask.shape == mask.shape == (height, width)
                assert _iou(ours.mask, mask) >= 0.99
                assert abs(ours.iou - iou) <= 1e-3
        assert ours.cached  # the embedding was computed once per image


def test_sam_stage_holds_the_image_embedding_like_sam_predictor(octo, reference, runtime_images):
    """`set_image` then `predict(point)` (segment-anything's SamPredictor contract); an embedding
    returned by `set_image` can be passed back after another image was set."""
    from octopus_rt.runtime.backends import Backend
    from octopus_rt.runtime.images import load_image
    from octopus_rt.runtime.sam_stage import SamStage

    stage = SamStage(Backend(device="cpu", threads=1), octo.bundle_dir, octo.spec.sam)
    with pytest.raises(InputError, match="set_image"):
        stage.predict((1.0, 1.0))
    first, second = (load_image(path).rgb for path in runtime_images[:2])
    held = stage.set_image(first)
    assert held.original_hw == first.shape[:2]
    stage.set_image(second)
    for rgb, image in ((second, None), (first, held)):
        height, width = rgb.shape[:2]
        point = (width * 0.3, height * 0.6)
        ours = stage.predict(point, image=image)
        mask, iou = reference.segment(rgb, point, True)
        assert ours.mask.shape == (height, width)
        assert _iou(ours.mask, mask) >= 0.99 and abs(ours.iou - iou) <= 1e-3


def test_the_reference_shares_no_logic_with_the_runtime():
    """Parity proves something only if the reference computes independently: its modules import
    nothing of the runtime but result types and constants."""
    import ast
    from pathlib import Path

    allowed = {"octopus_rt.runtime.results": None, "octopus_rt.runtime.images": {"DEFAULT_MAX_PIXELS", "ImageInput"}}
    export_dir = Path(__file__).resolve().parents[1] / "export"
    for path in sorted(export_dir.glob("reference*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("octopus_rt.runtime"):
                assert node.module in allowed, (path.name, node.module)
                names = allowed[node.module]
                assert names is None or {a.name for a in node.names} <= names, (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("octopus_rt.runtime") for a in node.names), path.name


def test_awkward_image_files_match_reference(octo, reference, tmp_path):
    """Images the two loaders must agree on: EXIF-rotated JPEG, RGBA, 16-bit grey and palette PNGs
    (the mask's shape shows the orientation; the answer shows the pixels)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:48, 0:80]
    rgb = np.clip(np.stack([xs * 3, ys * 5, (xs + ys) * 2], -1) + rng.normal(0, 15, (48, 80, 3)), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)]), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257 + 100).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    for name in ("rotated.jpg", "alpha.png", "grey16.png", "palette.png"):
        path = tmp_path / name
        ours = octo.ask(path, QUESTIONS[0], max_new_tokens=8, tau=4.0)
        ref = reference.ask(path, QUESTIONS[0], max_new_tokens=8, tau=4.0)
        _assert_same_answer(ours, ref, ours.image_size)
        assert ours.image_size == ((48, 80) if name == "rotated.jpg" else (80, 48)), name
