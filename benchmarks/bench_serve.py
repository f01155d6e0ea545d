"""`octopus-rt serve` under load on loopback: requests/s and p50/p95 latency at concurrency 1, 2, 4, 8,
batched (--max-batch 8) vs unbatched (--max-batch 1) in the same run.

One command (not a test; bounded: `--requests` per level and `--level-seconds` at most):

    .venv/bin/python benchmarks/bench_serve.py [--bundles demo 100m] [--concurrency 1 2 4 8] [--requests 24]

For each bundle two server processes run side by side (`octopus-rt serve --port 0 --threads T`,
one with --max-batch 8, one with --max-batch 1); they are measured in turn, never at the same time,
in alternating order per concurrency level (a busy neighbour slows both alike). The client (httpx,
asyncio, in this process) keeps `c` requests in flight: chat completions with a distinct 640x480
photo each (8 photos in turn, more than the per-image cache holds, so every request runs vision,
prefill and decode), `max_tokens` = --answer-tokens, no mask. Throughput = answered requests / wall
time of the level. The goal of issue #15 is requests/s at concurrency 8 >= 2.5x concurrency 1 on
the ~100M model; the server hands `Octopus.ask_batch` whole batches, which prefills each request
and decodes them together, one decoder call per token for the batch (runtime/generate.py). The client shares the machine's
cores with the server: on a 2-core machine its own CPU time is part of what is measured.
The ~100M model is bench_work.py's `100m` size (built once into --work, eos disabled so every
answer runs to the token limit); `demo` is the built-in bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
QUESTION = "Which region of the image is most degraded?"


def photos(count: int, width: int = 640, height: int = 480) -> list[str]:
    """`count` distinct photo-like PNGs (gradients + seeded texture) as data URLs."""
    from PIL import Image

    urls = []
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 220
    for seed in range(count):
        pixels = np.clip(base + np.random.default_rng(seed).normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls


class Server:
    """`octopus-rt serve` in a child process on 127.0.0.1, port chosen by the system."""

    def __init__(self, bundle: Path, max_batch: int, threads: int) -> None:
        command = [sys.executable, "-m", "octopus_rt.cli", "serve", "--bundle", str(bundle), "--port", "0",
                   "--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", "64",
                   "--timeout", "300", "--log-level", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                if "ready at" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = re.search(r"ready at (http://\S+)", "".join(self.lines)).group(1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def load(url: str, images: list[str], concurrency: int, requests: int, seconds: float,
               tokens: int) -> dict[str, Any]:
    """Keep `concurrency` requests in flight until `requests` are answered or `seconds` pass."""
    import httpx

    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < requests and time.perf_counter() < deadline:
            image = images[issued % len(images)]
            issued += 1
            body = {"model": "bench", "max_tokens": tokens, "messages": [{"role": "user", "content": [
                {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": image}}]}]}
            start = time.perf_counter()
            response = await client.post(url + "/v1/chat/completions", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000  # noqa: E731
    return {"answered": len(ordered), "errors": errors, "wall_s": wall, "rps": len(ordered) / wall,
            "p50_ms": pick(0.5) if ordered else None, "p95_ms": pick(0.95) if ordered else None}


def bench_bundle(name: str, bundle: Path, args: argparse.Namespace, images: list[str]) -> dict[str, Any]:
    servers = {"batched": Server(bundle, 8, args.threads), "unbatched": Server(bundle, 1, args.threads)}
    results: dict[str, dict[str, Any]] = {mode: {} for mode in servers}
    try:
        for mode, server in servers.items():  # warm-up: sessions, allocator, first-call costs
            asyncio.run(load(server.url, images, 2, 4, args.level_seconds, args.answer_tokens))
        for index, concurrency in enumerate(args.concurrency):
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for mode in order:
                row = asyncio.run(load(servers[mode].url, images, concurrency, args.requests, args.level_seconds,
                                       args.answer_tokens))
                results[mode][str(concurrency)] = row
                print(f"[{name}] {mode:9s} c={concurrency}: {row['rps']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms ({row['answered']} answered, {row['errors']} errors)", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    low, high = str(min(args.concurrency)), str(max(args.concurrency))
    scaling = {mode: rows[high]["rps"] / rows[low]["rps"] for mode, rows in results.items()}
    return {"bundle": str(bundle), "results": results, f"rps_c{high}_over_c{low}": scaling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", default=["demo", "100m"], choices=["demo", "100m"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="requests per level and mode")
    parser.add_argument("--level-seconds", type=float, default=90.0, help="time cap per level and mode")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/octopus-bench-runtime"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    images = photos(8)
    report: dict[str, Any] = {
        "command": "benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(), "threads": args.threads, "load_average_start": os.getloadavg(),
        "requests_per_level": args.requests, "answer_tokens": args.answer_tokens,
        "ask_batch": "batched decode (runtime/generate.py greedy_batch)",
        "bundles": {},
    }
    for name in args.bundles:
        if name == "demo":
            bundle = ROOT / "octopus_rt" / "demo" / "bundle"
        else:
            from bench_work import prepare

            bundle = prepare("100m", args.work)
        report["bundles"][name] = bench_bundle(name, bundle, args, images)
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, entry in report["bundles"].items():
        print(f"\n== {name} ==  requests/s at c={max(args.concurrency)} over c={min(args.concurrency)}: "
              + ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in next(
                  v for k, v in entry.items() if k.startswith("rps_")).items()))
        print(f"{'c':>3s} | {'batched req/s':>13s} {'p50 ms':>7s} {'p95 ms':>7s} | {'unbatched req/s':>15s} "
              f"{'p50 ms':>7s} {'p95 ms':>7s}")
        for c in args.concurrency:
            b, u = entry["results"]["batched"][str(c)], entry["results"]["unbatched"][str(c)]
            print(f"{c:>3d} | {b['rps']:>13.2f} {b['p50_ms']:>7.0f} {b['p95_ms']:>7.0f} | {u['rps']:>15.2f} "
                  f"{u['p50_ms']:>7.0f} {u['p95_ms']:>7.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
