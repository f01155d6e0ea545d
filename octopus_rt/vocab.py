"""The closed-set words and fixed phrases of IQA-Octopus, shared by every part of octopus-rt.

Torch-free and dependency-free on purpose: the runtime, the exporter (which records the token ids of
these words in the bundle manifest), the data engine (which writes answers with them) and the
evaluation all import this one module, so the words a model is trained to say are the words the
runtime listens for.
"""

from __future__ import annotations

__all__ = [
    "HORIZONTAL_WORDS",
    "VERTICAL_WORDS",
    "POSITION_WORDS",
    "LEVEL_WORDS",
    "LEVEL_WEIGHTS",
    "OPTION_LETTERS",
    "WHOLE_IMAGE_PHRASES",
    "DISTORTION_NAMES",
    "SCORE_QUESTION",
    "SCORE_ANSWER_PREFIX",
    "MCQ_INSTRUCTION",
    "closed_set_words",
    "word_forms",
    "position_terms",
    "position_phrase",
    "says_whole_image",
    "format_mcq_question",
]

# Paper eq. 3: index 0 maps to coordinate 0, index 1 to coordinate 1 (origin at the top left corner).
HORIZONTAL_WORDS: tuple[str, str] = ("left", "right")
VERTICAL_WORDS: tuple[str, str] = ("top", "bottom")
POSITION_WORDS: tuple[str, ...] = HORIZONTAL_WORDS + VERTICAL_WORDS

# Q-Align convention (shared/spec/formats.md): best to worst, with the weights of the scalar score.
LEVEL_WORDS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)

OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Answers that say the distortion covers the whole image; the runtime then skips segmentation and
# returns a full mask (paper 4.1). Matched case-insensitively as substrings. The data engine writes
# its uniform-case answers with the first phrase, so a model trained on our data says it verbatim.
WHOLE_IMAGE_PHRASES: tuple[str, ...] = (
    "the whole image",
    "the entire image",
    "the full image",
    "all over the image",
    "throughout the image",
    "across the image uniformly",
)

# Category key (shared/spec/distortions.md) -> the name used in answers.
DISTORTION_NAMES: dict[str, str] = {
    "blur": "blur",
    "noise": "noise",
    "compression": "compression",
    "brighten": "overly high brightness",
    "darken": "insufficient brightness",
    "contrast_strengthen": "overly high contrast",
    "contrast_weaken": "insufficient contrast",
    "saturate_strengthen": "overly high saturation",
    "saturate_weaken": "insufficient saturation",
    "oversharpen": "oversharpening",
    "pixelate": "pixelation",
    "quantization": "color quantization",
}

# Scoring prompt (Q-Align convention): the next token after the answer prefix is one of LEVEL_WORDS.
SCORE_QUESTION = "How would you rate the quality of this image?"
SCORE_ANSWER_PREFIX = "The quality of the image is"

# Q-Bench-A1 prompt convention for multiple choice.
MCQ_INSTRUCTION = "\nChoose between one of the options as follows:\n"


def closed_set_words() -> dict[str, tuple[str, ...]]:
    """Every closed set the runtime scores, by name. The exporter records token ids for each word."""
    return {
        "horizontal": HORIZONTAL_WORDS,
        "vertical": VERTICAL_WORDS,
        "level": LEVEL_WORDS,
        "option": OPTION_LETTERS,
    }


def word_forms(word: str) -> tuple[str, ...]:
    """Surface forms a tokenizer may produce for `word`: with and without a leading space, and
    lower-case / capitalised (sentence-initial "Top", mid-sentence " top"). Option letters: upper only."""
    # Option letters stay upper-case: a lower-case "a" is the article, not option A.
    bases = (word.upper(),) if len(word) == 1 else (word.lower(), word.capitalize())
    return tuple(text for base in bases for text in (base, " " + base))


def position_terms(bbox_center: tuple[float, float], width: int, height: int) -> tuple[str, str]:
    """Paper eq. 1: (horizontal, vertical) term from the centre (x, y) of a region's bounding box
    in pixels of a width x height image. x/W in [0, 1/2) is left, else right; likewise top/bottom."""
    x, y = bbox_center
    horizontal = HORIZONTAL_WORDS[0] if x / width < 0.5 else HORIZONTAL_WORDS[1]
    vertical = VERTICAL_WORDS[0] if y / height < 0.5 else VERTICAL_WORDS[1]
    return horizontal, vertical


def position_phrase(horizontal: str, vertical: str) -> str:
    """The spatial phrase answers start with, e.g. "top left" (vertical term first)."""
    return f"{vertical} {horizontal}"


def says_whole_image(text: str, phrases: tuple[str, ...] | list[str] = WHOLE_IMAGE_PHRASES) -> bool:
    """True when the answer says the distortion covers the whole image."""
    lowered = text.lower()
    return any(phrase.lower() in lowered for phrase in phrases)


def format_mcq_question(question: str, options: list[str] | tuple[str, ...]) -> str:
    """Q-Bench-A1 layout: the question, the instruction, then one "A. option" line per option."""
    if not 1 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"multiple choice takes 1 to {len(OPTION_LETTERS)} options, got {len(options)}")
    lines = [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
    return question + MCQ_INSTRUCTION + "\n".join(lines)
