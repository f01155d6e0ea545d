"""`octopus-rt doctor`: thin CLI over runtime/doctor.py. Imports only typer/stdlib at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the `doctor` command to the root app."""

    @app.command("doctor")
    def doctor(
        bundle: Optional[Path] = typer.Option(None, "--bundle", help="Bundle directory to check against this machine."),
        device: str = typer.Option("auto", "--device", help="auto, tensorrt, cuda or cpu: the device the bundle must run on."),
        json_out: bool = typer.Option(False, "--json", help="Print the probed environment and plan as JSON."),
    ) -> None:
        """Python, onnxruntime and its providers, GPU / CUDA / TensorRT, and whether BUNDLE can run here.

        Exits 0 when it can, non-zero with the reason otherwise.
        """
        import json

        from octopus_rt.errors import OctopusError
        from octopus_rt.runtime.device_info import probe_device
        from octopus_rt.runtime.doctor import diagnose

        env = probe_device()
        report = diagnose(env, bundle, device)
        if json_out:
            typer.echo(json.dumps({"environment": env.to_dict(), "plans": report.plans, "ok": report.ok,
                                   "reason": report.reason}, indent=2))
        else:
            for line in report.lines:
                typer.echo(line)
        if not report.ok:
            raise OctopusError(report.reason)
