"""`octopus-rt train` on an official-layout Phi-3.5-Vision: collation, what trains, gradient
checkpointing, train -> merge -> load, exact resume. Tiny seeded checkpoint (tests/fixtures_phi3v.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from octopus_rt.cli import main
from training_helpers import conv
from training_helpers import phi3v_dataset as _dataset

torch.set_num_threads(1)

# Official image-token counts at 4 crops (tokens = ((h/336)(w/336) + 1) 144 + 1 + (h/336 + 1) 12):
SQUARE_TOKENS = 757  # any square image -> 672 x 672 (docs/phi3v.md; transformers.js' 773 - 16 ids)
WIDE_TOKENS = 457  # 2:1 -> 336 x 672 (transformers.js: 457 for 1280 x 640)


def _options(base, data, out, **changes):
    from octopus_rt.training.options import TrainOptions

    values = dict(base_model=base, data=[data], out=out, progress=False)
    values.update(changes)
    return TrainOptions(**values)


def _tuned(base, **changes):
    from octopus_rt.training.phi3v_training import Phi3VArchitecture

    architecture = Phi3VArchitecture()
    model, collator = architecture.load(base)
    options = _options(base, "unused", "unused", lora_rank=4, lora_alpha=12.0, lora_dropout=0.0)
    for key, value in changes.items():
        setattr(options, key, value)
    return architecture, model, collator, options


# ---------------------------------------------------------------- collation


def test_collation_is_the_official_prompt_with_answer_labels(tiny_phi3v_dir):
    import jinja2
    from PIL import Image
    from tokenizers import Tokenizer

    from octopus_rt.training.dataset import parse_turns
    from octopus_rt.training.phi3v_collate import Phi3VCollator
    from octopus_rt.export.phi3v_config import read_phi3v_spec

    collator = Phi3VCollator(tiny_phi3v_dir, read_phi3v_spec(tiny_phi3v_dir))
    turns = parse_turns(conv("Which region is most degraded?", "The top left region.",
                              "What distortion is there?", "Noise and blur."))
    square, wide = Image.new("RGB", (64, 64)), Image.new("RGB", (128, 64))
    encoded = collator.encode(turns, square)
    # Independent reference: the checkpoint's own chat template (jinja) and the official placeholder
    # rule written out here: split at <|image_1|>, every chunk with <s>, the tag -> -1 * tokens.
    config = json.loads((tiny_phi3v_dir / "tokenizer_config.json").read_text())
    messages = [{"role": t.role, "content": ("<|image_1|>\n" if i == 0 else "") + t.text} for i, t in enumerate(turns)]
    text = jinja2.Template(config["chat_template"]).render(messages=messages, add_generation_prompt=False)
    tokenizer = Tokenizer.from_file(str(tiny_phi3v_dir / "tokenizer.json"))
    head, tail = text.split("<|image_1|>")
    expected = tokenizer.encode(head).ids + [-1] * SQUARE_TOKENS + tokenizer.encode(tail).ids
    np.testing.assert_array_equal(encoded.input_ids, expected)
    # Labels: exactly the two answers, each with its <|end|> and newline; nothing of the prompts.
    labelled = np.flatnonzero(encoded.labels >= 0)
    runs = np.split(labelled, np.flatnonzero(np.diff(labelled) > 1) + 1)
    assert [tokenizer.decode(encoded.input_ids[r].tolist(), skip_special_tokens=False).strip() for r in runs] == \
        ["The top left region.<|end|>", "Noise and blur.<|end|>"]
    np.testing.assert_array_equal(encoded.labels[labelled], encoded.input_ids[labelled])
    # The first answer follows the runtime's prompt for the first question, unchanged.
    from octopus_rt.runtime.phi3v_prompt import phi3v_chat_prompt, phi3v_prompt_ids

    prompt = phi3v_prompt_ids(tokenizer, phi3v_chat_prompt(turns[0].text), [SQUARE_TOKENS]).input_ids
    assert runs[0][0] == len(prompt) and np.array_equal(encoded.input_ids[: len(prompt)], prompt)
    # A batch of two aspect ratios: own token counts, right padding, HD pixel inputs.
    wide_encoded = collator.encode(turns[:2], wide)
    assert int((wide_encoded.input_ids < 0).sum()) == WIDE_TOKENS
    batch = collator.batch([encoded, wide_encoded], [square, wide])
    length = len(encoded.input_ids)
    assert batch["input_ids"].shape == (2, length) and batch["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[672, 672], [336, 672]]
    n = len(wide_encoded.input_ids)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (length - n)
    assert (batch["input_ids"][1, n:] == 32000).all() and (batch["labels"][1, n:] == -100).all()


def test_padded_batch_of_two_aspect_ratios_equals_single_samples(tiny_phi3v_dir, tiny_phi3v_model):
    """Right padding leaves every sample's logits as they are alone. Both samples (783 and 627 ids)
    lie past the tiny model's original_max_position_embeddings (512): longrope picks short or long
    factors from the longest sequence of a forward call (transformers and the official code), so a
    sample below it would be rotated with the long factors in this batch (docs/training.md)."""
    from PIL import Image

    from octopus_rt.training.dataset import parse_turns
    from octopus_rt.training.phi3v_collate import Phi3VCollator
    from octopus_rt.training.batches import model_inputs

    collator = Phi3VCollator(tiny_phi3v_dir, tiny_phi3v_model.spec)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (64, w, 3), dtype=np.uint8)) for w in (64, 192)]
    turns = parse_turns(conv("Which region is most degraded?", "The top left region."))
    encoded = [collator.encode(turns, image) for image in images]
    assert [int((e.input_ids < 0).sum()) for e in encoded] == [SQUARE_TOKENS, 601]  # 3:1 -> 336 x 1008
    assert min(len(e.input_ids) for e in encoded) > tiny_phi3v_model.config.rope_parameters["original_max_position_embeddings"]
    with torch.no_grad():
        together = tiny_phi3v_model(**model_inputs(collator.batch(encoded, images))).logits
        for row, (item, image) in enumerate(zip(encoded, images)):
            alone = tiny_phi3v_model(**model_inputs(collator.batch([item], [image]))).logits[0]
            n = len(item.input_ids)
            assert float((together[row, :n] - alone).abs().max()) < 1e-4


# ---------------------------------------------------------------- what trains


def test_lora_on_the_four_projections_and_full_vision_tuning(tiny_phi3v_dir):
    from peft.tuners.lora import LoraLayer

    architecture, model, _, options = _tuned(tiny_phi3v_dir)
    layers = model.config.num_hidden_layers
    model, summary = architecture.apply_tuning(model, options)
    wrapped = {n.removeprefix("language_model.base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    expected = {f"model.layers.{i}.{p}" for i in range(layers)
                for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert wrapped == expected == set(summary.lora_targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    vision = trainable - lora
    assert len(lora) == 2 * len(expected)
    last = model.spec.clip_kwargs["num_hidden_layers"] - 1  # features come from the second-to-last layer
    assert {"vision_embed_tokens.glb_GN", "vision_embed_tokens.sub_GN", "vision_embed_tokens.img_projection.0.weight",
            "vision_embed_tokens.img_projection.2.bias", "vision_embed_tokens.img_processor.embeddings.patch_embedding.weight",
            "vision_embed_tokens.img_processor.encoder.layers.0.self_attn.q_proj.weight"} <= vision
    assert all(n.startswith("vision_embed_tokens.") for n in vision)
    assert not [n for n in vision if f"encoder.layers.{last}." in n or "post_layernorm" in n]
    assert not [n for n in trainable if "embed_tokens" in n.removeprefix("vision_embed_tokens") or "lm_head" in n]
    architecture, model, _, options = _tuned(tiny_phi3v_dir, freeze_vision=True)
    model, summary = architecture.apply_tuning(model, options)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _counting(forward, calls: dict, key: str):
    def wrapped(*args, **kwargs):
        calls[key] += 1
        return forward(*args, **kwargs)

    return wrapped


def test_gradient_checkpointing_recomputes_clip_and_decoder_layers(tiny_phi3v_dir):
    """The CLIP loop of Phi3VImageEmbedding bypasses CLIPEncoder.forward: its layers must still be
    recomputed in the backward pass (2 forward calls per step instead of 1), with equal gradients."""
    from PIL import Image

    from octopus_rt.training.dataset import parse_turns
    from octopus_rt.training.batches import model_inputs

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    turns = parse_turns(conv("Which region is most degraded?", "The top left region."))
    results = []
    for checkpointing in (False, True):
        architecture, model, collator, options = _tuned(tiny_phi3v_dir)
        if checkpointing:
            architecture.enable_gradient_checkpointing(model)
        torch.manual_seed(0)
        model, _ = architecture.apply_tuning(model, options)
        model.train()
        with torch.no_grad():  # non-zero LoRA B so the LoRA weights get gradients through the layers
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.1)
        calls = {"clip": 0, "decoder": 0}
        # Counted in forward itself: torch's recompute does not run module hooks.
        for key, layer in (("clip", model.vision_embed_tokens.img_processor.encoder.layers[0]),
                           ("decoder", model.language_model.base_model.model.model.layers[0])):
            layer.forward = _counting(layer.forward, calls, key)
        batch = collator.batch([collator.encode(turns, image)], [image])
        logits = model(**model_inputs(batch)).logits
        logits[0, -4:].square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((dict(calls), grads))
    (plain_calls, plain), (ckpt_calls, ckpt) = results
    assert plain_calls == {"clip": 1, "decoder": 1} and ckpt_calls == {"clip": 2, "decoder": 2}
    assert plain.keys() == ckpt.keys() and any("img_processor.encoder.layers.0" in n for n in plain)
    assert max(float((plain[n] - ckpt[n]).abs().max()) for n in plain) < 1e-6


# ---------------------------------------------------------------- train -> merge -> load


@pytest.fixture(scope="module")
def phi3v_data(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("phi3v_data") / "data", 8)


@pytest.fixture(scope="module")
def learnable_dir(tiny_phi3v_dir, tmp_path_factory):
    """The tiny checkpoint with lm_head scaled by 10. With the random 0.02-scale lm_head the logits stay
    near uniform (max ~0.3) and LoRA alone barely moves the loss (10.36 -> 9.95 in 8 steps, measured);
    a pretrained lm_head has no such problem (same reason as training_helpers.LM_INIT for LLaVA)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("phi3v_learnable") / "base"
    shutil.copytree(tiny_phi3v_dir, path)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors["lm_head.weight"] * 10.0
            save_file(tensors, str(shard), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def trained(learnable_dir, phi3v_data, tmp_path_factory):
    from octopus_rt.training.train import train

    out = tmp_path_factory.mktemp("phi3v_train") / "merged"
    return train(_options(learnable_dir, phi3v_data, out, max_steps=8, lr=3e-3, lora_rank=8, lora_alpha=24.0,
                          lora_dropout=0.0))


def _tensors(model_dir) -> dict:
    from safetensors.numpy import load_file

    from octopus_rt.export.phi3v_checkpoint import checkpoint_shards

    tensors = {}
    for shard in checkpoint_shards(model_dir):
        tensors.update(load_file(str(shard)))
    return tensors


def test_merged_checkpoint_is_the_official_layout_with_lora_folded_in(trained, learnable_dir):
    base, merged = _tensors(learnable_dir), _tensors(trained.out)
    assert merged.keys() == base.keys()
    config = json.loads((trained.out / "config.json").read_text())
    assert config == dict(json.loads((learnable_dir / "config.json").read_text()), torch_dtype="float32")
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (trained.out / name).read_bytes() == (learnable_dir / name).read_bytes()
    # Expected values from the trained model's own parameters, in float64: W + (alpha / r) B A.
    params = {n: p.detach().double().numpy() for n, p in trained.model.named_parameters()}
    prefix = "language_model.base_model.model."
    folded = 0
    for name in params:
        if name.endswith("lora_A.default.weight"):
            module = name[len(prefix): -len(".lora_A.default.weight")]
            a, b = params[name], params[name.replace("lora_A", "lora_B")]
            expected = base[module + ".weight"].astype(np.float64) + (24.0 / 8) * (b @ a)
            assert np.abs(merged[module + ".weight"] - expected).max() < 1e-6, module
            assert np.abs(b @ a).max() > 1e-4  # training moved it
            folded += 1
    assert folded == 4 * 2
    # Fully tuned vision tensors are the trained values; untouched tensors are the base's, bit for bit.
    patch = "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight"
    np.testing.assert_array_equal(merged[patch], params["vision_embed_tokens.img_processor.embeddings.patch_embedding.weight"])
    np.testing.assert_array_equal(merged["model.vision_embed_tokens.sub_GN"], params["vision_embed_tokens.sub_GN"])
    assert np.abs(merged["model.vision_embed_tokens.sub_GN"] - base["model.vision_embed_tokens.sub_GN"]).max() > 1e-4
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(merged[key], base[key])


def test_merged_checkpoint_loads_and_answers_like_the_trained_model(trained, learnable_dir, phi3v_data):
    from octopus_rt.export.phi3v_checkpoint import load_phi3v
    from octopus_rt.training.dataset import load_image, read_split
    from octopus_rt.training.phi3v_collate import Phi3VCollator
    from octopus_rt.training.batches import model_inputs
    from octopus_rt.training.validation_metrics import run_validation

    merged = load_phi3v(trained.out)
    collator = Phi3VCollator(trained.out, merged.spec)
    records = read_split(phi3v_data, "train").records[:2]
    batch = model_inputs(collator.collate_records(records, [load_image(r) for r in records]))
    trained.model.eval()
    with torch.no_grad():
        assert float((merged(**batch).logits - trained.model(**batch).logits).abs().max()) < 1e-4
    # It learned: loss falls during training, and the merged model scores the set better than the base.
    assert np.mean(trained.losses[-2:]) < trained.losses[0] - 2.0, trained.losses
    all_records = read_split(phi3v_data, "train").records
    before = run_validation(load_phi3v(learnable_dir), collator, all_records).loss
    after = run_validation(merged, collator, all_records).loss
    assert after < before - 2.0, (before, after)


def test_resume_gives_identical_losses(learnable_dir, phi3v_data, tmp_path):
    from octopus_rt.training.train import train

    # Dropout on, so the restored RNG state matters too.
    common = dict(max_steps=4, lr=1e-3, lora_rank=4, lora_dropout=0.3, save_every=2, merge=False)
    full = train(_options(learnable_dir, phi3v_data, tmp_path / "full", **common))
    shutil.copytree(full.work_dir, tmp_path / "resumed.train")
    resumed = train(_options(learnable_dir, phi3v_data, tmp_path / "resumed", resume=True, **common))
    assert resumed.steps == [3, 4]
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=0, atol=1e-6)
    a = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-6


def test_cli_trains_phi3v_with_validation(tiny_phi3v_dir, tmp_path, capsys):
    referring = {"task": "referring", "conversations": conv("What distortions does the top left region have?", "Noise.")}
    data = _dataset(tmp_path / "data", 2)
    _dataset(data, 1, seed=1, split="val", extra=[referring])
    out = tmp_path / "merged"
    code = main(["train", str(tiny_phi3v_dir), "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "merged model written to" in text and "(8 LoRA modules)" in text
    evals = [json.loads(line) for line in (tmp_path / "merged.train" / "log.jsonl").read_text().splitlines()]
    last = [e for e in evals if e["type"] == "eval"][-1]
    assert last["pos_n"] == 1 and last["referring_n"] == 1  # a greedy answer was generated
    options = json.loads((tmp_path / "merged.train" / "options.json").read_text())
    assert (options["lora_rank"], options["lora_alpha"], options["lora_dropout"]) == (64, 128.0, 0.0)
