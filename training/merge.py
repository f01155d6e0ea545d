"""Merge LoRA into the base weights and save a plain LlavaForConditionalGeneration directory.

The result is what `octopus-rt export lmm` takes directly: config.json, model.safetensors,
generation_config.json and the processor / tokenizer / chat template files, with no PEFT trace.
It is written to a temporary sibling directory and renamed into place, so `out_dir` either does not
exist or is complete (a full disk leaves no half-written model under the final name).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from octopus_rt.errors import InputError, OctopusError

__all__ = ["merged_model", "save_merged"]


def merged_model(model):
    """The plain transformers model: LoRA weights folded in (`merge_and_unload`) when `model` is a
    PeftModel, else `model` itself. Mutates a PeftModel (its base layers receive the deltas)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(progressbar=False, safe_merge=True)
    return model


def save_merged(model, processor, out_dir: str | os.PathLike[str]) -> Path:
    """Merge (if needed) and save model + processor to `out_dir` atomically; returns the path.

    Raises InputError when `out_dir` exists, OctopusError when writing fails (the partial temporary
    directory is removed).
    """
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"output directory {out} already exists; choose another --out or remove it")
    plain = merged_model(model)
    was_training = plain.training
    plain.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OctopusError(f"could not write the merged model to {out}: {exc}") from None
    finally:
        plain.train(was_training)
    try:
        os.rename(staging, out)  # atomic on one file system; fails if `out` appeared meanwhile
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OctopusError(f"could not move the merged model into {out}: {exc}") from None
    return out
