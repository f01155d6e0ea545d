"""The base models `octopus-rt train` takes, and the seam between them and the one training loop.

train.py owns everything the model families share: data order, batching, answer-token loss over the
global batch, AdamW + cosine schedule, checkpoints and exact resume, several processes, validation.
An `Architecture` owns what differs between families:

- `load(base_model) -> (model, collator)`: the model in float32 on the CPU and its collator;
- `enable_gradient_checkpointing(model)`;
- `apply_tuning(model, options) -> (model, TuningSummary)`: which parameters train;
- `write_merged(model, collator, options) -> (out_dir, final model)`: the result in the base's format;
- `lora_defaults`: rank, alpha and dropout when the options leave them unset;
- `shares_images`: whether `forward_shared_images(model, inputs, inverse)` (one vision-tower pass per
  distinct image of a batch, `--group-by-image`) works for the family.

Collators share one interface (collate.Collator for LLaVA, phi3v_collate.Phi3VCollator):
`encode(turns, image) -> EncodedText`, `batch(encoded, images) -> dict` (labels plus the model's
keyword inputs), `collate_records(records, images)`, `generate(model, turns, image, max_new_tokens)
-> str`, and `tokenizer` (`encode` / `decode`, for the closed-set token ids).

`architecture_for(base_model)` picks the family from config.json alone (no remote code is run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from octopus_rt.errors import InputError
from octopus_rt.jsonfile import read_json_object

__all__ = ["LoraDefaults", "Architecture", "LlavaArchitecture", "architecture_for", "load_llava", "with_lora_defaults"]


@dataclass(frozen=True)
class LoraDefaults:
    """LoRA settings a family uses when --lora-rank / --lora-alpha / --lora-dropout are not given."""

    rank: int
    alpha: float
    dropout: float


class Architecture:
    """One model family (module docstring). Subclasses implement every method."""

    name = ""
    lora_defaults = LoraDefaults(16, 32.0, 0.05)
    shares_images = False

    def load(self, base_model: Path):
        raise NotImplementedError

    def enable_gradient_checkpointing(self, model) -> None:
        raise NotImplementedError

    def apply_tuning(self, model, options):
        raise NotImplementedError

    def write_merged(self, model, collator, options):
        raise NotImplementedError


def with_lora_defaults(options, defaults: LoraDefaults):
    """`options` with unset LoRA settings (None) filled from the architecture's defaults."""
    return replace(
        options,
        lora_rank=defaults.rank if options.lora_rank is None else options.lora_rank,
        lora_alpha=defaults.alpha if options.lora_alpha is None else options.lora_alpha,
        lora_dropout=defaults.dropout if options.lora_dropout is None else options.lora_dropout,
    )


def load_llava(base_model: Path):
    """(model float32 on CPU, processor) from a LlavaForConditionalGeneration (or FastVLM: a LLaVA with
    a timm CNN tower) directory, after checking the architecture. Raises InputError for an unsupported
    directory."""
    from transformers import AutoConfig, AutoProcessor

    from octopus_rt.export.llava_graphs import model_class
    from octopus_rt.training.lora import check_architecture

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"cannot read the config of {base_model}: {exc}") from None
    check_architecture(config)
    import torch

    model = model_class(config.model_type).from_pretrained(base_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base_model)
    return model, processor


class LlavaArchitecture(Architecture):
    """transformers LlavaForConditionalGeneration (Phi-3, Llama or Qwen2 language model; CLIP or SigLIP), or
    FastVlmForConditionalGeneration (the same with a timm CNN tower).
    LoRA on every linear layer under the language model (training/lora.py); the merged model is a
    plain `save_pretrained` directory (training/merge.py)."""

    name = "llava"
    lora_defaults = LoraDefaults(16, 32.0, 0.05)
    shares_images = True  # training/shared_images.py

    def load(self, base_model: Path):
        from octopus_rt.training.collate import Collator

        model, processor = load_llava(base_model)
        return model, Collator(processor)

    def enable_gradient_checkpointing(self, model) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def apply_tuning(self, model, options):
        from octopus_rt.training.lora import apply_tuning

        return apply_tuning(model, options.lm_tuning, rank=options.lora_rank, alpha=options.lora_alpha,
                            dropout=options.lora_dropout, freeze_vision=options.freeze_vision,
                            freeze_vision_stages=options.freeze_vision_stages)

    def write_merged(self, model, collator, options):
        from octopus_rt.training.merge import merged_model, save_merged

        final = merged_model(model)
        return save_merged(final, collator.processor, options.out), final


def architecture_for(base_model: str | Path) -> Architecture:
    """The family of the model directory `base_model`, from its config.json. InputError (one line)
    for a missing directory or an unsupported model."""
    from octopus_rt.export.llava_graphs import LLAVA_FAMILY
    from octopus_rt.export.phi3v_config import is_phi3v_config

    base_model = Path(base_model)
    config = read_json_object(base_model / "config.json",
                              missing=f"{base_model} is not a model directory (no config.json)")
    if is_phi3v_config(config):
        from octopus_rt.training.phi3v_training import Phi3VArchitecture

        return Phi3VArchitecture()
    if config.get("model_type") in LLAVA_FAMILY:
        return LlavaArchitecture()
    found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
    raise InputError(f"unsupported base model {found}: octopus-rt train takes a LlavaForConditionalGeneration "
                     "(or FastVLM) or an official-layout Phi-3(.5)-Vision (Phi3VForCausalLM) directory")
