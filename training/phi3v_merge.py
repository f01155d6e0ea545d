"""Fold weight updates into an official-layout Phi-3(.5)-Vision checkpoint, streaming, and write the
result in the same layout: `octopus-rt merge BASE ADAPTER --out DIR` and the end of `octopus-rt train`.

The output holds exactly the base's tensors under the base's key names (LoRA folded in,
replacements written over, everything else copied), config.json as the base's with `torch_dtype`
set to the written dtype, the base's preprocessor_config.json, and its other top-level files
(tokenizer, chat template, generation config, the remote-code .py files a user's own tooling may
use; copied, never imported). So `load_phi3v`, `octopus-rt export lmm` and Microsoft's code read it
as they read the base.

Memory: one base tensor at a time is read (safetensors, memory-mapped) and one output shard is held
until written; shards are cut at `max_shard_bytes` of the written dtype (plus an index when there is
more than one), so a full 4.2 B-parameter model merges in about one shard's size of RAM.
Arithmetic in float32: W' = (W + scale * (B @ A)), then cast to the written dtype. The default
dtype is float32: LoRA deltas of a short fine-tune are often below bf16's resolution of the weight
(2^-8 relative), so rounding the sum back to bf16 would lose part of what training learned.
The output folder appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.training.peft_adapter import ALIASES, WeightUpdates, adapter_updates, read_adapter

__all__ = ["DTYPES", "TensorInfo", "checkpoint_tensors", "merge_updates", "merge_adapter"]

DTYPES = ("float32", "bfloat16", "float16")
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where a base tensor lives and what it is (read from the safetensors header only)."""

    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...


def checkpoint_tensors(base_dir: str | Path) -> dict[str, TensorInfo]:
    """{official key: TensorInfo} of every tensor in the checkpoint's safetensors shards, in shard order."""
    from safetensors import safe_open

    from octopus_rt.export.phi3v_checkpoint import checkpoint_shards

    infos: dict[str, TensorInfo] = {}
    for shard in checkpoint_shards(base_dir):
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                piece = reader.get_slice(key)
                infos[key] = TensorInfo(shard, tuple(piece.get_shape()), piece.get_dtype())
    return infos


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _plan(infos: dict[str, TensorInfo], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for key, info in infos.items():
        nbytes = itemsize * _numel(info.shape)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _merged_tensor(key: str, tensor, updates: WeightUpdates, dtype):
    import torch

    if key in updates.replace:
        tensor = updates.replace[key]
    if key in updates.lora:
        update = updates.lora[key]
        delta = (update.b.to(torch.float32) @ update.a.to(torch.float32)) * update.scale
        tensor = tensor.to(torch.float32) + delta  # a new tensor: the memory-mapped base stays untouched
    if not tensor.is_floating_point():
        return tensor.contiguous()
    return tensor.detach().to(dtype).contiguous()


def merge_updates(base_dir: str | Path, updates: WeightUpdates, out_dir: str | Path, *, dtype: str = "float32",
                  max_shard_bytes: int = 4 * 1024**3, progress: bool = False) -> Path:
    """Write base + updates to `out_dir` in the official layout (module docstring); returns out_dir.

    InputError when out_dir exists, the base is not a Phi-3(.5)-Vision checkpoint or an update does
    not fit it (checked before anything is written); OctopusError when writing fails (nothing is
    left behind)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from octopus_rt.export.phi3v_checkpoint import copy_side_files
    from octopus_rt.export.phi3v_config import read_phi3v_spec

    base_dir, out = Path(base_dir), Path(out_dir)
    target = _torch_dtype(dtype)
    if out.exists():
        raise InputError(f"output directory {out} already exists; choose another --out or remove it")
    spec = read_phi3v_spec(base_dir)
    infos = checkpoint_tensors(base_dir)
    for key, tensor in [*updates.replace.items(), *((k, None) for k in updates.lora)]:
        if key not in infos:
            raise InputError(f"the update names {key}, which the base checkpoint does not hold")
        shape = tuple(tensor.shape) if tensor is not None else (updates.lora[key].b.shape[0], updates.lora[key].a.shape[1])
        if shape != infos[key].shape:
            raise InputError(f"the update of {key} has shape {shape}, the base's has {infos[key].shape}")
    for alias, key in ALIASES.items():  # a stored copy of a shared tensor follows its update
        if alias in infos and key in updates.replace and alias not in updates.replace:
            updates.replace[alias] = updates.replace[key]
    groups = _plan(infos, target.itemsize, max_shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    bar = _progress(sum(_numel(i.shape) for i in infos.values()) * target.itemsize, progress)
    try:
        weight_map, total = {}, 0
        with ExitStack() as stack:
            readers = {}
            for name, group in zip(names, groups):
                tensors = {}
                for key in group:
                    shard = infos[key].shard
                    if shard not in readers:
                        readers[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
                    tensors[key] = _merged_tensor(key, readers[shard].get_tensor(key), updates, target)
                    nbytes = tensors[key].numel() * tensors[key].element_size()
                    total += nbytes
                    if bar is not None:
                        bar.update(nbytes)
                save_file(tensors, str(staging / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, name))
                del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / _INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = dict(spec.raw_config, torch_dtype=dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if (base_dir / "preprocessor_config.json").is_file():
            shutil.copyfile(base_dir / "preprocessor_config.json", staging / "preprocessor_config.json")
        copy_side_files(base_dir, staging)
        os.rename(staging, out)  # atomic on one file system; fails if `out` appeared meanwhile
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OctopusError(f"could not write the merged checkpoint to {out}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                  max_shard_bytes: int = 4 * 1024**3, progress: bool = False) -> tuple[Path, int]:
    """`octopus-rt merge`: fold a PEFT LoRA adapter (training.peft_adapter) into the official-layout
    base. Returns (out_dir, number of base tensors changed). Every check runs before writing."""
    from octopus_rt.export.phi3v_config import read_phi3v_spec

    _torch_dtype(dtype)
    if Path(out_dir).exists():
        raise InputError(f"output directory {out_dir} already exists; choose another --out or remove it")
    read_phi3v_spec(base_dir)  # one line for a base that is not Phi-3(.5)-Vision, before the adapter is read
    config, tensors = read_adapter(adapter_dir)
    shapes = {key: info.shape for key, info in checkpoint_tensors(base_dir).items()}
    updates = adapter_updates(config, tensors, shapes)
    return merge_updates(base_dir, updates, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         progress=progress), len(updates)


def _progress(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, desc="merge", unit="B", unit_scale=True, dynamic_ncols=True)
