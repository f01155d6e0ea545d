"""Reading training data: JSONL records of the data engine's form, mixing weights, image loading.

A record is one JSON object per line of ``DATA_DIR/{train,val,test}.jsonl`` with at least
``image`` (path relative to DATA_DIR, which it must not leave) and ``conversations`` (LLaVA form: ``[{"from": "human",
"value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}, ...]``, multi-turn allowed).
Problems are reported with file and line; `on_error="skip"` drops the bad record and counts it,
`"stop"` raises an InputError at the first one. Training never reads the test split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.paths import read_inside, resolve_inside

__all__ = [
    "Turn",
    "TrainRecord",
    "ReadReport",
    "MixedDataset",
    "read_split",
    "parse_turns",
    "load_image",
    "IMAGE_TOKEN",
]

IMAGE_TOKEN = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    """One conversation turn: role "user" or "assistant", text without the image placeholder."""

    role: str
    text: str


@dataclass
class TrainRecord:
    """One usable record. `where` is "file:line" for messages; `raw` is the JSON object (for loss hooks).
    `image` is `root` / the record's relative path; `root` (the dataset folder) is where it must stay when read."""

    id: str
    image: Path
    turns: list[Turn]
    task: str
    subtask: str
    where: str
    raw: dict = field(repr=False, default_factory=dict)
    root: Path | None = None


@dataclass
class ReadReport:
    """What reading one split found: the records kept and one message per skipped line."""

    records: list[TrainRecord]
    skipped: list[str]


def parse_turns(conversations: object) -> list[Turn]:
    """A record's LLaVA `conversations` list -> alternating user / assistant `Turn`s (ValueError if malformed)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"conversation turn {index} is not an object")
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise ValueError(f"conversation turn {index} needs 'from' (human|gpt) and a string 'value'")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"conversation turn {index} should come from {'human' if expected == 'user' else 'gpt'}")
        if index > 0 and IMAGE_TOKEN in value:
            raise ValueError(f"only the first turn may hold {IMAGE_TOKEN} (turn {index} does)")
        text = value
        if index == 0:
            if value.count(IMAGE_TOKEN) > 1:
                raise ValueError(f"the first turn holds {IMAGE_TOKEN} more than once; one image per record")
            # The chat template writes the image placeholder (and its newline) itself.
            text = value.replace(IMAGE_TOKEN + "\n", "", 1).replace(IMAGE_TOKEN, "", 1).strip()
        turns.append(Turn(role, text))
    if turns[-1].role != "assistant":
        raise ValueError("the conversation must end with a gpt answer")
    return turns


def _parse_record(line: str, data_dir: Path) -> TrainRecord:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError("a record must be a JSON object")
    image = raw.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("missing 'image' (a path relative to the dataset folder)")
    path = resolve_inside(data_dir, image, "image")  # InputError (a ValueError) when it leads outside
    if not path.is_file():
        raise ValueError(f"image {image} not found")
    turns = parse_turns(raw.get("conversations"))
    return TrainRecord(
        id=str(raw.get("id", "")),
        image=path,
        turns=turns,
        task=str(raw.get("task", "")),
        subtask=str(raw.get("subtask", "")),
        where="",
        raw=raw,
        root=Path(data_dir),
    )


def read_split(data_dir: str | Path, split: str, on_error: str = "stop", required: bool = True) -> ReadReport:
    """Read ``data_dir/<split>.jsonl``. Raises InputError for a missing file (when `required`) and,
    with on_error="stop", for the first bad line (message "<file>:<line>: <problem>")."""
    if split == "test":
        raise InputError("training never reads the test split")
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not data_dir.is_dir():
        raise InputError(f"dataset folder {data_dir} not found")
    if not path.is_file():
        if required:
            raise InputError(f"{path} not found (a dataset folder holds train.jsonl and val.jsonl)")
        return ReadReport([], [])
    records: list[TrainRecord] = []
    skipped: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = _parse_record(line, data_dir)
            except ValueError as exc:
                if on_error == "stop":
                    raise InputError(f"{where}: {exc} (use --on-error skip to drop bad records)") from None
                skipped.append(f"{where}: {exc}")
                continue
            record.where = where
            records.append(record)
    return ReadReport(records, skipped)


def load_image(record: TrainRecord):
    """The record's image as an RGB PIL image, decoded by the runtime's loader (EXIF orientation,
    mode conversion and pixel limit exactly as at inference). Raises InputError naming the file and line."""
    from PIL import Image

    from octopus_rt.runtime.images import load_image as runtime_load_image

    try:
        if record.root is None:
            return Image.fromarray(runtime_load_image(record.image).rgb)
        # read through the dataset folder again: a link swapped in since the record was parsed is refused
        rel = record.image.relative_to(record.root).as_posix()
        return Image.fromarray(runtime_load_image(read_inside(record.root, rel, "image")).rgb)
    except InputError as exc:
        raise InputError(f"{record.where}: cannot load image {record.image}: {exc}") from None


class MixedDataset:
    """Several datasets' records mixed by weight, with a seeded order per epoch.

    `epoch_order(epoch)` returns a list of (dataset index, record index) pairs; the same seed and epoch
    always give the same order on every process, so the step number alone says where training is.
    With `group_by_image`, the records of one image file are consecutive in that order (images in a
    seeded random order, records shuffled within each image), so that a batch holds a few images'
    questions and the vision tower runs once per image (training/shared_images.py).
    """

    def __init__(self, datasets: list[list[TrainRecord]], weights: list[float], seed: int,
                 group_by_image: bool = False) -> None:
        if len(datasets) != len(weights):
            raise ValueError("one weight per dataset")
        self.datasets = datasets
        self.weights = weights
        self.seed = seed
        self.group_by_image = group_by_image
        self.samples_per_epoch = sum(self._count(len(d), w) for d, w in zip(datasets, weights))

    @staticmethod
    def _count(n: int, weight: float) -> int:
        return int(math.floor(n * weight + 0.5)) if n else 0

    def record(self, key: tuple[int, int]) -> TrainRecord:
        return self.datasets[key[0]][key[1]]

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, epoch])
        keys: list[tuple[int, int]] = []
        for index, (records, weight) in enumerate(zip(self.datasets, self.weights)):
            n = len(records)
            count = self._count(n, weight)
            whole, rest = divmod(count, n) if n else (0, 0)
            picks = list(range(n)) * whole + sorted(rng.choice(n, size=rest, replace=False).tolist() if rest else [])
            keys.extend((index, int(i)) for i in picks)
        permutation = rng.permutation(len(keys))
        order = [keys[i] for i in permutation]
        if not self.group_by_image:
            return order
        groups: dict[str, list[tuple[int, int]]] = {}
        for key in order:  # the permutation already shuffled each image's records
            groups.setdefault(str(self.record(key).image), []).append(key)
        members = list(groups.values())
        return [key for g in rng.permutation(len(members)) for key in members[g]]
