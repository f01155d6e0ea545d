"""The training loop end to end on tiny models: learning, global-batch loss, resume, full disk, scale-out."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from octopus_rt.errors import OctopusError
from training_helpers import conv, make_base, quadrant_dataset, write_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "phi3")


def _options(base, data, out, **changes):
    from octopus_rt.training.options import TrainOptions

    values = dict(base_model=base, data=[data], out=out, progress=False)
    values.update(changes)
    return TrainOptions(**values)


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _log(work_dir, kind="train"):
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["type"] == kind]


# ---------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """LoRA + full vision tuning on the quadrant dataset (32 train records, one fixed question)."""
    from octopus_rt.training.train import train

    root = tmp_path_factory.mktemp("quad")
    data = quadrant_dataset(root / "data", 40, seed=0)
    result = train(_options(base_dir, data, root / "merged", max_steps=600, batch_size=4, lr=2e-3,
                            lora_dropout=0.0, eval_every=300))
    return result, data


def test_loss_falls_and_train_set_positional_accuracy(trained):
    from transformers import AutoProcessor

    from octopus_rt.training.collate import Collator
    from octopus_rt.training.dataset import read_split
    from octopus_rt.training.validation_metrics import run_validation

    result, data = trained
    first, last = result.losses[0], float(np.mean(result.losses[-20:]))
    assert last < first / 2, (first, last)
    # Scored on the merged model as saved, with the runtime's closed-set softmax.
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(result.out).eval()
    collator = Collator(AutoProcessor.from_pretrained(result.out))
    scores = run_validation(merged, collator, read_split(data, "train").records).as_dict()
    assert scores["pos_n"] == 32 and scores["pos_acc"] >= 0.9, scores
    evals = _log(result.work_dir, "eval")
    assert [e["step"] for e in evals] == [300, 600] and evals[-1]["pos_n"] == 4  # the val split, never test
    entry = _log(result.work_dir)[-1]
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "eta_s"} <= set(entry) and entry["eta_s"] == 0


def test_merged_model_passes_export_parity(trained, tmp_path):
    lmm = pytest.importorskip("octopus_rt.export.lmm")
    result, _ = trained
    try:
        section = lmm.export_lmm(result.out, tmp_path / "bundle")  # raises OctopusError when parity fails
    finally:
        torch.set_grad_enabled(True)  # the exporter switches autograd off for the whole process
    assert section and (tmp_path / "bundle").is_dir()


# ---------------------------------------------------------------- global-batch normalisation


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Answers of very different lengths, so a per-micro-batch mean would weigh tokens differently."""
    answers = ["Top.", "The bottom right region, the bottom right quadrant, is the most degraded one, with "
               "severe noise and blur and compression.", "Left.", "The top left region shows overly high "
               "brightness, insufficient contrast and pixelation all over."]
    records = [{"conversations": conv("Which region is most degraded?", a)} for a in answers]
    return write_records(tmp_path_factory.mktemp("uneven") / "data", records)


