"""export.phi3v_* (config, native model, streaming loader / writer) against the official layout and
independent references: transformers' own Phi3ForCausalLM and CLIPVisionModel loaded straight from
the shards, the longrope formula in numpy, and the layout facts of image_embedding_phi3_v.py."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from octopus_rt.errors import InputError  # noqa: E402

CLIP_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."


def _official_keys(config: dict) -> set[str]:
    """Every key of an official Phi-3-Vision checkpoint, spelled out from the official module names."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config["num_hidden_layers"]):
        keys |= {f"model.layers.{i}.{name}.weight" for name in (
            "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
            "input_layernorm", "post_attention_layernorm")}
    clip = config["img_processor"].get("clip_config", {"num_hidden_layers": 24})
    keys |= {CLIP_PREFIX + name for name in (
        "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
        "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias")}
    for j in range(clip["num_hidden_layers"]):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{CLIP_PREFIX}encoder.layers.{j}.{name}.{kind}" for kind in ("weight", "bias")}
    keys |= {f"model.vision_embed_tokens.img_projection.{k}.{kind}" for k in (0, 2) for kind in ("weight", "bias")}
    return keys | {"model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN"}


def _read_all(model_dir) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def test_fixture_is_in_the_official_layout(tiny_phi3v_dir):
    config = json.loads((tiny_phi3v_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["model_type"] == "phi3_v"
    assert config["rope_scaling"]["type"] == "su"
    index = json.loads((tiny_phi3v_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    tensors = _read_all(tiny_phi3v_dir)
    assert set(index["weight_map"]) == set(tensors) == _official_keys(config)
    width, hidden = 4 * config["img_processor"]["image_dim_out"], config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    assert tuple(tensors["model.vision_embed_tokens.glb_GN"].shape) == (1, 1, width)
    assert tuple(tensors["model.vision_embed_tokens.sub_GN"].shape) == (1, 1, 1, width)
    assert tuple(tensors["model.vision_embed_tokens.img_projection.0.weight"].shape) == (hidden, width)
    assert tuple(tensors["model.vision_embed_tokens.img_projection.2.weight"].shape) == (hidden, hidden)
    assert tuple(tensors["model.layers.0.self_attn.qkv_proj.weight"].shape) == ((heads + 2 * kv) * head_dim, hidden)
    assert tuple(tensors["model.layers.0.mlp.gate_up_proj.weight"].shape) == (2 * config["intermediate_size"], hidden)
    assert tuple(tensors["lm_head.weight"].shape) == (32064, hidden)


def test_text_path_matches_transformers_phi3(tiny_phi3v_dir, tiny_phi3v_model):
    """Reference: transformers' Phi3ForCausalLM configured here from the raw config.json (longrope,
    the modern name of "su") and loaded with the shards' decoder tensors: equal logits on both sides
    of original_max_position_embeddings."""
    from transformers import Phi3Config, Phi3ForCausalLM

    raw = json.loads((tiny_phi3v_dir / "config.json").read_text())
    rope = {"rope_type": "longrope", "short_factor": raw["rope_scaling"]["short_factor"],
            "long_factor": raw["rope_scaling"]["long_factor"], "rope_theta": raw["rope_theta"],
            "original_max_position_embeddings": raw["original_max_position_embeddings"]}
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings", "rms_norm_eps",
             "sliding_window", "tie_word_embeddings", "pad_token_id")
    reference = Phi3ForCausalLM(Phi3Config(**{k: raw[k] for k in names}, rope_scaling=rope)).eval()
    decoder_state = {k: v for k, v in _read_all(tiny_phi3v_dir).items() if not k.startswith("model.vision_embed_tokens.")}
    reference.load_state_dict(decoder_state, strict=True)
    generator = torch.Generator().manual_seed(0)
    original = raw["original_max_position_embeddings"]
    for length in (37, original + 40):
        ids = torch.randint(0, 32000, (1, length), generator=generator)
        with torch.no_grad():
            ours = tiny_phi3v_model(ids).logits
            theirs = reference(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_longrope_cos_sin_switch_at_original_length(tiny_phi3v_dir, tiny_phi3v_model):
    """cos/sin against the formula of modeling_phi3_v.py's Phi3SuScaledRotaryEmbedding, in numpy:
    inv_freq = 1 / (factor * theta^(2i/d)); factor = long when max(position) + 1 > original, else
    short; cos/sin scaled by sqrt(1 + ln(max / original) / ln(original))."""
    raw = json.loads((tiny_phi3v_dir / "config.json").read_text())
    original, top = raw["original_max_position_embeddings"], raw["max_position_embeddings"]
    dim = raw["hidden_size"] // raw["num_attention_heads"]
    scaling = math.sqrt(1 + math.log(top / original) / math.log(original))
    rotary = tiny_phi3v_model.language_model.model.rotary_emb
    probe = torch.zeros(1, 1, dim)
    results = {}
    for last, key in ((original - 1, "short_factor"), (original, "long_factor")):
        positions = np.arange(last - 20, last + 1)
        factors = np.asarray(raw["rope_scaling"][key], dtype=np.float64)
        inv_freq = 1.0 / (factors * raw["rope_theta"] ** (np.arange(0, dim, 2) / dim))
        angles = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=1)
        cos, sin = rotary(probe, torch.from_numpy(positions)[None])
        np.testing.assert_allclose(cos[0].numpy(), np.cos(angles) * scaling, rtol=0, atol=2e-5)
        np.testing.assert_allclose(sin[0].numpy(), np.sin(angles) * scaling, rtol=0, atol=2e-5)
        results[key] = cos[0, -1].numpy()
    assert abs(scaling - 1.1547) < 1e-4  # sqrt(1 + ln 8 / ln 512) for 4096 / 512
    assert not np.allclose(results["short_factor"], results["long_factor"], atol=1e-3)


def test_clip_features_are_the_second_to_last_hidden_state(tiny_phi3v_dir, tiny_phi3v_model):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    raw = json.loads((tiny_phi3v_dir / "config.json").read_text())
    reference = CLIPVisionModel(CLIPVisionConfig(**raw["img_processor"]["clip_config"])).eval()
    state = {k[len(CLIP_PREFIX):]: v for k, v in _read_all(tiny_phi3v_dir).items() if k.startswith(CLIP_PREFIX)}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("position_ids") for key in missing)
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = tiny_phi3v_model.vision_embed_tokens.patch_features(pixels)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_merge_2x2_channel_order(tiny_phi3v_model):
    vision = tiny_phi3v_model.vision_embed_tokens
    g, m = 24, 12
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    features = torch.stack([rows, cols], dim=-1).reshape(1, g * g, 2).float()  # channel 0 row, 1 col
    merged = vision.merge_2x2(features)
    assert merged.shape == (1, m, m, 8)
    for i, j in ((0, 0), (3, 7), (11, 11)):
        corners = merged[0, i, j].reshape(4, 2).tolist()
        assert corners == [[2 * i, 2 * j], [2 * i, 2 * j + 1], [2 * i + 1, 2 * j], [2 * i + 1, 2 * j + 1]]


def test_hd_layout_separator_positions(tiny_phi3v_model):
    vision = tiny_phi3v_model.vision_embed_tokens
    m, width = 12, vision.glb_GN.shape[-1]
    for rows, cols in ((1, 2), (3, 1), (2, 2)):
        merged = torch.randn(1 + rows * cols, m, m, width, generator=torch.Generator().manual_seed(rows * 10 + cols))
        with torch.no_grad():
            layout = vision.hd_layout(merged, rows, cols)
        assert layout.shape[0] == (rows * cols + 1) * m * m + 1 + (rows + 1) * m
        is_sub = (layout == vision.sub_GN.reshape(width)).all(dim=1)
        is_glb = (layout == vision.glb_GN.reshape(width)).all(dim=1)
        line = cols * m + 1
        tiled_subs = [r * line + cols * m for r in range(rows * m)]
        start = rows * m * line
        global_subs = [start + 1 + r * (m + 1) + m for r in range(m)]
        assert torch.nonzero(is_sub).flatten().tolist() == tiled_subs + global_subs
        assert torch.nonzero(is_glb).flatten().tolist() == [start]
        # Crop (r, c)'s token (i, j) sits on line r*m + i, column c*m + j of the tiled grid.
        for r, c, i, j in ((0, 0, 0, 0), (rows - 1, cols - 1, 2, 5), (rows - 1, 0, 11, 3)):
            assert torch.equal(layout[(r * m + i) * line + c * m + j], merged[1 + r * cols + c, i, j])
        assert torch.equal(layout[start + 1 + 3 * (m + 1) + 4], merged[0, 3, 4])  # global view token (3, 4)


def test_embed_fills_placeholders_and_clamps(tiny_phi3v_model):
    from octopus_rt.runtime.hd_transform import HDTransform

    image = np.random.default_rng(0).integers(0, 256, (320, 640, 3), dtype=np.uint8)
    hd = HDTransform(num_crops=4)(image)
    n = hd.num_img_tokens
    ids = torch.tensor([[1, 32010, 29, 13] + [-1] * n + [1, 500, 32007, 32001]])
    pixel_values = torch.from_numpy(hd.pixel_values)[None]
    with torch.no_grad():
        embeds = tiny_phi3v_model.embed(ids, pixel_values, [hd.image_size])
        tokens = tiny_phi3v_model.vision_embed_tokens(pixel_values, [hd.image_size])[0]
        table = tiny_phi3v_model.language_model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0, 4 : 4 + n], tokens, rtol=0, atol=0)
    text = torch.cat([ids[0, :4], ids[0, 4 + n :]])
    torch.testing.assert_close(torch.cat([embeds[0, :4], embeds[0, 4 + n :]]), table[text], rtol=0, atol=0)
    with torch.no_grad():
        plain = tiny_phi3v_model.embed(ids)  # no images: placeholders look up id 0
    torch.testing.assert_close(plain[0, 4], table[0], rtol=0, atol=0)
    with pytest.raises(InputError):
        tiny_phi3v_model.embed(ids[:, :-10 - n // 2], pixel_values, [hd.image_size])


def test_save_official_layout_round_trip(tiny_phi3v_dir, tiny_phi3v_model, tmp_path):
    from octopus_rt.export.phi3v_checkpoint import load_phi3v, save_official_layout

    out = save_official_layout(tiny_phi3v_model, tmp_path / "copy", source_dir=tiny_phi3v_dir, max_shard_bytes=6 * 1024**2)
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_phi3v_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (tiny_phi3v_dir / name).read_bytes() or name == "preprocessor_config.json"
    original, copy = _read_all(tiny_phi3v_dir), _read_all(out)
    assert set(copy) == set(original) and len(list(out.glob("*.safetensors"))) > 2
    assert all(torch.equal(copy[k], original[k]) for k in original)
    reloaded = load_phi3v(out)
    assert reloaded.spec.num_crops == 4
    with pytest.raises(InputError, match="not empty"):
        save_official_layout(tiny_phi3v_model, out)


def test_loader_errors(tiny_phi3v_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    broken = tmp_path / "broken"
    shutil.copytree(tiny_phi3v_dir, broken)
    shard = broken / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(shard), metadata={"format": "pt"})
    with pytest.raises(InputError, match="missing"):
        load_phi3v(broken)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_phi3v_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputError, match="pickle"):
        load_phi3v(pickled)
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(InputError, match="not a Phi-3-Vision"):
        load_phi3v(llava)


def test_spec_defaults_to_clip_l_and_reads_num_crops(tiny_phi3v_dir):
    from octopus_rt.export.phi3v_config import CLIP_VIT_L_336, phi3v_spec_from_dicts

    raw = json.loads((tiny_phi3v_dir / "config.json").read_text())
    official = {**raw, "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                                         "name": "clip_vision_model", "num_img_tokens": 144}}
    spec = phi3v_spec_from_dicts(official, {"num_crops": 16})
    assert spec.clip_kwargs == CLIP_VIT_L_336 and spec.num_crops == 16
    assert (spec.crop_size, spec.tokens_per_side, spec.feature_layers) == (336, 12, 23)
    assert phi3v_spec_from_dicts(official, {}).num_crops == 4 and phi3v_spec_from_dicts(official, {}).warnings
    rope = spec.text_config().rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == raw["original_max_position_embeddings"]
    yarn = phi3v_spec_from_dicts({**official, "rope_scaling": {**raw["rope_scaling"], "type": "yarn"}})
    assert abs(yarn.text_kwargs["rope_scaling"]["attention_factor"] - (0.1 * math.log(8) + 1)) < 1e-12
    with pytest.raises(InputError):
        phi3v_spec_from_dicts({**official, "embd_layer": {**raw["embd_layer"], "hd_transform_order": "glb_sub"}})
    with pytest.raises(InputError):
        phi3v_spec_from_dicts({**official, "img_processor": {**official["img_processor"], "model_name": "other/clip"}})
