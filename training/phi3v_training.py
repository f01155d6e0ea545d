"""Phi-3(.5)-Vision in `octopus-rt train`: the paper's recipe on the native model (export.phi3v_model).

- Base: an official-layout directory, loaded by export.phi3v_checkpoint.load_phi3v in float32
  (never its remote code).
- LoRA on the language model's `qkv_proj`, `o_proj`, `gate_up_proj` and `down_proj` of every layer
  (the paper: LoRA on the LLM; these are every nn.Linear of a Phi-3 decoder layer, the targets of
  the Phi-3CookBook's vision fine-tuning without its extra `lm_head`). PEFT wraps the
  `language_model` (transformers' Phi3ForCausalLM), whose module names are the official checkpoint
  keys, so the LoRA tensors carry the names a PEFT adapter of Microsoft's model carries.
  Default rank 64, alpha 128, dropout 0: the Phi-3CookBook's (the paper gives no rank).
- Fully tuned (unless --freeze-vision): the CLIP encoder layers that run (all but the last:
  features come from the second-to-last layer; the last layer and post_layernorm never see a
  gradient, so they stay frozen), CLIP's embeddings and pre-layernorm, `img_projection`, `glb_GN`
  and `sub_GN`.
- Gradient checkpointing: the decoder's layers through transformers; the CLIP layers too, although
  `Phi3VImageEmbedding.patch_features` runs them in its own loop instead of CLIPEncoder.forward:
  transformers 5 checkpoints inside each `GradientCheckpointingLayer`, so the switch holds in any
  loop. That is checked here, so an older transformers (switch in CLIPEncoder.forward) fails loudly
  instead of silently keeping every CLIP activation.
- Merge: the LoRA factors and the fully tuned tensors become WeightUpdates under the official keys,
  folded into the base checkpoint by training.phi3v_merge (the same code as `octopus-rt merge`).
"""

from __future__ import annotations

from pathlib import Path

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.training.architectures import Architecture, LoraDefaults
from octopus_rt.training.lora import TuningSummary

__all__ = ["LORA_TARGETS", "Phi3VArchitecture", "lora_target_names", "trained_updates"]

LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def lora_target_names(language_model) -> list[str]:
    """Names (in `language_model`, i.e. official keys without `.weight`) of the LoRA-wrapped Linears."""
    from torch import nn

    return [name for name, module in language_model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in LORA_TARGETS]


def _clip_tower(embedding):
    # transformers 5 flattened CLIPVisionModel; 4.x kept the modules under `.vision_model`.
    return getattr(embedding.img_processor, "vision_model", embedding.img_processor)


def _vision_trainable(model) -> list:
    """The vision parameters the official forward uses (module docstring)."""
    embedding = model.vision_embed_tokens
    tower = _clip_tower(embedding)
    modules = [tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[: embedding.feature_layers],
               embedding.img_projection]
    return [p for m in modules for p in m.parameters()] + [embedding.glb_GN, embedding.sub_GN]


def trained_updates(model, base_shapes: dict):
    """WeightUpdates (official keys) of a trained model: LoRA factors of the PEFT-wrapped language
    model, and every other trainable parameter as a replacement."""
    from peft import PeftModel, get_peft_model_state_dict

    from octopus_rt.training.peft_adapter import WeightUpdates, adapter_updates, official_module

    language_model = model.language_model
    updates = WeightUpdates()
    if isinstance(language_model, PeftModel):
        config = language_model.peft_config["default"].to_dict()
        updates = adapter_updates(config, get_peft_model_state_dict(language_model), base_shapes)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_" not in name:
            key = official_module(name, base_shapes)
            if tuple(base_shapes.get(key, ())) != tuple(parameter.shape):
                raise OctopusError(f"internal: trained parameter {name} has no counterpart {key} in the base")
            updates.replace[key] = parameter.detach()
    return updates


class Phi3VArchitecture(Architecture):
    """Official-layout Phi-3(.5)-Vision (module docstring)."""

    name = "phi3v"
    lora_defaults = LoraDefaults(64, 128.0, 0.0)

    def load(self, base_model: Path):
        import torch

        from octopus_rt.export.phi3v_checkpoint import load_phi3v
        from octopus_rt.training.phi3v_collate import Phi3VCollator

        model = load_phi3v(base_model, dtype=torch.float32)
        for note in model.spec.warnings:
            print(f"note: {note}", flush=True)
        return model, Phi3VCollator(base_model, model.spec)

    def enable_gradient_checkpointing(self, model) -> None:
        kwargs = {"use_reentrant": False}
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.vision_embed_tokens.img_processor.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        embedding = model.vision_embed_tokens
        layers = _clip_tower(embedding).encoder.layers[: embedding.feature_layers]
        if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            raise InputError("--gradient-checkpointing: this transformers version checkpoints CLIP inside "
                             "CLIPEncoder.forward, which the Phi-3-Vision image path does not call; "
                             "use transformers >= 5 or train without --gradient-checkpointing")

    def apply_tuning(self, model, options):
        if options.lm_tuning not in ("lora", "full", "frozen"):
            raise InputError(f"unknown language model tuning {options.lm_tuning!r}")
        if options.freeze_vision_stages:
            raise InputError("--freeze-vision-stages is for LLaVA / FastVLM; Phi-3.5-Vision takes --freeze-vision")
        for parameter in model.parameters():
            parameter.requires_grad_(options.lm_tuning == "full")
        for parameter in model.vision_embed_tokens.parameters():
            parameter.requires_grad_(False)
        targets: list[str] = []
        if options.lm_tuning == "lora":
            from peft import LoraConfig, get_peft_model

            targets = lora_target_names(model.language_model)
            config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                                target_modules=targets, bias="none")
            model.language_model = get_peft_model(model.language_model, config)  # freezes the decoder
        if not options.freeze_vision:
            for parameter in _vision_trainable(model):
                parameter.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return model, TuningSummary(targets, trainable, total)

    def write_merged(self, model, collator, options):
        from octopus_rt.training.phi3v_merge import checkpoint_tensors, merge_updates

        shapes = {key: info.shape for key, info in checkpoint_tensors(options.base_model).items()}
        out = merge_updates(options.base_model, trained_updates(model, shapes), options.out, dtype="float32")
        return out, model
