"""The lean runtime: numpy + onnxruntime + tokenizers + Pillow, no PyTorch.

Public API: `Octopus` (runtime/api.py) and its results. onnxruntime is imported lazily, when the
first session is created, so `import octopus_rt.runtime` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from octopus_rt.runtime.results import Answer, AskOptions, ChoiceResult, MaskResult, ScoreResult

if TYPE_CHECKING:
    from octopus_rt.runtime.api import Octopus

__all__ = ["Octopus", "Answer", "AskOptions", "ScoreResult", "ChoiceResult", "MaskResult"]


def __getattr__(name: str) -> Any:
    # api pulls in tokenizers/Pillow helpers; defer it until someone asks for Octopus.
    if name == "Octopus":
        from octopus_rt.runtime.api import Octopus

        return Octopus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
