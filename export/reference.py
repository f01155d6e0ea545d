"""The PyTorch reference pipeline: what the runtime must reproduce, and what it is benchmarked against.

On the export / benchmark side only (needs torch, transformers and segment-anything). It loads the
model directory and SAM checkpoint recorded in a bundle's manifest (`lmm.source.model_dir`,
`sam.source`) and answers like `Octopus.ask`:

- the prompt is the processor's own chat template (one user turn: the image, then the question),
  tokenised by the processor; the image goes through the processor's image processor;
- `model.generate(do_sample=False, use_cache=True, output_logits=True)` gives the tokens and the raw
  logits of every step; the closed-set math (first mention per axis, logsumexp over token forms,
  softmax at temperature tau, eq. 4 / quadrant) is its own torch implementation
  (export/reference_closed_set.py), and so is image loading (export/reference_images.py): the
  parity tests compare two implementations, not one with itself;
- `segment_anything.SamPredictor` with one positive point and `multimask_output`, keeping the
  best predicted IoU (as the runtime does).

Stage timings (milliseconds) come from forward hooks on the vision tower / projector, the SAM image
encoder / mask decoder, and a streamer that timestamps every generated token, so the benchmark can
compare the same stages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octopus_rt import vocab
from octopus_rt.bundle import read_manifest
from octopus_rt.errors import OctopusError
from octopus_rt.export import reference_closed_set as closed_set
from octopus_rt.export.reference_images import reference_rgb
from octopus_rt.manifest import SamSection, parse_manifest
from octopus_rt.runtime.images import DEFAULT_MAX_PIXELS, ImageInput
from octopus_rt.runtime.results import Answer, ChoiceResult, ScoreResult

__all__ = ["ReferencePipeline", "reference_pipeline"]


class _TokenClock:
    """A generate() streamer: put() is called with the prompt, then with each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class _Hooks:
    """Forward (pre-)hooks that record start / end times of sub-modules."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self._handles: list[Any] = []

    def watch(self, module: torch.nn.Module, name: str) -> None:
        def before(*_: Any) -> None:
            self.marks.setdefault(f"{name}.start", time.perf_counter())

        def after(*_: Any) -> None:
            self.marks[f"{name}.end"] = time.perf_counter()

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def span_ms(self, first: str, last: str | None = None) -> float | None:
        last = last or first
        if f"{first}.start" not in self.marks or f"{last}.end" not in self.marks:
            return None
        return (self.marks[f"{last}.end"] - self.marks[f"{first}.start"]) * 1000.0

    def reset(self) -> None:
        self.marks.clear()


class ReferencePipeline:
    """Reference of a bundle, from the sources its manifest records (or explicit overrides).

    threads: torch intra-op threads (None: leave torch's setting). The model runs in float32 on CPU.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        *,
        model_dir: str | os.PathLike[str] | None = None,
        sam_checkpoint: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.manifest = parse_manifest(read_manifest(bundle_dir))
        lmm = self.manifest.lmm
        if lmm is None:
            raise OctopusError(f"bundle {bundle_dir} has no lmm section")
        source = Path(model_dir or (lmm.source.model_dir if lmm.source else ""))
        if not source.is_dir():
            raise OctopusError(f"reference model directory not found: {source}")
        self.lmm = lmm
        self.defaults = self.manifest.defaults
        self.max_pixels = max_pixels
        self.closed_set = {w: list(ids) for w, ids in lmm.closed_set.items()}
        self.hooks = _Hooks()
        self._load_lmm(source)
        self.predictor = None
        if self.manifest.sam is not None:
            self._load_sam(self.manifest.sam, sam_checkpoint)

    def _load_sam(self, section: SamSection, checkpoint: str | os.PathLike[str] | None) -> None:
        from segment_anything import SamPredictor

        from octopus_rt.export.sam_models import SamConfig, load_sam

        source = section.source
        config = SamConfig.from_dict(source.config) if source.model_type == "custom" else None
        sam, _ = load_sam(checkpoint or source.checkpoint, source.model_type, config)
        self.hooks.watch(sam.image_encoder, "sam_encoder")
        self.hooks.watch(sam.mask_decoder, "sam_decoder")
        self.predictor = SamPredictor(sam)

    def _load_lmm(self, source: Path) -> None:
        """The PyTorch model and processor (LLaVA or FastVLM here, by config.json's model_type;
        export/phi3v_reference.py overrides this)."""
        from transformers import AutoProcessor

        from octopus_rt.export.llava_graphs import check_model_dir, model_class

        model_type = check_model_dir(source)["model_type"]
        self.model = model_class(model_type).from_pretrained(source, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(source)
        inner = self.model.model
        self.hooks.watch(inner.vision_tower, "vision_tower")
        self.hooks.watch(inner.multi_modal_projector, "projector")

    # ------------------------------------------------------------------------------------------
    def inputs(self, rgb: np.ndarray, question: str, answer_prefix: str = "") -> dict[str, torch.Tensor]:
        """The processor's tokens and pixels for one image and question (+ assistant answer prefix)."""
        from PIL import Image

        from octopus_rt.export.lmm_reference import build_messages

        text = self.processor.apply_chat_template(build_messages(question), add_generation_prompt=True, tokenize=False)
        text += answer_prefix
        bos = self.processor.tokenizer.bos_token
        # The processor's rule: no special tokens are added when the template already wrote BOS.
        add_special = not (bos is not None and text.startswith(bos))
        return self.processor(
            images=[Image.fromarray(rgb)], text=[text], return_tensors="pt", add_special_tokens=add_special
        )

    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        max_new_tokens: int | None = None,
        tau: float | None = None,
        point_mapping: str | None = None,
        multimask: bool | None = None,
        segment: bool = True,
    ) -> Answer:
        """Same contract as `Octopus.ask` (see runtime/api.py), computed with PyTorch."""
        tau = float(self.defaults.tau if tau is None else tau)
        mapping = point_mapping or self.defaults.point_mapping
        limit = int(self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens)
        multimask = bool(self.defaults.multimask if multimask is None else multimask)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        rgb = reference_rgb(image, self.max_pixels)
        timings["decode_image"] = (time.perf_counter() - start) * 1000.0
        clock = _TokenClock()
        self.hooks.reset()
        tokens, logits = self._generate(rgb, question, limit, clock, timings)
        vision = self.hooks.span_ms("vision_tower", "projector")
        if vision is not None:
            timings["vision"] = vision
        if len(clock.times) >= 2:
            first = (clock.times[1] - self.hooks.marks.get("projector.end", clock.times[0])) * 1000.0
            timings["prefill"] = first
            steps = np.diff(clock.times[1:]) * 1000.0
            timings["decode"] = float(np.sum(steps))
            if len(steps):
                timings["decode_per_token"] = float(np.median(steps))
            self.step_ms = list(steps)
        text = self._decode(tokens)
        probs = closed_set.axis_probabilities(logits, tokens, self.closed_set, tau)
        height, width = rgb.shape[:2]
        point = closed_set.point_for(probs, width, height, mapping)
        whole = vocab.says_whole_image(text, self.lmm.whole_image_phrases or vocab.WHOLE_IMAGE_PHRASES)
        mask, mask_iou = None, None
        if whole:
            mask, mask_iou = np.ones((height, width), dtype=bool), 1.0
        elif segment and point is not None and self.predictor is not None:
            mask, mask_iou = self.segment(rgb, point, multimask, timings)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return Answer(text, tokens, point, probs or None, whole, mask, mask_iou, (width, height), timings)

    def _generate(self, rgb: np.ndarray, question: str, limit: int, clock: _TokenClock,
                  timings: dict[str, float]) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy tokens and the raw logits (V,) of each step; `clock.put` is called with the prompt
        and then with each token; the preprocessing time goes to timings["preprocess"]."""
        tick = time.perf_counter()
        inputs = self.inputs(rgb, question)
        timings["preprocess"] = (time.perf_counter() - tick) * 1000.0
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=limit,
                do_sample=False,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
                streamer=clock,
            )
        prompt_len = inputs["input_ids"].shape[1]
        return [int(t) for t in out.sequences[0, prompt_len:]], [step[0].float() for step in out.logits]

    def _decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def _next_logits(self, rgb: np.ndarray, question: str, answer_prefix: str) -> torch.Tensor:
        """Raw logits (V,) of the token after the prompt (+ answer prefix)."""
        with torch.inference_mode():
            return self.model(**self.inputs(rgb, question, answer_prefix)).logits[0, -1].float()

    def segment(
        self, rgb: np.ndarray, point: tuple[float, float], multimask: bool, timings: dict[str, float] | None = None
    ) -> tuple[np.ndarray, float]:
        """SamPredictor with one positive point; the best-IoU multimask output (or the single mask)."""
        timings = {} if timings is None else timings
        if self.predictor is None:
            raise OctopusError("the bundle records no SAM source")
        self.hooks.reset()
        tick = time.perf_counter()
        with torch.inference_mode():
            self.predictor.set_image(rgb)
        encoder = self.hooks.span_ms("sam_encoder") or 0.0
        timings["sam_encoder"] = encoder
        timings["sam_preprocess"] = (time.perf_counter() - tick) * 1000.0 - encoder
        tick = time.perf_counter()
        with torch.inference_mode():
            masks, scores, _ = self.predictor.predict(
                point_coords=np.asarray([point], dtype=np.float32),
                point_labels=np.asarray([1]),
                multimask_output=multimask,
            )
        decoder = self.hooks.span_ms("sam_decoder") or 0.0
        timings["sam_decoder"] = decoder
        timings["postprocess"] = (time.perf_counter() - tick) * 1000.0 - decoder
        best = int(np.argmax(scores)) if multimask else 0
        return masks[best].astype(bool), float(scores[best])

    def next_token_probs(self, image: ImageInput, question: str, answer_prefix: str, words: Sequence[str]) -> dict[str, float]:
        logits = self._next_logits(reference_rgb(image, self.max_pixels), question, answer_prefix)
        probs = closed_set.word_probabilities(logits, [self.closed_set[w] for w in words], 1.0)
        return {w: float(p) for w, p in zip(words, probs)}

    def score(self, image: ImageInput) -> ScoreResult:
        prompt = self.lmm.score_prompt
        probs = self.next_token_probs(image, prompt.question, prompt.answer_prefix, vocab.LEVEL_WORDS)
        return ScoreResult(closed_set.weighted_score([probs[w] for w in vocab.LEVEL_WORDS], vocab.LEVEL_WEIGHTS), probs)

    def choose(self, image: ImageInput, question: str, options: Sequence[str]) -> ChoiceResult:
        letters = vocab.OPTION_LETTERS[: len(options)]
        probs = self.next_token_probs(image, vocab.format_mcq_question(question, list(options)), "", letters)
        index = int(np.argmax([probs[letter] for letter in letters]))
        return ChoiceResult(letters[index], index, list(options)[index], probs)


def reference_pipeline(bundle_dir: str | os.PathLike[str], **options: Any) -> ReferencePipeline:
    """The reference of a bundle's architecture (`lmm.architecture`): LLaVA here, Phi-3(.5)-Vision in
    export/phi3v_reference.py. Options as ReferencePipeline's."""
    manifest = parse_manifest(read_manifest(bundle_dir))
    if manifest.lmm is not None and manifest.lmm.architecture == "phi3v":
        from octopus_rt.export.phi3v_reference import Phi3VReferencePipeline

        return Phi3VReferencePipeline(bundle_dir, **options)
    return ReferencePipeline(bundle_dir, **options)
