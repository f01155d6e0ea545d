"""training/segmenter.py: trains segment-anything's classes on region masks and writes a checkpoint
that `export/sam_models.load_sam(..., "custom", config)` loads strictly."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from octopus_rt.export.sam_models import load_sam, load_sam_config  # noqa: E402
from octopus_rt.training.data.quadrant import make_quadrant_dataset  # noqa: E402
from octopus_rt.training.segmenter import SegmenterOptions, load_region_samples, train_segmenter  # noqa: E402

TINY = {"image_size": 64, "patch_size": 8, "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1], "window_size": 4, "prompt_embed_dim": 32, "mask_in_chans": 8,
        "decoder_depth": 1, "decoder_mlp_dim": 64, "decoder_num_heads": 2, "iou_head_depth": 2,
        "iou_head_hidden_dim": 32}


@pytest.fixture(scope="module")
def quad_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quad")
    make_quadrant_dataset(root, 30, size=64, seed=1)
    return root


def test_region_samples_have_low_res_targets(quad_dir):
    samples = load_region_samples(quad_dir, "train", TINY)
    assert samples
    low = 4 * TINY["image_size"] // TINY["patch_size"]
    for sample in samples:
        assert sample.image.shape == (3, 64, 64)
        assert sample.masks.shape[1:] == (low, low)
        # Quadrant masks: each covers a quarter of the (unpadded, square) frame.
        assert np.allclose(sample.masks.mean(axis=(1, 2)), 0.25, atol=0.02)


def test_train_writes_a_loadable_checkpoint_and_learns(quad_dir, tmp_path):
    out = tmp_path / "sam.pth"
    result = train_segmenter(SegmenterOptions(quad_dir, out, config=dict(TINY), steps=60, images_per_step=2,
                                              points_per_image=4, lr=2e-3, warmup_steps=5, log_every=10))
    assert out.is_file() and result.config_path.is_file()
    config = load_sam_config(result.config_path)
    sam, _ = load_sam(out, "custom", config)
    assert sum(p.numel() for p in sam.parameters()) == result.num_parameters
    losses = [entry["loss"] for entry in result.log]
    assert losses[-1] < losses[0]  # the loss falls on this easy four-quadrant task
    assert result.val_iou is not None and 0.0 <= result.val_iou <= 1.0 and result.val_prompts > 0
    assert json.loads(out.with_suffix(".log.json").read_text())["steps"] == 60
