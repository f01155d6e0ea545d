"""`octopus-rt train` and `octopus-rt merge`. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _train_command(
    base_model: Path = typer.Argument(..., help="Model directory to start from: a transformers "
                                      "LlavaForConditionalGeneration or an official-layout Phi-3(.5)-Vision."),
    data: list[str] = typer.Option(..., "--data", help="Dataset folder with train.jsonl (+ val.jsonl), optionally "
                                   "PATH:WEIGHT to mix several; repeat for more."),
    out: Path = typer.Option(..., "--out", help="Directory to create for the merged model (must not exist)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoints and logs (default: OUT.train next to OUT)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the (weighted) training data."),
    batch_size: int = typer.Option(2, "--batch-size", help="Samples per process per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches accumulated per optimizer step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak AdamW learning rate (cosine decay)."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps before the cosine decay."),
    lm_tuning: str = typer.Option("lora", "--lm-tuning", help="Language model: lora | full | frozen."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank (default: 16 for LLaVA, 64 for "
                                            "Phi-3.5-Vision as in the Phi-3CookBook)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha, scale = alpha / rank "
                                               "(default: 32 for LLaVA, 128 for Phi-3.5-Vision)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="Dropout on the LoRA input "
                                                 "(default: 0.05 for LLaVA, 0 for Phi-3.5-Vision)."),
    freeze_vision: bool = typer.Option(False, "--freeze-vision", help="Freeze the vision tower and projector "
                                       "(default: fully fine-tuned, as in the paper)."),
    freeze_vision_stages: int = typer.Option(0, "--freeze-vision-stages", help="LLaVA / FastVLM: keep the vision "
                                             "tower's input layers and first N stages (CNN stages or ViT layers) "
                                             "frozen; the rest fine-tunes."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: never)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate on the val split every N steps "
                                   "(0: at the end only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the work directory."),
    on_error: str = typer.Option("stop", "--on-error", help="Bad records or images: stop | skip."),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16/fp16 on GPU, "
                                  "fp32 on CPU)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Recompute activations in the backward pass to save memory."),
    group_by_image: bool = typer.Option(False, "--group-by-image", help="LLaVA family: keep each image's records "
                                        "together in batches and run the vision tower once per distinct image "
                                        "(faster when the data asks several questions per image)."),
    seed: int = typer.Option(0, "--seed", help="Seed of LoRA init, data order and dropout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (logs still go to log.jsonl)."),
) -> None:
    """Fine-tune a LLaVA or Phi-3.5-Vision model on quality data (LoRA on the language model, full vision
    tuning) and write the merged model in the base's own format, ready for `octopus-rt export lmm`.
    Runs unchanged under torchrun / accelerate."""
    from octopus_rt.training.options import TrainOptions, parse_data_arg
    from octopus_rt.training.train import train

    options = TrainOptions(
        base_model=base_model, data=[parse_data_arg(d) for d in data], out=out, work_dir=work_dir, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, lm_tuning=lm_tuning,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, freeze_vision=freeze_vision,
        freeze_vision_stages=freeze_vision_stages, max_steps=max_steps, save_every=save_every, eval_every=eval_every,
        resume=resume, on_error=on_error,
        precision=precision, gradient_checkpointing=gradient_checkpointing, group_by_image=group_by_image, seed=seed,
        progress=not no_progress,
    )
    result = train(options)
    if result.out is not None:
        last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
        typer.echo(f"merged model written to {result.out} ({len(result.steps)} steps{last}; "
                   f"{result.tokens_per_s:.0f} tokens/s, {result.samples_per_s:.2f} samples/s; logs in {result.work_dir})")


def _merge_command(
    base_model: Path = typer.Argument(..., help="Official-layout Phi-3(.5)-Vision directory the adapter was trained on."),
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Directory to create for the merged checkpoint (must not exist)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights' dtype: float32 | bfloat16 | float16 (float32 keeps "
                              "LoRA deltas that bf16 would round away)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fold a PEFT LoRA adapter into a Phi-3(.5)-Vision checkpoint and write it in the official layout
    (same key names and config), ready for `octopus-rt export lmm`. Reads only JSON and safetensors."""
    from octopus_rt.training.phi3v_merge import merge_adapter

    written, changed = merge_adapter(base_model, adapter, out, dtype=dtype, progress=not no_progress)
    typer.echo(f"merged checkpoint written to {written} ({changed} tensors updated, {dtype})")


def register(app: typer.Typer) -> None:
    """Add the training commands to the root app."""
    app.command("train")(_train_command)
    app.command("merge")(_merge_command)
