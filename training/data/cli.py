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
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label maps <stem>.png (+ names.json) "
                                          "used as regions instead of proposals."),
    uniform: float = typer.Option(0.2, "--uniform", help="Share of images distorted as a whole."),
    max_regions: int = typer.Option(3, "--max-regions", help="Most distorted regions per image (1-3); 1 for "
                                    "the easy end of a curriculum."),
    min_severity: int = typer.Option(1, "--min-severity", help="Lowest severity of any distortion (1-5); "
                                     "ordered pairs (severities 1-3) only while it is <= 3."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Build a region-wise distortion dataset with all four task types from a folder of images."""
    from octopus_rt.errors import InputError
    from octopus_rt.training.data.synth import SynthOptions, synthesize

    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other")
    options = SynthOptions(num=num, seed=seed, size=size, sam=str(sam) if sam else None, workers=workers,
                           overwrite=overwrite, resume=resume, groups=str(groups) if groups else None,
                           labels=str(labels) if labels else None,
                           uniform_prob=uniform, max_regions=max_regions, min_severity=min_severity,
                           progress=not quiet)
    report = synthesize(src_dir, out, options)
    counts = ", ".join(f"{k} {v}" for k, v in report.records.items())
    typer.echo(f"wrote {report.samples} images, records: {counts} -> {out}")
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)} source image(s):", err=True)
        for name, reason in report.skipped:
            typer.echo(f"  {name}: {reason}", err=True)


@data_app.command()
def show(
    data_dir: Path = typer.Argument(..., help="Dataset folder."),
    record_id: str = typer.Argument(..., help="Record id to draw."),
    out: Path = typer.Option(Path("sample.png"), "--out", help="PNG to write."),
) -> None:
    """Render one record (image, region masks with labels, question and answer) to a PNG."""
    from octopus_rt.training.data.show import find_record, render_record

    path = render_record(data_dir, find_record(data_dir, record_id), out)
    typer.echo(f"wrote {path}")


@data_app.command("import")
def import_(
    fmt: str = typer.Argument(..., help="q-instruct | dq495k | q-align | q-bench | q-bench-hf | kadid | koniq"),
    path: Path = typer.Argument(..., help="The dataset's JSON / CSV file."),
    out: Path = typer.Option(..., "--out", help="Folder for {train,val,test}.jsonl and dataset.json."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the image paths are relative to "
                                              "(default: the file's folder; KADID: its images/ folder)."),
    split: str = typer.Option("auto", "--split", help="auto (80/10/10 by source) or train / val / test."),
    mos_scale: Optional[str] = typer.Option(None, "--mos-scale", help="'WORST,BEST' of the score scale (default 1,5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the auto split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
) -> None:
    """Convert a public quality dataset into octopus-rt records."""
    from octopus_rt.errors import InputError
    from octopus_rt.training.data.importers import import_dataset

    scale = None
    if mos_scale:
        try:
            lo, hi = (float(v) for v in mos_scale.split(","))
        except ValueError as exc:
            raise InputError(f"--mos-scale takes 'WORST,BEST', got {mos_scale!r}") from exc
        scale = (lo, hi)
    report = import_dataset(fmt, path, out, image_root=image_root, split=split, seed=seed, mos_scale=scale,
                            overwrite=overwrite)
    typer.echo(f"imported {sum(report.records.values())} records ("
               + ", ".join(f"{k} {v}" for k, v in report.records.items()) + f") -> {out}")
    if report.skipped:
        typer.echo(f"skipped {len(report.skipped)}:", err=True)
        for item, reason in report.skipped[:50]:
            typer.echo(f"  {item}: {reason}", err=True)


@data_app.command()
def stats(data_dir: Path = typer.Argument(..., help="Dataset folder.")) -> None:
    """Print counts per split, task, sub-task, position answer, distortion and severity, and the share of
    ambiguous grounding targets."""
    from octopus_rt.training.data.stats import compute_stats, format_stats

    typer.echo(format_stats(compute_stats(data_dir)))
