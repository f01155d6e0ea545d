"""Runtime (onnxruntime) vs the PyTorch reference pipeline, per stage, at two model sizes.

One command (not a test; it competes for the cores, keep it to a few minutes):

    .venv/bin/python benchmarks/bench_runtime.py [--sizes tiny 100m] [--repeats 5] [--threads 2]

What it measures, for each model size, in one run:
- per stage (read/decode image, preprocess, vision, prefill, per-token decode, SAM preprocess,
  SAM encoder, SAM decoder, postprocess): median and p90 over `--repeats` runs after one warm-up,
  runtime and reference interleaved (so a busy neighbour slows both alike), same thread count,
  KV cache on in both (transformers generate(use_cache=True)); ratios reference / runtime.
  End-to-end = the LMM part (`ask` without SAM, `--answer-tokens` new tokens) + the SAM part at the
  image centre (so SAM is timed even when a random model's answer names no position).
- per-token decode time at answer token 10 vs token 200 (median over tokens 5-15 and 195-205 of
  a 210-token answer), both pipelines;
- second question on the same image vs the first (runtime; per-image cache), answer + SAM, at
  8-token and `--answer-tokens` answers;
- peak RSS of each pipeline, each in its own child process (load + one answer + SAM);
- process cold start of `octopus-rt infer` (process start to answer printed, minus the model
  compute it reports), median of 3.
The models are seeded random LLaVAs from training/model_factory.py with the lm_head scaled (peaky
logits, as trained models have) and the eos rows zeroed so answers run to the token limit
(`--train-steps N`: the text model is trained N steps instead, training/lm_warmup.py, so that
int8 / int4 exports pass the default agreement checks); SAM is a custom-size segment-anything model.
Results go to JSON (`--out`) and are printed as a table.

--work holds what is built (models, bundles) and is reused by later runs; only a folder that is new,
empty, or marked as the benchmarks' own is used (benchmarks/bench_work.py builds the models into it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_work import SIZES, claim_work, prepare  # noqa: E402 - the --work folder and its models, benchmarks/bench_work.py
from child_rss import peak_rss_mb  # noqa: E402 - VmHWM, as the phi3v_*_rss children read it

QUESTIONS = ("Which region of the image is most degraded?", "What distortion affects the top left region?")
STAGES_LMM = ("read_image", "decode_image", "preprocess", "vision", "prefill", "decode_per_token", "decode")
STAGES_SAM = ("sam_preprocess", "sam_encoder", "sam_decoder", "postprocess")


def photo(path: Path, width: int = 640, height: int = 480) -> Path:
    """A photo-like PNG (gradients + texture)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 220
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90, "n": len(ordered)}


def _runtime_sam(octo, image: Path, point: tuple[float, float]) -> dict[str, float]:
    """SAM stages of the runtime at `point` (through `Octopus.segment`, sharing the image cache)."""
    timings = octo.segment(image, point).timings_ms
    return {k: timings[k] for k in STAGES_SAM if k in timings}


def _window(steps: list[float], token: int, half: int = 5) -> float | None:
    # steps[k] is the decode call that emits answer token k + 1 (token 0 comes from the prefill).
    lo, hi = max(0, token - 1 - half), token - 1 + half + 1
    chunk = steps[lo:hi]
    return statistics.median(chunk) if chunk else None


