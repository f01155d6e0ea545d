"""`octopus-rt export sam`: thin CLI over the sam exporter. Imports only typer at module level."""

from __future__ import annotations

import typer


def register(export_app: typer.Typer) -> None:
    """Add the `sam` command to `octopus-rt export`."""
