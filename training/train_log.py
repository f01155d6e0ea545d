"""What a training run reports while it runs: `TrainLogger` (console with a tqdm bar on the main
process, `log.jsonl` in the work directory, TensorBoard when installed).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TrainLogger"]


class TrainLogger:
    """Console (tqdm on the main process), JSONL file and TensorBoard (when installed)."""

    def __init__(self, work_dir: Path, enabled: bool, total: int, initial: int, progress: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        self.file = open(work_dir / "log.jsonl", "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(log_dir=str(work_dir / "tensorboard"))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, values: dict) -> None:
        """One optimizer step done: move the progress bar and show loss, lr and tokens/s."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)

    def record(self, entry: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = "eval/" if entry.get("type") == "eval" else "train/"
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "type"):
                    self.tb.add_scalar(prefix + key, value, entry["step"])

    def close(self) -> None:
        for handle in (self.bar, self.tb, self.file):
            if handle is not None:
                handle.close()
