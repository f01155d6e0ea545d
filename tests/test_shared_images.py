"""`--group-by-image`: one vision-tower pass per distinct image of a batch (training/shared_images.py) and
the epoch order that keeps each image's records together (training/dataset.MixedDataset).

The reference is the model's own plain forward with one image per record (transformers' code, not ours):
logits, image features and every parameter's gradient must match it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from octopus_rt.errors import InputError
from training_helpers import conv, make_base, write_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "llava")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """Six records about three image files (three questions about image 0, two about 1, one about 2)."""
    root = tmp_path_factory.mktemp("shared") / "data"
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"images/{index}.png")
    qa = [("Which region is degraded the most?", "The top left region."),
          ("Which region is degraded the least?", "The bottom right region, which is clean."),
          ("Rate the quality.", "Poor."),
          ("Which region is degraded the most?", "The bottom left region."),
          ("Describe the image.", "Heavy noise covers the whole picture."),
          ("Which region is degraded the most?", "The top right region.")]
    images = [0, 1, 0, 2, 1, 0]  # interleaved: a wrong row-to-image map changes the result
    records = [{"image": f"images/{i}.png", "conversations": conv(q, a)} for i, (q, a) in zip(images, qa)]
    write_records(root, records)
    write_records(root, records[:2], split="val")
    return root


def _read(data):
    from octopus_rt.training.dataset import read_split

    return read_split(data, "train").records


def test_distinct_rows_names_each_key_once_in_order_of_appearance():
    from octopus_rt.training.shared_images import distinct_rows

    assert distinct_rows(["a", "b", "a", "c", "b"]) == ([0, 1, 3], [0, 1, 0, 2, 1])
    assert distinct_rows(["x"]) == ([0], [0])


def _forward_both(model, collator, records, loss_scale=1.0):
    """(plain outputs, plain grads, shared outputs, shared grads, plain loss, shared loss) on `records`."""
    from octopus_rt.training.batches import answer_loss_sum, model_inputs, load_images
    from octopus_rt.training.shared_images import distinct_rows, forward_shared_images

    records, images = load_images(records, "stop", print)
    encoded = [collator.encode(r.turns, image) for r, image in zip(records, images)]
    results = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        if shared:
            firsts, inverse = distinct_rows([str(r.image) for r in records])
            assert len(firsts) < len(records)  # the test shares images, or it proves nothing
            batch = collator.batch(encoded, [images[i] for i in firsts])
            outputs = forward_shared_images(model, model_inputs(batch), inverse)
        else:
            batch = collator.batch(encoded, images)
            outputs = model(**model_inputs(batch))
        loss = answer_loss_sum(outputs.logits, batch["labels"])
        (loss_scale * loss).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((outputs, grads, float(loss.detach())))
    return results


def _assert_same(results, atol=1e-5):
    (plain, plain_grads, plain_loss), (shared, shared_grads, shared_loss) = results
    np.testing.assert_allclose(shared.logits.detach().numpy(), plain.logits.detach().numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(shared.image_hidden_states.detach().numpy(),
                               plain.image_hidden_states.detach().numpy(), rtol=0, atol=atol)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert set(shared_grads) == set(plain_grads) and plain_grads
    for name, grad in plain_grads.items():
        scale = max(1.0, float(grad.abs().max()))
        np.testing.assert_allclose(shared_grads[name].numpy(), grad.numpy(), rtol=0, atol=1e-5 * scale, err_msg=name)


def test_shared_forward_equals_the_per_record_forward_and_its_gradients(base_dir, shared_data):
    from octopus_rt.training.architectures import LlavaArchitecture

    model, collator = LlavaArchitecture().load(base_dir)
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    results = _forward_both(model, collator, _read(shared_data))
    _assert_same(results)
    # The vision tower's gradient arrives (the copies' gradients are summed into one pass).
    vision = [n for n in results[1][1] if "vision_tower" in n]
    assert vision and any(float(results[1][1][n].abs().max()) > 0 for n in vision)


def test_shared_forward_through_a_lora_wrapper(base_dir, shared_data):
    from octopus_rt.training.architectures import LlavaArchitecture
    from octopus_rt.training.lora import apply_tuning

    model, collator = LlavaArchitecture().load(base_dir)
    model, _ = apply_tuning(model, "lora", rank=4, alpha=8.0, dropout=0.0)
    model.train()
    _assert_same(_forward_both(model, collator, _read(shared_data)))


def test_shared_forward_on_a_fastvlm_cnn_tower(tmp_path, shared_data):
    """FastVLM's features come back as a list per image; BatchNorm in eval mode (its batch statistics in
    training mode legitimately differ: the module docstring says so)."""
    pytest.importorskip("timm")
    from octopus_rt.training.architectures import LlavaArchitecture

    base = make_base(tmp_path / "fastvlm", image_size=64, vision_model="efficientnet_lite0", patch_size=32,
                     text_model="llama", chat_template="llava")
    model, collator = LlavaArchitecture().load(base)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    _assert_same(_forward_both(model, collator, _read(shared_data)), atol=1e-4)


def test_the_trainer_step_with_shared_images_equals_the_plain_step(base_dir, shared_data):
    from octopus_rt.training.architectures import LlavaArchitecture
    from octopus_rt.training.batches import load_images
    from octopus_rt.training.train import _accumulate

    model, collator = LlavaArchitecture().load(base_dir)
    model.train()
    records, images = load_images(_read(shared_data), "stop", print)
    micro = [(records, images, [collator.encode(r.turns, image) for r, image in zip(records, images)])]
    tokens = sum(e.num_answer_tokens for e in micro[0][2])
    runs = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        loss = _accumulate(model, collator, micro, tokens, torch.device("cpu"), "fp32", None, None, 1.0,
                           share_images=share)
        runs.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for name, grad in runs[0][1].items():
        np.testing.assert_allclose(runs[1][1][name].numpy(), grad.numpy(), rtol=0, atol=1e-5, err_msg=name)


def test_grouped_epoch_order_keeps_each_images_records_together(shared_data):
    from octopus_rt.training.dataset import MixedDataset

    records = _read(shared_data)
    plain = MixedDataset([records], [2.0], seed=5)
    grouped = MixedDataset([records], [2.0], seed=5, group_by_image=True)
    for epoch in (0, 1):
        order = grouped.epoch_order(epoch)
        assert Counter(order) == Counter(plain.epoch_order(epoch))  # same records, same repeats
        images = [str(grouped.record(k).image) for k in order]
        runs = [image for index, image in enumerate(images) if index == 0 or images[index - 1] != image]
        assert len(runs) == len(set(images)) == 3  # one contiguous run per image
        assert grouped.epoch_order(epoch) == order  # seeded
    orders = {tuple(MixedDataset([records], [2.0], seed=s, group_by_image=True).epoch_order(0)) for s in range(8)}
    assert len(orders) > 1  # the image order is shuffled


def test_group_by_image_trains_from_the_cli_and_is_refused_for_phi3v(base_dir, shared_data, tmp_path, capsys,
                                                                     tiny_phi3v_dir):
    from octopus_rt.cli import main
    from octopus_rt.training.options import TrainOptions
    from octopus_rt.training.train import train

    code = main(["train", str(base_dir), "--data", str(shared_data), "--out", str(tmp_path / "out"),
                 "--batch-size", "3", "--max-steps", "2", "--group-by-image", "--no-progress"])
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "out" / "config.json").is_file()
    with pytest.raises(InputError, match="--group-by-image works for LLaVA-family models"):
        train(TrainOptions(base_model=tiny_phi3v_dir, data=[shared_data], out=tmp_path / "phi", progress=False,
                           group_by_image=True, max_steps=1))


def test_load_images_decodes_each_image_file_once(shared_data, monkeypatch):
    from octopus_rt.runtime import images as runtime_images
    from octopus_rt.training.batches import load_images

    records = _read(shared_data)
    calls = Counter()
    original = runtime_images.load_image

    def counting(path, *args, **kwargs):
        calls[str(path)] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(runtime_images, "load_image", counting)
    kept, images = load_images(records, "stop", print)
    assert kept == records
    assert sorted(calls.values()) == [1, 1, 1]  # three distinct files among six records
    for record, image in zip(records, images):  # each record still gets its own file's pixels
        expected = np.asarray(Image.open(record.image).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(image), expected)
