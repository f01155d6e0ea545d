"""Which parameters train: LoRA on every linear layer under the language model, and nothing else.

PEFT's usual shortcuts pick the wrong modules on LLaVA: ``["q_proj", "v_proj"]`` on LLaVA-Phi-3 only
matches CLIP layers (Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``), and ``"all-linear"`` also wraps
the vision tower and the projector. So the target list is the explicit full names of the
`nn.Linear` modules under ``model.language_model`` (``lm_head`` sits outside it and stays as is).
The vision tower and projector are fully fine-tuned (paper 5.1) unless `freeze_vision`;
`freeze_vision_stages` keeps the tower's input layers and its first N stages frozen (a CNN's stages, a
ViT's encoder layers), so a pretrained tower adapts only its deeper layers, and backpropagation stops there.

The same holds for transformers' FastVLM (a LLaVA whose tower is a timm CNN): same module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from octopus_rt.errors import InputError
from octopus_rt.export.llava_graphs import (  # what export lmm takes
    LLAVA_FAMILY,
    SUPPORTED_TEXT_MODELS,
    SUPPORTED_VISION_MODELS,
)

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "SUPPORTED_VISION_MODELS",
    "TuningSummary",
    "check_architecture",
    "language_model_linear_names",
    "apply_tuning",
]

@dataclass
class TuningSummary:
    """What `apply_tuning` did: the LoRA-wrapped module names and the parameter counts."""

    lora_targets: list[str]
    trainable_parameters: int
    total_parameters: int


def check_architecture(config) -> None:
    """Raise InputError unless `config` is a LLaVA (or FastVLM) with a supported language model and
    vision tower."""
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAVA_FAMILY or (architectures and LLAVA_FAMILY[model_type][0] not in architectures):
        found = ", ".join(architectures) or model_type or "unknown"
        raise InputError(f"unsupported base model {found}: octopus-rt train takes a LlavaForConditionalGeneration "
                         "or FastVlmForConditionalGeneration")
    text = getattr(config.text_config, "model_type", None)
    vision = getattr(config.vision_config, "model_type", None)
    if text not in SUPPORTED_TEXT_MODELS:
        raise InputError(f"unsupported language model {text!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}")
    towers = LLAVA_FAMILY[model_type][1]
    if vision not in towers:
        raise InputError(f"unsupported vision tower {vision!r} for {model_type}; supported: {', '.join(towers)}")


def language_model_linear_names(model) -> list[str]:
    """Full names (as in `model.named_modules()`) of every nn.Linear under the language model."""
    from torch import nn

    language_model = model.model.language_model
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    return [
        f"{prefix}.{name}"
        for name, module in language_model.named_modules()
        if isinstance(module, nn.Linear)
    ]


def _vision_modules(model) -> list:
    return [model.model.vision_tower, model.model.multi_modal_projector]


def vision_stages(tower) -> list:
    """The tower's modules from the input on, in order: [input layers, stage 1, stage 2, ...] (a timm
    CNN: stem, then its `blocks` stages; a CLIP / SigLIP tower: embeddings, then encoder layers)."""
    timm_model = getattr(tower, "timm_model", None)
    if timm_model is not None:
        stem = [m for m in (getattr(timm_model, "conv_stem", None), getattr(timm_model, "bn1", None)) if m is not None]
        if not stem or not hasattr(timm_model, "blocks"):
            raise InputError(f"cannot tell the stages of the timm tower {type(timm_model).__name__}")
        return [stem, *list(timm_model.blocks)]
    inner = getattr(tower, "vision_model", tower)
    return [[inner.embeddings], *list(inner.encoder.layers)]


def _keep_inference_mode(module, args) -> None:
    module.train(False)


def freeze_stages(tower, count: int) -> None:
    """Freeze the tower's input layers and its first `count` stages (vision_stages): no gradients, and
    their normalisation layers always run in inference mode (a forward pre-hook, so `model.train()`
    cannot switch them back): a frozen BatchNorm keeps its ImageNet running statistics instead of
    drifting to small training batches. Hooks are not saved: the model on disk is unchanged in form."""
    from torch import nn

    stages = vision_stages(tower)
    if count > len(stages) - 1:
        raise InputError(f"--freeze-vision-stages {count}: the vision tower has {len(stages) - 1} stages")
    for stage in stages[:count + 1]:
        for module in (stage if isinstance(stage, list) else [stage]):
            module.requires_grad_(False)
            for sub in module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.register_forward_pre_hook(_keep_inference_mode)


def apply_tuning(model, lm_tuning: str, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                 freeze_vision: bool = False, freeze_vision_stages: int = 0):
    """Set which parameters train and wrap the model with LoRA when `lm_tuning == "lora"`.

    model: a LlavaForConditionalGeneration. lm_tuning: "lora" | "full" | "frozen" for the language
    model (embeddings, decoder layers, lm_head). Returns (model or PeftModel, TuningSummary).
    """
    targets: list[str] = []
    for parameter in model.parameters():
        parameter.requires_grad_(lm_tuning == "full")
    if lm_tuning == "lora":
        from peft import LoraConfig, get_peft_model

        targets = language_model_linear_names(model)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        model = get_peft_model(model, config)  # freezes every base parameter
        inner = model.get_base_model()
    elif lm_tuning in ("full", "frozen"):
        inner = model
    else:
        raise InputError(f"unknown language model tuning {lm_tuning!r}")
    for module in _vision_modules(inner):
        for parameter in module.parameters():
            parameter.requires_grad_(not freeze_vision)
    if freeze_vision_stages and not freeze_vision:
        freeze_stages(inner.model.vision_tower, freeze_vision_stages)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, TuningSummary(targets, trainable, total)
