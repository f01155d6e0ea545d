"""PyTorch reference outputs that an exported LMM must reproduce.

Everything here runs on the PyTorch model BEFORE any onnxruntime session exists, and the result
holds only numpy arrays: the exporter then frees the model, so a large checkpoint is never held
twice (Phi-3-mini in fp32 is ~15 GB).

Three kinds of reference, all at shapes other than the ones used to trace the graphs:

- `VisionCase`: processor pixel values (batch 1 and 3; tracing uses 2) -> projected image features,
  from transformers' own `model.model.get_image_features` (not from the exported wrapper, so the
  vision graph is checked against the model's code: feature layer and CLS handling for LLaVA, the
  flattening order of the feature map for FastVLM).
- `DecoderCase`: random inputs_embeds / KV cache at several (batch, sequence, past, left padding)
  shapes -> last-position logits and presents, from `DecoderWrapper` (the exported module itself).
- `GenerationCase`: a real processor prompt (chat template, image, left padding, batch 2) run
  through `model.generate()` greedily for `steps` tokens with `output_logits=True` (raw logits;
  `output_scores` would give processed scores). `min_new_tokens=steps` keeps every row going for
  all steps; the ONNX loop applies the same rule (eos logits masked before the argmax).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from octopus_rt import vocab
from octopus_rt.export.llava_wrappers import DecoderWrapper, decoder_dims

__all__ = [
    "VisionCase",
    "DecoderCase",
    "GenerationCase",
    "LmmReference",
    "DECODER_SHAPES",
    "VISION_BATCHES",
    "QUESTIONS",
    "synthetic_images",
    "build_messages",
    "compute_reference",
    "transformers_image_features",
]

# (batch, new tokens S, past length P, left padding of row 1). Tracing uses (2, 5, 3, 0).
DECODER_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1, 1, 0, 0),
    (1, 9, 0, 0),
    (2, 6, 0, 2),
    (2, 1, 7, 3),
    (2, 3, 4, 2),
    (1, 1, 13, 0),
)
VISION_BATCHES: tuple[int, ...] = (1, 3)
# Questions of the generation reference and of the prompt check (a real task and a short one).
QUESTIONS: tuple[str, ...] = (vocab.SCORE_QUESTION, "Which region is most degraded?")


@dataclass
class VisionCase:
    pixel_values: np.ndarray  # float32 B x 3 x H x W
    features: np.ndarray  # float32 B x N x hidden


@dataclass
class DecoderCase:
    shape: tuple[int, int, int, int]  # (batch, seq, past, pad)
    inputs: list[np.ndarray]  # in decoder_input_names order
    outputs: list[np.ndarray]  # in decoder_output_names order


@dataclass
class GenerationCase:
    input_ids: np.ndarray  # int64 B x T (left padded)
    attention_mask: np.ndarray  # int64 B x T
    pixel_values: np.ndarray  # float32 B x 3 x H x W
    tokens: np.ndarray  # int64 B x steps, greedy tokens of generate()
    logits: np.ndarray  # float32 steps x B x V, raw logits of each step
    eos_token_ids: list[int]
    pad_token_id: int


@dataclass
class LmmReference:
    vision: list[VisionCase] = field(default_factory=list)
    decoder: list[DecoderCase] = field(default_factory=list)
    generation: GenerationCase | None = None


def synthetic_images(count: int, seed: int = 0):
    """`count` deterministic RGB PIL images of different sizes and aspect ratios (gradients + noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(80, 60), (50, 90), (64, 64), (120, 40)]
    images = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images


def build_messages(question: str, image=None) -> list[dict]:
    """One user turn in LLaVA's list form: the image, then the question text."""
    image_item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_item, {"type": "text", "text": question}]}]


def processor_inputs(processor, questions, images) -> dict[str, torch.Tensor]:
    """The processor's own tokenisation of chat-template prompts (left padded), as PyTorch tensors."""
    processor.tokenizer.padding_side = "left"
    conversations = [build_messages(q, image) for q, image in zip(questions, images)]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def _random_decoder_case(wrapper: DecoderWrapper, dims, shape, generator: torch.Generator) -> DecoderCase:
    batch, seq, past, pad = shape
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad and batch > 1:
        mask[1, :pad] = 0
    # Positions as generate() makes them: cumulative count of real tokens, padding at 0.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, past:]
    embeds = torch.randn(batch, seq, dims.hidden_size, generator=generator)
    # Scale like real token embeddings so the decoder sees typical magnitudes.
    embeds = embeds * float(wrapper.language_model.embed_tokens.weight.detach().std())
    kv_shape = (batch, dims.num_key_value_heads, past, dims.head_dim)
    pasts = [torch.randn(*kv_shape, generator=generator) for _ in range(2 * dims.num_layers)]
    inputs = [embeds, mask, positions, *pasts]
    with torch.no_grad():
        outputs = wrapper(*inputs)
    return DecoderCase(
        shape=shape,
        inputs=[t.detach().numpy().copy() for t in inputs],
        outputs=[t.detach().numpy().copy() for t in outputs],
    )


def transformers_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """float32 B x N x hidden: the model's own `get_image_features` (LlavaModel / FastVlmModel) with
    the config's feature layer and strategy, its per-image list stacked."""
    config = model.config
    output = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    return torch.stack(list(output.pooler_output))


def compute_reference(model, processor, *, steps: int = 32, seed: int = 0) -> LmmReference:
    """Reference outputs of `model` (a LlavaForConditionalGeneration or FastVlmForConditionalGeneration
    in eval mode, fp32, CPU).

    `processor` is the model's LlavaProcessor. Returns numpy-only data (see module docstring).
    """
    generator = torch.Generator().manual_seed(seed)
    reference = LmmReference()
    images = synthetic_images(max(VISION_BATCHES), seed=seed)
    for batch in VISION_BATCHES:
        pixels = processor.image_processor(images[:batch], return_tensors="pt")["pixel_values"].float()
        with torch.no_grad():
            features = transformers_image_features(model, pixels)
        reference.vision.append(VisionCase(pixels.numpy().copy(), features.numpy().copy()))

    wrapper = DecoderWrapper(model).eval()
    dims = decoder_dims(model.config.get_text_config())
    for shape in DECODER_SHAPES:
        reference.decoder.append(_random_decoder_case(wrapper, dims, shape, generator))

    inputs = processor_inputs(processor, QUESTIONS, synthetic_images(len(QUESTIONS), seed=seed + 1))
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad_id = config.pad_token_id if config.pad_token_id is not None else processor.tokenizer.pad_token_id
    config.update(
        do_sample=False,
        num_beams=1,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad_id,
    )
    with torch.no_grad():
        result = model.generate(**inputs, generation_config=config)
    prompt_length = inputs["input_ids"].shape[1]
    reference.generation = GenerationCase(
        input_ids=inputs["input_ids"].numpy().astype(np.int64),
        attention_mask=inputs["attention_mask"].numpy().astype(np.int64),
        pixel_values=inputs["pixel_values"].float().numpy(),
        tokens=result.sequences[:, prompt_length:].numpy().astype(np.int64),
        logits=torch.stack(list(result.logits)).float().numpy(),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad_id) if pad_id is not None else 0,
    )
    return reference
