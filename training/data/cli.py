"""`octopus-rt data ...` sub-commands (synth, import, show, stats)."""

from __future__ import annotations

import typer

data_app = typer.Typer(no_args_is_help=True)
