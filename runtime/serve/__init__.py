"""`octopus-rt serve`: an OpenAI-compatible HTTP server over the `Octopus` API (the `serve` extra).

Modules: app.py (FastAPI routes, `create_app`), schemas.py (request parsing, response bodies,
OpenAI-style errors), batching.py (queue + worker thread + `Octopus.ask_batch`), guard.py (API key,
body limit, request metrics), metrics.py (Prometheus), cli.py (the command), ray_app.py (Ray
Serve replicas). Importing this package imports none of fastapi, uvicorn, prometheus-client or ray.
"""
