"""Ray Serve deployment of the same FastAPI app: N replicas behind Ray's HTTP proxy.

Each replica is `create_app(Octopus(bundle))`: its own model, worker thread, queue, limits and
metrics; Ray's proxy spreads requests over the replicas (each takes up to max_batch + max_queue at
once, past that it answers 429 itself). With --device cuda|tensorrt a replica reserves one GPU
(Ray sets CUDA_VISIBLE_DEVICES), so `--replicas` = the number of GPUs gives one replica per GPU.
The bundle path must exist on every node. Three ways to run it:

    octopus-rt serve --ray --replicas 2                       # local Ray instance
    octopus-rt serve --ray --ray-address auto --autoscale 1:8 # a running cluster (`ray start`, KubeRay)
    serve run octopus_rt.runtime.serve.ray_app:app_builder bundle=/models/b device=cuda replicas=4
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["build_application", "app_builder", "run_ray"]


class OctopusReplica:
    """One Ray Serve replica (the FastAPI app comes from `serve.ingress`; nothing else here)."""


def build_application(bundle_dir: str | Path, settings: Any, *, device: str = "auto", threads: int | None = None,
                      replicas: int = 1, autoscale: tuple[int, int] | None = None) -> Any:
    """A bound Ray Serve application (pass it to `serve.run`)."""
    from ray import serve

    bundle_dir = str(bundle_dir)

    def build() -> Any:
        from octopus_rt.runtime.api import Octopus
        from octopus_rt.runtime.serve.app import create_app

        return create_app(Octopus(bundle_dir, device=device, threads=threads), settings)

    options: dict[str, Any] = {
        "name": "octopus",
        "max_ongoing_requests": settings.max_batch + settings.max_queue,
        "ray_actor_options": {"num_cpus": threads or 1, "num_gpus": 1 if device in ("cuda", "tensorrt") else 0},
    }
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(serve.ingress(build)(OctopusReplica), **options).bind()


def app_builder(args: dict[str, str]) -> Any:
    """For `serve run octopus_rt.runtime.serve.ray_app:app_builder key=value ...` (or a Serve config
    file's `import_path`): bundle (required), device, threads, replicas, max_batch, max_queue,
    timeout, api_key, model_name."""
    from octopus_rt.runtime.serve.app import ServeSettings

    unknown = set(args) - {"bundle", "device", "threads", "replicas", "max_batch", "max_queue", "timeout", "api_key",
                           "model_name"}
    if unknown or "bundle" not in args:
        raise ValueError(f"app_builder takes bundle=DIR and optional settings; unknown: {sorted(unknown)}")
    settings = ServeSettings(max_batch=int(args.get("max_batch", 8)), max_queue=int(args.get("max_queue", 64)),
                             timeout=float(args.get("timeout", 60)), api_key=args.get("api_key"),
                             model_name=args.get("model_name", Path(args["bundle"]).name))
    threads = int(args["threads"]) if "threads" in args else None
    return build_application(args["bundle"], settings, device=args.get("device", "auto"), threads=threads,
                             replicas=int(args.get("replicas", 1)))


def run_ray(bundle_dir: Path, settings: Any, *, device: str, threads: int | None, host: str, port: int,
            replicas: int, autoscale: tuple[int, int] | None, address: str | None) -> None:
    """Start (or join) Ray, deploy, print the URL, serve until SIGINT / SIGTERM, shut down."""
    import signal

    import ray
    import typer
    from ray import serve

    from octopus_rt.runtime.serve.cli import url_of

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    local = address is None and host in ("127.0.0.1", "localhost", "::1")
    # A local instance serving loopback keeps Ray's own services on loopback too.
    ray.init(address=address, include_dashboard=False, logging_level="warning",
             **({"_node_ip_address": "127.0.0.1"} if local else {}))
    try:
        serve.start(http_options={"host": host, "port": port})
        application = build_application(bundle_dir, settings, device=device, threads=threads, replicas=replicas,
                                         autoscale=autoscale)
        serve.run(application, name="octopus", route_prefix="/")
        count = f"{autoscale[0]}-{autoscale[1]}" if autoscale else str(replicas)
        typer.echo(f"octopus-rt serve: ready at {url_of(host, port)} "
                   f"(Ray Serve, {count} replicas of {settings.model_name})")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
