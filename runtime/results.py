"""Typed results and options of the runtime API (`Octopus.ask`, `.score`, `.choose`).

Coordinate frame of every point: (x, y) pixels of the *original* image after EXIF orientation,
origin at the top left corner, x to the right, y down. Masks are H x W bool arrays in that frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Answer", "ScoreResult", "ChoiceResult", "MaskResult", "AskOptions"]


def _timings(timings_ms: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 3) for k, v in timings_ms.items()}


@dataclass(frozen=True)
class AskOptions:
    """Per-call options of `Octopus.ask`; None means "the bundle manifest's default".

    max_new_tokens: cap on generated tokens (also capped by the model's context).
    tau: closed-set softmax temperature (> 0, paper eq. 2 read as e^(chi/tau)).
    point_mapping: "paper" (eq. 4) or "quadrant" (see runtime/closed_set.point_from_probs).
    multimask: keep SAM's best-IoU mask of its multimask outputs (True) or its single-mask output.
    segment: run the SAM stage when the bundle has one (False: answer and point only).
    overlay: also render `Answer.overlay` (the image with mask, point and answer), from the RGB the
        call decoded (decoded for it only when the per-image cache let the call skip decoding).
    on_token: streaming hook, called on the calling thread during decoding with the text each
        generated token adds to the answer ("" when it adds none yet: a stop token, a partial UTF-8
        character); a last call may follow decoding with text held back until then. The deltas
        concatenate to exactly `Answer.text`. An exception it raises ends the call (e.g. a server
        cancelling a request whose client left); in `Octopus.ask_batch` it ends that item only.
    """

    max_new_tokens: int | None = None
    tau: float | None = None
    point_mapping: str | None = None
    multimask: bool | None = None
    segment: bool = True
    overlay: bool = False
    on_token: Callable[[str], None] | None = None

    def merged(self, **keywords: Any) -> "AskOptions":
        """These options with every keyword that is not None put in their place."""
        return dataclasses.replace(self, **{k: v for k, v in keywords.items() if v is not None})


@dataclass
class Answer:
    """The answer to one question about one image.

    text: the decoded answer (special tokens skipped). token_ids: the generated ids, the stop token
    included when one was emitted. point: (x, y) in original pixels, or None when the answer names
    no positional word on either axis. probs: closed-set probabilities {"left", "right", "top",
    "bottom"} (an axis the answer never mentions is absent from the dict), or None like `point`.
    whole_image: the answer says the distortion covers the whole image (mask is then all True and SAM
    is skipped). mask: H x W bool, or None (no SAM section, segmentation off, or no point).
    mask_iou: SAM's predicted IoU of the kept mask (1.0 for a whole-image mask, None without mask).
    timings_ms: wall time per stage in milliseconds (stages skipped thanks to the cache are absent).
    cached: which per-image results came from the cache ("vision", "prefix", "sam_embedding").
    prompt_tokens: length of the prompt in tokens (image tokens included), for usage accounting.
    overlay: the image with mask, point and answer drawn (runtime/overlay.py) when asked for
        (`AskOptions.overlay`), else None.
    """

    text: str
    token_ids: list[int]
    point: tuple[float, float] | None
    probs: dict[str, float] | None
    whole_image: bool
    mask: np.ndarray | None
    mask_iou: float | None
    image_size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    cached: tuple[str, ...] = ()
    prompt_tokens: int = 0
    overlay: Any = field(default=None, repr=False)  # PIL.Image.Image | None

    def to_json(self, mask_path: str | None = None) -> dict[str, Any]:
        """JSON-ready dict (the schema of `octopus-rt infer --json`, documented in docs/runtime.md)."""
        width, height = self.image_size
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "point": None if self.point is None else [float(self.point[0]), float(self.point[1])],
            "probs": None if self.probs is None else {k: float(v) for k, v in self.probs.items()},
            "whole_image": bool(self.whole_image),
            "mask": mask_path,
            "mask_iou": None if self.mask_iou is None else float(self.mask_iou),
            "mask_area": None if self.mask is None else float(self.mask.mean()),
            "image_size": [int(width), int(height)],
            "timings_ms": _timings(self.timings_ms),
            "cached": list(self.cached),
        }


@dataclass
class ScoreResult:
    """Scalar quality (Q-Align convention): score = sum_i p_i * w_i with w = vocab.LEVEL_WEIGHTS,
    in [0, 1] (1 = excellent). probs: {level word: probability}, summing to 1."""

    score: float
    probs: dict[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (`infer-batch` score lines, the server's /v1/score)."""
        return {"score": float(self.score), "probs": {k: float(v) for k, v in self.probs.items()},
                "timings_ms": _timings(self.timings_ms)}


@dataclass
class ChoiceResult:
    """Multiple choice: the option with the highest closed-set probability over the option letters.

    letter: "A".."D"; index: 0-based; option: the option text; probs: {letter: probability} over the
    letters actually offered (summing to 1).
    """

    letter: str
    index: int
    option: str
    probs: dict[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (`infer-batch` multiple-choice lines, the server's /v1/choose)."""
        return {"letter": self.letter, "index": int(self.index), "option": self.option,
                "probs": {k: float(v) for k, v in self.probs.items()}, "timings_ms": _timings(self.timings_ms)}


@dataclass
class MaskResult:
    """SAM's mask for one point: mask H x W bool (original frame), iou its predicted IoU, cached
    whether the image's SAM embedding came from the per-image cache (`Octopus.segment`)."""

    mask: np.ndarray
    iou: float
    cached: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
