"""Memory of one piece of work measured in a fresh Python process (shared by the phi3v_*_rss benchmarks).

A benchmark passes the child's code; the code may call `rss_mb()` (VmRSS now) and `peak_rss_mb()`
(VmHWM: this process's high-water mark) and must print one JSON line last, which `run_child` returns.
A benchmark that starts its children itself (bench_runtime, bench_peers) imports `peak_rss_mb` from
here; CHILD_PRELUDE carries these functions' own source, so every child reads its memory one way.
VmHWM and not `resource.getrusage(...).ru_maxrss`: on Linux ru_maxrss survives fork + exec, so a
child started by a benchmark that has just built a 2 GB checkpoint would report the parent's peak
(measured: a child of a 1.5 GB parent reads 1513 MB from ru_maxrss, 13 MB from VmHWM).

    from child_rss import run_child
    result = run_child("x = load(sys.argv[1]); print(json.dumps({'peak_mb': round(peak_rss_mb())}))", path)
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

__all__ = ["CHILD_PRELUDE", "run_child", "rss_mb", "peak_rss_mb"]


def _status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key + " not in /proc/self/status")


def rss_mb():
    """VmRSS of this process now, in MiB."""
    return _status_mb("VmRSS")


def peak_rss_mb():
    """VmHWM (the high-water mark of this process image) in MiB."""
    return _status_mb("VmHWM")


# The child is `python -c CODE`: it cannot import this file, so it gets the functions' source.
CHILD_PRELUDE = "\nimport json, sys, time\n\n" + "\n".join(inspect.getsource(f) for f in (_status_mb, rss_mb, peak_rss_mb))


def run_child(code: str, *args: object) -> dict:
    """Run CHILD_PRELUDE + `code` with `args` as sys.argv[1:] in a new interpreter; its last stdout
    line parsed as JSON. Exits with the child's stderr tail when it fails."""
    result = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + code, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"child failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
