"""`octopus-rt export lmm`: thin CLI over the lmm exporter. Imports only typer at module level."""

from __future__ import annotations

from pathlib import Path

import typer


def register(export_app: typer.Typer) -> None:
    """Add the `lmm` command to `octopus-rt export`."""

    @export_app.command("lmm")
    def lmm(
        model_dir: Path = typer.Argument(
            ..., help="transformers save_pretrained directory of a LlavaForConditionalGeneration (+ processor)."
        ),
        out: Path = typer.Option(..., "--out", help="Bundle directory (created, or updated in place)."),
        precision: str = typer.Option(
            "fp32", "--precision", help="fp32, fp16, int8 (dynamic, CPU/edge) or int4 (MatMulNBits decoder weights)."
        ),
        opset: int = typer.Option(18, "--opset", help="ONNX opset of the graphs (older TensorRT / Jetson need older)."),
    ) -> None:
        """Export the vision tower + projector and the language decoder to ONNX, verified against PyTorch."""
        import time

        # Heavy imports stay inside the command: `octopus-rt infer` must not pay for torch.
        from octopus_rt.export.lmm import export_lmm

        started = time.monotonic()

        def progress(message: str) -> None:
            typer.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

        section = export_lmm(model_dir, out, precision=precision, opset=opset, progress=progress)
        check = section["verification"]
        typer.echo(
            f"OK lmm ({section['source']['text_model_type']} + {section['source']['vision_model_type']}, "
            f"{precision}, opset {section['opset']}): {section['vision']['num_image_tokens']} image tokens, "
            f"{section['decoder']['num_layers']} layers; teacher-forced top-1 {check['top1_agreement']:.3f}, "
            f"logits cosine >= {check['generation_min_cosine']:.5f}, max |diff| {check['generation_max_abs_diff']:.2e}"
        )
