"""Training building blocks: answer-only labels, LoRA module selection, merge parity, data reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from octopus_rt.errors import InputError
from training_helpers import conv, make_base, write_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("phi3") / "base")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("llama") / "base", text_model="llama", chat_template="llava",
                     vision_model="siglip")


def _load(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


# ---------------------------------------------------------------- collation


@pytest.mark.parametrize("which", ["phi3_dir", "llama_dir"])
def test_collator_ids_match_processor_and_labels_cover_answers_only(which, request):
    from PIL import Image

    from octopus_rt.training.collate import Collator
    from octopus_rt.training.dataset import parse_turns

    _, processor = _load(request.getfixturevalue(which))
    collator = Collator(processor)
    turns = parse_turns(conv("Which region is most degraded?", "The top left region.",
                              "What distortion is there?", "Noise and blur."))
    encoded = collator.encode(turns)
    # Token ids equal what the model's own processor produces for the rendered conversation.
    text = collator.render(turns, generation_prompt=False)
    reference = processor(images=[Image.new("RGB", (64, 64))], text=[text], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(encoded.input_ids, reference)
    # The labelled tokens decode to exactly the two answers followed by the template's end-of-turn text.
    tokenizer = processor.tokenizer
    labelled = encoded.labels >= 0
    runs = np.split(np.flatnonzero(labelled), np.flatnonzero(np.diff(np.flatnonzero(labelled)) > 1) + 1)
    assert len(runs) == 2
    texts = [tokenizer.decode(encoded.input_ids[r], skip_special_tokens=True).strip() for r in runs]
    assert texts == ["The top left region.", "Noise and blur."]
    # Question text and the image placeholders carry no label.
    assert not np.any(labelled[encoded.input_ids == collator.image_token_id])
    question_ids = tokenizer.encode(" degraded?", add_special_tokens=False)
    assert all(encoded.labels[i] < 0 for i in np.flatnonzero(np.isin(encoded.input_ids, question_ids)))
    # The prompt the runtime builds (turns up to the question + generation prompt) is a prefix.
    prompt = collator.encode_prompt(turns[:1])
    np.testing.assert_array_equal(encoded.input_ids[: len(prompt)], prompt)
    assert encoded.labels[len(prompt)] >= 0 and not labelled[: len(prompt)].any()


# ---------------------------------------------------------------- LoRA module selection


@pytest.mark.parametrize("which", ["phi3_dir", "llama_dir"])
def test_lora_targets_every_language_model_linear_and_nothing_else(which, request):
    from peft.tuners.lora import LoraLayer

    from octopus_rt.training.lora import apply_tuning

    model, _ = _load(request.getfixturevalue(which))
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linear_names if n.startswith("model.language_model.")}
    peft_model, summary = apply_tuning(model, "lora", rank=4, alpha=8, dropout=0.0)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected == set(summary.lora_targets)
    assert not any(n.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")) for n in wrapped)
    if which == "phi3_dir":  # Phi-3's fused projections are covered
        assert any(n.endswith("qkv_proj") for n in wrapped) and any(n.endswith("gate_up_proj") for n in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    vision = {n for n in trainable if ".vision_tower." in n or ".multi_modal_projector." in n}
    assert vision and all("lora_" in n for n in trainable - vision)
    frozen_lm = [n for n, p in peft_model.named_parameters() if ".language_model." in n and "lora_" not in n]
    assert frozen_lm and not any(dict(peft_model.named_parameters())[n].requires_grad for n in frozen_lm)


def test_peft_name_shortcuts_would_miss_the_language_model(phi3_dir):
    """The pitfall the explicit selection avoids: on LLaVA-Phi-3, q_proj/v_proj name only CLIP layers."""
    model, _ = _load(phi3_dir)
    hits = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ("q_proj", "v_proj")]
    assert hits and all(n.startswith("model.vision_tower.") for n in hits)


def test_freeze_vision_and_full_tuning(phi3_dir):
    from octopus_rt.training.lora import apply_tuning

    model, _ = _load(phi3_dir)
    frozen, summary = apply_tuning(model, "lora", rank=2, freeze_vision=True)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model, _ = _load(phi3_dir)
    full, summary = apply_tuning(model, "full")
    assert summary.trainable_parameters == summary.total_parameters and summary.lora_targets == []


# ---------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def default_init_dir(tmp_path_factory):
    """The model factory's default model (initializer_range 0.02, logits of order 1)."""
    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

    path = tmp_path_factory.mktemp("plain") / "base"
    build_llava(path, TinyLlavaSpec())
    return path


