"""The `lmm` section's content: what `export lmm` records about the model besides its graphs.

Each function reads the transformers processor / tokenizer / model and returns a typed piece of the
schema (octopus_rt/manifest_lmm.py); `lmm_section` assembles the pieces into the section that
`bundle.commit_section` writes. Graph entries (`vision`, `decoder`) come from the architecture's
module (export/llava_graphs.graph_specs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from octopus_rt import bundle, vocab
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.manifest_lmm import (
    DecoderGraph,
    EmbeddingTable,
    HDTransformSpec,
    LmmSection,
    LmmSource,
    PromptSpec,
    TokenizerSpec,
    VisionGraph,
    VisionPreprocessSpec,
)
from octopus_rt.verification import LmmVerification

__all__ = ["preprocess_spec", "prompt_spec", "check_prompt", "closed_set_ids", "eos_token_ids", "lmm_section"]

# The chat template is rendered around this text to split it into prefix / infix / suffix strings.
SENTINEL = "QUESTIONSENTINEL"
# Closed-set words are tokenized after this anchor, so each form gets its in-context ids.
ANCHOR = "\n"


def preprocess_spec(processor, model) -> VisionPreprocessSpec:
    """The image processor's recipe as the runtime's numpy preprocessing replays it."""
    from transformers.image_utils import PILImageResampling

    from octopus_rt.export.llava_graphs import vision_input_size

    image_processor = processor.image_processor
    cfg = image_processor.to_dict()
    backend = getattr(image_processor, "backend", None)
    if backend is None:
        backend = "torchvision" if "Torchvision" in "".join(c.__name__ for c in type(image_processor).__mro__) else "pil"

    def plain_size(value):
        if value is None:
            return None
        items = dict(value.items()) if hasattr(value, "items") else {"shortest_edge": int(value)}
        return {k: int(v) for k, v in items.items() if v is not None}

    resample = cfg.get("resample")
    try:
        resample_name = PILImageResampling(int(resample)).name.lower() if resample is not None else None
    except (TypeError, ValueError):
        resample_name = str(resample)
    do_crop = bool(cfg.get("do_center_crop", False))
    crop = plain_size(cfg.get("crop_size")) if do_crop else None
    size = plain_size(cfg.get("size"))
    height, width = vision_input_size(model, processor)
    return VisionPreprocessSpec(
        image_processor_type=type(image_processor).__name__,
        backend=str(backend),
        do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
        do_resize=bool(cfg.get("do_resize", True)),
        size=size,
        resample=resample_name,
        do_center_crop=do_crop,
        crop_size=crop,
        do_rescale=bool(cfg.get("do_rescale", True)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        do_normalize=bool(cfg.get("do_normalize", True)),
        image_mean=[float(v) for v in cfg.get("image_mean", (0.0, 0.0, 0.0))],
        image_std=[float(v) for v in cfg.get("image_std", (1.0, 1.0, 1.0))],
        input_height=int(height),
        input_width=int(width),
    )


def prompt_spec(processor, image_token_id: int, num_image_tokens: int) -> PromptSpec:
    """The chat template rendered once around a sentinel question and split into plain strings."""
    from octopus_rt.export.lmm_reference import build_messages

    if not getattr(processor, "chat_template", None):
        raise InputError("the model's processor has no chat template; save one with the processor (chat_template.jinja)")
    rendered = processor.apply_chat_template(build_messages(SENTINEL), add_generation_prompt=True, tokenize=False)
    image_token = processor.image_token
    if rendered.count(image_token) != 1 or rendered.count(SENTINEL) != 1:
        raise OctopusError(f"the chat template does not render one image token {image_token!r} and one question")
    prefix, rest = rendered.split(image_token)
    infix, suffix = rest.split(SENTINEL)
    bos = processor.tokenizer.bos_token
    # The processor's rule: no special tokens are added when the template already wrote the BOS text.
    add_special = not (bos is not None and rendered.startswith(bos))
    return PromptSpec(
        prefix=prefix,
        image_token=image_token,
        image_token_id=int(image_token_id),
        num_image_tokens=int(num_image_tokens),
        infix=infix,
        suffix=suffix,
        add_special_tokens=add_special,
    )


def check_prompt(prompt: PromptSpec, tokenizer_json: Path, processor) -> None:
    """The runtime's tokenisation of the pre-rendered strings must equal the processor's input_ids."""
    from tokenizers import Tokenizer

    from octopus_rt.export.lmm_reference import QUESTIONS, processor_inputs, synthetic_images

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    images = synthetic_images(1)
    for question in (*QUESTIONS, vocab.format_mcq_question("Is it blurry?", ["Yes", "No"])):
        expected = processor_inputs(processor, [question], images)["input_ids"][0].tolist()
        got = tokenizer.encode(prompt.render(question), add_special_tokens=prompt.add_special_tokens).ids
        if got != expected:
            raise OctopusError(
                f"pre-rendered prompt does not tokenize like the processor for {question!r} "
                f"({len(got)} vs {len(expected)} ids)"
            )


def closed_set_ids(tokenizer_json: Path, progress: Callable[[str], None]) -> tuple[dict, dict]:
    """({word: token ids}, {word: {form: ids}}) of the closed-set words (docs/bundle.md, `closed_set`)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    anchor = tokenizer.encode(ANCHOR, add_special_tokens=False).ids
    closed: dict[str, list[int]] = {}
    forms_out: dict[str, dict[str, list[int]]] = {}
    multi: list[str] = []
    for words in vocab.closed_set_words().values():
        for word in words:
            ids_by_form: dict[str, list[int]] = {}
            for form in vocab.word_forms(word):
                ids = tokenizer.encode(ANCHOR + form, add_special_tokens=False).ids
                # In-context ids (after a newline); a standalone encode would let sentencepiece-style
                # tokenizers prepend a space marker to the space-less form.
                ids = ids[len(anchor):] if ids[: len(anchor)] == anchor else tokenizer.encode(form, add_special_tokens=False).ids
                ids_by_form[form] = ids
            forms_out[word] = ids_by_form
            # A multi-token form's first sub-token ("l" of "left") is shared with unrelated words and
            # would add their probability mass to this word: use single-token forms, and fall back to
            # first sub-tokens only for a word that has no single-token form at all (docs/bundle.md).
            single = [ids[0] for ids in ids_by_form.values() if len(ids) == 1]
            if single:
                closed[word] = list(dict.fromkeys(single))
            else:
                closed[word] = list(dict.fromkeys(ids[0] for ids in ids_by_form.values() if ids))
                multi.append(word)
    if multi:
        progress(f"closed set: no single-token form for {', '.join(multi)}; using first sub-tokens")
    return closed, forms_out


