"""Which parameters train: LoRA on every linear layer under the language model, and nothing else.

PEFT's usual shortcuts pick the wrong modules on LLaVA: ``["q_proj", "v_proj"]`` on LLaVA-Phi-3 only
matches CLIP layers (Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``), and ``"all-linear"`` also wraps
the vision tower and the projector. So the target list is the explicit full names of the
`nn.Linear` modules under ``model.language_model`` (``lm_head`` sits outside it and stays as is).
The vision tower and projector are fully fine-tuned (paper 5.1) unless `freeze_vision`.
"""

from __future__ import annotations

from dataclasses import dataclass

from octopus_rt.errors import InputError
from octopus_rt.export.llava_graphs import SUPPORTED_TEXT_MODELS, SUPPORTED_VISION_MODELS  # what export lmm takes

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
    """Raise InputError unless `config` is a LLaVA with a supported language model and vision tower."""
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) != "llava" or (
        architectures and "LlavaForConditionalGeneration" not in architectures
    ):
        found = ", ".join(architectures) or getattr(config, "model_type", "unknown")
        raise InputError(f"unsupported base model {found}: octopus-rt train takes a LlavaForConditionalGeneration")
    text = getattr(config.text_config, "model_type", None)
    vision = getattr(config.vision_config, "model_type", None)
    if text not in SUPPORTED_TEXT_MODELS:
        raise InputError(f"unsupported language model {text!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}")
    if vision not in SUPPORTED_VISION_MODELS:
        raise InputError(f"unsupported vision tower {vision!r}; supported: clip, siglip")


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


def apply_tuning(model, lm_tuning: str, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                 freeze_vision: bool = False):
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, TuningSummary(targets, trainable, total)
