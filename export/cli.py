"""`octopus-rt export ...` sub-commands. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import typer

from octopus_rt.export import lmm_cli, sam_cli, trt_cli

export_app = typer.Typer(no_args_is_help=True)
lmm_cli.register(export_app)
sam_cli.register(export_app)
trt_cli.register(export_app)
