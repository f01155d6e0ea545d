"""`octopus-rt train` and `octopus-rt eval`. Heavy imports happen inside the commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the training and evaluation commands to the root app."""
