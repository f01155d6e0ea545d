"""PEFT LoRA adapters for Phi-3(.5)-Vision: read one, check it against a base checkpoint, turn it into
weight updates named by the official checkpoint keys (folded in by training.phi3v_merge).

Format (PEFT's `save_pretrained`): `adapter_config.json` (peft_type "LORA", r, lora_alpha, use_rslora,
rank_pattern, alpha_pattern, ...) and `adapter_model.safetensors` holding, for every LoRA-wrapped
nn.Linear, `base_model.model.<module>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r), plus
full tensors `base_model.model.<module>.<param>` for what PEFT saves whole (modules_to_save, trained
biases, and a LoRA-targeted lm_head or embedding as `<module>.base_layer.weight`). transformers' own adapter saving may omit the `base_model.model.` prefix; both are read.
`<module>` is a path in the model the adapter was trained on:

- Microsoft's remote-code Phi3VForCausalLM (Phi-3CookBook: `model.add_adapter`, or `get_peft_model`):
  `model.layers.N.self_attn.qkv_proj`, `model.layers.N.mlp.gate_up_proj`, `lm_head`,
  `model.vision_embed_tokens.img_processor.vision_model.encoder.layers.N.self_attn.q_proj`,
  `model.vision_embed_tokens.img_projection.0`: the official checkpoint keys without `.weight`
  (modeling_phi3_v.py: Phi3VForCausalLM.model = Phi3VModel with `layers`, `vision_embed_tokens`).
- peft on the language model of our native model (transformers' Phi3ForCausalLM): the same names.
- peft on our whole native model: `language_model.model.layers.N...`,
  `vision_embed_tokens.img_processor.encoder...`, mapped by export.phi3v_checkpoint.official_key.

Merge rule (PEFT's for nn.Linear, `LoraLayer.get_delta_weight`): W' = W + s B A with
s = alpha / r (alpha / sqrt(r) with use_rslora), r and alpha per module from rank_pattern /
alpha_pattern (PEFT's `get_pattern_key` matching) else r / lora_alpha. Anything whose merge is not
that rule is refused with one line, before anything is written: other PEFT methods, DoRA, LoRA
biases, fan_in_fan_out, embedding / convolution LoRA, activated LoRA, layer replication, tensors that
name no tensor of the base or do not fit its shape, and pickle files (adapter_model.bin).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from octopus_rt.errors import InputError
from octopus_rt.jsonfile import read_json_object

__all__ = ["ALIASES", "LoraUpdate", "WeightUpdates", "read_adapter", "adapter_updates", "official_module"]

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Config switches of LoRA variants whose merge is not W + s B A (or that PEFT cannot merge at all).
_VARIANTS = ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "target_parameters",
             "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
             "velora_config", "use_qalora", "trainable_token_indices")
# The official module shares `model.embed_tokens`; its state dict lists the tensor under both names.
ALIASES = {"model.vision_embed_tokens.wte.weight": "model.embed_tokens.weight"}


@dataclass(frozen=True)
class LoraUpdate:
    """One LoRA-wrapped Linear: a (r, in), b (out, r), W' = W + scale * b @ a."""

    a: object
    b: object
    scale: float


@dataclass
class WeightUpdates:
    """Updates keyed by official checkpoint key: a whole new tensor, LoRA factors, or both (the LoRA
    delta then goes onto the new tensor, as PEFT applies it to the base layer it loaded)."""

    lora: dict[str, LoraUpdate] = field(default_factory=dict)
    replace: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of base tensors changed."""
        return len(set(self.lora) | set(self.replace))


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json as a dict, {name: tensor}) of a PEFT adapter folder. InputError (one line)
    for a missing folder or file, a pickle-only adapter or an unreadable file. Executes nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter folder {adapter_dir} not found")
    config_path, weights = adapter_dir / CONFIG, adapter_dir / WEIGHTS
    if not config_path.is_file():
        raise InputError(f"{adapter_dir} has no {CONFIG}: not a PEFT adapter folder")
    if not weights.is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is a pickle file and is not loaded; save the adapter with safe_serialization)" \
            if pickled else ""
        raise InputError(f"{adapter_dir} has no {WEIGHTS}{hint}")
    config = read_json_object(config_path)
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise InputError(f"cannot read {weights}: {exc}") from None
    return config, tensors


def official_module(path: str, base_keys) -> str:
    """A module or parameter path of the model an adapter was trained on (without `base_model.model.`)
    -> the official checkpoint name. Our native model's names are mapped; official names stay."""
    from octopus_rt.export.phi3v_checkpoint import official_key

    if path.startswith(("language_model.", "vision_embed_tokens.")):
        path = official_key(path, clip_flat=".img_processor.vision_model." not in path)
    if path not in base_keys and path in ALIASES:
        return ALIASES[path]
    return path


