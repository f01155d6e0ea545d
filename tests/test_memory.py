"""octopus_rt/memory.py: default engine limits, KV cache formula, the estimate and docs/deploy.md's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from octopus_rt.errors import InputError
from octopus_rt.manifest import ProfileLimits
from octopus_rt.memory import TEXT_TOKENS_MARGIN, default_limits
from trt_helpers import GIB, phi3_manifest, with_engines


def test_default_limits_follow_the_manifest():
    limits = default_limits(phi3_manifest())
    assert limits.max_seq == 576 + TEXT_TOKENS_MARGIN == 832
    assert limits.max_past == 832 + 64 - 1
    assert (limits.max_batch, limits.opt_batch, limits.opt_seq) == (1, 1, 1)
    assert 0 < limits.opt_past <= limits.max_past
    custom = default_limits(phi3_manifest(), max_batch=4, max_seq=100, max_past=300)
    assert (custom.max_batch, custom.max_seq, custom.max_past) == (4, 100, 300)
    with pytest.raises(InputError, match="max_position_embeddings"):
        default_limits(phi3_manifest(), max_past=5000)
    with pytest.raises(InputError):
        ProfileLimits(max_batch=1, max_seq=10, max_past=10, opt_seq=11)


def test_kv_cache_formula_against_hand_computation():
    from octopus_rt.memory import kv_cache_bytes

    # Phi-3-mini: 32 layers, 32 KV heads of 96, 4096 tokens, fp16: 2*32*32*96*4096*2 = 1.5 GiB.
    assert kv_cache_bytes(32, 32, 96, 4096, 2) == 1_610_612_736 == int(1.5 * GIB)
    assert kv_cache_bytes(32, 32, 96, 4096, 2, batch=2) == 3 * GIB
    # Llama-3-8B with GQA: 32 layers, 8 KV heads of 128, 8192 tokens, fp16 = 1 GiB.
    assert kv_cache_bytes(32, 8, 128, 8192, 2) == GIB


def test_memory_estimate_of_a_phi3_bundle():
    from octopus_rt.memory import JETSON_BOARDS, OS_RESERVE, check_boards, estimate_memory, format_report

    manifest = phi3_manifest()
    est = estimate_memory(manifest)
    assert est.weights == {"lmm": 600_000_000 + 1_000 + 7_600_000_000 + 394_000_000, "sam": 376_000_000}
    assert est.max_len == 896 and est.batch == 1  # max_past + 1 of the default limits
    assert est.kv_cache == 2 * 32 * 32 * 96 * 896 * 4  # float32 I/O of the decoder graph
    # vit_b encoder at 1024: 4096 tokens, 12 heads, fp32 scores + probabilities dominate.
    assert est.activations_detail["sam_encoder"] >= 2 * 12 * 4096 * 4096 * 4
    assert est.activations == max(est.activations_detail.values())
    assert est.total == est.weights_total + est.kv_cache + est.activations + est.runtime
    fits = {f.board.name: f.fits for f in check_boards(est)}
    assert fits == {b.name: est.total <= b.memory_bytes - OS_RESERVE for b in JETSON_BOARDS}
    assert fits["Jetson Orin Nano 8GB"] is False and fits["Jetson AGX Orin 64GB"] is True
    assert any("Orin Nano 8GB" in line and "does NOT fit" in line for line in format_report(est))
    # Engine limits recorded by `export trt` replace the defaults.
    manifest = with_engines(manifest)
    manifest["engines"]["targets"]["sm87-trt10.3.0"]["limits"] = ProfileLimits(max_batch=2, max_seq=10, max_past=99, opt_past=5).to_dict()
    assert estimate_memory(manifest).kv_cache == 2 * 32 * 32 * 96 * 100 * 4 * 2


def test_deploy_memory_table_is_current():
    """docs/deploy.md's memory table is what octopus_rt.memory computes for those configurations."""
    from octopus_rt.memory import check_boards, estimate_memory, format_bytes

    def manifest(decoder_bytes_per_weight, vision_bytes, sam_bytes_per_weight, sam_precision):
        m = phi3_manifest()
        m["defaults"]["max_new_tokens"] = 64
        decoder_params = 3.821e9 - 32064 * 3072  # everything but the embedding table
        m["lmm"]["files"] = {
            "decoder.onnx.data": {"size": int(decoder_params * decoder_bytes_per_weight)},
            "vision.onnx": {"size": int(316e6 * vision_bytes)},
            "embed_tokens.npy": {"size": 32064 * 3072 * vision_bytes},
            "tokenizer.json": {"size": 2_000_000},
        }
        if sam_precision is None:
            del m["sam"]
        else:
            m["sam"]["files"] = {"sam.onnx": {"size": int(93.7e6 * sam_bytes_per_weight)}}
            m["sam"]["precision"] = sam_precision
        return m

    rows = {
        "LLaVA-Phi-3-mini fp16 + SAM vit_b fp16": manifest(2, 2, 2, "fp16"),
        "LLaVA-Phi-3-mini, int4 decoder, fp16 vision + SAM vit_b fp16": manifest(0.5625, 2, 2, "fp16"),
        "LLaVA-Phi-3-mini int4 decoder, no SAM": manifest(0.5625, 2, 0, None),
        "LLaVA-Phi-3-mini fp32 + SAM vit_b fp32": manifest(4, 4, 4, "fp32"),
    }
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name, m in rows.items():
        est = estimate_memory(m)
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == format_bytes(est.weights_total)
        assert cells[5] == f"**{format_bytes(est.total)}**"
        assert cells[6:] == ["yes" if f.fits else "no" for f in check_boards(est)]
