"""Session fixtures: a seeded tiny Phi-3-Vision checkpoint in the official layout (training/phi3v_factory.py).

    def test_x(tiny_phi3v_dir, tiny_phi3v_model):
        tiny_phi3v_dir      # read-only folder: config.json, 2 safetensors shards + index, tokenizer, ...
        tiny_phi3v_model    # export.phi3v_model.Phi3VForCausalLM loaded from it (fp32, eval)

Treat both as read-only (copy the folder with shutil.copytree before modifying it).
"""

from __future__ import annotations

import pytest

__all__ = ["tiny_phi3v_dir", "tiny_phi3v_model"]


@pytest.fixture(scope="session")
def tiny_phi3v_dir(tmp_path_factory):
    from octopus_rt.training.phi3v_factory import build_phi3v_checkpoint

    return build_phi3v_checkpoint(tmp_path_factory.mktemp("phi3v") / "tiny-phi3v")


@pytest.fixture(scope="session")
def tiny_phi3v_model(tiny_phi3v_dir):
    import torch

    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    torch.set_num_threads(1)
    return load_phi3v(tiny_phi3v_dir)
