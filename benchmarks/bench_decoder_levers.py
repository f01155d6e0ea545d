"""Micro-benchmark of the decode levers of issue 13 on one exported gqa-form decoder, interleaved.

    .venv/bin/python benchmarks/bench_decoder_levers.py --bundle BUNDLE [--rounds 5] [--threads 2]

BUNDLE: an fp32 bundle exported with `--decoder-form gqa` (bench_peers.py writes one to
/tmp/octopus-bench-peers/ours-fp32-gqa). From its decoder.onnx this script derives the variants
below into --work (once), then, round by round in rotating order, measures for each: session
creation (ms), prefill of 220 tokens (ms) and the median decode step over 24 tokens (ms/token),
through the runtime's own BufferDecoder (runtime/kv_buffer.py):

- int4 MatMulNBits block 32: accuracy_level 4 (int8 compute) vs 0 (fp32 compute), symmetric vs not;
- int8: MatMulNBits 8 bits accuracy_level 4 vs onnxruntime quantize_dynamic (MatMulInteger);
- session start-up of the fp32 graph: graph optimisation ORT_ENABLE_BASIC / ORT_ENABLE_ALL /
  ORT_DISABLE_ALL, an offline-optimised copy (SessionOptions.optimized_model_filepath) loaded at
  DISABLE_ALL, and the weights embedded in the .onnx file instead of the bundle's external data file
  (onnxruntime memory-maps external data).
Results: benchmarks/results/decoder_levers.json and a printed table (spread = min..max of rounds).
Run time: ~1 min to derive the variants, then ~20 s per round on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from octopus_rt.bundle import read_manifest, section_path

ROOT = Path(__file__).resolve().parents[1]


def derive(src: Path, work: Path) -> dict[str, tuple[Path, str]]:
    """{variant: (graph path, optimisation level)}, built once into `work`."""
    import onnx

    from octopus_rt.export import quantize
    from octopus_rt.export.onnx_export import save_onnx

    work.mkdir(parents=True, exist_ok=True)
    variants = {"fp32 external data (BASIC, default)": (src, "basic"), "fp32 (ALL)": (src, "all"),
                "fp32 (DISABLE_ALL)": (src, "disable")}
    builds = {
        "int4 acc4 asym (default)": dict(accuracy_level=4, symmetric=False),
        "int4 acc4 sym": dict(accuracy_level=4, symmetric=True),
        "int4 acc0 asym": dict(accuracy_level=0, symmetric=False),
    }
    for name, kwargs in builds.items():
        path = work / (name.split(" (")[0].replace(" ", "_") + ".onnx")
        if not path.exists():
            quantize.to_int4(src, path, block_size=32, head_bits=8, external=True, **kwargs)
        variants[name] = (path, "basic")
    nbits8 = work / "int8_nbits_acc4.onnx"
    if not nbits8.exists():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        save_onnx(quantizer.model.model, nbits8, external=True)
    variants["int8 MatMulNBits acc4"] = (nbits8, "basic")
    dynamic = work / "int8_dynamic.onnx"
    if not dynamic.exists():
        quantize.to_int8(src, dynamic, external=True)
    variants["int8 quantize_dynamic (default)"] = (dynamic, "basic")
    embedded = work / "fp32_embedded.onnx"
    if not embedded.exists():
        onnx.save_model(onnx.load(str(src)), str(embedded))
    variants["fp32 weights embedded (BASIC)"] = (embedded, "basic")
    optimized = work / "fp32_optimized.onnx"
    if not optimized.exists():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized.name + ".data")
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    variants["fp32 offline-optimised (DISABLE_ALL)"] = (optimized, "disable")
    return variants


def measure(path: Path, level: str, spec: dict, table: np.ndarray, threads: int, ids: list[int], tokens: int):
    import onnxruntime as ort

    from octopus_rt.manifest_lmm import DecoderGraph
    from octopus_rt.runtime.backends import Graph
    from octopus_rt.runtime.kv_buffer import BufferDecoder

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    tick = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    startup = (time.perf_counter() - tick) * 1000
    decoder = BufferDecoder(Graph("decoder", session, "cpu"), table, DecoderGraph.from_dict(spec))
    tick = time.perf_counter()
    logits, state = decoder.forward(decoder.embed(ids), decoder.empty_state(len(ids) + tokens + 1))
    prefill = (time.perf_counter() - tick) * 1000
    result = decoder.greedy(logits, state, tokens + 1, [])
    return startup, prefill, statistics.median(result.step_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/octopus-bench-peers/ours-fp32-gqa"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/octopus-bench-levers"),
                        help="where the variants are written (reused by later runs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decoder_levers.json")
    args = parser.parse_args()
    # Through the bundle's own reader: validated, and every file resolved inside the bundle.
    section = read_manifest(args.bundle, runnable=True)["lmm"]
    if section["decoder"].get("form") != "gqa" or section["precision"] != "fp32":
        sys.exit("--bundle must hold an fp32 lmm section exported with --decoder-form gqa")
    table = np.load(section_path(args.bundle, section, section["embedding"]["file"]), mmap_mode="r")
    variants = derive(section_path(args.bundle, section, section["decoder"]["file"]), args.work)
    ids = np.random.default_rng(0).integers(16, table.shape[0], 220).tolist()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    names = list(variants)
    started = time.perf_counter()
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            path, level = variants[name]
            samples[name].append(measure(path, level, section["decoder"], table, args.threads, ids, args.tokens))
        print(f"round {index + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
    report = {"command": "benchmarks/bench_decoder_levers.py " + " ".join(sys.argv[1:]), "threads": args.threads,
              "load_average": os.getloadavg(), "rounds": args.rounds, "variants": {}}
    print("| variant | start-up ms | prefill 220 tok ms | decode ms/token (range) | file MB |\n|---|---|---|---|---|")
    for name, rows in samples.items():
        startup, prefill, decode = (sorted(col) for col in zip(*rows))
        path = variants[name][0]
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6
        report["variants"][name] = {"startup_ms": statistics.median(startup), "prefill_ms": statistics.median(prefill),
                                    "decode_ms_per_token": statistics.median(decode),
                                    "decode_range": [decode[0], decode[-1]], "startup_range": [startup[0], startup[-1]],
                                    "file_mb": size}
        print(f"| {name} | {statistics.median(startup):.0f} ({startup[0]:.0f}-{startup[-1]:.0f}) | "
              f"{statistics.median(prefill):.0f} | {statistics.median(decode):.2f} ({decode[0]:.2f}-{decode[-1]:.2f}) | "
              f"{size:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