def test_merge_parity_and_plain_llava_directory(default_init_dir, tmp_path):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from octopus_rt.training.lora import apply_tuning
    from octopus_rt.training.merge import save_merged

    # fp32 round-off grows with the logits' size: with logits of order 6 (initializer_range 0.2) the
    # merged model differs by ~1e-5 (relative ~2e-6); the factory's default model keeps them of order 1.
    model, processor = _load(default_init_dir)
    torch.manual_seed(1)
    peft_model, _ = apply_tuning(model, "lora", rank=4, alpha=8, dropout=0.1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters do something
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    peft_model.eval()
    ids = torch.tensor([[1, 6, 9] + [4] * 16 + [9, 254, 279, 382, 8, 9, 7, 9]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids, pixel_values=pixels).logits
    out = save_merged(peft_model, processor, tmp_path / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert type(merged) is LlavaForConditionalGeneration
    with torch.no_grad():
        reloaded = merged(input_ids=ids, pixel_values=pixels).logits
    with torch.no_grad():
        base = _load(default_init_dir)[0](input_ids=ids, pixel_values=pixels).logits
    assert (unmerged - base).abs().max() > 1e-2  # the adapters changed the model
    assert (reloaded - unmerged).abs().max() <= 1e-5
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert not [k for k in handle.keys() if "lora" in k or "base_layer" in k]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    with pytest.raises(InputError, match="already exists"):
        save_merged(merged, processor, out)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------- records and options


def test_read_split_reports_file_and_line(tmp_path):
    from octopus_rt.training.dataset import read_split

    data = write_records(tmp_path / "d", [{"conversations": conv("Q?", "A.")}] * 3)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    lines.insert(2, json.dumps({"image": "images/missing.png", "conversations": conv("Q?", "A.")}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"train\.jsonl:2: not valid JSON"):
        read_split(data, "train", "stop")
    report = read_split(data, "train", "skip")
    assert len(report.records) == 2 and len(report.skipped) == 2
    assert ":3: image images/missing.png not found" in report.skipped[1]
    with pytest.raises(InputError, match="test split"):
        read_split(data, "test")


@pytest.mark.parametrize("conversations, problem", [
    ([], "non-empty"),
    ([{"from": "human", "value": "<image>\nQ?"}], "end with a gpt answer"),
    ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}], "should come from human"),
    ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A <image>"}], "only the first turn"),
])
def test_malformed_conversations(tmp_path, conversations, problem):
    from octopus_rt.training.dataset import read_split

    data = write_records(tmp_path / "d", [{"conversations": conversations}])
    with pytest.raises(InputError, match=problem):
        read_split(data, "train", "stop")


def test_data_weights_and_epoch_order():
    from octopus_rt.training.options import DataSource, parse_data_arg
    from octopus_rt.training.dataset import MixedDataset

    assert parse_data_arg("/a/b:2.5") == DataSource(__import__("pathlib").Path("/a/b"), 2.5)
    assert parse_data_arg("/a/b").weight == 1.0
    with pytest.raises(InputError):
        parse_data_arg("/a/b:-1")
    mixed = MixedDataset([list(range(10)), list(range(4))], [0.5, 2.5], seed=3)
    order = mixed.epoch_order(0)
    assert mixed.samples_per_epoch == len(order) == 5 + 10
    counts = np.bincount([d for d, _ in order])
    assert counts.tolist() == [5, 10]
    assert len({k for k in order if k[0] == 0}) == 5  # a subset without repeats
    assert np.bincount([i for d, i in order if d == 1]).min() >= 2  # whole copies of the small set
    assert order == mixed.epoch_order(0) and order != mixed.epoch_order(1)


# ---------------------------------------------------------------- metrics


def test_position_tally_uses_the_closed_set_softmax():
    from scipy.special import logsumexp

    from octopus_rt.training.eval_metrics import distortion_keywords
    from octopus_rt.training.validation_metrics import position_tally

    horizontal, vertical = [[10, 11], [12]], [[20], [21, 22]]  # left/right, top/bottom token forms
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 32))
    labels = np.full((3, 6), -100)
    labels[0, 2:4] = [21, 10]  # "bottom left"
    labels[1, 3:5] = [20, 12]  # "top right"
    labels[2, 1:3] = [5, 6]  # no positional word

    def predicted(row, words):  # argmax of the words' logsumexp scores (the softmax keeps the order)
        return int(np.argmax([logsumexp(row[ids]) for ids in words]))

    tally = position_tally(logits, labels, horizontal, vertical)
    expected_h = [int(predicted(logits[0, 2], horizontal) == 0), int(predicted(logits[1, 3], horizontal) == 1)]
    expected_v = [int(predicted(logits[0, 1], vertical) == 1), int(predicted(logits[1, 2], vertical) == 0)]
    assert (tally.horizontal_total, tally.vertical_total, tally.both_total) == (2, 2, 2)
    assert tally.horizontal_correct == sum(expected_h) and tally.vertical_correct == sum(expected_v)
    assert tally.both_correct == sum(h and v for h, v in zip(expected_h, expected_v))
    # Raising the logit of the right word at its predecessor position makes it correct.
    logits[0, 2, 10] = 50.0
    logits[0, 1, 21] = 50.0
    assert position_tally(logits, labels, horizontal, vertical).both_correct >= 1
    # Referring accuracy matches names the way `octopus-rt eval` does (one definition).
    assert distortion_keywords("Severe Noise, and overly high brightness.") == {"noise", "overly high brightness"}


def test_merge_on_a_full_disk_leaves_nothing_behind(default_init_dir, tmp_path, monkeypatch):
    import errno

    from octopus_rt.errors import OctopusError
    from octopus_rt.training.merge import save_merged

    model, processor = _load(default_init_dir)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(processor, "save_pretrained", full_disk)  # the model's files are written first
    with pytest.raises(OctopusError, match="No space left"):
        save_merged(model, processor, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
