"""Difficulty buckets and position-answer histograms for `octopus-rt eval`'s grounding figures.

Why: one "all" figure mixes an easy question (one clearly distorted region) with an ill-posed one
("most degraded" among 2-3 regions with different distortion types), and a model that always says
"bottom right" can look fine on it. The table therefore repeats every grounding figure per bucket:

- SINGLE_VISIBLE: the image has exactly one distorted region, whose strongest distortion has
  severity >= 3 (a local target; any grounding sub-task);
- SINGLE: exactly one distorted region, any severity;
- MULTI: two or more distorted regions, "most degraded" questions (HyD-G-max).
Whole-image records belong to no bucket (they have no position answer); they stay in "all".
"""

from __future__ import annotations

from octopus_rt import vocab

__all__ = ["SINGLE_VISIBLE", "SINGLE", "MULTI", "BUCKETS", "HISTOGRAM", "difficulty_buckets", "answer_phrase",
           "PHRASES"]

SINGLE_VISIBLE = "single region, severity>=3"
SINGLE = "single region, any severity"
MULTI = "multi-region, most degraded"
BUCKETS: tuple[str, ...] = (SINGLE_VISIBLE, SINGLE, MULTI)
HISTOGRAM = "position answers"  # the sub-task name of the histogram rows
PHRASES: tuple[str, ...] = tuple(vocab.position_phrase(h, v) for v in vocab.VERTICAL_WORDS
                                 for h in vocab.HORIZONTAL_WORDS)


def difficulty_buckets(record: dict) -> list[str]:
    """The buckets (see the module docstring) a grounding record with one target belongs to."""
    regions = record.get("regions") or []
    targets = record.get("target_regions") or []
    by_id = {r["id"]: r for r in regions}
    if len(targets) != 1 or targets[0] not in by_id or by_id[targets[0]].get("whole_image"):
        return []
    distorted = [r for r in regions if r.get("distortions")]
    if len(distorted) == 1:
        strongest = max(int(d["severity"]) for d in distorted[0]["distortions"])
        return [SINGLE_VISIBLE, SINGLE] if strongest >= 3 else [SINGLE]
    if len(distorted) >= 2 and record.get("subtask") == "HyD-G-max":
        return [MULTI]
    return []


def answer_phrase(horizontal: str | None, vertical: str | None) -> str:
    """"top left", ... for an answer's two side words; "none" when an axis was not said."""
    if horizontal is None or vertical is None:
        return "none"
    return vocab.position_phrase(horizontal, vertical)
