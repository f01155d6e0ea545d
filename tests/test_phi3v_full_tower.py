"""`slow`: the official CLIP ViT-L/14-336 tower (303 M parameters, built from `img_processor` alone as
Microsoft's code builds it) with the tiny Phi-3: `export lmm` verifies, and one `ask` through the
runtime equals the independent PyTorch reference (export/phi3v_reference.py). About 8 minutes and
6 GB of RAM on a 2-core machine (benchmarks/phi3v_export_rss.py measures the same export)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_full_clip_l_tower_exports_and_answers_like_the_reference(tmp_path):
    from octopus_rt.export.lmm import export_lmm
    from octopus_rt.export.reference import reference_pipeline
    from octopus_rt.runtime import Octopus
    from octopus_rt.training.phi3v_factory import build_clip_l_phi3v_checkpoint

    model_dir = build_clip_l_phi3v_checkpoint(tmp_path / "model", seed=0)
    section = export_lmm(model_dir, tmp_path / "bundle", precision="fp32")
    assert section["source"]["num_parameters"] > 300_000_000
    assert section["verification"]["tokens_identical"] is True

    rgb = np.random.default_rng(3).integers(0, 256, (500, 1000, 3), dtype=np.uint8)  # 2:1 -> 1 x 2 crops at 4
    question = "Which region is most degraded?"
    octo = Octopus(tmp_path / "bundle", device="cpu")
    # ((h/336)(w/336) + 1) * 144 + 1 + (h/336 + 1) * 12 with h, w = 336, 672 (transformers.js: 457).
    assert octo.image_stage.num_image_tokens((1000, 500)) == 457
    ours = octo.ask(rgb, question, max_new_tokens=8)
    expected = reference_pipeline(tmp_path / "bundle").ask(rgb, question, max_new_tokens=8)
    assert ours.token_ids == expected.token_ids and ours.text == expected.text
    if expected.probs is not None:
        assert max(abs(ours.probs[w] - expected.probs[w]) for w in expected.probs) <= 1e-4