def _reference_run(base_dir, data, steps, lr, global_batch):
    """Plain PyTorch + transformers: one batch of `global_batch` records per step, the model's own
    loss (labels=, mean over answer tokens), AdamW and the cosine factor written out."""
    from octopus_rt.training.collate import Collator
    from octopus_rt.training.lora import apply_tuning
    from octopus_rt.training.dataset import MixedDataset, load_image, read_split
    from octopus_rt.training.architectures import load_llava

    torch.manual_seed(0)
    model, processor = load_llava(base_dir)
    model, _ = apply_tuning(model, "lora", rank=16, alpha=32, dropout=0.0)
    model.train()
    collator = Collator(processor)
    records = read_split(data, "train").records
    order = MixedDataset([records], [1.0], seed=0).epoch_order(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        chosen = [records[i] for _, i in order[step * global_batch: (step + 1) * global_batch]]
        batch = collator.collate_records(chosen, [load_image(r) for r in chosen])
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, _trainable(model)


def test_accumulation_equals_one_large_batch_and_reference(base_dir, uneven_data, tmp_path):
    from octopus_rt.training.train import train

    common = dict(max_steps=2, lr=1e-2, lora_dropout=0.0, merge=False)
    big = train(_options(base_dir, uneven_data, tmp_path / "a", batch_size=2, grad_accum=1, **common))
    accumulated = train(_options(base_dir, uneven_data, tmp_path / "b", batch_size=1, grad_accum=2, **common))
    ref_losses, ref_params = _reference_run(base_dir, uneven_data, steps=2, lr=1e-2, global_batch=2)
    np.testing.assert_allclose(big.losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(accumulated.losses, ref_losses, rtol=0, atol=1e-5)
    for params in (_trainable(big.model), _trainable(accumulated.model)):
        assert params.keys() == ref_params.keys()
        # Attention key biases have an exactly zero gradient (softmax ignores a constant shift); Adam
        # divides their round-off noise by its own size, so they move by ~lr at random: not compared.
        worst = max(float((params[n] - ref_params[n]).abs().max()) for n in params if not n.endswith("k_proj.bias"))
        assert worst < 1e-4, worst  # 1% of one step's Adam move (lr 1e-2)
    # The check has teeth: the second step moved the weights by much more than the tolerance.
    assert big.losses[1] < big.losses[0] - 1e-3


# ---------------------------------------------------------------- resume and checkpoints


@pytest.fixture(scope="module")
def small_quad(tmp_path_factory):
    return quadrant_dataset(tmp_path_factory.mktemp("small") / "data", 20, seed=1)


def test_resume_gives_identical_subsequent_losses(base_dir, small_quad, tmp_path):
    from octopus_rt.training.train import train

    # Dropout on, so the restored RNG state matters too.
    common = dict(max_steps=6, batch_size=2, grad_accum=2, lr=1e-3, lora_dropout=0.2, save_every=2,
                  keep_checkpoints=3, eval_every=0)
    full = train(_options(base_dir, small_quad, tmp_path / "full", **common))
    checkpoints = sorted(p.name for p in (full.work_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    shutil.copytree(full.work_dir, tmp_path / "resumed.train")
    shutil.rmtree(tmp_path / "resumed.train" / "checkpoints" / "step-00000004")
    resumed = train(_options(base_dir, small_quad, tmp_path / "resumed", resume=True, **common))
    assert resumed.steps == [3, 4, 5, 6]
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=0, atol=1e-6)
    final_full, final_resumed = _trainable(full.model), _trainable(resumed.model)
    assert max(float((final_full[n] - final_resumed[n]).abs().max()) for n in final_full) < 1e-6


def test_full_disk_never_leaves_a_corrupt_latest_checkpoint(base_dir, small_quad, tmp_path, monkeypatch):
    import errno

    from octopus_rt.training import checkpoint
    from octopus_rt.training.train import train

    real_save = checkpoint.save_file
    calls = {"n": 0}

    def flaky_save(obj, path):
        calls["n"] += 1
        if path.parent.name.startswith(".partial-step-00000004") and path.name == "optimizer.pt":
            with open(path, "wb") as handle:  # a half-written file, then the disk is full
                handle.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_file", flaky_save)
    options = _options(base_dir, small_quad, tmp_path / "out", max_steps=6, batch_size=2, lr=1e-3, save_every=2)
    with pytest.raises(OctopusError, match=r"step 4 .*No space left.*step-00000002"):
        train(options)
    names = sorted(p.name for p in (options.work_dir / "checkpoints").iterdir())
    assert names == ["step-00000002"] and not (tmp_path / "out").exists()
    assert checkpoint.latest_checkpoint(options.work_dir).name == "step-00000002"
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = train(_options(base_dir, small_quad, tmp_path / "out", max_steps=6, batch_size=2, lr=1e-3,
                             save_every=2, resume=True))
    assert resumed.steps == [3, 4, 5, 6] and (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------- scale-out


def test_two_gloo_processes_equal_one_process(base_dir, small_quad, tmp_path):
    """The same command under torchrun (2 CPU processes, gloo) matches 1 process with the same global batch."""
    from octopus_rt.cli import main

    args = ["train", str(base_dir), "--data", str(small_quad), "--max-steps", "3", "--lora-dropout", "0",
            "--lr", "1e-3", "--batch-size", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--module", "octopus_rt.cli", *args, "--out", str(tmp_path / "two"), "--grad-accum", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [e["loss"] for e in _log(tmp_path / "one.train")]
    two = [e["loss"] for e in _log(tmp_path / "two.train")]
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-4)
    assert "2 process(es)" in done.stdout + done.stderr
    # The validation pass is sharded over the processes and all-reduced: same figures as one process.
    eval_one, eval_two = _log(tmp_path / "one.train", "eval")[-1], _log(tmp_path / "two.train", "eval")[-1]
    assert eval_one["pos_n"] == eval_two["pos_n"] > 0
    assert abs(eval_one["val_loss"] - eval_two["val_loss"]) < 1e-4
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


# ---------------------------------------------------------------- options for recipes


def test_gradient_checkpointing_gives_the_same_losses(base_dir, small_quad, tmp_path):
    from octopus_rt.training.train import train

    common = dict(max_steps=2, batch_size=2, lr=1e-3, lora_dropout=0.0, merge=False)
    plain = train(_options(base_dir, small_quad, tmp_path / "a", **common))
    checkpointed = train(_options(base_dir, small_quad, tmp_path / "b", gradient_checkpointing=True, **common))
    np.testing.assert_allclose(checkpointed.losses, plain.losses, rtol=0, atol=1e-6)


def test_full_training_with_an_auxiliary_loss_hook(base_dir, small_quad, tmp_path):
    """Recipe hooks: full tuning of every parameter, plus an extra loss whose gradient must arrive."""
    from octopus_rt.training.train import train

    seen = []

    def hook(model, batch, outputs, records):
        seen.append(len(records))
        bias = model.model.multi_modal_projector.linear_1.bias
        return 1e3 * bias.sum()  # dominates: Adam's first step moves every element by exactly -lr

    common = dict(max_steps=1, batch_size=2, grad_accum=2, lr=1e-3, lm_tuning="full", merge=False)
    with torch.no_grad():  # train() switches autograd on itself (an export in the same process turns it off)
        result = train(_options(base_dir, small_quad, tmp_path / "a", **common), loss_hook=hook)
    assert seen == [2, 2] and result.trainable_parameters == result.total_parameters
    from octopus_rt.training.architectures import load_llava

    initial = load_llava(base_dir)[0].model.multi_modal_projector.linear_1.bias.detach()
    moved = result.model.model.multi_modal_projector.linear_1.bias.detach() - initial
    np.testing.assert_allclose(moved.numpy(), -1e-3, rtol=1e-3)


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes(base_dir, small_quad, tmp_path):
    """`accelerate launch --multi_gpu` starts torchrun-style workers; on a CPU they use gloo."""
    from octopus_rt.cli import main

    args = ["train", str(base_dir), "--data", str(small_quad), "--max-steps", "2", "--lora-dropout", "0",
            "--lr", "1e-3", "--batch-size", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "octopus_rt.cli", *args, "--out", str(tmp_path / "two"), "--grad-accum", "1"]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    np.testing.assert_allclose([e["loss"] for e in _log(tmp_path / "two.train")],
                               [e["loss"] for e in _log(tmp_path / "one.train")], rtol=0, atol=1e-4)
