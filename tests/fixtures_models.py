"""Session fixtures: tiny seeded LLaVA models (training/model_factory.py) and their exported bundles.

Made visible to every test module by one import line in tests/conftest.py. Both fixtures are
factories, so a test asks only for the kinds it needs and each kind is built / exported once per
session:

    def test_x(tiny_llava_dir, tiny_lmm_bundle):
        model_dir = tiny_llava_dir("phi3_clip")      # save_pretrained dir (model, processor, tokenizer)
        bundle = tiny_lmm_bundle("llama_siglip")     # bundle dir with a verified fp32 `lmm` section
        flat = tiny_lmm_bundle("llama_siglip", "flat_kv")  # the same with the traced flat_kv decoder

Kinds are "<text>_<vision>" with text in phi3 / llama / qwen2 and vision in clip / siglip (every text
model has grouped-query attention: 4 query heads, 2 KV heads). The model case phi3_clip uses the
Phi-3 chat template, the others LLaVA-1.5's USER/ASSISTANT template.

Treat the returned folders as read-only (copy them with shutil.copytree before modifying).

Peaky logits: a seeded random model's logits are nearly flat (std ~0.15), so greedy decoding and
top-1 agreement (of fp16 / int8 / int4 graphs) hinge on near-ties that no trained model has; and
scaling the head alone does not help, since it scales the quantisation error with the margin. The
lm_head of these test models is therefore given a bigram structure (see build_tiny_llava) that
yields a clear top-1 margin, while greedy text still varies from token to token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["LLAVA_KINDS", "LM_HEAD_SCALE", "llava_spec", "build_tiny_llava", "peaky_head", "tiny_llava_dir", "tiny_lmm_bundle",
           "tiny_grounding_bundle"]

LLAVA_KINDS = ("phi3_clip", "llama_clip", "llama_siglip", "qwen2_clip", "qwen2_siglip", "phi3_siglip")
# The final hidden state has RMS 1 (norm 8 at width 64): the aligned head row gives a logit of ~8
# against ~N(0, 1) for the others, a margin of a few units like a trained LM's next-token logits.
LM_HEAD_SCALE = 1.0


def llava_spec(kind: str):
    """The TinyLlavaSpec of a fixture kind ("phi3_clip", "llama_siglip", ...)."""
    from octopus_rt.training.model_factory import TinyLlavaSpec

    if kind not in LLAVA_KINDS:
        raise ValueError(f"unknown tiny LLaVA kind {kind!r}; choose one of {', '.join(LLAVA_KINDS)}")
    text, vision = kind.split("_")
    return TinyLlavaSpec(
        text_model=text,
        vision_model=vision,
        chat_template="phi3" if text == "phi3" else "llava",
        text_heads=4,
        text_kv_heads=2,
    )


def build_tiny_llava(kind: str, out_dir: Path) -> Path:
    """Build kind's seeded model into out_dir (save_pretrained layout) with a scaled lm_head."""
    import torch

    from octopus_rt.training.model_factory import build_llava

    torch.set_num_threads(1)
    model, _ = build_llava(out_dir, llava_spec(kind))
    peaky_head(model)
    model.save_pretrained(out_dir)
    return out_dir


def peaky_head(model) -> None:
    """Give a seeded model's lm_head the bigram structure of the module docstring, in place."""
    import torch

    embed = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(1234)
    permutation = torch.randperm(embed.shape[0], generator=generator)
    with torch.no_grad():
        # Row j of the head is the (unit) embedding of token perm[j]: the residual stream carries the
        # current token's embedding, so the model acts like a confident bigram LM (next = perm^-1 of
        # current, perturbed by attention and MLP) with a clear top-1 margin, as trained LMs have.
        bigram = embed[permutation] / embed[permutation].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        model.lm_head.weight.copy_(LM_HEAD_SCALE * bigram + model.lm_head.weight)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """Factory kind -> Path of a tiny LlavaForConditionalGeneration save_pretrained directory."""
    cache: dict[str, Path] = {}

    def get(kind: str = "phi3_clip") -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_llava(kind, tmp_path_factory.mktemp(f"llava_{kind}") / "model")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_lmm_bundle(tiny_llava_dir, tmp_path_factory):
    """Factory (kind, decoder form) -> Path of a bundle holding a verified fp32 `lmm` section of
    tiny_llava_dir(kind); form "auto" (the export default: gqa for these models) or "flat_kv"."""
    cache: dict[tuple[str, str], Path] = {}

    def get(kind: str = "phi3_clip", form: str = "auto") -> Path:
        if (kind, form) not in cache:
            import torch

            from octopus_rt.export.lmm import export_lmm

            torch.set_num_threads(1)
            bundle = tmp_path_factory.mktemp(f"lmm_bundle_{kind}_{form}") / "bundle"
            export_lmm(tiny_llava_dir(kind), bundle, precision="fp32", decoder_form=form)
            cache[kind, form] = bundle
        return cache[kind, form]

    return get


@pytest.fixture(scope="session")
def tiny_grounding_bundle(tiny_lmm_bundle, tiny_sam_bundle, tmp_path_factory) -> Path:
    """The tiny llama_clip lmm bundle with the tiny sam section merged into its manifest (read only)."""
    import json
    import shutil

    bundle = tmp_path_factory.mktemp("grounding_bundle") / "bundle"
    shutil.copytree(tiny_lmm_bundle("llama_clip"), bundle)
    sam_manifest = json.loads((tiny_sam_bundle / "manifest.json").read_text())
    shutil.copytree(tiny_sam_bundle / sam_manifest["sam"]["dir"], bundle / sam_manifest["sam"]["dir"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sam"] = sam_manifest["sam"]
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle
