"""octopus-rt vs onnxruntime-genai vs transformers on the same weights, interleaved in one run.

    .venv/bin/pip install -c constraints/ci.txt -e ".[bench]"      # onnxruntime-genai (peer)
    .venv/bin/python benchmarks/bench_peers.py [--precisions fp32 int8 int4] [--rounds 5] [--threads 2]

Model: a seeded ~100M-parameter LLaVA (SigLIP + Qwen2 text model: hidden 768, 14 layers, 12 heads /
4 KV heads, MLP 2048) from training/model_factory.py, with the lm_head scaled for peaky logits. Its
text half is saved as a `Qwen2ForCausalLM` directory; onnxruntime-genai's own builder
(`python -m onnxruntime_genai.models.builder -i TEXT_DIR -o OUT -p fp32|int8|int4 -e cpu`) turns that
into its model, `octopus-rt export lmm` turns the LLaVA into our bundle (random weights cannot reach
the quantised agreement defaults, so the quantised exports pass `accept_quality_loss=True`, which the
manifest records). transformers runs the text half in PyTorch (fp32; int8 = torch dynamic quantisation
of the Linear layers; no int4 CPU path without extra packages).

Per engine and precision (same token ids, same thread count):
- prefill ms of a 220-token prompt, decode ms/token (median over `--tokens` steps), both per round,
  engines interleaved round by round (a busy neighbour slows every engine alike); the spread is the
  min..max over rounds;
- session start-up (load to ready) and peak RSS, each in a child process (load, prefill, decode);
- memory bandwidth measured in the same run (2 threads reading a 512 MiB buffer, best of 5, before
  and after the timing rounds), and the fraction of the bandwidth limit: (weight bytes read per token
  / decode time) / measured bandwidth. Weight bytes per token = the graph's initializers except the
  embedding table (one row is read per token), plus the KV cache read at that length.
Results go to benchmarks/results/peers.json; a markdown table is printed.
Run time: ~2 min to build and export once (cached in --work), then about 1 min per precision per
round set at the defaults (5 rounds x 3 engines x 24 tokens); ~8 min in all on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
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
from child_rss import peak_rss_mb  # noqa: E402 - VmHWM, as the other benchmarks' children read it
from peer_engines import Ours, Torch, batch_throughput, make_engine  # noqa: E402 - the three engines, benchmarks/peer_engines.py
PROMPT_TOKENS = 220
SPEC = dict(text_model="qwen2", vision_model="siglip", chat_template="llava", image_size=224, patch_size=16,
            vision_hidden=384, vision_layers=6, vision_heads=6, text_hidden=768, text_layers=14, text_heads=12,
            text_kv_heads=4, text_intermediate=2048, vocab_size=1024)
PEERS = ("onnxruntime-genai", "transformers")


# ------------------------------------------------------------------------------------ building
def build_models(work: Path) -> tuple[Path, Path]:
    """The seeded LLaVA (model/) and its text half as Qwen2ForCausalLM (text/), built once."""
    llava_dir, text_dir = work / "model", work / "text"
    if (text_dir / "config.json").is_file() and (llava_dir / "config.json").is_file():
        return llava_dir, text_dir
    import torch
    from transformers import Qwen2ForCausalLM

    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

    torch.set_num_threads(2)
    model, processor = build_llava(llava_dir, TinyLlavaSpec(**SPEC))
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaky logits, as in bench_work.py
    model.save_pretrained(llava_dir)
    text = Qwen2ForCausalLM(model.config.get_text_config()).eval()
    text.model.load_state_dict(model.model.language_model.state_dict())
    text.lm_head.load_state_dict(model.lm_head.state_dict())
    text.generation_config = model.generation_config
    text.save_pretrained(text_dir)
    processor.tokenizer.save_pretrained(text_dir)
    return llava_dir, text_dir


def build_ours(work: Path, llava_dir: Path, precision: str, form: str) -> Path:
    bundle = work / f"ours-{precision}-{form}"
    if (bundle / "manifest.json").is_file():
        return bundle
    from octopus_rt.export.lmm import export_lmm

    print(f"[build] octopus-rt export lmm --precision {precision} --decoder-form {form}", flush=True)
    export_lmm(llava_dir, bundle, precision=precision, decoder_form=form, accept_quality_loss=precision != "fp32")
    return bundle


def build_genai(work: Path, text_dir: Path, precision: str, threads: int) -> Path:
    out = work / f"genai-{precision}"
    config = out / "genai_config.json"
    if not config.is_file():
        print(f"[build] onnxruntime_genai.models.builder -p {precision} -e cpu", flush=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text_dir), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Same thread count as the other engines (genai_config.json takes no other session entries).
    data = json.loads(config.read_text())
    options = data["model"]["decoder"].setdefault("session_options", {})
    options.pop("config_entries", None)
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    config.write_text(json.dumps(data, indent=2))
    return out


# ---------------------------------------------------------------------------------- measuring
def onnx_weight_bytes(path: Path) -> int:
    """Bytes of a graph's initializers except tables read by Gather (embedding: one row per token)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node if node.op_type in ("Gather", "GatherND")}
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered:
            continue
        count = int(np.prod(init.dims)) if init.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize if init.data_type != onnx.TensorProto.UINT4 else count // 2
    return total


