"""Session fixtures with a tiny seeded SAM (segment-anything's own classes) and its exported bundle.

Made visible to every test module by one import line in tests/conftest.py. The bundle is shared by
the whole session: treat it as read-only (copy it with shutil.copytree before modifying it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["TINY_SAM_CONFIG", "tiny_sam_checkpoint", "tiny_sam_bundle"]

# 128-pixel input, 8 x 8 embedding grid, 32 x 32 low-res masks; window + global attention blocks.
TINY_SAM_CONFIG = {
    "image_size": 128,
    "patch_size": 16,
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "window_size": 4,
    "prompt_embed_dim": 64,
    "decoder_mlp_dim": 128,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 64,
}


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """Path of a seeded tiny SAM state_dict (.pth); its config JSON lies beside it (same stem, .json)."""
    import torch

    from octopus_rt.export.sam_models import SamConfig, build_sam, save_custom_checkpoint

    torch.set_num_threads(1)
    config = SamConfig.from_dict(TINY_SAM_CONFIG)
    checkpoint, _ = save_custom_checkpoint(
        build_sam(config, seed=0), config, tmp_path_factory.mktemp("tiny_sam") / "tiny_sam.pth"
    )
    return checkpoint


@pytest.fixture(scope="session")
def tiny_sam_bundle(tiny_sam_checkpoint, tmp_path_factory) -> Path:
    """A bundle directory holding only a verified fp32 `sam` section exported from tiny_sam_checkpoint."""
    import torch

    from octopus_rt.export.sam import export_sam

    torch.set_num_threads(1)
    bundle = tmp_path_factory.mktemp("tiny_sam_bundle") / "bundle"
    export_sam(tiny_sam_checkpoint, bundle, model_type="custom")
    return bundle
