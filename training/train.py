"""The training loop of `octopus-rt train`: `train(TrainOptions(...)) -> TrainResult`.

One optimizer step sees a global batch of batch_size * grad_accum * world_size samples taken from a
seeded per-epoch order (the same on every process). The loss of a step is the sum of the answer
tokens' cross-entropies over the global batch divided by the number of answer tokens in the global
batch; each process counts its tokens first, the counts are all-reduced, every micro-batch's summed
loss is divided by that global count, and gradients are all-reduced (summed) after accumulation.
So accumulation and several processes give the same update as one large batch.

The model family (LLaVA, Phi-3.5-Vision) is an `Architecture` (training/architectures.py) picked from
the base model's config.json: it loads the model and its collator, chooses what trains and writes
the merged result; everything else here is shared. A batch through the model (inputs, answer loss,
autocast) is training/batches.py, the run's log training/train_log.py, validation
training/validation_metrics.py.

Extension points for recipes (the demo model): `lm_tuning="full"` trains a small model from its
initial weights, and `loss_hook(model, batch, outputs, records) -> scalar tensor` adds an auxiliary
loss per micro-batch (weighted 1 / (grad_accum * world_size), i.e. averaged over the global batch).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from octopus_rt.errors import InputError
from octopus_rt.training.batches import answer_loss_sum, autocast, load_images, model_inputs
from octopus_rt.training.options import TrainOptions
from octopus_rt.training.train_log import TrainLogger
from octopus_rt.training.validation_metrics import run_validation

__all__ = ["TrainResult", "train", "read_datasets", "resolve_precision"]


@dataclass
class TrainResult:
    """What a run did. `losses[i]` is the loss of optimizer step `steps[i]` (1-based, this call only);
    `model` is the final (merged when merging) model, kept in memory for callers such as tests."""

    out: Path | None
    work_dir: Path
    steps: list[int]
    losses: list[float]
    lrs: list[float]
    last_eval: dict | None
    tokens_per_s: float
    samples_per_s: float
    trainable_parameters: int
    total_parameters: int
    lora_targets: list[str]
    model: object = field(default=None, repr=False)


def resolve_precision(precision: str, device) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return precision


def read_datasets(options: TrainOptions, log: Callable[[str], None]):
    """(MixedDataset of the train splits, list of val records, skipped-line messages)."""
    from octopus_rt.training.dataset import MixedDataset, read_split

    train_sets, val_records, skipped = [], [], []
    for source in options.data:
        report = read_split(source.path, "train", options.on_error)
        if not report.records:
            raise InputError(f"{source.path}/train.jsonl holds no usable record")
        train_sets.append(report.records)
        skipped += report.skipped
        val = read_split(source.path, "val", options.on_error, required=False)
        val_records += val.records
        skipped += val.skipped
    if skipped:
        log(f"skipped {len(skipped)} bad record(s); first: {skipped[0]}")
    return MixedDataset(train_sets, [d.weight for d in options.data], options.seed,
                        group_by_image=options.group_by_image), val_records, skipped


def _check_paths(options: TrainOptions) -> None:
    if options.out.exists():
        raise InputError(f"output directory {options.out} already exists; choose another --out or remove it")
    if options.resume:
        from octopus_rt.training.checkpoint import latest_checkpoint

        if latest_checkpoint(options.work_dir) is None:
            raise InputError(f"--resume: no complete checkpoint in {options.work_dir}/checkpoints")
    elif options.work_dir.exists() and any(options.work_dir.iterdir()):
        raise InputError(f"work directory {options.work_dir} already holds a run; pass --resume to continue it "
                         "or remove it")


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def factor(step: int) -> float:  # `step` = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _accumulate(model, collator, micro, global_tokens: float, device, precision: str, scaler, loss_hook,
                hook_weight: float, share_images: bool = False) -> float:
    """Forward and backward over one process's micro-batches of a step; returns the summed answer loss.

    micro: list of (records, images, encoded). Each micro-batch's loss is its summed answer-token
    cross-entropy divided by `global_tokens` (plus hook_weight * the hook's loss), so the gradients
    accumulated over micro-batches and summed over processes are those of the global batch.
    share_images: run the vision tower once per distinct image file of a micro-batch
    (training/shared_images.py). Grad mode is switched on here: callers (or a previous export in the
    same process) may have turned it off globally.
    """
    import torch

    from octopus_rt.training.shared_images import distinct_rows, forward_shared_images

    loss_sum = 0.0
    with torch.enable_grad():
        for records, images, encoded in micro:
            if not records:
                continue
            if share_images:
                firsts, inverse = distinct_rows([str(r.image) for r in records])
                images = [images[i] for i in firsts]
            batch = {k: v.to(device) for k, v in collator.batch(encoded, images).items()}
            with autocast(device, precision):
                if share_images:
                    outputs = forward_shared_images(model, model_inputs(batch), inverse)
                else:
                    outputs = model(**model_inputs(batch))
            summed = answer_loss_sum(outputs.logits, batch["labels"])
            loss = summed / global_tokens
            if loss_hook is not None:
                loss = loss + hook_weight * loss_hook(model, batch, outputs, records)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += float(summed.detach())
    return loss_sum


def train(options: TrainOptions, *, loss_hook: Callable | None = None) -> TrainResult:
    """Run (or resume) one training run and write the merged model to `options.out`.

    Raises InputError / OctopusError with one-line messages for bad input; see the module docstring.
    """
    import torch

    from octopus_rt.training.architectures import architecture_for, with_lora_defaults
    from octopus_rt.training.checkpoint import CheckpointState, latest_checkpoint, load_checkpoint, save_checkpoint
    from octopus_rt.training.distributed import init_distributed

    options.validate()
    dist = init_distributed()
    logger = None
    try:
        # Every process checks before any of them creates the work directory (rank 0 does, later).
        refused = None
        try:
            _check_paths(options)
        except InputError as exc:
            refused = exc
        if not dist.all_ok(refused is None):
            raise refused or InputError("another process refused the output or work directory")
        architecture = architecture_for(options.base_model)
        if options.group_by_image and not architecture.shares_images:
            raise InputError(f"--group-by-image works for LLaVA-family models, not {architecture.name}")
        options = with_lora_defaults(options, architecture.lora_defaults)
        precision = resolve_precision(options.precision, dist.device)
        say = print if dist.is_main else (lambda _text: None)
        dataset, val_records, skipped = read_datasets(options, say)
        global_batch = options.batch_size * options.grad_accum * dist.world_size
        steps_per_epoch = dataset.samples_per_epoch // global_batch
        if steps_per_epoch < 1:
            raise InputError(f"the training data ({dataset.samples_per_epoch} samples per epoch) is smaller than one "
                             f"global batch ({global_batch}); lower --batch-size or --grad-accum")
        total_steps = options.max_steps or max(1, round(options.epochs * steps_per_epoch))

        torch.manual_seed(options.seed)
        model, collator = architecture.load(options.base_model)
        if options.gradient_checkpointing:
            architecture.enable_gradient_checkpointing(model)
        model, summary = architecture.apply_tuning(model, options)
        model.to(dist.device)
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(total_steps, options.warmup_steps, options.min_lr_ratio))
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        fingerprint = {"samples_per_epoch": dataset.samples_per_epoch, "global_batch": global_batch,
                       "total_steps": total_steps, "trainable": summary.trainable_parameters}

        start_step = 0
        if options.resume:
            ckpt = load_checkpoint(latest_checkpoint(options.work_dir), dist.rank)
            saved = {k: ckpt.meta.get(k) for k in fingerprint}
            if saved != fingerprint:
                raise InputError(f"--resume: the run differs from the checkpoint's (saved {saved}, now {fingerprint})")
            missing = set(n for n, _ in named) ^ set(ckpt.trainable)
            if missing:
                raise InputError(f"--resume: checkpoint parameters do not match the model ({sorted(missing)[:3]} ...)")
            with torch.no_grad():
                for name, parameter in named:
                    parameter.copy_(ckpt.trainable[name].to(parameter.device))
            optimizer.load_state_dict(ckpt.optimizer)
            scheduler.load_state_dict(ckpt.scheduler)
            if scaler is not None and ckpt.scaler is not None:
                scaler.load_state_dict(ckpt.scaler)
            start_step = int(ckpt.meta["step"])
        elif dist.is_main:
            options.work_dir.mkdir(parents=True, exist_ok=True)
            (options.work_dir / "options.json").write_text(json.dumps(options.to_json(), indent=1), encoding="utf-8")
            if skipped:
                (options.work_dir / "skipped.txt").write_text("\n".join(skipped) + "\n", encoding="utf-8")
        dist.barrier()

        logger = TrainLogger(options.work_dir, dist.is_main, total_steps, start_step, options.progress)
        say = logger.message
        say(f"training {summary.trainable_parameters:,} of {summary.total_parameters:,} parameters "
            f"({len(summary.lora_targets)} LoRA modules), {total_steps} steps of {global_batch} samples, "
            f"{dist.world_size} process(es), {precision} on {dist.device.type}")

        orders: dict[int, list] = {}

        def sample_key(flat: int):
            epoch, within = divmod(flat, steps_per_epoch * global_batch)
            if epoch not in orders:
                orders.clear()
                orders[epoch] = dataset.epoch_order(epoch)
            return orders[epoch][within]

        steps, losses, lrs = [], [], []
        last_eval = None
        run_tokens, run_samples, run_time = 0.0, 0.0, 0.0
        for step in range(start_step + 1, total_steps + 1):
            began = time.perf_counter()
            micro = []
            for m in range(options.grad_accum):
                first = (step - 1) * global_batch + (m * dist.world_size + dist.rank) * options.batch_size
                records = [dataset.record(sample_key(first + i)) for i in range(options.batch_size)]
                records, images = load_images(records, options.on_error, say)
                micro.append((records, images, [collator.encode(r.turns, image) for r, image in zip(records, images)]))
            local_tokens = sum(e.num_answer_tokens for _, _, enc in micro for e in enc)
            local_inputs = sum(len(e.input_ids) for _, _, enc in micro for e in enc)
            local_samples = sum(len(r) for r, _, _ in micro)
            global_tokens, global_inputs, global_samples = dist.all_sum([local_tokens, local_inputs, local_samples])
            if global_tokens == 0:
                raise InputError(f"step {step}: the global batch holds no answer tokens (empty answers?)")
            loss_sum = _accumulate(model, collator, micro, global_tokens, dist.device, precision, scaler,
                                   loss_hook, hook_weight=1.0 / (options.grad_accum * dist.world_size),
                                   share_images=options.group_by_image)
            dist.sum_gradients(params)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(dist.all_sum(loss_sum) / global_tokens)
            elapsed = time.perf_counter() - began
            run_tokens += global_inputs
            run_samples += global_samples
            run_time += elapsed
            steps.append(step)
            losses.append(step_loss)
            lrs.append(lr)
            logger.advance({"loss": step_loss, "lr": lr, "tokens_per_s": run_tokens / run_time})
            if step % options.log_every == 0 or step == total_steps:
                logger.record({"type": "train", "step": step, "epoch": (step * global_batch) / dataset.samples_per_epoch,
                               "loss": step_loss, "lr": lr, "answer_tokens": int(global_tokens),
                               "tokens_per_s": run_tokens / run_time, "samples_per_s": run_samples / run_time,
                               "eta_s": (total_steps - step) * run_time / len(steps)})
            if val_records and ((options.eval_every and step % options.eval_every == 0) or step == total_steps):
                result = run_validation(model, collator, val_records, dist=dist, batch_size=options.batch_size,
                                        precision=precision, max_samples=options.eval_max_samples,
                                        on_error=options.on_error)
                last_eval = {"type": "eval", "step": step, **result.as_dict()}
                logger.record(last_eval)
                say("eval step {step}: ".format(step=step) + ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items()
                    if k not in ("type", "step")))
            if options.save_every and step % options.save_every == 0 and step < total_steps:
                trainable = {n: p.detach().cpu().clone() for n, p in named} if dist.is_main else {}
                save_checkpoint(options.work_dir, CheckpointState(
                    trainable, optimizer.state_dict() if dist.is_main else {}, scheduler.state_dict(),
                    scaler.state_dict() if scaler is not None else None, dict(fingerprint, step=step)),
                    rank=dist.rank, world_size=dist.world_size, keep=options.keep_checkpoints, all_ok=dist.all_ok)
        logger.close()
        logger = None
        out = None
        final_model = model
        if options.merge and dist.is_main:
            out, final_model = architecture.write_merged(model, collator, options)
        dist.barrier()
        result = TrainResult(
            out=out if options.merge else None, work_dir=options.work_dir, steps=steps, losses=losses, lrs=lrs,
            last_eval=last_eval, tokens_per_s=run_tokens / run_time if run_time else 0.0,
            samples_per_s=run_samples / run_time if run_time else 0.0,
            trainable_parameters=summary.trainable_parameters, total_parameters=summary.total_parameters,
            lora_targets=summary.lora_targets, model=final_model)
        if dist.is_main:
            summary_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "model"}
            (options.work_dir / "result.json").write_text(json.dumps(summary_json, indent=1), encoding="utf-8")
        return result
    finally:
        if logger is not None:  # an error mid-run: flush the log and release the progress bar
            logger.close()
        dist.close()
