"""Fold weight updates into an official-layout Phi-3(.5)-Vision checkpoint, streaming, and write the
result in the same layout: `octopus-rt merge BASE ADAPTER --out DIR` and the end of `octopus-rt train`.

The output holds exactly the base's tensors under the base's key names (LoRA folded in,
replacements written over, everything else copied), config.json as the base's with `torch_dtype`
set to the written dtype, the base's preprocessor_config.json, and its other top-level files
(tokenizer, chat template, generation config, the remote-code .py files a user's own tooling may
use; copied, never imported). So `load_phi3v`, `octopus-rt export lmm` and Microsoft's code read it
as they read the base.

Memory: one base tensor at a time is read (safetensors, memory-mapped, one base shard open at a time)
and written straight to its output shard (`write_safetensors`), so a merge needs about one tensor's
size of RAM beyond the imports, whatever the model size (measured: benchmarks/phi3v_merge_rss.py).
Output shards are cut at `max_shard_bytes` of the written dtype, with an index when there are several.
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

__all__ = ["DTYPES", "TensorInfo", "checkpoint_tensors", "merge_updates", "merge_adapter", "write_safetensors"]

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


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _written_dtype(base_dtype: str, target) -> str:
    """safetensors dtype name a base tensor is written with: floats in the target dtype, others as they are."""
    if base_dtype not in _ITEMSIZE:
        raise InputError(f"the base checkpoint holds a tensor of unsupported dtype {base_dtype}")
    return _NAMES[str(target).removeprefix("torch.")] if base_dtype in _FLOATS else base_dtype


def write_safetensors(path: Path, entries: list, produce) -> int:
    """Write a safetensors file one tensor at a time; returns the data bytes written.

    entries: [(key, shape, dtype name)] in file order; produce(key) -> a CPU tensor of that shape and
    dtype. The format (a little-endian u64 header size, the JSON header with data_offsets, padded
    with spaces to 8 bytes, then the raw little-endian data) is written directly, so memory holds one
    tensor, not the whole shard (safetensors' save_file serialises the shard into memory first)."""
    import sys

    import torch

    if sys.byteorder != "little":
        raise OctopusError("writing safetensors needs a little-endian machine")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        size = _ITEMSIZE[dtype] * _numel(shape)
        header[key] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for key, shape, dtype in entries:
            tensor = produce(key)
            if tuple(tensor.shape) != tuple(shape) or tensor.element_size() != _ITEMSIZE[dtype]:
                raise OctopusError(f"internal: {key} came out as {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            flat = tensor.detach().contiguous().reshape(-1)
            handle.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
        handle.flush()
        os.fsync(handle.fileno())
    return offset


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
            current: list = [None, None]  # (shard, reader): one base shard open at a time, in plan order
            for name, group in zip(names, groups):
                entries = [(key, infos[key].shape, _written_dtype(infos[key].dtype, target)) for key in group]

                def produce(key):
                    shard = infos[key].shard
                    if current[0] != shard:
                        stack.close()
                        current[:] = [shard, stack.enter_context(safe_open(str(shard), framework="pt"))]
                    tensor = _merged_tensor(key, current[1].get_tensor(key), updates, target)
                    if bar is not None:
                        bar.update(tensor.numel() * tensor.element_size())
                    return tensor

                total += write_safetensors(staging / name, entries, produce)
                weight_map.update(dict.fromkeys(group, name))
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