def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """GB/s of `threads` threads each summing its share of a buffer much larger than the caches."""
    buffer = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(buffer, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        tick = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - tick)
    return buffer.nbytes / best / 1e9


def prompt_ids(vocab_size: int, special: int = 16, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(special, vocab_size, PROMPT_TOKENS).tolist()


def child(engine: str, precision: str, paths: dict[str, Path], threads: int, tokens: int) -> None:
    """Start-up and peak RSS of one engine in a fresh process (printed as one JSON line)."""
    ids = prompt_ids(int(json.loads((paths["text"] / "config.json").read_text())["vocab_size"]))
    tick = time.perf_counter()
    runner = make_engine(engine, precision, paths, threads)
    startup = (time.perf_counter() - tick) * 1000
    runner.decode(ids, tokens)
    print(json.dumps({"startup_ms": startup, "peak_rss_mib": peak_rss_mb()}))


def run_child(engine: str, precision: str, args) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", engine, "--child-precision", precision, "--work", str(args.work),
         "--threads", str(args.threads), "--tokens", str(args.tokens)],
        capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paths_for(work: Path) -> dict[str, Path]:
    paths = {"work": work, "text": work / "text", "model": work / "model"}
    for precision in ("fp32", "int8", "int4"):
        paths[f"genai-{precision}"] = work / f"genai-{precision}"
    return paths


