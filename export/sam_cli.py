"""`octopus-rt export sam`: thin CLI over the sam exporter. Imports only typer at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(export_app: typer.Typer) -> None:
    """Add the `sam` command to `octopus-rt export`."""

    @export_app.command("sam")
    def sam(
        checkpoint: Path = typer.Argument(..., help="Segment Anything checkpoint (.pth state_dict)."),
        model_type: str = typer.Option(..., "--model-type", help="vit_b, vit_l, vit_h or custom."),
        sam_config: Optional[str] = typer.Option(
            None, "--sam-config",
            help="custom only: architecture as a JSON file or inline JSON object "
            "(default: CHECKPOINT with suffix .json when it exists).",
        ),
        out: Path = typer.Option(..., "--out", help="Bundle directory (created, or updated in place)."),
        precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (encoder LayerNorm stays fp32)."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset (14-20; older TensorRT needs older opsets)."),
    ) -> None:
        """Export SAM's image encoder and TensorRT-friendly mask decoder to ONNX, verified against segment-anything."""
        from octopus_rt.export.sam import export_sam

        section = export_sam(checkpoint, out, model_type=model_type, sam_config=sam_config,
                             precision=precision, opset=opset, log=typer.echo)
        enc = section["encoder"]
        typer.echo(
            f"OK sam ({model_type}, {precision}, opset {section['opset']}): input {enc['input_size']}, "
            f"embeddings {'x'.join(map(str, enc['embedding_shape']))}, "
            f"min mask IoU vs SamPredictor {section['verification']['min_mask_iou']:.4f}"
        )
