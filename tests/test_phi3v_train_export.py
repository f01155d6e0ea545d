"""Issue #14's user path end to end on the tiny official-layout Phi-3.5-Vision, each step through the
CLI: `octopus-rt train` (LoRA + vision tuning, merged into the official layout by
training/phi3v_merge.merge_updates, the writer `octopus-rt merge` uses) -> `octopus-rt export lmm` on
the merged folder (its built-in verification must pass) -> `octopus-rt infer --json`, whose answers
must equal the independent PyTorch reference (export/phi3v_reference.py) on the merged weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from octopus_rt.cli import main  # noqa: E402
from training_helpers import phi3v_dataset  # noqa: E402

QUESTION = "Which region is most degraded?"


def _tensors(model_dir) -> dict:
    from safetensors.numpy import load_file

    from octopus_rt.export.phi3v_checkpoint import checkpoint_shards

    tensors = {}
    for shard in checkpoint_shards(model_dir):
        tensors.update(load_file(str(shard)))
    return tensors


def test_train_merge_export_infer(phi3v_grounding_dir, tmp_path, capsys):
    from octopus_rt.export.reference import reference_pipeline

    data = phi3v_dataset(tmp_path / "data", 4)
    merged = tmp_path / "merged"
    code = main(["train", str(phi3v_grounding_dir), "--data", str(data), "--out", str(merged), "--max-steps", "2",
                 "--lr", "1e-3", "--lora-rank", "4", "--no-progress"])
    assert code == 0, capsys.readouterr().out
    base, out = _tensors(phi3v_grounding_dir), _tensors(merged)
    assert out.keys() == base.keys()  # the official key set
    changed = {k for k in base if not np.array_equal(base[k].astype(np.float32), out[k])}
    assert any(".qkv_proj." in k for k in changed) and any(".img_processor." in k for k in changed)
    assert "lm_head.weight" not in changed  # frozen; LoRA went into the four projections

    bundle = tmp_path / "bundle"
    code = main(["export", "lmm", str(merged), "--out", str(bundle)])
    assert code == 0, capsys.readouterr().err[-2000:]
    section = json.loads((bundle / "manifest.json").read_text())["lmm"]
    assert section["architecture"] == "phi3v" and section["verification"]["tokens_identical"] is True
    capsys.readouterr()

    reference = reference_pipeline(bundle, threads=1)  # loads the merged folder named in the manifest
    rng = np.random.default_rng(7)
    grounded = 0
    for index, (width, height) in enumerate(((120, 60), (40, 120))):  # 2:1 and 1:3: different token counts
        path = tmp_path / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        code = main(["infer", str(path), QUESTION, "--bundle", str(bundle), "--json", "--device", "cpu",
                     "--max-new-tokens", "10", "--threads", "1"])
        assert code == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        expected = reference.ask(path, QUESTION, max_new_tokens=10)
        assert record["token_ids"] == list(expected.token_ids) and record["text"] == expected.text
        assert (record["probs"] is None) == (expected.probs is None)
        if expected.probs is not None:
            grounded += 1
            assert max(abs(record["probs"][w] - expected.probs[w]) for w in expected.probs) <= 1e-4
    assert grounded >= 1  # the closed-set probabilities were compared at least once
