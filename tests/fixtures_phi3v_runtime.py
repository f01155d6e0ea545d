"""Session fixtures of the Phi-3-Vision export / runtime tests: a grounding tiny checkpoint and its bundle.

    def test_x(phi3v_bundle, phi3v_grounding_dir):
        phi3v_bundle          # read-only bundle: fp32 `lmm` section (4 crops) + tiny SAM `sam` section
        phi3v_grounding_dir   # the official-layout checkpoint it was exported from

Made visible to every test module by one import line in tests/conftest.py. Copy before modifying.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["PHI3V_POSITION_BOOST", "build_grounding_phi3v", "phi3v_grounding_dir", "phi3v_bundle"]

# The seeded tiny Phi-3-V's head is random, so its answers are noise over 32064 ids (mostly unused
# fillers). As for the LLaVA runtime fixture, the head becomes a confident bigram over the learned
# word pieces, the fillers' rows are zeroed (never chosen), "▁The" follows <|assistant|>, and the
# positional words' rows are scaled by this factor: measured, most answers to the test questions then
# name a position.
PHI3V_POSITION_BOOST = 2.0


def build_grounding_phi3v(source: Path, out_dir: Path) -> Path:
    """The tiny official-layout checkpoint at `source` with the head described above, written to
    out_dir in the official layout (tokenizer and configs copied)."""
    import torch
    from tokenizers import Tokenizer

    from octopus_rt import vocab
    from octopus_rt.export.phi3v_checkpoint import load_phi3v, save_official_layout

    torch.set_num_threads(1)
    model = load_phi3v(source)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    pieces = tokenizer.get_vocab()
    words = sorted(i for piece, i in pieces.items() if i < 32000 and i > 258 and not piece.startswith("<unused"))
    head = model.language_model.lm_head.weight
    embed = model.language_model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(1234)
    index = torch.tensor(words)
    permuted = index[torch.randperm(len(words), generator=generator)]
    with torch.no_grad():
        rows = embed[permuted] / embed[permuted].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        keep = head[index] + rows
        head.zero_()
        head[index] = keep
        for special in (2, 32000, 32007):
            head[special] = 0.0  # no early stop: answers run to max_new_tokens
        # The answer's first token follows <|assistant|> (not a word piece): a clear "▁The", as a chat
        # model starts, instead of a near-tie that a quantised graph may flip.
        assistant = embed[32001] / embed[32001].norm()
        head[pieces["▁The"]] += assistant
        for word in vocab.POSITION_WORDS:
            for form in vocab.word_forms(word):
                token = pieces.get("▁" + form.strip()) if form.startswith(" ") else None
                if token is not None:
                    head[token] *= PHI3V_POSITION_BOOST
    return save_official_layout(model, out_dir, source_dir=source)


@pytest.fixture(scope="session")
def phi3v_grounding_dir(tiny_phi3v_dir, tmp_path_factory) -> Path:
    return build_grounding_phi3v(tiny_phi3v_dir, tmp_path_factory.mktemp("phi3v_grounding") / "model")


@pytest.fixture(scope="session")
def phi3v_bundle(phi3v_grounding_dir, tiny_sam_checkpoint, tmp_path_factory) -> Path:
    """fp32 Phi-3-V `lmm` section (num_crops 4) + the tiny SAM's `sam` section."""
    import torch

    from octopus_rt.export.lmm import export_lmm
    from octopus_rt.export.sam import export_sam

    torch.set_num_threads(1)
    bundle = tmp_path_factory.mktemp("phi3v_bundle") / "bundle"
    export_lmm(phi3v_grounding_dir, bundle, precision="fp32")
    export_sam(tiny_sam_checkpoint, bundle, model_type="custom")
    return bundle
