"""`octopus-rt data ...` sub-commands (synth, import, show, stats).

Only typer and the standard library at module level: the data engine's numpy / OpenCV /
scikit-image imports happen inside each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(no_args_is_help=True)


@data_app.command()
def synth(
    src_dir: Path = typer.Argument(..., help="Folder of clean source images."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (images/, masks/, {train,val,test}.jsonl)."),
    num: Optional[int] = typer.Option(None, "--num", help="Distorted images to make (default: one per source)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical output."),
    size: int = typer.Option(512, "--size", help="Longest image side in pixels (larger sources are downscaled)."),
    sam: Optional[Path] = typer.Option(None, "--sam", help="segment-anything checkpoint for region proposals."),
    workers: int = typer.Option(2, "--workers", help="Worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the dataset already in --out."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run with the same options."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="File of 'filename,group' lines kept in one split."),
    uniform: float = typer.Option(0.2, "--uniform", help="Share of images distorted as a whole."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Build a region-wise distortion dataset with all four task types from a folder of images."""
    from octopus_rt.errors import InputError
    from octopus_rt.training.data.synth import SynthOptions, synthesize

    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other")
    options = SynthOptions(num=num, seed=seed, size=size, sam=str(sam) if sam else None, workers=workers,
                           overwrite=overwrite, resume=resume, groups=str(groups) if groups else None,
                           uniform_prob=uniform, progress=not quiet)
    report = synthesize(src_dir, out, options)
    counts = ", ".join(f"{k} {v}" for k, v in report.records.items())
    typer.echo(f"wrote {report.samples} images, records: {counts} -> {out}")
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)} source image(s):", err=True)
        for name, reason in report.skipped:
            typer.echo(f"  {name}: {reason}", err=True)
