"""`octopus-rt export ...` sub-commands. Heavy imports (torch, transformers) happen inside commands."""

from __future__ import annotations

import typer

export_app = typer.Typer(no_args_is_help=True)
