"""`octopus-rt merge BASE ADAPTER --out DIR` for Phi-3.5-Vision: a PEFT adapter built by peft itself on
our model merges like peft's own merge_and_unload, under every key naming a user's adapter may carry;
anything else is refused with one line and nothing written."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from octopus_rt.cli import main

torch.set_num_threads(1)

DECODER = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _peft_adapter(base_dir, out_dir, monkeypatch, *, seed: int, **lora):
    """(adapter folder, peft's merge_and_unload of it) with peft on our whole native model.

    peft under transformers 5 treats a model whose `config` has a model_type as a transformers model
    and asks for its `base_model_prefix`; ours is a plain nn.Module, so the test supplies one."""
    from peft import LoraConfig, get_peft_model

    from octopus_rt.export.phi3v_checkpoint import load_phi3v
    from octopus_rt.export.phi3v_model import Phi3VForCausalLM

    monkeypatch.setattr(Phi3VForCausalLM, "base_model_prefix", "", raising=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(load_phi3v(base_dir), LoraConfig(**lora))
    with torch.no_grad():  # lora_B starts at zero: make every adapter do something
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    peft_model.save_pretrained(out_dir)  # safetensors by default
    merged = peft_model.merge_and_unload(progressbar=False)
    return out_dir, {n: p.detach().clone() for n, p in merged.named_parameters()}


def _merge(capsys, *args) -> tuple[int, str]:
    code = main(["merge", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _params(model_dir) -> dict:
    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    return {n: p.detach() for n, p in load_phi3v(model_dir).named_parameters()}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


@pytest.fixture(scope="module")
def adapter(tiny_phi3v_dir, tmp_path_factory):
    """LoRA on the decoder's four projections, CLIP q_proj / fc1, img_projection.0 and lm_head, with
    per-module rank and alpha (rank_pattern, alpha_pattern)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _peft_adapter(
            tiny_phi3v_dir, tmp_path_factory.mktemp("adapter") / "peft", monkeypatch, seed=0, r=4, lora_alpha=8,
            target_modules=DECODER + ["q_proj", "fc1", "img_projection.0", "lm_head"],
            rank_pattern={"o_proj": 2}, alpha_pattern={"fc1": 20})


def test_merge_equals_peft_merge_and_unload(tiny_phi3v_dir, adapter, tmp_path, capsys):
    from safetensors import safe_open

    from octopus_rt.export.phi3v_checkpoint import checkpoint_shards

    adapter_dir, expected = adapter
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert any(n.startswith("base_model.model.language_model.model.layers.0.self_attn.qkv_proj.lora_A") for n in names)
    assert any(".img_processor.encoder.layers.0.self_attn.q_proj.lora_A" in n for n in names)
    out = tmp_path / "merged"
    code, text = _merge(capsys, tiny_phi3v_dir, adapter_dir, "--out", out)
    assert code == 0, text
    assert "merged checkpoint written to" in text
    merged = _params(out)
    assert _worst(merged, expected) <= 1e-5
    base = _params(tiny_phi3v_dir)
    assert _worst(merged, base) > 1e-2  # the adapter changed the model
    keys = lambda d: {k for s in checkpoint_shards(d) for k in safe_open(str(s), "pt").keys()}  # noqa: E731
    assert keys(out) == keys(tiny_phi3v_dir)
    assert json.loads((out / "config.json").read_text()) == \
        dict(json.loads((tiny_phi3v_dir / "config.json").read_text()), torch_dtype="float32")
    # bf16 output: the float32 result, rounded once.
    code, text = _merge(capsys, tiny_phi3v_dir, adapter_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, text
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle, \
            safe_open(str(out / "model.safetensors"), "pt") as reference:
        for key in ("model.layers.0.self_attn.qkv_proj.weight", "model.vision_embed_tokens.img_projection.0.weight"):
            assert torch.equal(handle.get_tensor(key), reference.get_tensor(key).to(torch.bfloat16))


def _microsoft_name(name: str) -> str:
    """Our module path -> the remote-code model's (modeling_phi3_v.py: Phi3VForCausalLM.model is
    Phi3VModel holding `layers`, `norm`, `vision_embed_tokens`; its CLIP is a CLIPVisionModel with
    `vision_model`), written out here independently of the code under test."""
    name = re.sub(r"^language_model\.", "", name)
    name = re.sub(r"^vision_embed_tokens\.img_processor\.", "model.vision_embed_tokens.img_processor.vision_model.", name)
    return re.sub(r"^vision_embed_tokens\.", "model.vision_embed_tokens.", name)


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_remote_code_key_names_merge_the_same(tiny_phi3v_dir, adapter, tmp_path, capsys, prefix):
    """A user's adapter trained on Microsoft's remote-code model (PEFT names, or transformers'
    add_adapter names without `base_model.model.`) gives the same checkpoint, also when sharded."""
    from safetensors.torch import load_file, save_file

    from octopus_rt.training.phi3v_merge import merge_adapter

    adapter_dir, expected = adapter
    renamed = tmp_path / "remote"
    renamed.mkdir()
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    relabelled = {prefix + _microsoft_name(k.removeprefix("base_model.model.")): v for k, v in tensors.items()}
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in {"base_model.model." + k.removeprefix(prefix) for k in relabelled}
    save_file(relabelled, str(renamed / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["rank_pattern"] = {"o_proj": 2}  # patterns match module-name suffixes under either naming
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    out, changed = merge_adapter(tiny_phi3v_dir, renamed, tmp_path / "merged", max_shard_bytes=6 * 1024**2)
    assert changed == len(tensors) // 2
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert _worst(_params(out), expected) <= 1e-5


def test_adapter_of_the_language_model_with_lm_head(tiny_phi3v_dir, tmp_path, capsys):
    """peft on the transformers Phi3ForCausalLM inside our model, targets as the Phi-3CookBook's (the
    four projections + lm_head): official names, and lm_head saved whole as `lm_head.base_layer.weight`."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    model = load_phi3v(tiny_phi3v_dir)
    torch.manual_seed(2)
    model.language_model = get_peft_model(model.language_model, LoraConfig(r=4, lora_alpha=8, target_modules=DECODER + ["lm_head"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    model.language_model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        assert {"base_model.model.lm_head.base_layer.weight",
                "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"} <= set(handle.keys())
    model.language_model = model.language_model.merge_and_unload(progressbar=False)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    code, text = _merge(capsys, tiny_phi3v_dir, tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0, text
    assert _worst(_params(tmp_path / "merged"), expected) <= 1e-5


def test_rslora_scale(tiny_phi3v_dir, tmp_path, capsys, monkeypatch):
    adapter_dir, expected = _peft_adapter(tiny_phi3v_dir, tmp_path / "rs", monkeypatch, seed=1, r=4, lora_alpha=6,
                                          use_rslora=True, target_modules=DECODER)
    code, text = _merge(capsys, tiny_phi3v_dir, adapter_dir, "--out", tmp_path / "merged")
    assert code == 0, text
    assert _worst(_params(tmp_path / "merged"), expected) <= 1e-5


# ---------------------------------------------------------------- refusals


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file(edit(tensors), str(path / "adapter_model.safetensors"))


def _drop_first_b(tensors):
    first = next(k for k in tensors if "lora_B" in k)
    return {k: v for k, v in tensors.items() if k != first}


def _llava_names(tensors):
    return {k.replace("language_model.model.layers", "model.language_model.layers"): v for k, v in tensors.items()}


def _wider(tensors):
    key = next(k for k in tensors if "qkv_proj.lora_A" in k)
    return dict(tensors, **{key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)})


def _dora(tensors):
    key = next(k for k in tensors if "qkv_proj.lora_A" in k)
    return dict(tensors, **{key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(3)})


CASES = [
    ("no config", lambda p: (p / "adapter_config.json").unlink(), "not a PEFT adapter folder"),
    ("pickle only", lambda p: ((p / "adapter_model.safetensors").rename(p / "adapter_model.bin")), "pickle file"),
    ("ia3", lambda p: _edit_config(p, peft_type="IA3"), "unsupported adapter type 'IA3'"),
    ("dora", lambda p: _edit_config(p, use_dora=True), "use_dora=True"),
    ("dora tensor", lambda p: _edit_tensors(p, _dora), "unsupported adapter tensor"),
    ("missing partner", lambda p: _edit_tensors(p, _drop_first_b), "not its partner"),
    ("another model", lambda p: _edit_tensors(p, _llava_names), "names no tensor of the base"),
    ("another size", lambda p: _edit_tensors(p, _wider), "another model size"),
    ("wrong rank", lambda p: _edit_config(p, rank_pattern={}), "the config says r=4"),
    ("bad json", lambda p: (p / "adapter_config.json").write_text("{"), "cannot read"),
]


@pytest.mark.parametrize("label, breakage, message", CASES, ids=[c[0] for c in CASES])
def test_bad_adapters_are_refused_with_one_line(tiny_phi3v_dir, adapter, tmp_path, capsys, label, breakage, message):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter[0], broken)
    breakage(broken)
    code, text = _merge(capsys, tiny_phi3v_dir, broken, "--out", tmp_path / "merged")
    assert code == 2 and message in text, (label, text)
    assert sum(line.startswith("error: ") for line in text.splitlines()) == 1 and "Traceback" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written, no partial folder


def test_bad_bases_and_outputs_are_refused(tiny_phi3v_dir, adapter, tmp_path, capsys):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}))
    code, text = _merge(capsys, llava, adapter[0], "--out", tmp_path / "o")
    assert code == 2 and "not a Phi-3-Vision config" in text
    (tmp_path / "exists").mkdir()
    code, text = _merge(capsys, tiny_phi3v_dir, adapter[0], "--out", tmp_path / "exists")
    assert code == 2 and "already exists" in text
    code, text = _merge(capsys, tiny_phi3v_dir, adapter[0], "--out", tmp_path / "o", "--dtype", "int8")
    assert code == 2 and "--dtype must be one of" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "llava"]


def test_streamed_safetensors_files_read_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    from octopus_rt.training.phi3v_merge import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.zeros(0, 4), "e": torch.randn(2, 2).to(torch.float16)}
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}
    entries = [(k, tuple(v.shape), names[v.dtype]) for k, v in tensors.items()]
    written = write_safetensors(tmp_path / "x.safetensors", entries, tensors.__getitem__)
    assert written == sum(v.numel() * v.element_size() for v in tensors.values())
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_full_tensors_replace_and_the_shared_wte_counts_as_embed_tokens(tiny_phi3v_dir, tmp_path):
    """modules_to_save-style full tensors replace the base's; the remote-code model lists its embedding
    twice (`vision_embed_tokens.wte` is `embed_tokens`), and either name updates the one stored tensor."""
    from safetensors.torch import save_file

    from octopus_rt.training.phi3v_merge import merge_adapter

    base = _params(tiny_phi3v_dir)
    embed = base["language_model.model.embed_tokens.weight"] + 1.0
    sub = base["vision_embed_tokens.sub_GN"] * -1.0
    (tmp_path / "a").mkdir()
    save_file({"base_model.model.model.vision_embed_tokens.wte.weight": embed.contiguous(),
               "base_model.model.model.vision_embed_tokens.sub_GN": sub.contiguous()},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                                    "modules_to_save": ["embed_tokens"]}))
    out, changed = merge_adapter(tiny_phi3v_dir, tmp_path / "a", tmp_path / "merged")
    merged = _params(out)
    assert changed == 2 and torch.equal(merged["language_model.model.embed_tokens.weight"], embed)
    assert torch.equal(merged["vision_embed_tokens.sub_GN"], sub)
    assert _worst({k: v for k, v in merged.items() if "embed_tokens.weight" not in k and "sub_GN" not in k},
                  {k: v for k, v in base.items() if "embed_tokens.weight" not in k and "sub_GN" not in k}) == 0.0