def measure(size: str, bundle: Path, image: Path, repeats: int, threads: int, answer_tokens: int, long_tokens: int):
    import torch

    from octopus_rt.export.reference import ReferencePipeline
    from octopus_rt.runtime import Octopus
    from octopus_rt.runtime.images import load_image

    torch.set_num_threads(threads)
    octo = Octopus(bundle, device="cpu", threads=threads)
    ref = ReferencePipeline(bundle, threads=threads)
    rgb = load_image(image).rgb
    centre = (rgb.shape[1] / 2.0, rgb.shape[0] / 2.0)
    samples: dict[str, dict[str, list[float]]] = {"runtime": {}, "reference": {}}

    def add(which: str, timings: dict[str, float]) -> None:
        for key, value in timings.items():
            samples[which].setdefault(key, []).append(float(value))

    for index in range(repeats + 1):  # index 0 is the warm-up
        octo.cache.clear()
        answer = octo.ask(image, QUESTIONS[0], max_new_tokens=answer_tokens, segment=False)
        ours = {k: v for k, v in answer.timings_ms.items() if k != "load_sessions"}
        ours["prefill"] = ours.get("prefill", 0.0) + ours.pop("prefill_prefix", 0.0)
        ours.update(_runtime_sam(octo, image, centre))
        theirs = dict(ref.ask(image, QUESTIONS[0], max_new_tokens=answer_tokens, segment=False).timings_ms)
        ref.segment(rgb, centre, True, theirs)
        for timings in (ours, theirs):
            timings["end_to_end"] = timings.get("total", 0.0) + sum(timings.get(k, 0.0) for k in STAGES_SAM)
        if index:
            add("runtime", ours)
            add("reference", theirs)
        print(f"[{size}] repeat {index}/{repeats}: runtime {ours['end_to_end']:.0f} ms, "
              f"reference {theirs['end_to_end']:.0f} ms", flush=True)

    result: dict[str, Any] = {"stages": {}}
    for stage in (*STAGES_LMM, *STAGES_SAM, "total", "end_to_end"):
        a, b = samples["runtime"].get(stage), samples["reference"].get(stage)
        row: dict[str, Any] = {}
        if a:
            row["runtime"] = _stats(a)
        if b:
            row["reference"] = _stats(b)
        if a and b and statistics.median(a) > 0:
            row["ratio_reference_over_runtime"] = statistics.median(b) / statistics.median(a)
        result["stages"][stage] = row

    # Per-token decode cost at answer token 10 vs 200 (skipped with --long-tokens 0).
    long_runs: dict[str, list[tuple[float, float]]] = {"runtime": [], "reference": []}
    for _ in range(2 if long_tokens else 0):
        octo.ask(image, QUESTIONS[0], max_new_tokens=long_tokens, segment=False)
        steps = octo.last_step_ms
        long_runs["runtime"].append((_window(steps, 10), _window(steps, 200)))
        ref.ask(image, QUESTIONS[0], max_new_tokens=long_tokens, segment=False)
        steps = list(getattr(ref, "step_ms", []))
        long_runs["reference"].append((_window(steps, 10), _window(steps, 200)))
    result["token_10_vs_200"] = {}
    for which, runs in long_runs.items() if long_tokens else ():
        t10 = statistics.median(r[0] for r in runs if r[0] is not None)
        t200 = statistics.median(r[1] for r in runs if r[1] is not None)
        result["token_10_vs_200"][which] = {"token_10_ms": t10, "token_200_ms": t200, "ratio": t200 / t10}

    # Second question on the same image vs the first: answer + SAM at the centre, as `ask` does for a
    # grounded answer; the second reuses the prefix KV cache, the vision features and the SAM
    # embedding. At two answer lengths, since decoding is the part no cache can save.
    result["second_vs_first"] = {}
    for tokens in sorted({8, answer_tokens}):
        firsts, seconds, cached = [], [], []
        for _ in range(max(3, repeats)):
            octo.cache.clear()
            times = []
            for question in QUESTIONS:
                answer = octo.ask(image, question, max_new_tokens=tokens, segment=False)
                mask = octo.segment(image, centre)
                times.append(answer.timings_ms["total"] + sum(mask.timings_ms.values()))
                cached = [*answer.cached, *(["sam_embedding"] if mask.cached else [])]
            firsts.append(times[0])
            seconds.append(times[1])
        result["second_vs_first"][str(tokens)] = {
            "first_ms": statistics.median(firsts),
            "second_ms": statistics.median(seconds),
            "ratio": statistics.median(seconds) / statistics.median(firsts),
            "answer_tokens": tokens,
            "second_cached": cached,
        }
    result["model"] = {
        "lmm_parameters": octo.lmm.source.num_parameters,
        "num_image_tokens": octo.prompt.num_image_tokens,
        "sam_config": SIZES[size]["sam"],
        "llava_spec": SIZES[size]["llava"],
    }
    return result


def child_rss(which: str, bundle: Path, image: Path, threads: int, answer_tokens: int) -> None:
    """Load one pipeline, answer once, segment at the centre; print the peak RSS in MiB."""
    from octopus_rt.runtime.images import load_image

    rgb = load_image(image).rgb
    centre = (rgb.shape[1] / 2.0, rgb.shape[0] / 2.0)
    if which == "runtime":
        from octopus_rt.runtime import Octopus

        octo = Octopus(bundle, device="cpu", threads=threads)
        octo.ask(image, QUESTIONS[0], max_new_tokens=answer_tokens, segment=False)
        _runtime_sam(octo, image, centre)
        torch_loaded = "torch" in sys.modules
    else:
        import torch

        from octopus_rt.export.reference import ReferencePipeline

        torch.set_num_threads(threads)
        ref = ReferencePipeline(bundle, threads=threads)
        ref.ask(image, QUESTIONS[0], max_new_tokens=answer_tokens, segment=False)
        ref.segment(rgb, centre, True)
        torch_loaded = True
    # VmHWM (this process image's peak RSS); ru_maxrss would carry the parent's peak across exec.
    print(json.dumps({"peak_rss_mib": peak_rss_mb(), "torch_loaded": torch_loaded}))


def peak_rss(bundle: Path, image: Path, threads: int, answer_tokens: int) -> dict[str, float]:
    out = {}
    for which in ("runtime", "reference"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child-rss", which, "--bundle", str(bundle), "--image", str(image),
             "--threads", str(threads), "--answer-tokens", str(answer_tokens)],
            capture_output=True, text=True, check=True,
        )
        out[which] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    out["ratio_reference_over_runtime"] = out["reference"] / out["runtime"]
    return out


