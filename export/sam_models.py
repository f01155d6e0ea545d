"""Build Segment Anything models with segment-anything's own classes, and load checkpoints safely.

Official models (vit_b / vit_l / vit_h) come from `segment_anything.sam_model_registry`; `custom`
models are built from a small JSON config (`SamConfig`) with the same classes, so tests, the demo's
trained segmenter and official checkpoints all export through one path. Checkpoints are plain
`state_dict` files (`torch.save(model.state_dict())`), as the official `.pth` files are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from octopus_rt.errors import InputError

__all__ = [
    "MODEL_TYPES",
    "OFFICIAL_CONFIGS",
    "SamConfig",
    "load_sam_config",
    "build_sam",
    "save_custom_checkpoint",
    "load_sam",
]

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "custom")


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model; defaults are the official vit_b except where noted.

    image_size: side S of the square encoder input (1024 official); embedding grid is S / patch_size.
    Low-res masks are 4 * (S / patch_size) square (256 official). pixel_mean/std in 0-255 units.
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `SamConfig.from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamConfig":
        """Validate and build; raises InputError naming the bad key."""
        if not isinstance(values, dict):
            raise InputError(f"SAM config must be a JSON object, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"unknown SAM config key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            default = known[name].default
            try:
                if isinstance(default, tuple):
                    if not isinstance(value, (list, tuple)):
                        raise TypeError
                    kind = float if name.startswith("pixel_") else int
                    kwargs[name] = tuple(kind(v) for v in value)
                elif isinstance(default, bool) or isinstance(value, bool):
                    raise TypeError
                elif isinstance(default, int):
                    if not isinstance(value, int):
                        raise TypeError
                    kwargs[name] = value
                else:
                    kwargs[name] = float(value)
            except (TypeError, ValueError):
                raise InputError(f"SAM config key {name!r} has a bad value {value!r}") from None
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise InputError when the sizes cannot build a working model."""
        problems = []
        positive = ["image_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                    "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim",
                    "decoder_num_heads", "iou_head_depth", "iou_head_hidden_dim", "num_multimask_outputs"]
        problems += [f"{k} must be > 0" for k in positive if getattr(self, k) <= 0]
        if self.window_size < 0:
            problems.append("window_size must be >= 0 (0 = global attention everywhere)")
        if self.image_size % self.patch_size:
            problems.append("image_size must be a multiple of patch_size")
        if self.encoder_embed_dim % max(self.encoder_num_heads, 1):
            problems.append("encoder_embed_dim must be a multiple of encoder_num_heads")
        if self.prompt_embed_dim % max(self.decoder_num_heads, 1) or self.prompt_embed_dim % 8:
            problems.append("prompt_embed_dim must be a multiple of decoder_num_heads and of 8")
        if (self.prompt_embed_dim // 2) % 2:
            problems.append("prompt_embed_dim must be a multiple of 4")
        if self.mask_in_chans % 4:
            problems.append("mask_in_chans must be a multiple of 4")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            problems.append("encoder_global_attn_indexes must lie in [0, encoder_depth)")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            problems.append("pixel_mean and pixel_std need 3 values, std > 0")
        if problems:
            raise InputError("bad SAM config: " + "; ".join(problems))


OFFICIAL_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                       encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                       encoder_global_attn_indexes=(7, 15, 23, 31)),
}


def load_sam_config(source: str | os.PathLike[str] | dict[str, Any]) -> SamConfig:
    """SamConfig from a dict, an inline JSON object string, or a JSON file path."""
    if isinstance(source, dict):
        return SamConfig.from_dict(source)
    text = str(source)
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise InputError(f"SAM config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read SAM config {path}: {exc}") from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"SAM config is not valid JSON: {exc}") from exc
    return SamConfig.from_dict(values)


