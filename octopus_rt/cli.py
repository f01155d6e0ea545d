"""`octopus-rt` command line: parses arguments and calls the API, nothing more.

Every sub-command module imports only typer and the standard library at module level; heavy
modules (onnxruntime, torch, ...) are imported inside the command that needs them, so
`octopus-rt infer` never pays for (or requires) the exporter's dependencies.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from octopus_rt.errors import OctopusError

app = typer.Typer(
    name="octopus-rt",
    help="IQA-Octopus deployment runtime: export, run, train and evaluate quality models that answer and ground.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """IQA-Octopus deployment runtime."""


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory to check."),
) -> None:
    """Re-hash every file of a bundle against its manifest (the runtime itself checks only sizes), and
    show how the lmm section was verified at export (and what the user lowered or accepted)."""
    from octopus_rt.bundle import BundleError, check_files, read_manifest
    from octopus_rt.verification import LmmVerification

    manifest = read_manifest(bundle)
    problems = check_files(bundle, manifest, hashes=True)
    if problems:
        for line in problems:
            typer.echo(f"FAIL {line}", err=True)
        raise BundleError(f"{len(problems)} problem(s) in {bundle}")
    sections = [name for name in ("lmm", "sam", "engines") if isinstance(manifest.get(name), dict)]
    count = sum(len(manifest[name].get("files", {})) for name in sections)
    typer.echo(f"OK {bundle}: {count} files in sections {', '.join(sections) or '(none)'} match the manifest")
    record = (manifest.get("lmm") or {}).get("verification")
    if isinstance(record, dict):
        for line in LmmVerification.from_dict(record, "lmm.verification").describe("lmm"):
            typer.echo(line)


def _register_subcommands() -> None:
    from octopus_rt.export.cli import export_app
    from octopus_rt.runtime.cli import register as register_runtime
    from octopus_rt.runtime.doctor_cli import register as register_doctor
    from octopus_rt.runtime.serve.cli import register as register_serve
    from octopus_rt.training.cli import register as register_training
    from octopus_rt.training.eval_cli import register as register_eval
    from octopus_rt.training.data.cli import data_app

    app.add_typer(export_app, name="export", help="Write a model bundle (ONNX graphs, tokenizer, manifest).")
    app.add_typer(data_app, name="data", help="Build, import and inspect region-wise quality datasets.")
    register_runtime(app)
    register_doctor(app)
    register_serve(app)
    register_training(app)
    register_eval(app)


_register_subcommands()


def _click_classes(name: str) -> tuple[type, ...]:
    """Exception class `name` of every click that may parse our command line: recent typer bundles
    its own copy (`typer._click`), older typer uses the `click` package; their classes differ."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _debug_requested(args: list[str]) -> bool:
    """True when --debug is given as the root option, i.e. before the sub-command's name. A later
    "--debug" (a question, say) is the sub-command's business; "--" ends option parsing."""
    for arg in args:
        if arg == "--debug":
            return True
        if arg == "--" or not arg.startswith("-"):
            return False
    return False


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point. Expected failures print one line and exit non-zero; --debug shows tracebacks.

    Usage errors (unknown option, missing argument) print the usage, the error and exit 2, like click.
    A question that starts with "-" goes after "--": `octopus-rt infer IMG -- "--debug"`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    try:
        result = app(args=args, prog_name="octopus-rt", standalone_mode=False)
    except _click_classes("Exit") as exc:
        return exc.exit_code
    except _click_classes("ClickException") as exc:
        exc.show()
        if isinstance(exc, _click_classes("NoSuchOption")):
            hint = "--debug goes before the command (octopus-rt --debug infer ...); " \
                if getattr(exc, "option_name", "") == "--debug" else ""
            typer.echo(f"({hint}an argument that starts with '-' goes after '--': octopus-rt infer IMAGE -- '-x')",
                       err=True)
        return exc.exit_code
    except _click_classes("Abort"):
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OctopusError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line unless --debug
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
