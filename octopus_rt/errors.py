"""Exception types of octopus-rt. The CLI prints these as one line and exits non-zero."""

from __future__ import annotations

__all__ = ["OctopusError", "InputError", "BundleError"]


class OctopusError(Exception):
    """An expected failure with a message meant for the user (bad input, missing file, ...)."""


class InputError(OctopusError, ValueError):
    """The caller's input (image, question, path, option) is unusable."""


class BundleError(OctopusError):
    """A bundle is missing, of another format version, or its files do not match the manifest."""
