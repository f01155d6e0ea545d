"""Helpers shared by the training tests: tiny models, tiny datasets, record writing.

Not a test module (no test_ prefix). The tiny LLaVA uses initializer_range 0.2 for the language
model: with the usual 0.02 a random frozen lm_head cannot produce confident logits (max logit ~1 over
1024 tokens), so LoRA alone could never bring the loss down; a real pretrained lm_head does not have
this problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from octopus_rt.training.model_factory import TinyLlavaSpec, build_llava

LM_INIT = {"initializer_range": 0.2}


def tiny_spec(**changes) -> TinyLlavaSpec:
    values = dict(extra_text_config=dict(LM_INIT))
    values.update(changes)
    return TinyLlavaSpec(**values)


def make_base(path: Path, **changes) -> Path:
    import torch

    torch.set_num_threads(1)
    build_llava(path, tiny_spec(**changes))
    return path


def quadrant_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """The data engine's quadrant dataset (one noisy quadrant, balanced labels, one fixed question)."""
    from octopus_rt.training.data.quadrant import make_quadrant_dataset

    make_quadrant_dataset(path, n, size=64, seed=seed)
    return path


def write_records(path: Path, records: list[dict], split: str = "train", size: int = 64, seed: int = 0) -> Path:
    """Write `records` (conversations given; images made here as random PNGs) to path/<split>.jsonl.
    A record whose "image" key is already set keeps it (for broken-image tests)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "images").mkdir(exist_ok=True)
    lines = []
    for index, record in enumerate(records):
        record = dict(record)
        if "image" not in record:
            rel = f"images/{split}_{index:04d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / rel)
            record["image"] = rel
        record.setdefault("id", f"{split}-{index}")
        record.setdefault("task", "grounding")
        lines.append(json.dumps(record))
    (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def conv(question: str, *answers_and_questions: str) -> list[dict]:
    """LLaVA conversation: question, answer[, question, answer ...]; the first turn gets <image>."""
    turns = [{"from": "human", "value": "<image>\n" + question}]
    for index, text in enumerate(answers_and_questions):
        turns.append({"from": "gpt" if index % 2 == 0 else "human", "value": text})
    return turns


# Grounding answers of the Phi-3-V training tests, one per quadrant.
ANSWERS = ("The top left region.", "The bottom right region.", "The top right region.", "The bottom left region.")


def phi3v_dataset(path: Path, n: int, seed: int = 0, split: str = "train", extra: list | None = None):
    """n grounding records on noise images alternating square (64 x 64) and 2:1 (128 x 64)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (path / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        size = (64, 64) if i % 2 == 0 else (128, 64)
        rel = f"images/{split}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path / rel)
        lines.append({"id": f"{split}-{i}", "task": "grounding", "image": rel,
                      "conversations": conv("Which region is most degraded?", ANSWERS[i % len(ANSWERS)])})
    for j, record in enumerate(extra or []):
        rel = f"images/{split}_x{j}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path / rel)
        lines.append(dict(record, image=rel, id=f"{split}-x{j}"))
    (path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    return path
