"""Numpy preprocessing vs the transformers image processor of tiny CLIP / SigLIP LLaVA models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from octopus_rt.runtime.preprocess import VisionPreprocess  # noqa: E402



def _manifest_section(processor) -> dict:
    """The `lmm.preprocess` fields of docs/bundle.md, from an image processor (what the exporter writes)."""
    ip = processor.image_processor
    cfg = ip.to_dict()
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}[int(cfg["resample"])]
    size = dict(cfg["size"])
    crop = dict(cfg["crop_size"]) if cfg.get("do_center_crop") else None
    out_h, out_w = (crop["height"], crop["width"]) if crop else (size.get("height"), size.get("width"))
    return {
        "image_processor_type": cfg["image_processor_type"],
        "backend": "torchvision",
        "do_convert_rgb": cfg.get("do_convert_rgb", True),
        "do_resize": cfg["do_resize"],
        "size": size,
        "resample": resample,
        "do_center_crop": bool(cfg.get("do_center_crop", False)),
        "crop_size": crop,
        "do_rescale": cfg["do_rescale"],
        "rescale_factor": cfg["rescale_factor"],
        "do_normalize": cfg["do_normalize"],
        "image_mean": list(cfg["image_mean"]),
        "image_std": list(cfg["image_std"]),
        "input_height": out_h,
        "input_width": out_w,
    }


@pytest.fixture(scope="module", params=["clip", "siglip"])
def model_dir(request, tmp_path_factory):
    from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    build_llava(out, TinyLlavaSpec(vision_model=request.param))
    return out


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _smooth_image(rng, h, w):
    """A photo-like image (smooth gradients + texture) rather than pure noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hw", [(48, 80), (100, 60), (64, 64), (37, 201), (300, 280)])
def test_matches_transformers_processor(processor, hw):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    rgb = _smooth_image(rng, *hw)
    expected = processor.image_processor(images=rgb, return_tensors="np")["pixel_values"]
    ours = VisionPreprocess.from_manifest(_manifest_section(processor))(rgb)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    diff = np.abs(ours - expected)
    # The torchvision backend's antialiased uint8 resize is a fixed-point port of Pillow's: they agree
    # to within two grey levels (rare; fixed-point rounding of the intermediate pass), in normalised
    # units of the smallest std ...
    two_levels = 2.0 / 255.0 / min(processor.image_processor.image_std)
    assert diff.max() <= two_levels + 1e-5
    # ... and almost every value is identical up to float rounding.
    assert (diff > 1e-5).mean() < 0.02


def test_pil_backend_of_the_processor_too(model_dir, processor):
    """The PIL backend (`backend: "pil"` in a manifest) is Pillow itself: same recipe, same result."""
    from transformers import AutoImageProcessor

    pil_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    assert "Pil" in type(pil_processor).__name__
    rgb = _smooth_image(np.random.default_rng(3), 90, 70)
    expected = pil_processor(images=rgb, return_tensors="np")["pixel_values"]
    section = {**_manifest_section(processor), "backend": "pil"}
    ours = VisionPreprocess.from_manifest(section)(rgb)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_exported_manifest_drives_the_same_preprocessing(tiny_llava_dir, tiny_lmm_bundle):
    """The contract end to end: the `lmm.preprocess` section the exporter writes reproduces the processor."""
    import json

    from transformers import AutoProcessor

    manifest = json.loads((tiny_lmm_bundle("phi3_clip") / "manifest.json").read_text())
    processor = AutoProcessor.from_pretrained(tiny_llava_dir("phi3_clip"))
    rgb = _smooth_image(np.random.default_rng(11), 77, 131)
    expected = processor.image_processor(images=rgb, return_tensors="np")["pixel_values"]
    ours = VisionPreprocess.from_manifest(manifest["lmm"]["preprocess"])(rgb)
    diff = np.abs(ours - expected)
    assert diff.max() <= 2.0 / 255.0 / min(processor.image_processor.image_std) + 1e-5
    assert (diff > 1e-5).mean() < 0.02
