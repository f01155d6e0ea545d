"""Session fixtures: tiny seeded FastVLMs (transformers' FastVlmForConditionalGeneration: the LLaVA
design with a timm CNN tower) built by training/model_factory.build_llava, and their bundles.

Made visible to every test module by one import line in tests/conftest.py. Factories, each kind
built / exported once per session:

    def test_x(tiny_fastvlm_dir, tiny_fastvlm_bundle):
        model_dir = tiny_fastvlm_dir("llama")                        # save_pretrained dir
        bundle = tiny_fastvlm_bundle("llama")                        # verified fp32, decoder form auto (gqa)
        half = tiny_fastvlm_bundle("llama", vision_precision="fp16")  # fp16 vision graph, fp32 decoder

The tower is the demo's (`efficientnet_lite0`: timm's tf_efficientnet_lite0, 1280 channels, stride
32) at 96 px, so 3 x 3 = 9 image tokens: a square grid whose row-major order a transposed flattening
would get wrong. Its weights get timm's own initialisation (build_llava does that: the transformers
wrapper's generic init makes the features vanish, ~1e-22, an image-blind model). The lm_head gets the bigram structure of fixtures_models.peaky_head (a clear top-1 margin).

Treat the returned folders as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["FASTVLM_TEXT_MODELS", "fastvlm_spec", "build_tiny_fastvlm", "tiny_fastvlm_dir", "tiny_fastvlm_bundle"]

FASTVLM_TEXT_MODELS = ("phi3", "llama", "qwen2")


def fastvlm_spec(text: str):
    """The TinyLlavaSpec of a FastVLM with text model `text` (phi3 / llama / qwen2)."""
    from octopus_rt.training.model_factory import TinyLlavaSpec

    return TinyLlavaSpec(text_model=text, vision_model="efficientnet_lite0", chat_template="phi3" if text == "phi3" else "llava",
                         image_size=96, patch_size=32, text_heads=4, text_kv_heads=2)


def build_tiny_fastvlm(text: str, out_dir: Path) -> Path:
    """Build the seeded FastVLM into out_dir (save_pretrained layout), with a peaky head."""
    import torch

    from fixtures_models import peaky_head
    from octopus_rt.training.model_factory import build_llava

    torch.set_num_threads(1)
    model, _ = build_llava(out_dir, fastvlm_spec(text))
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert float(model.model.vision_tower.timm_model.conv_head.weight.detach().std()) > 0.03  # timm's init (~0.04)
    peaky_head(model)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_fastvlm_dir(tmp_path_factory):
    """Factory text model -> Path of a tiny FastVLM save_pretrained directory."""
    cache: dict[str, Path] = {}

    def get(text: str = "llama") -> Path:
        if text not in cache:
            cache[text] = build_tiny_fastvlm(text, tmp_path_factory.mktemp(f"fastvlm_{text}") / "model")
        return cache[text]

    return get


@pytest.fixture(scope="session")
def tiny_fastvlm_bundle(tiny_fastvlm_dir, tmp_path_factory):
    """Factory (text, form, precision, vision_precision) -> Path of a bundle with a verified `lmm`
    section of tiny_fastvlm_dir(text); form "auto" (gqa here) or "flat_kv"; vision_precision None:
    the export's default (as `precision`)."""
    cache: dict[tuple, Path] = {}

    def get(text: str = "llama", form: str = "auto", precision: str = "fp32", vision_precision: str | None = None) -> Path:
        key = (text, form, precision, vision_precision)
        if key not in cache:
            import torch

            from octopus_rt.export.lmm import export_lmm

            torch.set_num_threads(1)
            bundle = tmp_path_factory.mktemp(f"fastvlm_bundle_{'_'.join(map(str, key))}") / "bundle"
            export_lmm(tiny_fastvlm_dir(text), bundle, precision=precision, decoder_form=form,
                       vision_precision=vision_precision)
            cache[key] = bundle
        return cache[key]

    return get
