"""`octopus-rt export trt`: thin CLI over export/trt.py. Imports only typer/stdlib at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def register(export_app: typer.Typer) -> None:
    """Add the `trt` command to `octopus-rt export`."""

    @export_app.command("trt")
    def trt(
        bundle: Path = typer.Argument(..., help="Bundle directory (with lmm and/or sam sections)."),
        fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Build fp16 engines (LayerNorm of the SAM encoder stays fp32)."),
        max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch of images (default 1)."),
        max_seq: Optional[int] = typer.Option(None, "--max-seq", help="Longest prefill in tokens (default: image tokens + 256)."),
        max_past: Optional[int] = typer.Option(None, "--max-past", help="Longest KV cache in tokens (default: max-seq + max_new_tokens - 1)."),
        workspace: float = typer.Option(2.0, "--workspace", help="TensorRT builder workspace in GiB."),
        decoder: bool = typer.Option(False, "--decoder/--no-decoder", help="Also build the LM decoder engine (default: the decode loop runs on CUDA)."),
        device_id: int = typer.Option(0, "--device-id", help="CUDA device to build on."),
        opt_level: int = typer.Option(3, "--opt-level", help="TensorRT builder optimisation level 0..5."),
    ) -> None:
        """Build TensorRT engines (onnxruntime EP-context models) for THIS machine's GPU, verify them
        against the CPU path, and record them in the bundle's `engines` section."""
        from octopus_rt.export.trt import TrtBuildOptions, build_engines
        from octopus_rt.export.trt_profiles import TRT_GRAPHS_DEFAULT

        options = TrtBuildOptions(
            fp16=fp16, max_batch=max_batch, max_seq=max_seq, max_past=max_past, workspace_gib=workspace,
            graphs=TRT_GRAPHS_DEFAULT + (("decoder",) if decoder else ()), device_id=device_id,
            builder_optimization_level=opt_level,
        )
        result = build_engines(bundle, options, log=lambda line: typer.echo(line, err=True))
        graphs = ", ".join(result.target.graphs)
        typer.echo(f"OK {bundle}: engines {result.name} ({graphs}) built and verified against the CPU path")
