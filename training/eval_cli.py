"""`octopus-rt eval BUNDLE DATA_DIR`: thin CLI over training/evaluate.py and training/eval_sweep.py (imports typer only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the root app."""

    @app.command("eval")
    def eval_command(
        bundle: Path = typer.Argument(..., help="Bundle directory to evaluate."),
        data_dir: Path = typer.Argument(..., help="Dataset folder with {train,val,test}.jsonl (octopus-rt data)."),
        split: str = typer.Option("test", "--split", help="Split to measure (train, val or test)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON here."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for plots (the sweep plot)."),
        sweep: bool = typer.Option(False, "--sweep", help="Choose tau and the point mapping on the VAL split "
                                   "by grounding mIoU and write them into the bundle's manifest defaults."),
        max_records: Optional[int] = typer.Option(None, "--max-records", help="Measure at most this many records."),
        no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the baselines (faster)."),
        tau: Optional[float] = typer.Option(None, "--tau", help="Override the manifest's tau."),
        point_mapping: Optional[str] = typer.Option(None, "--point-mapping", help="paper or quadrant."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random-point baseline and the bootstrap."),
        threads: int = typer.Option(1, "--threads", help="onnxruntime intra-op threads."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown."),
    ) -> None:
        """Measure a bundle on a dataset split: a table per task with n and 95% CIs, and baselines."""
        import json

        from octopus_rt.training.eval_report import format_table, plot_sweep
        from octopus_rt.training.eval_sweep import sweep_defaults
        from octopus_rt.training.evaluate import EvalOptions, evaluate

        options = EvalOptions(bundle, data_dir, split=split, max_records=max_records, baselines=not no_baselines,
                              tau=tau, point_mapping=point_mapping, seed=seed, threads=threads)
        sweep_result = None
        if sweep:
            sweep_result = sweep_defaults(options)
            best = sweep_result["best"]
            typer.echo(f"sweep on val (n={sweep_result['n']}): tau={best['tau']:g}, point mapping "
                       f"{best['point_mapping']} (mIoU {100 * best['miou']:.1f}); written to {bundle}/manifest.json")
            if plots is not None:
                path = plot_sweep(sweep_result, Path(plots) / "sweep_miou_vs_tau.png")
                typer.echo(f"sweep plot: {path}")
        report = evaluate(options)
        report.sweep = sweep_result
        typer.echo(format_table(report, markdown=markdown), nl=False)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
            typer.echo(f"wrote {json_out}")