def build_sam(config: SamConfig, seed: int | None = None) -> Any:
    """A `segment_anything.modeling.Sam` (eval mode, fp32, CPU) with this architecture.

    With `seed`, weights are seeded random, and the positional parameters that SAM initialises to
    zero (absolute and relative position embeddings) get small random values too, so that exports
    and parity tests exercise them. Without a seed, segment-anything's own initialisation is used.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    config.validate()
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=config.encoder_depth,
                embed_dim=config.encoder_embed_dim,
                img_size=config.image_size,
                mlp_ratio=config.mlp_ratio,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=config.encoder_num_heads,
                patch_size=config.patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=tuple(config.encoder_global_attn_indexes),
                window_size=config.window_size,
                out_chans=config.prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=config.prompt_embed_dim,
                image_embedding_size=(config.embedding_size, config.embedding_size),
                input_image_size=(config.image_size, config.image_size),
                mask_in_chans=config.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=config.num_multimask_outputs,
                transformer=TwoWayTransformer(
                    depth=config.decoder_depth,
                    embedding_dim=config.prompt_embed_dim,
                    mlp_dim=config.decoder_mlp_dim,
                    num_heads=config.decoder_num_heads,
                ),
                transformer_dim=config.prompt_embed_dim,
                iou_head_depth=config.iou_head_depth,
                iou_head_hidden_dim=config.iou_head_hidden_dim,
            ),
            pixel_mean=list(config.pixel_mean),
            pixel_std=list(config.pixel_std),
        )
        if seed is not None:
            with torch.no_grad():
                for name, param in sam.image_encoder.named_parameters():
                    if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                        param.normal_(0.0, 0.02)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return sam.eval()


def save_custom_checkpoint(
    sam: Any,
    config: SamConfig,
    checkpoint_path: str | os.PathLike[str],
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Write `sam`'s state_dict (official .pth layout) and its config JSON.

    config_path defaults to the checkpoint path with suffix ".json", which `export sam --model-type
    custom` finds on its own when --sam-config is not given. Returns (checkpoint_path, config_path).
    """
    checkpoint_path = Path(checkpoint_path)
    config_path = Path(config_path) if config_path is not None else checkpoint_path.with_suffix(".json")
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in sam.state_dict().items()}, checkpoint_path)
    config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return checkpoint_path, config_path


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if not checkpoint.exists():
        raise InputError(f"SAM checkpoint not found: {checkpoint}")
    if not checkpoint.is_file():
        raise InputError(f"SAM checkpoint must be a file: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        text = str(exc).strip()
        # torch's messages run to several sentences of advice; the first one names the problem.
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise InputError(f"cannot read SAM checkpoint {checkpoint} (corrupt or truncated?): {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints often nest it
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{checkpoint} is not a SAM state_dict (expected a dict of tensors)")
    return state


def _guess_model_type(state: dict[str, torch.Tensor]) -> str | None:
    """The official type whose encoder width and depth the checkpoint has; None when none fits."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    for name, config in OFFICIAL_CONFIGS.items():
        if patch.shape[0] == config.encoder_embed_dim and len(blocks) == config.encoder_depth:
            return name
    return None


def load_sam(
    checkpoint: str | os.PathLike[str],
    model_type: str,
    config: SamConfig | None = None,
) -> tuple[Any, SamConfig]:
    """Build the model for `model_type` and load `checkpoint` strictly. Returns (sam, config).

    Official types use `segment_anything.sam_model_registry`; `custom` needs `config`. A checkpoint
    of another architecture raises InputError naming the type it looks like.
    """
    if model_type not in MODEL_TYPES:
        raise InputError(f"unknown --model-type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    checkpoint = Path(checkpoint)
    if model_type == "custom":
        if config is None:
            raise InputError("--model-type custom needs --sam-config (a JSON file or object)")
    elif config is not None:
        raise InputError(f"--sam-config is only used with --model-type custom, not {model_type}")
    state = _read_state_dict(checkpoint)
    guess = _guess_model_type(state)
    if model_type != "custom" and guess != model_type and "image_encoder.patch_embed.proj.weight" in state:
        # Fail before building (and randomly initialising) a large model of the wrong type.
        hint = f"it looks like --model-type {guess}" if guess else (
            "it matches no official type; use --model-type custom with its --sam-config")
        raise InputError(f"checkpoint {checkpoint} does not fit --model-type {model_type}: {hint}")
    if model_type == "custom":
        sam = build_sam(config)
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model_type](checkpoint=None)
        config = OFFICIAL_CONFIGS[model_type]
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        if missing and not any(k.startswith("image_encoder.") for k in state):
            hint = "it holds no SAM image encoder weights"
        elif guess is not None and guess != model_type:
            hint = f"it looks like --model-type {guess}"
        elif guess is None and model_type != "custom":
            hint = "it matches no official type; use --model-type custom with its --sam-config"
        else:
            first = (mismatched or missing or unexpected)[0]
            got = tuple(state[first].shape) if first in state else "absent"
            want = tuple(expected[first].shape) if first in expected else "absent"
            hint = f"first difference: {first} is {got}, the model expects {want}"
        raise InputError(f"checkpoint {checkpoint} does not fit --model-type {model_type}: {hint}")
    sam.load_state_dict(state, strict=True)
    return sam.eval(), config
