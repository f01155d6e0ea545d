"""Atomic training checkpoints: write everything into a temporary directory, then rename it.

Layout: ``WORK_DIR/checkpoints/step-00000012/`` holding ``trainable.pt`` (the trainable parameters
by name), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 only), ``rng-rank{R}.pt`` (torch,
CUDA, numpy and Python RNG states of each process) and ``meta.json`` (step, global batch, data
fingerprint). Every .pt file holds tensors and plain containers only and is read with
``torch.load(weights_only=True)``: a checkpoint is data, never code. A checkpoint only gets its final name by `os.rename` after every file is written and
flushed, so a crash or a full disk leaves at worst a ``.partial-*`` directory, never a corrupt
"latest" checkpoint; `latest_checkpoint` ignores partial directories and `save_checkpoint` removes them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octopus_rt.errors import OctopusError

__all__ = ["CheckpointState", "save_checkpoint", "save_file", "load_checkpoint", "latest_checkpoint", "checkpoint_dir"]

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointState:
    """What a checkpoint restores. `trainable`: {parameter name: tensor}; the other dicts are
    `state_dict()`s; `meta` is JSON (step, global batch, world size, data fingerprint)."""

    trainable: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    meta: dict


def checkpoint_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support directory fsync; the rename is still atomic
    finally:
        os.close(fd)


def save_file(obj, path: Path) -> None:
    """`torch.save` of one checkpoint file, flushed and fsynced (the unit a full disk interrupts)."""
    import torch

    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def rng_state() -> dict:
    """The RNG states as tensors and plain values only, so `torch.load(weights_only=True)` reads them
    (numpy's state holds an ndarray, which a weights-only load refuses; it is stored as a list)."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_dir(work_dir)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return max(complete, key=lambda p: int(_NAME.match(p.name).group(1))) if complete else None


def save_checkpoint(work_dir: Path, state: CheckpointState, *, rank: int, world_size: int, keep: int,
                    all_ok=lambda ok: ok) -> Path:
    """Write a checkpoint for `state.meta["step"]` atomically; prune to the newest `keep`.

    Every process calls this (each writes its own RNG state); rank 0 writes the rest and renames.
    `all_ok(ok: bool) -> bool` combines the processes' success flags (an all-reduce under
    torch.distributed), so every process raises together when any write failed.
    Raises OctopusError (with the last complete checkpoint named) when writing fails.
    """
    root = checkpoint_dir(work_dir)
    step = int(state.meta["step"])
    final = root / f"step-{step:08d}"
    partial = root / f".partial-step-{step:08d}"
    error: OSError | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
    except OSError as exc:
        error = exc
    if not all_ok(error is None):
        return _fail(work_dir, partial, step, error)
    try:
        save_file(rng_state(), partial / f"rng-rank{rank}.pt")
        if rank == 0:
            save_file(state.trainable, partial / "trainable.pt")
            save_file(state.optimizer, partial / "optimizer.pt")
            save_file(state.scheduler, partial / "scheduler.pt")
            if state.scaler is not None:
                save_file(state.scaler, partial / "scaler.pt")
    except OSError as exc:
        error = exc
    if not all_ok(error is None):
        return _fail(work_dir, partial, step, error)
    if rank == 0:
        try:
            meta = dict(state.meta, world_size=world_size)
            with open(partial / "meta.json", "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(partial)
            if final.exists():  # a re-run of the same step after resume: replace the old copy
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(root)
        except OSError as exc:
            error = exc
    if not all_ok(error is None):
        return _fail(work_dir, partial, step, error)
    if rank == 0:
        _prune(root, keep)
    return final


def _fail(work_dir: Path, partial: Path, step: int, error: OSError | None):
    shutil.rmtree(partial, ignore_errors=True)
    latest = latest_checkpoint(work_dir)
    where = f"the latest complete checkpoint is {latest}" if latest else "no complete checkpoint exists yet"
    reason = error if error is not None else "another process failed to write its part"
    raise OctopusError(f"could not write the checkpoint of step {step} ({reason}); {where}; "
                       "free space and rerun with --resume")


def _prune(root: Path, keep: int) -> None:
    complete = sorted((p for p in root.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, rank: int) -> CheckpointState:
    """Read a checkpoint and restore this process's RNG state from it."""
    import torch

    import pickle

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        # weights_only: tensors and plain containers only; a checkpoint is data, never code (a crafted
        # pickle would otherwise run whatever it names on --resume).
        load = lambda name: torch.load(path / name, map_location="cpu", weights_only=True)  # noqa: E731
        trainable = load("trainable.pt")
        optimizer = load("optimizer.pt")
        scheduler = load("scheduler.pt")
        scaler = load("scaler.pt") if (path / "scaler.pt").is_file() else None
        rng_file = path / f"rng-rank{rank}.pt"
        if not rng_file.is_file():
            raise OctopusError(f"{path} has no RNG state for process {rank}; resume with the world size it was saved with")
        rng = load(rng_file.name)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OctopusError(f"cannot read checkpoint {path}: it holds more than tensors and plain values, so it is "
                           f"not loaded (written by another program or an older octopus-rt?): {first}") from None
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise OctopusError(f"cannot read checkpoint {path}: {exc}") from None
    set_rng_state(rng)
    return CheckpointState(trainable, optimizer, scheduler, scaler, meta)
