"""`octopus-rt infer`, `infer-batch`, `doctor`. Imports only typer at module level."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the runtime's commands to the root app."""
