"""`octopus-rt export lmm` on a FastVLM (transformers' FastVlmForConditionalGeneration: a timm CNN
tower whose last feature map, flattened row-major, is the image tokens) and the runtime on its bundle.

The references are transformers' own: `FastVlmModel.get_image_features`, `generate()` through the
processor (AutoModelForImageTextToText), and export/reference.ReferencePipeline (transformers
generate + its own closed-set math) for `Octopus.ask`. Tiny models: tests/fixtures_fastvlm.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
torch.set_num_threads(1)

from test_export_lmm import (  # noqa: E402
    QUESTIONS,
    STEPS,
    _run_cli,
    _runtime_style_generate,
    _section,
    _teacher_forced_agreement,
    _transformers_generate,
)

from octopus_rt.cli import main  # noqa: E402
from octopus_rt.errors import OctopusError  # noqa: E402


def _vision_graph(folder):
    import onnx

    return onnx.load(str(folder / "vision.onnx"))


def test_manifest_records_the_timm_tower(tiny_fastvlm_bundle):
    from onnx import TensorProto

    section, folder = _section(tiny_fastvlm_bundle("llama"))
    assert section["architecture"] == "llava"  # the runtime's LLaVA path runs it unchanged
    assert section["source"]["architectures"] == ["FastVlmForConditionalGeneration"]
    assert section["source"]["vision_model_type"] == "timm_wrapper"
    assert section["source"]["text_model_type"] == "llama"
    # 96 px / stride 32: a 3 x 3 feature map; the image size comes from the processor (timm configs have none).
    assert section["vision"]["num_image_tokens"] == 9 == section["prompt"]["num_image_tokens"]
    assert section["vision"]["precision"] == "fp32" and section["precision"] == "fp32"
    assert (section["preprocess"]["input_height"], section["preprocess"]["input_width"]) == (96, 96)
    graph = _vision_graph(folder).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 96, 96]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    check = section["verification"]
    assert check["tokens_identical"] and check["vision_precision"] == "fp32"
    assert check["thresholds"]["rtol"] == 1e-3  # judged by the fp32 criteria


def test_vision_graph_equals_transformers_image_features(tiny_fastvlm_dir, tiny_fastvlm_bundle):
    """vision.onnx against FastVlmModel.get_image_features on images the exporter did not use."""
    import onnxruntime as ort
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from octopus_rt.export.lmm_reference import synthetic_images

    section, folder = _section(tiny_fastvlm_bundle("llama"))
    processor = AutoProcessor.from_pretrained(tiny_fastvlm_dir("llama"))
    model = AutoModelForImageTextToText.from_pretrained(tiny_fastvlm_dir("llama")).eval()
    pixels = processor.image_processor(synthetic_images(6, seed=5)[2:], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output)).numpy()
    session = ort.InferenceSession(str(folder / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert got.shape == want.shape == (4, 9, section["vision"]["hidden_size"])
    assert np.abs(want).max() > 0.1  # the tower's features are not vanishing (fixtures_fastvlm)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("text, form", [("llama", "gqa"), ("phi3", "flat_kv"), ("qwen2", "gqa")])
def test_fp32_bundle_matches_transformers_generate(text, form, tiny_fastvlm_dir, tiny_fastvlm_bundle):
    """Batch 3 with left padding, driven the way the runtime drives a bundle, against generate()."""
    from octopus_rt.export.lmm_reference import synthetic_images

    bundle_dir = tiny_fastvlm_bundle(text, "auto" if form == "gqa" else form)
    assert _section(bundle_dir)[0]["decoder"]["form"] == form
    images = synthetic_images(4, seed=7)[1:]
    ids_rt, tokens_rt, logits_rt = _runtime_style_generate(bundle_dir, QUESTIONS, images, STEPS)
    ids_ref, tokens_ref, logits_ref = _transformers_generate(tiny_fastvlm_dir(text), QUESTIONS, images, STEPS)
    np.testing.assert_array_equal(ids_rt, ids_ref)
    np.testing.assert_array_equal(tokens_rt, tokens_ref)
    assert np.abs(logits_rt - logits_ref).max() <= 1e-4


def _assert_runtime_matches_reference(bundle_dir, images, *, probs_atol: float = 1e-4):
    """Octopus.ask (the lean runtime) against ReferencePipeline (transformers generate) on each image."""
    from octopus_rt.export.reference import ReferencePipeline
    from octopus_rt.runtime import Octopus

    octo = Octopus(bundle_dir, device="cpu", threads=1)
    reference = ReferencePipeline(bundle_dir, threads=1)
    for path in images:
        ours = octo.ask(path, "Which region is most degraded?", max_new_tokens=12, tau=4.0)
        ref = reference.ask(path, "Which region is most degraded?", max_new_tokens=12, tau=4.0)
        assert ours.token_ids == ref.token_ids and ours.text == ref.text
        assert (ours.probs is None) == (ref.probs is None)
        for word in ours.probs or {}:
            assert abs(ours.probs[word] - ref.probs[word]) <= probs_atol
        score, ref_score = octo.score(path), reference.score(path)
        assert abs(score.score - ref_score.score) <= probs_atol


def test_runtime_answers_like_transformers(tiny_fastvlm_bundle, runtime_images):
    _assert_runtime_matches_reference(tiny_fastvlm_bundle("llama"), runtime_images)


def test_fp16_vision_with_fp32_decoder(tiny_fastvlm_dir, tiny_fastvlm_bundle, runtime_images, capsys):
    """--vision-precision fp16: half the tower's bytes, float32 graph I/O (the runtime unchanged), the
    decoder untouched, judged by the fp16 criteria, recorded and shown by `octopus-rt verify`."""
    from onnx import TensorProto

    bundle_dir = tiny_fastvlm_bundle("llama", vision_precision="fp16")
    section, folder = _section(bundle_dir)
    fp32_section, fp32_folder = _section(tiny_fastvlm_bundle("llama"))
    assert section["precision"] == "fp32" and section["vision"]["precision"] == "fp16"
    graph = _vision_graph(folder).graph
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [TensorProto.FLOAT] * 2
    big = [init for init in graph.initializer if len(init.dims) >= 2]
    assert big and all(init.data_type == TensorProto.FLOAT16 for init in big)
    vision_bytes = (folder / "vision.onnx").stat().st_size
    assert vision_bytes < 0.55 * (fp32_folder / "vision.onnx").stat().st_size
    # The decoder graph is the fp32 one, byte for byte.
    assert section["files"]["decoder.onnx"]["sha256"] == fp32_section["files"]["decoder.onnx"]["sha256"]
    check = section["verification"]
    assert check["precision"] == "fp32" and check["vision_precision"] == "fp16"
    assert check["thresholds"]["min_cosine"] == 0.999 and check["thresholds"].get("rtol") is None
    cosine, top1 = _teacher_forced_agreement(bundle_dir, tiny_fastvlm_dir("llama"))
    assert cosine >= 0.999 and top1 >= 0.99, (cosine, top1)
    assert main(["verify", str(bundle_dir)]) == 0
    assert "fp16 vision" in capsys.readouterr().out
    _assert_runtime_matches_reference(bundle_dir, runtime_images[:2], probs_atol=1e-2)


def test_int4_decoder_with_fp16_vision_through_the_cli(tiny_fastvlm_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "lmm", str(tiny_fastvlm_dir("llama")), "--out", str(out), "--precision", "int4",
                 "--vision-precision", "fp16"]) == 0
    assert "fp16 vision" in capsys.readouterr().out
    section, folder = _section(out)
    assert section["vision"]["precision"] == "fp16" and section["decoder"]["quantization"]["method"] == "MatMulNBits"
    assert section["verification"]["vision_precision"] == "fp16"
    cosine, top1 = _teacher_forced_agreement(out, tiny_fastvlm_dir("llama"))
    assert cosine >= 0.99 and top1 >= 0.99, (cosine, top1)


def test_transposed_flattening_fails_verification(tiny_fastvlm_dir, tmp_path, monkeypatch):
    """The verification reference is transformers' get_image_features, not the exported wrapper: a
    wrapper that flattens the feature map column-major (the same tokens, in the wrong order) is refused."""
    from octopus_rt.export import llava_wrappers
    from octopus_rt.export.lmm import export_lmm

    def column_major(self, pixel_values):
        features = self.vision_tower(pixel_values, do_pooling=False, return_dict=True).last_hidden_state
        return self.projector(features.transpose(2, 3).flatten(2).transpose(1, 2))

    monkeypatch.setattr(llava_wrappers.FastVlmVisionWrapper, "forward", column_major)
    with pytest.raises(OctopusError, match="failed verification: .*vision features"):
        export_lmm(tiny_fastvlm_dir("llama"), tmp_path / "b", decoder_form="flat_kv")
    assert not (tmp_path / "b").exists()


def test_unsupported_text_model_is_refused(tmp_path, capsys):
    model = tmp_path / "fastvlm"
    model.mkdir()
    config = {"model_type": "fast_vlm", "architectures": ["FastVlmForConditionalGeneration"],
              "text_config": {"model_type": "gemma"}, "vision_config": {"model_type": "timm_wrapper"}}
    (model / "config.json").write_text(json.dumps(config))
    code, line = _run_cli(["export", "lmm", str(model), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and line.startswith("error:") and "(text gemma, vision timm_wrapper)" in line
    assert "FastVlmForConditionalGeneration (vision tower timm_wrapper)" in line
    assert not (tmp_path / "b").exists()


def test_unknown_vision_precision_is_refused(tiny_fastvlm_dir, tmp_path, capsys):
    code, line = _run_cli(["export", "lmm", str(tiny_fastvlm_dir("llama")), "--out", str(tmp_path / "b"),
                           "--vision-precision", "int4"], capsys)
    assert code != 0 and "unknown vision precision 'int4'" in line and "fp16" in line
    assert not (tmp_path / "b").exists()
