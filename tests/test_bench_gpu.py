"""benchmarks/bench_gpu.py: its arithmetic, and a clear exit without a GPU (the run itself needs one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_exits_clearly_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the benchmark would run")
    assert _bench_module().main(["--out", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "nothing was run" in err
    assert not Path("unused.json").exists()


def test_bench_bandwidth_arithmetic():
    bench = _bench_module()
    phi3 = bench.PHI3_MINI
    sizes = bench.decoder_bytes(phi3, 32)
    # Phi-3-mini has 3.82 B parameters; the decoder reads all but the embedding table per token.
    params = sizes["total"] / 2 + phi3["vocab"] * phi3["hidden"] - 2 * phi3["hidden"]  # + embedding, - its row
    assert 3.75e9 < params < 3.85e9
    assert bench.kv_bytes(phi3, 32, 1000) == 2 * 32 * 32 * 96 * 1000 * 2
    assert bench.extrapolate(1.0, phi3, 32, 32) == 1.0
    assert 10 < bench.extrapolate(1.0, phi3, 2, 32) < 16  # per-layer bytes dominate the head


@pytest.mark.slow
def test_bench_gpu_tiny_cpu_smoke(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--allow-cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert set(report["backends"]["ort_cpu"]["ms"]) == set(bench.STAGES)
    assert "skipped" in report["backends"]["tensorrt_fp16"]
