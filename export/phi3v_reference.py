"""The PyTorch reference of a Phi-3(.5)-Vision bundle, written apart from the runtime on purpose.

The runtime (runtime/hd_transform.py, phi3v_prompt.py, phi3v_layout.py, image_stage.py,
generate.py) is what the parity tests and the exporter's verification check; this module computes
the same answers with independent code, following Microsoft's processing_phi3_v.py and the official
generate() (sources in docs/phi3v.md):

- `official_pixel_values`: the HD transform with the torchvision / torch calls of
  `Phi3VImageProcessor` (Pillow bilinear resize, torchvision pad with white, ToTensor + Normalize,
  torch bicubic global view);
- `official_prompt_ids`: the checkpoint's chat template through transformers' tokenizer, split at
  `<|image_k|>`, each chunk tokenised with special tokens, the tag replaced by -k repeated
  ((h/c)(w/c) + 1) m^2 + 1 + (h/c + 1) m times (`Phi3VProcessor._convert_images_texts_to_inputs`);
- `greedy`: the native model (export/phi3v_model.py: its own 2x2 merge, `sub_glb` layout and
  projection; transformers' Phi3 decoder, whose longrope picks the table per call) decoding
  greedily with a KV cache, dropping the cache and re-running the whole sequence when it first grows
  past original_max_position_embeddings (`prepare_inputs_for_generation`'s "enforce re-compute cache");
- `Phi3VReferencePipeline`: export/reference.ReferencePipeline's ask / score / choose / segment on
  top of these (closed set, image loading and SAM are that module's independent pieces).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from octopus_rt.errors import OctopusError
from octopus_rt.jsonfile import read_json_object
from octopus_rt.export.reference import ReferencePipeline

__all__ = [
    "official_pixel_values",
    "official_num_image_tokens",
    "official_prompt_ids",
    "official_stop_ids",
    "greedy",
    "Phi3VReferencePipeline",
]

_IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
END_TOKEN = "<|end|>"


def official_pixel_values(image, num_crops: int, crop: int = 336, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """processing_phi3_v.py's preprocess of one RGB image (PIL image or H x W x 3 uint8):
    pixel_values float32 (num_crops + 1) x 3 x crop x crop and the padded (height, width)."""
    import torchvision
    import torchvision.transforms.functional as F
    from PIL import Image

    mean = mean or (0.48145466, 0.4578275, 0.40821073)
    std = std or (0.26862954, 0.26130258, 0.27577711)
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    new_h = max(int(new_w / ratio), 1)  # the official code fails at 0 rows; docs/phi3v.md
    image = F.resize(image, [new_h, new_w])
    target = int(np.ceil(new_h / crop) * crop)
    top = int((target - new_h) / 2)
    image = F.pad(image, [0, top, 0, target - new_h - top], fill=[255, 255, 255])
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    steps = torchvision.transforms.Compose([torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(mean, std)])
    hd = steps(image)
    global_view = torch.nn.functional.interpolate(hd.unsqueeze(0).float(), size=(crop, crop), mode="bicubic")
    h, w = hd.shape[1:]
    crops = hd.reshape(1, 3, h // crop, crop, w // crop, crop).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, crop, crop)
    stacked = torch.cat([global_view, crops])
    padding = torch.zeros(max(num_crops + 1 - stacked.shape[0], 0), 3, crop, crop)
    return torch.cat([stacked, padding]), (int(h), int(w))


def official_num_image_tokens(image_size: tuple[int, int], crop: int = 336, tokens_per_side: int = 12) -> int:
    """Phi3VImageProcessor.calc_num_image_tokens_from_image_size for a padded (height, width)."""
    h, w = image_size[0] // crop, image_size[1] // crop
    return (h * w + 1) * tokens_per_side**2 + 1 + (h + 1) * tokens_per_side


def official_prompt_ids(tokenizer, question: str, num_img_tokens: int, answer_prefix: str = "") -> torch.Tensor:
    """1 x S int64 ids of one user turn "<|image_1|>\\n{question}" with the chat template, as
    Phi3VProcessor builds them (module docstring). `tokenizer`: transformers' tokenizer of the
    checkpoint (its chat template and tokenizer.json)."""
    messages = [{"role": "user", "content": f"<|image_1|>\n{question}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix
    chunks = [tokenizer(chunk).input_ids for chunk in _IMAGE_TAG.split(text)]
    tags = [int(tag[len("<|image_"):-len("|>")]) for tag in _IMAGE_TAG.findall(text)]
    ids = list(chunks[0])
    for tag, chunk in zip(tags, chunks[1:]):
        ids += [-tag] * num_img_tokens + list(chunk)
    return torch.tensor([ids], dtype=torch.long)


def official_stop_ids(model_dir: Path, tokenizer) -> list[int]:
    """config.json's eos_token_id, the `<|end|>` token, the tokenizer's eos token and
    generation_config.json's eos_token_id when the file exists."""
    found: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = read_json_object(path).get("eos_token_id")
            found += [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token in (END_TOKEN, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id:
            found.append(token_id)
    return sorted({int(t) for t in found})


def greedy(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes, steps: int, *,
           stop_ids: Sequence[int] = (), mask_stop: bool = False, forced: Sequence[int] | None = None,
           on_step: Callable[[], None] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of `model` (Phi3VForCausalLM) from a 1 x S prompt with image placeholders.

    Returns the tokens and the raw float32 logits (V,) of each step. Stops after a stop id unless
    `mask_stop` (then the stop ids' logits are -inf for the choice, as generate()'s min_new_tokens);
    `forced` feeds those tokens instead of the argmax (teacher forcing). on_step() runs after the
    prefill and after each step (timing). See the module docstring for the cache re-run."""
    from transformers import DynamicCache

    lm = model.language_model
    switch = getattr(model.config, "original_max_position_embeddings", None)
    switch = switch if getattr(model.config, "rope_parameters", {}).get("rope_type") == "longrope" else None
    sequence = input_ids.clone()
    tokens: list[int] = []
    logits_out: list[torch.Tensor] = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = lm(inputs_embeds=model.embed(sequence, pixel_values[None], [image_sizes]), past_key_values=cache, use_cache=True)
        for step in range(steps):
            if on_step is not None:
                on_step()
            logits = out.logits[0, -1].float()
            logits_out.append(logits)
            scores = logits.clone()
            if mask_stop and stop_ids:
                scores[list(stop_ids)] = -float("inf")
            token = int(forced[step]) if forced is not None else int(torch.argmax(scores))
            tokens.append(token)
            if (token in stop_ids and not mask_stop) or step == steps - 1:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            past = cache.get_seq_length()
            if switch is not None and past <= switch < sequence.shape[1]:
                cache = DynamicCache()
                embeds = model.embed(sequence, pixel_values[None], [image_sizes])
                out = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
            else:
                out = lm(input_ids=sequence[:, -1:], past_key_values=cache, use_cache=True)
    return tokens, logits_out


class Phi3VReferencePipeline(ReferencePipeline):
    """ReferencePipeline for a Phi-3(.5)-Vision bundle: the checkpoint at `lmm.source.model_dir`
    loaded natively (export/phi3v_checkpoint.load_phi3v, float32), num_crops from `lmm.hd` (or
    `num_crops`), tokens as in the module docstring. Timings: `vision` spans CLIP to projection."""

    def __init__(self, bundle_dir, *, num_crops: int | None = None, **options) -> None:
        self._num_crops = num_crops
        super().__init__(bundle_dir, **options)

    def _load_lmm(self, source: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        from octopus_rt.export.phi3v_checkpoint import load_phi3v

        if self.lmm.hd is None:
            raise OctopusError("the bundle's lmm section has no hd entry; it is not a Phi-3-Vision bundle")
        self.num_crops = int(self._num_crops or self.lmm.hd.num_crops)
        self.model = load_phi3v(source, num_crops=self.num_crops)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        self.stop_ids = official_stop_ids(source, self.tokenizer)
        vision = self.model.vision_embed_tokens
        self.hooks.watch(vision.img_processor, "vision_tower")
        self.hooks.watch(vision.img_projection, "projector")

    def phi3v_inputs(self, rgb: np.ndarray, question: str, answer_prefix: str = ""):
        """(input_ids 1 x S, pixel_values K x 3 x c x c, image size (h, w)) of one image and question."""
        spec = self.model.spec
        pixels, size = official_pixel_values(rgb, self.num_crops, spec.crop_size, spec.image_mean, spec.image_std)
        count = official_num_image_tokens(size, spec.crop_size, spec.tokens_per_side)
        return official_prompt_ids(self.tokenizer, question, count, answer_prefix), pixels, size

    def _generate(self, rgb, question, limit, clock, timings):
        tick = time.perf_counter()
        ids, pixels, size = self.phi3v_inputs(rgb, question)
        timings["preprocess"] = (time.perf_counter() - tick) * 1000.0
        clock.put(ids)
        return greedy(self.model, ids, pixels, size, limit, stop_ids=self.stop_ids, on_step=lambda: clock.put(None))

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _next_logits(self, rgb, question, answer_prefix):
        ids, pixels, size = self.phi3v_inputs(rgb, question, answer_prefix)
        with torch.inference_mode():
            return self.model(ids, pixels[None], [size]).logits[0, -1].float()
