"""The data engine: synthetic region-wise distortion datasets, importers of public formats, and tools
to inspect them (`octopus-rt data ...`). See docs/data.md."""

from __future__ import annotations

from octopus_rt.training.data.quadrant import make_quadrant_dataset

__all__ = ["make_quadrant_dataset"]