def measure_precision(precision: str, args, paths, ids) -> dict[str, Any]:
    engines = {}
    for name in [*(f"octopus-rt[{form}]" for form in args.forms), *PEERS]:
        if name == "transformers" and precision == "int4":
            continue
        engines[name] = make_engine(name, precision, paths, args.threads)
        engines[name].decode(ids, 3)  # warm-up (kernels, allocations)
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in engines}
    order = list(engines)
    for round_index in range(args.rounds):
        for name in order[round_index % len(order):] + order[: round_index % len(order)]:
            runner = engines[name]
            tick = time.perf_counter()
            runner.prefill(ids)
            samples[name]["prefill"].append((time.perf_counter() - tick) * 1000)
            samples[name]["decode"].append(statistics.median(runner.decode(ids, args.tokens)))
        print(f"[{precision}] round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{n} {samples[n]['decode'][-1]:.2f} ms/token" for n in engines), flush=True)
    result: dict[str, Any] = {}
    config = json.loads((paths["text"] / "config.json").read_text())
    kv_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * (
        config["hidden_size"] // config["num_attention_heads"]) * (PROMPT_TOKENS + args.tokens // 2) * 4
    for name, runner in engines.items():
        weights = runner.weight_bytes if isinstance(runner, Torch) else onnx_weight_bytes(runner.weight_file)
        decode = statistics.median(samples[name]["decode"])
        row = {
            "prefill_ms": statistics.median(samples[name]["prefill"]),
            "prefill_ms_range": [min(samples[name]["prefill"]), max(samples[name]["prefill"])],
            "decode_ms_per_token": decode,
            "decode_ms_range": [min(samples[name]["decode"]), max(samples[name]["decode"])],
            "weight_bytes_per_token": weights + kv_bytes,
        }
        row.update(run_child(name, precision, args))
        if isinstance(runner, Ours):
            row["batch_decode"] = batch_throughput(runner, ids, args.tokens, args.rounds)
        result[name] = row
    del engines
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forms", nargs="+", default=["gqa", "flat_kv"], choices=["gqa", "flat_kv"],
                        help="octopus-rt decoder forms to measure (export --decoder-form)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/octopus-bench-peers"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = paths_for(args.work)
    if args.child:
        child(args.child, args.child_precision, paths, args.threads, args.tokens)
        return
    from bench_work import claim_work

    started = time.perf_counter()
    claim_work(args.work)
    llava_dir, text_dir = build_models(args.work)
    for precision in args.precisions:
        for form in args.forms:
            build_ours(args.work, llava_dir, precision, form)
        build_genai(args.work, text_dir, precision, args.threads)
    config = json.loads((text_dir / "config.json").read_text())
    ids = prompt_ids(config["vocab_size"])
    report: dict[str, Any] = {
        "command": "benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
        "model": {**SPEC, "text_parameters": None}, "prompt_tokens": PROMPT_TOKENS, "decode_tokens": args.tokens,
        "rounds": args.rounds, "octopus_forms": args.forms, "versions": _versions(), "precisions": {},
    }
    bandwidth = [memory_bandwidth(args.threads)]
    for precision in args.precisions:
        report["precisions"][precision] = measure_precision(precision, args, paths, ids)
        bandwidth.append(memory_bandwidth(args.threads))
    report["memory_bandwidth_gbs"] = {"all": bandwidth}
    finalize(report)
    report["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


def finalize(report: dict[str, Any]) -> None:
    """Bandwidth limit and fraction per row, against the best bandwidth measured in the run (a busy
    machine only lowers the measurement; the best one is closest to what the memory can do)."""
    best = max(report["memory_bandwidth_gbs"]["all"])
    report["memory_bandwidth_gbs"]["used"] = best
    for rows in report["precisions"].values():
        for row in rows.values():
            row["bandwidth_limit_ms"] = row["weight_bytes_per_token"] / (best * 1e9) * 1000
            row["fraction_of_bandwidth_limit"] = row["bandwidth_limit_ms"] / row["decode_ms_per_token"]


def _versions() -> dict[str, str]:
    from octopus_rt.bundle import package_versions

    return package_versions("onnxruntime", "onnxruntime-genai", "torch", "transformers")


def table(report: dict[str, Any]) -> str:
    lines = ["| precision | engine | prefill 220 tok ms | decode ms/token (range) | % of bandwidth limit | start-up ms | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for precision, rows in report["precisions"].items():
        for name, row in rows.items():
            lo, hi = row["decode_ms_range"]
            lines.append(
                f"| {precision} | {name} | {row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.2f} ({lo:.2f}-{hi:.2f}) | "
                f"{100 * row['fraction_of_bandwidth_limit']:.0f} % | {row.get('startup_ms', float('nan')):.0f} | "
                f"{row.get('peak_rss_mib', float('nan')):.0f} |")
    for precision, rows in report["precisions"].items():
        for name, row in rows.items():
            if "batch_decode" in row:
                b = row["batch_decode"]
                lines.append(f"\n{precision} {name}: batch 4 decode {b['tokens_per_s_batch4']:.0f} tokens/s vs batch 1 "
                             f"{b['tokens_per_s_batch1']:.0f} tokens/s = {b['ratio']:.2f}x")
    bw = report["memory_bandwidth_gbs"]["all"]
    lines.append(f"\nmeasured memory bandwidth: {min(bw):.1f}-{max(bw):.1f} GB/s ({report['threads']} threads; "
                 f"the limits use the best, {report['memory_bandwidth_gbs']['used']:.1f} GB/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
