"""The fields every manifest section that owns files has (docs/bundle.md, "Every section with files
has"): `Section`, the base of the lmm, sam and engines sections, and its `FileRecord`s. Below both
octopus_rt/manifest.py and octopus_rt/manifest_lmm.py, so each section module can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from octopus_rt.schema import ManifestError, Schema, optional

__all__ = ["FileRecord", "Section"]


@dataclass(frozen=True)
class FileRecord(Schema):
    """One file of a section (path relative to the section's `dir`)."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Section(Schema):
    """Fields of every section that owns files (docs/bundle.md, "Every section with files has")."""

    dir: str | None = optional()  # folder relative to the bundle
    files: dict[str, FileRecord] | None = optional()
    written: str | None = optional()  # UTC ISO time of the commit
    versions: dict[str, str] = field(default_factory=dict)  # {package: version} that wrote it
    opset: int | None = None
    ir_version: int | None = None
    precision: str | None = None  # fp32 | fp16 | int8 | int4

    def check(self, where: str) -> None:
        if self.files is not None and self.dir is None:
            raise ManifestError(f"{where}.dir is missing")
