"""Exception types of octopus-rt. The CLI prints these as one line and exits non-zero."""

from __future__ import annotations

__all__ = ["OctopusError", "InputError"]


class OctopusError(Exception):
    """An expected failure with a message meant for the user (bad input, missing file, ...)."""


class InputError(OctopusError, ValueError):
    """The caller's input (image, question, path, option) is unusable."""