def _check_config(config: dict) -> tuple[int, float, bool, dict, dict]:
    kind = str(config.get("peft_type", "")).upper().removeprefix("PEFTTYPE.")
    if kind != "LORA":
        raise InputError(f"unsupported adapter type {config.get('peft_type')!r}: octopus-rt merge takes LoRA adapters")
    for name in _VARIANTS:
        if config.get(name):
            raise InputError(f"unsupported LoRA variant in {CONFIG}: {name}={config[name]!r} (plain LoRA only)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"{CONFIG} needs an integer r >= 1 and a number lora_alpha (got r={rank!r}, lora_alpha={alpha!r})")
    patterns = []
    for name in ("rank_pattern", "alpha_pattern"):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise InputError(f"{CONFIG}: {name} must be an object")
        patterns.append(value)
    return rank, float(alpha), bool(config.get("use_rslora")), patterns[0], patterns[1]


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def adapter_updates(config: dict, tensors: dict, base_shapes: dict) -> WeightUpdates:
    """Check a LoRA adapter (config dict, {name: tensor}) against the base checkpoint's tensors
    ({official key: shape}) and return its WeightUpdates. InputError (one line) for anything the
    module docstring lists as refused."""
    rank, alpha, rslora, rank_pattern, alpha_pattern = _check_config(config)
    if not tensors:
        raise InputError("the adapter holds no tensors")
    pairs: dict[str, dict] = {}
    updates = WeightUpdates()
    for name, tensor in tensors.items():
        path = name[len(PREFIX):] if name.startswith(PREFIX) else name
        match = _PAIR.match(path)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        if "lora_" in path or "magnitude_vector" in path or "trainable_tokens" in path:
            raise InputError(f"unsupported adapter tensor {name} (DoRA, embedding LoRA and LoRA biases are not supported)")
        # PEFT saves a targeted embedding / lm_head whole, under its wrapper's name `<module>.base_layer.weight`.
        key = official_module(path.replace(".base_layer.", "."), base_shapes)
        _check_shape(name, key, tuple(tensor.shape), base_shapes)
        updates.replace.setdefault(key, tensor)
    for module, factors in pairs.items():
        if set(factors) != {"A", "B"}:
            raise InputError(f"the adapter holds lora_{''.join(factors)} but not its partner for {module}")
        a, b = factors["A"], factors["B"]
        key = official_module(module, base_shapes) + ".weight"
        if a.ndim != 2 or b.ndim != 2:
            raise InputError(f"unsupported LoRA on {module}: factors of shape {tuple(a.shape)} / {tuple(b.shape)} "
                             "(only nn.Linear layers are merged)")
        _check_shape(f"{module} (lora_B @ lora_A)", key, (b.shape[0], a.shape[1]), base_shapes)
        r = int(_pattern_value(rank_pattern, module, rank))
        if a.shape[0] != r or b.shape[1] != r:
            raise InputError(f"{module}: LoRA factors of rank {a.shape[0]} / {b.shape[1]} but the config says r={r}")
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        updates.lora[key] = LoraUpdate(a, b, module_alpha / (math.sqrt(r) if rslora else r))
    return updates


def _check_shape(name: str, key: str, shape: tuple, base_shapes: dict) -> None:
    if key not in base_shapes:
        raise InputError(f"adapter tensor {name} names no tensor of the base checkpoint ({key}): "
                         "is the adapter for another model?")
    if tuple(base_shapes[key]) != tuple(shape):
        raise InputError(f"adapter tensor {name} has shape {tuple(shape)}, the base's {key} has "
                         f"{tuple(base_shapes[key])}: the adapter was trained on another model size")
