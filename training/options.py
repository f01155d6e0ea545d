"""Options of `octopus-rt train` as one dataclass, with validation that raises one-line InputErrors.

The defaults are the paper's recipe (section 5.1): LoRA on the language model, full fine-tuning of the
vision tower and projector, AdamW at lr 1e-4 with a cosine schedule, 1 epoch, batch size 2. LoRA rank,
alpha and dropout left as None take the model family's defaults (training/architectures.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from octopus_rt.errors import InputError

__all__ = ["DataSource", "TrainOptions", "parse_data_arg", "LM_TUNING", "PRECISIONS", "ON_ERROR"]

LM_TUNING = ("lora", "full", "frozen")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_ERROR = ("skip", "stop")


@dataclass(frozen=True)
class DataSource:
    """One dataset folder (with train.jsonl / val.jsonl) and its mixing weight.

    A weight w draws round(w * n_train) samples of the folder per epoch: w < 1 takes a seeded subset,
    w > 1 repeats the records (whole copies plus a seeded subset for the fraction).
    """

    path: Path
    weight: float = 1.0


def parse_data_arg(text: str) -> DataSource:
    """Parse `--data PATH[:WEIGHT]`. A suffix that is not a number belongs to the path (C:\\, a:b)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return DataSource(Path(text))
        if not math.isfinite(weight) or weight <= 0:
            raise InputError(f"--data {text}: the mixing weight must be a positive number, got {tail!r}")
        return DataSource(Path(head), weight)
    return DataSource(Path(text))


@dataclass
class TrainOptions:
    """Everything one training run needs. `validate()` checks it before any heavy work starts.

    Paths: `base_model` is a transformers LlavaForConditionalGeneration directory or an official-layout
    Phi-3(.5)-Vision directory (training/architectures.py); `out` is the merged
    model directory to create (must not exist); `work_dir` holds checkpoints, logs and the run's
    options (default: `<out>.train` next to `out`).
    Batching: one optimizer step sees batch_size * grad_accum * world_size samples (the global batch);
    the loss is the sum of answer-token losses divided by the answer tokens of the global batch.
    """

    base_model: Path
    data: list[DataSource]
    out: Path
    work_dir: Path | None = None
    epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 0.0  # 0 disables clipping
    lm_tuning: str = "lora"  # lora | full | frozen (language model)
    lora_rank: int | None = None  # None: the family's default (LLaVA 16, Phi-3.5-Vision 64)
    lora_alpha: float | None = None  # None: LLaVA 32, Phi-3.5-Vision 128
    lora_dropout: float | None = None  # None: LLaVA 0.05, Phi-3.5-Vision 0
    freeze_vision: bool = False  # paper table 4: freezing the vision tower and projector hurts
    freeze_vision_stages: int = 0  # LLaVA / FastVLM: keep the tower's input layers + first N stages frozen
    max_steps: int | None = None
    save_every: int = 0  # 0: only the final state
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end (when a val split exists)
    eval_max_samples: int | None = None
    resume: bool = False
    on_error: str = "stop"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    group_by_image: bool = False  # LLaVA family: each image's records share batches and one vision-tower pass
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    merge: bool = True  # write the merged model to `out` at the end
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run (recipes)

    def __post_init__(self) -> None:
        self.base_model = Path(self.base_model)
        self.out = Path(self.out)
        self.data = [d if isinstance(d, DataSource) else parse_data_arg(str(d)) for d in self.data]
        if self.work_dir is None:
            self.work_dir = self.out.with_name(self.out.name + ".train")
        self.work_dir = Path(self.work_dir)

    def validate(self) -> None:
        """Raise InputError (one line) for an option that cannot work. Does not touch the file system."""
        positive_ints = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "log_every": self.log_every,
                         "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise InputError(f"--epochs must be > 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lm_tuning not in LM_TUNING:
            raise InputError(f"language model tuning must be one of {', '.join(LM_TUNING)}, got {self.lm_tuning!r}")
        if self.lm_tuning == "lora":
            if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
                raise InputError(f"--lora-rank must be >= 1, got {self.lora_rank}")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise InputError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.freeze_vision_stages, int) or self.freeze_vision_stages < 0:
            raise InputError(f"--freeze-vision-stages must be an integer >= 0, got {self.freeze_vision_stages!r}")
        if self.lm_tuning == "frozen" and self.freeze_vision:
            raise InputError("nothing to train: the language model is frozen and --freeze-vision is set")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.on_error not in ON_ERROR:
            raise InputError(f"--on-error must be skip or stop, got {self.on_error!r}")
        if not self.data:
            raise InputError("give at least one --data DATASET_DIR")
        if self.out.resolve() == self.work_dir.resolve():
            raise InputError("the work directory must differ from --out")

    def to_json(self) -> dict:
        """JSON-friendly copy (paths as strings), saved in the work directory."""
        raw = asdict(self)
        raw["base_model"] = str(self.base_model)
        raw["out"] = str(self.out)
        raw["work_dir"] = str(self.work_dir)
        raw["data"] = [{"path": str(d.path), "weight": d.weight} for d in self.data]
        return raw
