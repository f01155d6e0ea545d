"""`octopus-rt serve`: parse, load the bundle, run the app under uvicorn (or Ray Serve with --ray).

Imports only typer and the standard library at module level: fastapi, uvicorn, prometheus-client
(the `serve` extra) and ray (the `ray` extra) are imported inside the command, after a check that
names the extra to install.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from octopus_rt.errors import InputError, OctopusError

__all__ = ["register", "require_extra", "run_uvicorn"]

_DEVICE_HELP = "auto (CUDA if available, else CPU) | cpu | cuda | tensorrt."
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")
RAY_MODULES = ("ray", "ray.serve")


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """One-line OctopusError naming the extra when any of `modules` cannot be imported."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OctopusError(f"`octopus-rt serve{' --ray' if extra == 'ray' else ''}` needs the {extra} extra: "
                           f"pip install 'octopus-rt[{extra}]' (missing: {', '.join(missing)})")


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_uvicorn(app, host: str, port: int, *, log_level: str = "info", banner: str = "") -> None:
    """Serve `app` until SIGINT / SIGTERM; print the URL once the lifespan (warm-up) is done and the
    socket listens (`--port 0` prints the port the system chose)."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            bound = self.servers[0].sockets[0].getsockname()
            typer.echo(f"octopus-rt serve: ready at {url_of(host, int(bound[1]))}{banner}")

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the handlers
        # it found; no-op handlers make that graceful stop exit 0 (what systemd and docker expect).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    _Server(config).run()


def _autoscale(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    low, sep, high = value.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high):
        raise InputError(f"--autoscale takes MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return int(low), int(high)


def serve(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Model bundle folder (default: $OCTOPUS_BUNDLE, then the demo bundle)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: every interface; mind --api-key)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed when ready)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Questions answered together (1: no batching)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests before 429 + Retry-After."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds from arrival to answer before a request is cancelled (504)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OCTOPUS_API_KEY", help="Require Authorization: Bearer KEY on /v1/* (also $OCTOPUS_API_KEY)."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Request body limit in MB (413 above it)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id in responses (default: the bundle folder's name)."),
    use_ray: bool = typer.Option(False, "--ray", help="Deploy as Ray Serve replicas behind one endpoint (the `ray` extra)."),
    replicas: int = typer.Option(1, "--replicas", help="With --ray: number of replicas (one GPU each with --device cuda|tensorrt)."),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", help="With --ray: MIN:MAX replicas, scaled on queued requests."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running cluster ('auto', HOST:6379); default: start a local one."),
    log_level: str = typer.Option("info", "--log-level", help="critical | error | warning | info | debug."),
) -> None:
    """Serve a bundle over HTTP: OpenAI-compatible /v1/chat/completions with grounding, batching, metrics."""
    from octopus_rt.runtime.cli import resolve_bundle

    require_extra("serve", SERVE_MODULES)
    if use_ray:
        require_extra("ray", RAY_MODULES)
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--replicas", replicas)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not timeout > 0 or not max_body_mb > 0:
        raise InputError("--timeout and --max-body-mb must be > 0")
    if not 0 <= port <= 65535 or (use_ray and port == 0):
        raise InputError(f"--port must be {'1' if use_ray else '0'}..65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty")
    scale = _autoscale(autoscale)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from octopus_rt.runtime.serve.app import ServeSettings

    bundle_dir = resolve_bundle(bundle).resolve()
    name = model_name or (bundle_dir.name if bundle_dir.name != "bundle" else bundle_dir.parent.name)
    settings = ServeSettings(max_batch=max_batch, max_queue=max_queue, timeout=timeout, api_key=api_key,
                             max_body_bytes=int(max_body_mb * 1024 * 1024), model_name=name)
    if use_ray:
        from octopus_rt.runtime.serve.ray_app import run_ray

        run_ray(bundle_dir, settings, device=device, threads=threads, host=host, port=port, replicas=replicas,
                autoscale=scale, address=ray_address)
        return
    from octopus_rt.runtime.api import Octopus
    from octopus_rt.runtime.serve.app import create_app

    model = Octopus(bundle_dir, device=device, threads=threads)
    # systemd and docker stop with SIGTERM; uvicorn handles it, this covers the load above it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_uvicorn(create_app(model, settings), host, port, log_level=log_level.lower(),
                banner=f" (model {name}, device {model.device}, max batch {max_batch})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
