"""`octopus-rt export lmm`: thin CLI over the lmm exporter. Imports only typer at module level."""

from __future__ import annotations

import typer


def register(export_app: typer.Typer) -> None:
    """Add the `lmm` command to `octopus-rt export`."""