def cold_start(bundle: Path, image: Path, threads: int, runs: int = 3) -> dict[str, Any]:
    """Wall time of `octopus-rt infer --json` minus the model compute it reports (total - load_sessions)."""
    exe = Path(sys.executable).parent / "octopus-rt"
    walls, overheads, loads = [], [], []
    for _ in range(runs):
        tick = time.perf_counter()
        proc = subprocess.run(
            [str(exe), "infer", str(image), QUESTIONS[0], "--bundle", str(bundle), "--json", "--max-new-tokens", "8",
             "--threads", str(threads)],
            capture_output=True, text=True, check=True,
        )
        wall = (time.perf_counter() - tick) * 1000
        timings = json.loads(proc.stdout)["timings_ms"]
        compute = timings["total"] - timings.get("load_sessions", 0.0)
        walls.append(wall)
        loads.append(timings.get("load_sessions", 0.0))
        overheads.append(wall - compute)
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    python_ms = (time.perf_counter() - tick) * 1000
    return {
        "cold_start_ms": statistics.median(overheads),
        "wall_ms": statistics.median(walls),
        "session_load_ms": statistics.median(loads),
        "bare_python_start_ms": python_ms,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                        help="runtime bundle precision (the reference always runs fp32)")
    parser.add_argument("--long-tokens", type=int, default=210)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train the text model this many steps first (quantised exports then pass the default "
                             "agreement checks); 0: random weights with a scaled head")
    parser.add_argument("--work", type=Path, default=Path("/tmp/octopus-bench-runtime"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime.json")
    parser.add_argument("--child-rss", choices=["runtime", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        child_rss(args.child_rss, args.bundle, args.image, args.threads, args.answer_tokens)
        return
    claim_work(args.work)
    image = photo(args.work / "photo.png")
    report: dict[str, Any] = {
        "command": "benchmarks/bench_runtime.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "image": "640x480 PNG",
        "answer_tokens": args.answer_tokens,
        "runtime_precision": args.precision,
        "train_steps": args.train_steps,
        "sizes": {},
    }
    for size in args.sizes:
        bundle = prepare(size, args.work, args.precision, args.train_steps)
        entry = measure(size, bundle, image, args.repeats, args.threads, args.answer_tokens, args.long_tokens)
        entry["peak_rss_mib"] = peak_rss(bundle, image, args.threads, args.answer_tokens)
        entry["cold_start"] = cold_start(bundle, image, args.threads)
        report["sizes"][size] = entry
        _print(size, entry)
    report["load_average_end"] = os.getloadavg()
    busy = max(report["load_average_start"][0], report["load_average_end"][0])
    if args.threads > 1 and busy > 1.0:
        # PyTorch's per-operator thread rendezvous stalls when another process holds a core (measured:
        # transformers' decode step 33 ms alone, 156-340 ms next to one busy process), onnxruntime's pool
        # without spinning much less: the reference/runtime ratios then overstate the runtime's gain.
        print(f"WARNING: load average {busy:.1f} with --threads {args.threads}: the ratios are not trustworthy "
              "on a busy machine; rerun on a quiet one or with --threads 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _print(size: str, entry: dict[str, Any]) -> None:
    print(f"\n== {size}: LMM {entry['model']['lmm_parameters'] / 1e6:.1f}M parameters, "
          f"{entry['model']['num_image_tokens']} image tokens ==")
    print(f"{'stage':18s} {'runtime med/p90 ms':>20s} {'reference med/p90 ms':>22s} {'ref/rt':>7s}")
    for stage, row in entry["stages"].items():
        if not row:
            continue
        rt, rf = row.get("runtime"), row.get("reference")
        fmt = lambda s: f"{s['median']:.2f}/{s['p90']:.2f}" if s else "-"  # noqa: E731
        ratio = row.get("ratio_reference_over_runtime")
        print(f"{stage:18s} {fmt(rt):>20s} {fmt(rf):>22s} {ratio and f'{ratio:.2f}x' or '-':>7s}")
    for which, row in entry["token_10_vs_200"].items():
        print(f"{which}: token 10 {row['token_10_ms']:.2f} ms, token 200 {row['token_200_ms']:.2f} ms, ratio {row['ratio']:.2f}")
    for tokens, sv in entry["second_vs_first"].items():
        print(f"second question {sv['second_ms']:.1f} ms vs first {sv['first_ms']:.1f} ms "
              f"({tokens}-token answers + SAM): {sv['ratio']:.2f}")
    rss = entry["peak_rss_mib"]
    print(f"peak RSS runtime {rss['runtime']:.0f} MiB, reference {rss['reference']:.0f} MiB")
    cold = entry["cold_start"]
    print(f"cold start {cold['cold_start_ms']:.0f} ms (wall {cold['wall_ms']:.0f} ms, of which session creation "
          f"{cold['session_load_ms']:.0f} ms; python itself {cold['bare_python_start_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