def eos_token_ids(model, tokenizer) -> list[int]:
    """The stop tokens generate() uses: the generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def lmm_section(
    *,
    opset: int,
    ir_version: int,
    precision: str,
    source: LmmSource,
    vision: VisionGraph,
    embedding: EmbeddingTable,
    decoder: DecoderGraph,
    tokenizer: TokenizerSpec,
    preprocess: VisionPreprocessSpec,
    prompt: PromptSpec,
    closed_set: dict[str, list[int]],
    closed_set_forms: dict[str, dict[str, list[int]]],
    verification: LmmVerification | None,
    architecture: str = "llava",
    hd: HDTransformSpec | None = None,
) -> LmmSection:
    """The section (without `dir` / `files` / `written`, which the commit adds); the vocabulary-side
    fields (whole-image phrases, score prompt) come from octopus_rt.vocab."""
    return LmmSection(
        architecture=architecture,
        hd=hd,
        versions=bundle.package_versions(
            "octopus-rt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers"
        ),
        opset=opset,
        ir_version=ir_version,
        precision=precision,
        source=source,
        vision=vision,
        embedding=embedding,
        decoder=decoder,
        tokenizer=tokenizer,
        preprocess=preprocess,
        prompt=prompt,
        closed_set=closed_set,
        closed_set_forms=closed_set_forms,
        whole_image_phrases=list(vocab.WHOLE_IMAGE_PHRASES),
        verification=verification,
    )
