"""Per-architecture image stage: question + image -> prompt ids and the image-token embeddings.

Everything that differs between the bundle architectures (manifest `lmm.architecture`) before the
decoder lives here, so `Octopus` (runtime/api.py) runs one pipeline for all of them:

    prompt = stage.prompt(tokenizer, question, answer_prefix, image_size)
    tokens = stage.image_tokens(rgb, timer)          # T x hidden, T = len(prompt.image_positions)
    embeds = embed_table[prompt.lookup_ids]; embeds[prompt.image_positions] = tokens

- `LlavaImageStage`: one resize / crop / normalise (runtime/preprocess.py), the vision graph on one
  1 x 3 x H x W image, a fixed number of image tokens (`lmm.prompt.num_image_tokens`) rendered as the
  image token id by the pre-rendered chat template.
- `Phi3VImageStage`: Phi-3(.5)-Vision. The HD transform (runtime/hd_transform.py) gives the global
  view and rows x cols crops; only those 1 + rows * cols crops run through the vision graph (no zero
  padding crops); the `sub_glb` layout is a numpy gather with the projected separators
  (runtime/phi3v_layout.py). The prompt follows Phi3VProcessor (runtime/phi3v_prompt.py): the text
  chunks around the image tag are tokenised separately with special tokens and the tag becomes
  image_token_id (-1) repeated for the image's own token count, which depends on its aspect ratio.

`stage.key` identifies the recipe of the image tokens (architecture and, for Phi-3-V, num_crops):
the per-image cache (runtime/cache.py) stores features and prefix KV states under it, so a changed
recipe never reuses another's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.manifest_lmm import HDTransformSpec, LmmSection, PromptSpec, VisionGraph, VisionPreprocessSpec
from octopus_rt.runtime.prompt import PromptIds, locate_image_tokens, template_prompt_ids

__all__ = ["ImageStage", "LlavaImageStage", "Phi3VImageStage", "image_stage_for"]


class ImageStage(Protocol):
    key: tuple

    def prompt(self, tokenizer: Any, question: str, answer_prefix: str, image_size: tuple[int, int]) -> PromptIds: ...

    def image_tokens(self, rgb: np.ndarray, timer: Any) -> np.ndarray: ...


class LlavaImageStage:
    """LLaVA-style models: one preprocessed image, a fixed number of image tokens."""

    def __init__(self, lmm: LmmSection, vision_graph: Callable[[], Any]) -> None:
        from octopus_rt.runtime.preprocess import VisionPreprocess

        self.lmm = lmm
        self.preprocess = VisionPreprocess.from_manifest(lmm.preprocess)
        self._vision_graph = vision_graph
        self.key = ("llava",)

    def prompt(self, tokenizer, question: str, answer_prefix: str, image_size: tuple[int, int]) -> PromptIds:
        return template_prompt_ids(tokenizer, self.lmm.prompt, question, answer_prefix)

    def image_tokens(self, rgb: np.ndarray, timer) -> np.ndarray:
        """N x hidden projected image features of one H x W x 3 uint8 RGB image."""
        with timer.stage("preprocess"):
            pixels = self.preprocess(rgb)
        vision = self.lmm.vision
        graph = self._vision_graph()
        with timer.stage("vision"):
            features = graph.run_numpy({vision.input_names[0]: pixels}, vision.output_names[:1])[0]
        return features[0]


class Phi3VImageStage:
    """Phi-3(.5)-Vision: HD crops, per-crop vision graph, numpy layout, chunked prompt (module doc).

    num_crops: the HD transform's crop budget (default: the bundle's `lmm.hd.num_crops`); the vision
    graph takes any number of crops, so it may differ from the exported value."""

    def __init__(self, prompt: PromptSpec, hd: HDTransformSpec, preprocess: VisionPreprocessSpec,
                 vision: VisionGraph | None, vision_graph: Callable[[], Any], file_of: Callable[[str], Path],
                 num_crops: int | None = None) -> None:
        from octopus_rt.runtime.hd_transform import HDTransform

        if not prompt.tokenize_chunks:
            raise OctopusError("bundle manifest: a phi3v prompt must have lmm.prompt.tokenize_chunks (Phi3VProcessor's rule)")
        num_crops = hd.num_crops if num_crops is None else int(num_crops)
        if num_crops < 1:
            raise InputError(f"num_crops must be >= 1, got {num_crops}")
        self.prompt_spec, self.hd, self.preprocess, self.vision = prompt, hd, preprocess, vision
        self.transform = HDTransform(
            num_crops=num_crops, crop=hd.crop_size, tokens_per_side=hd.tokens_per_side,
            image_mean=tuple(preprocess.image_mean), image_std=tuple(preprocess.image_std),
        )
        self._vision_graph = vision_graph
        self._file_of = file_of
        self._separators: np.ndarray | None = None
        self.key = ("phi3v", num_crops, hd.crop_size, hd.tokens_per_side)

    @property
    def num_crops(self) -> int:
        return self.transform.num_crops

    def with_num_crops(self, num_crops: int) -> Phi3VImageStage:
        """The same stage at another crop budget (its own cache key; graphs and separators shared)."""
        other = Phi3VImageStage(self.prompt_spec, self.hd, self.preprocess, self.vision, self._vision_graph,
                                self._file_of, num_crops)
        other._separators = self._separators
        return other

    @property
    def separators(self) -> np.ndarray:
        """2 x hidden projected (sub_GN, glb_GN), read once."""
        if self._separators is None:
            table = np.load(self._file_of(self.hd.separators.file), allow_pickle=False)
            if table.ndim != 2 or table.shape[0] != 2:
                raise OctopusError(f"separators file holds shape {table.shape}, expected 2 x hidden")
            self._separators = table
        return self._separators

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Image tokens of an image of (width, height) pixels at this stage's num_crops."""
        from octopus_rt.runtime.hd_transform import hd_image_size, num_image_tokens

        width, height = image_size
        hd_size = hd_image_size(width, height, self.transform.num_crops, self.transform.crop)
        return num_image_tokens(hd_size, self.transform.crop, self.transform.tokens_per_side)

    def prompt(self, tokenizer, question: str, answer_prefix: str, image_size: tuple[int, int]) -> PromptIds:
        from octopus_rt.runtime.phi3v_prompt import IMAGE_TAG, phi3v_prompt_ids

        p = self.prompt_spec
        if IMAGE_TAG.search(question) or IMAGE_TAG.search(answer_prefix):
            raise InputError("the question must not contain image tags such as <|image_1|>")
        count = self.num_image_tokens(image_size)
        built = phi3v_prompt_ids(tokenizer, p.render(question) + answer_prefix, [count], p.add_special_tokens)
        return locate_image_tokens(built.input_ids, p.image_token_id, count)

    def image_tokens(self, rgb: np.ndarray, timer) -> np.ndarray:
        """T x hidden image-token embeddings of one H x W x 3 uint8 RGB image (T from its crop grid).

        Adds `vision_per_crop` (ms per crop the vision graph ran on) to the timer's stage times."""
        from octopus_rt.runtime.phi3v_layout import assemble_image_tokens

        with timer.stage("preprocess"):
            hd = self.transform(rgb)
        vision = self.vision
        graph = self._vision_graph()
        crops = hd.pixel_values[: hd.num_used_crops]
        before = timer.ms.get("vision", 0.0)
        with timer.stage("vision"):
            features = graph.run_numpy({vision.input_names[0]: crops}, vision.output_names[:1])[0]
        timer.ms["vision_per_crop"] = (timer.ms["vision"] - before) / len(crops)
        with timer.stage("layout"):
            tokens = assemble_image_tokens(features, self.separators, hd.crop_grid)
        if tokens.shape[0] != hd.num_img_tokens:
            raise OctopusError(f"layout gave {tokens.shape[0]} image tokens, the HD transform expects {hd.num_img_tokens}")
        return tokens


def image_stage_for(lmm: LmmSection, vision_graph: Callable[[], Any], file_of: Callable[[str], Path], *,
                    num_crops: int | None = None) -> ImageStage:
    """The stage of the section's architecture. vision_graph(): the vision Graph (created lazily);
    file_of(name): a section file's path. num_crops: Phi-3-V only (InputError for other bundles)."""
    if lmm.architecture == "phi3v":
        if lmm.hd is None:
            raise OctopusError("bundle manifest: a phi3v lmm section needs lmm.hd")
        return Phi3VImageStage(lmm.prompt, lmm.hd, lmm.preprocess, lmm.vision, vision_graph, file_of, num_crops)
    if num_crops is not None:
        raise InputError(f"num_crops applies to Phi-3-Vision bundles only; this bundle is {lmm.architecture}")
    return LlavaImageStage(lmm, vision_graph)
