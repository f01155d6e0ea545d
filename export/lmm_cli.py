"""`octopus-rt export lmm`: thin CLI over the lmm exporter. Imports only typer at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(export_app: typer.Typer) -> None:
    """Add the `lmm` command to `octopus-rt export`."""

    @export_app.command("lmm")
    def lmm(
        model_dir: Path = typer.Argument(
            ..., help="transformers save_pretrained directory of a LlavaForConditionalGeneration or a "
            "FastVlmForConditionalGeneration (timm tower) (+ processor), or an official-layout Phi-3(.5)-Vision "
            "checkpoint folder (config.json, safetensors, tokenizer)."
        ),
        out: Path = typer.Option(..., "--out", help="Bundle directory (created, or updated in place)."),
        precision: str = typer.Option(
            "fp32", "--precision", help="fp32, fp16, int8 (dynamic, CPU/edge) or int4 (MatMulNBits decoder weights)."
        ),
        vision_precision: Optional[str] = typer.Option(
            None, "--vision-precision",
            help="LLaVA / FastVLM: fp32, fp16 or int8 for the vision graph alone (float32 I/O either way; default: "
                 "--precision, fp32 for int4). E.g. --vision-precision fp16 with an fp32 decoder halves a CNN "
                 "tower's bytes; verification then applies the fp16 criteria (cosine / top-1).",
        ),
        opset: int = typer.Option(18, "--opset", help="ONNX opset of the graphs (older TensorRT / Jetson need older)."),
        num_crops: Optional[int] = typer.Option(
            None, "--num-crops", help="Phi-3-Vision only: HD crop budget (default: preprocessor_config.json, else 4).",
        ),
        decoder_form: str = typer.Option(
            "auto", "--decoder-form",
            help="auto (gqa where the model allows it at fp32/int8/int4, else flat_kv), gqa (onnxruntime contrib "
                 "ops, shared KV buffer: fastest on the CPU provider) or flat_kv (standard ONNX ops: TensorRT, "
                 "CUDA, fp16).",
        ),
        min_cosine: Optional[float] = typer.Option(
            None, "--min-cosine", help="fp16/int8/int4: accept a logits cosine down to this (default 0.99, fp16 "
                                       "0.999); recorded in the manifest and shown by `octopus-rt verify`."
        ),
        min_top1: Optional[float] = typer.Option(
            None, "--min-top1", help="fp16/int8/int4: accept teacher-forced top-1 agreement down to this "
                                     "(default 0.95, fp16 0.99); recorded."
        ),
        accept_quality_loss: bool = typer.Option(
            False, "--accept-quality-loss",
            help="fp16/int8/int4: keep the export even when agreement is below the thresholds; the failed checks "
                 "are recorded in the manifest and printed by `octopus-rt verify` and `octopus-rt infer`.",
        ),
    ) -> None:
        """Export the vision tower + projector and the language decoder to ONNX, verified against PyTorch."""
        import time

        # Heavy imports stay inside the command: `octopus-rt infer` must not pay for torch.
        from octopus_rt.export.lmm import export_lmm

        started = time.monotonic()

        def progress(message: str) -> None:
            typer.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

        section = export_lmm(model_dir, out, precision=precision, opset=opset, progress=progress,
                             num_crops=num_crops, decoder_form=decoder_form, min_cosine=min_cosine, min_top1=min_top1,
                             accept_quality_loss=accept_quality_loss, vision_precision=vision_precision)
        check = section["verification"]
        status = "ACCEPTED WITH QUALITY LOSS" if check.get("quality_loss_accepted") else "OK"
        if section.get("architecture") == "phi3v":
            typer.echo(
                f"{status} lmm (Phi-3-Vision, {precision}, {section['decoder']['form']} decoder, opset {section['opset']}): "
                f"{section['hd']['num_crops']} crops (up to {section['vision']['num_image_tokens']} image tokens), "
                f"{section['decoder']['num_layers']} layers; greedy tokens identical: {check['tokens_identical']}, "
                f"top-1 {check['top1_agreement']:.3f}, closed-set max |diff| {check['closed_set_max_abs_diff']:.2e}, "
                f"logits max |diff| {check['generation_max_abs_diff']:.2e}"
            )
            return
        typer.echo(
            f"{status} lmm ({section['source']['text_model_type']} + {section['source']['vision_model_type']}, "
            f"{precision}, {section['decoder']['form']} decoder, {section['vision'].get('precision', precision)} vision, "
            f"opset {section['opset']}): "
            f"{section['vision']['num_image_tokens']} image tokens, "
            f"{section['decoder']['num_layers']} layers; teacher-forced top-1 {check['top1_agreement']:.3f}, "
            f"logits cosine >= {check['generation_min_cosine']:.5f}, max |diff| {check['generation_max_abs_diff']:.2e}"
        )
