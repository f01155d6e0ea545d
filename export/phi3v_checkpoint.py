"""Official-layout Phi-3(.5)-Vision checkpoints: streaming loader and writer (safetensors only).

Layout (Microsoft's Phi-3.5-vision-instruct folder): config.json, preprocessor_config.json,
tokenizer files, `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`
(or a single `model.safetensors`). Key names:

- decoder: `model.embed_tokens.weight`, `model.layers.{i}.*` (fused `qkv_proj`, `gate_up_proj`),
  `model.norm.weight`, `lm_head.weight` -> our `language_model.<same key>`;
- vision: `model.vision_embed_tokens.img_processor.vision_model.*` (CLIP ViT),
  `model.vision_embed_tokens.img_projection.{0,2}.*`, `model.vision_embed_tokens.glb_GN` (1 x 1 x 4C),
  `model.vision_embed_tokens.sub_GN` (1 x 1 x 1 x 4C) -> our `vision_embed_tokens.<rest>`.

Ignored when present: `model.vision_embed_tokens.wte.weight` (the official module shares it with
`model.embed_tokens`) and `*.rotary_emb.inv_freq` (old checkpoints stored the buffer).

Loading streams: the model is built on the meta device (no allocation, no random init), then each
shard is opened with safetensors and every tensor is read, cast and assigned in place of its meta
parameter, so peak memory is about the model plus one tensor. Pickle files (*.bin) are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from octopus_rt.errors import InputError
from octopus_rt.export.phi3v_config import Phi3VSpec, read_phi3v_spec
from octopus_rt.export.phi3v_model import Phi3VForCausalLM

__all__ = ["load_phi3v", "save_official_layout", "official_key", "module_key", "checkpoint_shards", "copy_side_files"]

VISION = "model.vision_embed_tokens."
CLIP = VISION + "img_processor.vision_model."
INDEX = "model.safetensors.index.json"
_IGNORED_KEYS = (VISION + "wte.weight",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WRITTEN_BY_US = {"config.json", "preprocessor_config.json", INDEX, "pytorch_model.bin.index.json"}


def _clip_flat(model: Phi3VForCausalLM) -> bool:
    return not hasattr(model.vision_embed_tokens.img_processor, "vision_model")


def module_key(key: str, clip_flat: bool = True) -> str | None:
    """Official checkpoint key -> our parameter name (None for keys we ignore on purpose)."""
    if key in _IGNORED_KEYS or key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith(CLIP):
        return "vision_embed_tokens.img_processor." + ("" if clip_flat else "vision_model.") + key[len(CLIP) :]
    if key.startswith(VISION):
        return "vision_embed_tokens." + key[len(VISION) :]
    return "language_model." + key


def official_key(name: str, clip_flat: bool = True) -> str:
    """Our parameter name -> official checkpoint key (inverse of module_key)."""
    clip_prefix = "vision_embed_tokens.img_processor." + ("" if clip_flat else "vision_model.")
    if name.startswith(clip_prefix):
        return CLIP + name[len(clip_prefix) :]
    if name.startswith("vision_embed_tokens."):
        return VISION + name[len("vision_embed_tokens.") :]
    if name.startswith("language_model."):
        return name[len("language_model.") :]
    raise ValueError(f"{name} is not a Phi3VForCausalLM parameter name")


def checkpoint_shards(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one; each inside model_dir."""
    model_dir = Path(model_dir).resolve()
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot read {index}: {exc}") from exc
        names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickle files are not loaded; convert them to safetensors)" if pickled else ""
        raise InputError(f"no safetensors weights in {model_dir}{hint}")
    shards = []
    for name in names:
        path = (model_dir / name).resolve()
        if path.parent != model_dir or not path.name.endswith(".safetensors"):
            raise InputError(f"{INDEX} names {name!r}, which is not a .safetensors file inside {model_dir}")
        if not path.is_file():
            raise InputError(f"shard {name} listed in {INDEX} is missing")
        shards.append(path)
    return shards


def load_phi3v(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, num_crops: int | None = None) -> Phi3VForCausalLM:
    """Build the native model from an official-layout directory, streaming the weights (see module doc).

    dtype: parameter dtype after loading (the checkpoint's own bf16 is cast). InputError on a missing,
    unexpected or mis-shaped tensor, naming the first few keys."""
    from safetensors import safe_open

    spec = read_phi3v_spec(model_dir, num_crops=num_crops)
    shards = checkpoint_shards(model_dir)
    with torch.device("meta"):
        model = Phi3VForCausalLM(spec)
    clip_flat = _clip_flat(model)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                name = module_key(key, clip_flat)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                tensor = reader.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise InputError(f"{key} has shape {tuple(tensor.shape)}, the config implies {tuple(params[name].shape)}")
                _assign(model, name, tensor.to(dtype))
                loaded.add(name)
    if spec.text_kwargs.get("tie_word_embeddings") and "language_model.lm_head.weight" not in loaded:
        model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
        loaded.add("language_model.lm_head.weight")
    missing = sorted(official_key(n, clip_flat) for n in set(params) - loaded)
    if missing or unexpected:
        raise InputError(
            f"{model_dir} does not match its config: "
            + (f"{len(missing)} missing tensor(s) ({', '.join(missing[:4])}) " if missing else "")
            + (f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:4])})" if unexpected else "")
        )
    _materialise_buffers(model)
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def _materialise_buffers(model: Phi3VForCausalLM) -> None:
    """Recreate the non-persistent buffers that stayed on the meta device (rotary tables, CLIP ids)."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    decoder = model.language_model.model
    decoder.rotary_emb = Phi3RotaryEmbedding(config=model.language_model.config)
    embeddings = model.vision_embed_tokens._tower.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise InputError(f"internal: tensors left unloaded after loading: {', '.join(left[:4])}")


def save_official_layout(
    model: Phi3VForCausalLM,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write `model` as an official-layout checkpoint: shards with the official key names (+ index when
    more than one), config.json and preprocessor_config.json as parsed (torch_dtype updated), and the
    other top-level files of source_dir (tokenizer, chat template, generation config, ...) copied as is.

    out_dir must not exist or be empty: we never overwrite what we did not write."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty; choose a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_flat = _clip_flat(model)
    state = [(official_key(n, clip_flat), p) for n, p in model.named_parameters()]
    if model.spec.text_kwargs.get("tie_word_embeddings"):
        state = [(k, p) for k, p in state if k != "lm_head.weight"]
    target = dtype or state[0][1].dtype
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, param in state:
        nbytes = param.numel() * target.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, param))
        size += nbytes
    names = (
        ["model.safetensors"] if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    for name, group in zip(names, groups):
        tensors = {key: param.detach().to(target).contiguous() for key, param in group}
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del tensors
    if len(names) > 1:
        total = sum(p.numel() for _, p in state) * target.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _write_configs(model.spec, out_dir, target)
    if source_dir is not None:
        copy_side_files(Path(source_dir), out_dir)
    return out_dir


def _write_configs(spec: Phi3VSpec, out_dir: Path, dtype: torch.dtype) -> None:
    config = dict(spec.raw_config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if spec.preprocessor:
        (out_dir / "preprocessor_config.json").write_text(json.dumps(spec.preprocessor, indent=2) + "\n", encoding="utf-8")


def copy_side_files(source: Path, out_dir: Path) -> None:
    """Top-level regular files of source that are not weights and not written above (no symlinks)."""
    for path in sorted(source.iterdir()):
        if path.is_symlink() or not path.is_file() or path.name in _WRITTEN_BY_US:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, out_dir / path.name)
