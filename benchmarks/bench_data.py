"""Throughput of `octopus-rt data synth`: distorted images per second at 512 px.

Sources: scikit-image's sample photos resized so the long side is 512 px. Times the whole
`synthesize` call (region proposals, distortions, PNG writing, records, splits) with --workers 2
and --workers 1, after one warm-up run. Besides wall-clock images/s it reports the CPU seconds
spent per image (this process + its workers), which does not depend on what else shares the
cores, and the load average during the run, since on a shared machine wall-clock figures are only
as good as the idle cores. Usage:

    .venv/bin/python benchmarks/bench_data.py [--num 40] [--size 512] [--workers 2 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import cv2
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel")


def write_sources(folder: Path, size: int) -> None:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        image = getattr(data, name)()
        if image.ndim == 2 or image.shape[2] != 3:
            continue
        h, w = image.shape[:2]
        scale = size / max(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        Image.fromarray(image).save(folder / f"{name}.png")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    from octopus_rt.training.data.synth import SynthOptions, synthesize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        write_sources(src, args.size)
        synthesize(src, Path(tmp) / "warm", SynthOptions(num=2, size=args.size, workers=1, progress=False))
        results = []
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            cpu0 = _cpu_seconds()
            start = time.perf_counter()
            report = synthesize(src, out, SynthOptions(num=args.num, size=args.size, workers=workers, progress=False))
            seconds = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu0
            records = sum(report.records.values())
            results.append({"workers": workers, "images": args.num, "size": args.size, "seconds": round(seconds, 2),
                            "images_per_s": round(args.num / seconds, 2), "records": records,
                            "records_per_s": round(records / seconds, 1),
                            "cpu_s_per_image": round(cpu / args.num, 3),
                            "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()})
            print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
