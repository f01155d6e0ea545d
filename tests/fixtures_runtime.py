"""Session fixtures of the runtime tests: a complete bundle (tiny LMM + tiny SAM) and test images.

Made visible to every test module by one import line in tests/conftest.py. Read-only: copy the
bundle (shutil.copytree) before modifying it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

__all__ = ["POSITION_BOOST", "build_grounding_llava", "runtime_bundle", "flat_kv_runtime_bundle", "runtime_images"]

# A random model rarely says "top" or "left"; the runtime tests need answers that do, so that the
# closed-set point and the SAM stage run. The lm_head rows of the positional words' single-token
# forms are scaled by this factor (on top of fixtures_models.LM_HEAD_SCALE): measured, every answer
# of the test questions then names a position, several name both axes.
POSITION_BOOST = 1.7


def build_grounding_llava(out_dir: Path) -> Path:
    """The phi3_clip tiny LLaVA with peaky logits and boosted positional words, saved to out_dir."""
    import torch

    from fixtures_models import LM_HEAD_SCALE, llava_spec
    from octopus_rt import vocab
    from octopus_rt.training.model_factory import build_llava

    torch.set_num_threads(1)
    model, processor = build_llava(out_dir, llava_spec("phi3_clip"))
    tokenizer = processor.tokenizer
    anchor = tokenizer.encode("\n", add_special_tokens=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        for word in vocab.POSITION_WORDS:
            for form in vocab.word_forms(word):
                ids = tokenizer.encode("\n" + form, add_special_tokens=False)[len(anchor):]
                if len(ids) == 1:
                    model.lm_head.weight[ids[0]] *= POSITION_BOOST
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def runtime_bundle(tiny_sam_checkpoint, tmp_path_factory) -> Path:
    """A bundle with the grounding tiny LLaVA's `lmm` section (the export default: gqa decoder form)
    and the tiny SAM's `sam` section."""
    import torch

    from octopus_rt.export.lmm import export_lmm
    from octopus_rt.export.sam import export_sam

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runtime_bundle")
    model_dir = build_grounding_llava(root / "model")
    bundle = root / "bundle"
    export_lmm(model_dir, bundle, precision="fp32")
    export_sam(tiny_sam_checkpoint, bundle, model_type="custom")
    return bundle


@pytest.fixture(scope="session")
def flat_kv_runtime_bundle(runtime_bundle, tmp_path_factory) -> Path:
    """runtime_bundle with its lmm section re-exported in the flat_kv decoder form (runtime_bundle's
    is the gqa form, `auto`'s choice for these models); the same SAM section."""
    import json
    import shutil

    import torch

    from octopus_rt.export.lmm import export_lmm

    torch.set_num_threads(1)
    bundle = tmp_path_factory.mktemp("runtime_bundle_flat_kv") / "bundle"
    shutil.copytree(runtime_bundle, bundle)
    model_dir = json.loads((bundle / "manifest.json").read_text())["lmm"]["source"]["model_dir"]
    export_lmm(model_dir, bundle, precision="fp32", decoder_form="flat_kv")
    return bundle


@pytest.fixture(scope="session")
def runtime_images(tmp_path_factory) -> list[Path]:
    """Three PNGs of different sizes and aspect ratios (smooth gradients + noise, like photos)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("runtime_images")
    rng = np.random.default_rng(7)
    paths = []
    for index, (width, height) in enumerate([(96, 72), (50, 110), (64, 64)]):
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 220
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
