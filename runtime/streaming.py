"""Incremental detokenisation for `AskOptions.on_token`: token ids in, text deltas out.

Each pushed id re-decodes the answer so far (answers are short; the tokenizer's own decode rules,
special tokens skipped, apply unchanged) and hands the callback the text beyond what it already
sent. Text is held back while the decoded answer ends in U+FFFD (a UTF-8 character split across
byte-level tokens) or no longer extends what was sent; `finish` sends the rest, so the deltas
concatenate to exactly the final `Answer.text`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """tokenizer: a `tokenizers.Tokenizer`; callback(delta: str) is called once per pushed token."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.sent = ""

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.callback("" if text.endswith("\ufffd") else self._emit(text))

    def finish(self, text: str) -> None:
        """Send what the final answer `text` holds beyond the deltas sent (nothing if all was sent)."""
        if text != self.sent:
            delta = self._emit(text)
            if delta:
                self.callback(delta)
