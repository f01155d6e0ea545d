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
            ..., help="transformers save_pretrained directory of a LlavaForConditionalGeneration (+ processor), "
            "or an official-layout Phi-3(.5)-Vision checkpoint folder (config.json, safetensors, tokenizer)."
        ),
        out: Path = typer.Option(..., "--out", help="Bundle directory (created, or updated in place)."),
        precision: str = typer.Option(
            "fp32", "--precision", help="fp32, fp16, int8 (dynamic, CPU/edge) or int4 (MatMulNBits decoder weights)."
        ),
        opset: int = typer.Option(18, "--opset", help="ONNX opset of the graphs (older TensorRT / Jetson need older)."),
        num_crops: Optional[int] = typer.Option(
            None, "--num-crops", help="Phi-3-Vision only: HD crop budget (default: preprocessor_config.json, else 4).",
        ),
    ) -> None:
        """Export the vision tower + projector and the language decoder to ONNX, verified against PyTorch."""
        import time

        # Heavy imports stay inside the command: `octopus-rt infer` must not pay for torch.
        from octopus_rt.export.lmm import export_lmm

        started = time.monotonic()

        def progress(message: str) -> None:
            typer.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

        section = export_lmm(model_dir, out, precision=precision, opset=opset, progress=progress, num_crops=num_crops)
        check = section["verification"]
        if section.get("architecture") == "phi3v":
            typer.echo(
                f"OK lmm (Phi-3-Vision, {precision}, opset {section['opset']}): {section['hd']['num_crops']} crops "
                f"(up to {section['vision']['num_image_tokens']} image tokens), {section['decoder']['num_layers']} layers; "
                f"greedy tokens identical: {check['tokens_identical']}, top-1 {check['top1_agreement']:.3f}, "
                f"closed-set max |diff| {check['closed_set_max_abs_diff']:.2e}, logits max |diff| "
                f"{check['generation_max_abs_diff']:.2e}"
            )
            return
        typer.echo(
            f"OK lmm ({section['source']['text_model_type']} + {section['source']['vision_model_type']}, "
            f"{precision}, opset {section['opset']}): {section['vision']['num_image_tokens']} image tokens, "
            f"{section['decoder']['num_layers']} layers; teacher-forced top-1 {check['top1_agreement']:.3f}, "
            f"logits cosine >= {check['generation_min_cosine']:.5f}, max |diff| {check['generation_max_abs_diff']:.2e}"
        )
