"""The data engine: synthetic region-wise distortion datasets, importers of public formats, and tools
to inspect them (`octopus-rt data ...`). See docs/data.md.

Importing this package is cheap (the CLI imports `octopus_rt.training.data.cli` through it at every
start); `make_quadrant_dataset` loads numpy / Pillow on first use.
"""

from __future__ import annotations

__all__ = ["make_quadrant_dataset"]


def __getattr__(name: str):
    if name == "make_quadrant_dataset":
        from octopus_rt.training.data.quadrant import make_quadrant_dataset

        return make_quadrant_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
