"""`octopus-rt data stats`: counts per split, task, sub-task, distortion and severity, and the
grounding targets' position answers.

Distortion and severity counts are per distorted region of each distinct image (not per record, so
an image with six questions is not counted six times); sub-types are counted as category/subtype.
Position answers are per grounding record with one local target: its eq. 1 phrase ("top left", ...)
and whether its box centre lies within records.POSITION_MARGIN of a midline (an ambiguous target;
`data synth` writes none, imported or hand-made data may have some). A skewed answer distribution
is a bias a model can learn instead of looking (the share of the most frequent answer says how much).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from octopus_rt.errors import InputError

__all__ = ["DatasetStats", "compute_stats", "format_stats"]


@dataclass
class DatasetStats:
    """Counters of one dataset folder."""

    splits: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    subtasks: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    subtypes: Counter = field(default_factory=Counter)
    severities: Counter = field(default_factory=Counter)
    positions: Counter = field(default_factory=Counter)  # "top left", ... per local grounding target
    ambiguous_targets: int = 0
    images: int = 0
    sources: int = 0

    @property
    def ambiguous_share(self) -> float:
        """Share of local grounding targets whose position words are a tie-break (0 when none)."""
        total = sum(self.positions.values())
        return self.ambiguous_targets / total if total else 0.0

    @property
    def top_position_share(self) -> float:
        """Share of the most frequent position answer among local grounding targets (0 when none)."""
        total = sum(self.positions.values())
        return max(self.positions.values()) / total if total else 0.0


def compute_stats(data_dir: str | Path) -> DatasetStats:
    """Count the records of `data_dir` (see the module docstring)."""
    from octopus_rt import vocab
    from octopus_rt.training.data.records import position_ambiguous, read_records

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"dataset folder not found: {data_dir}")
    by_split = read_records(data_dir)
    if not any(by_split.values()):
        raise InputError(f"no records in {data_dir} (expected train.jsonl / val.jsonl / test.jsonl)")
    stats = DatasetStats()
    seen_images: set[str] = set()
    sources: set[str] = set()
    for split, records in by_split.items():
        stats.splits[split] += len(records)
        for record in records:
            stats.tasks[record["task"]] += 1
            stats.subtasks[f"{record['task']}/{record.get('subtask')}"] += 1
            sources.add(str(record.get("source", record["image"])))
            target = _local_target(record)
            if target is not None:
                stats.positions[vocab.position_phrase(*target["position"])] += 1
                if record.get("width") and record.get("height") and target.get("center") and position_ambiguous(
                        target["center"], int(record["width"]), int(record["height"])):
                    stats.ambiguous_targets += 1
            if record["image"] in seen_images:
                continue
            seen_images.add(record["image"])
            for region in record.get("regions") or []:
                for d in region.get("distortions", []):
                    stats.categories[d["category"]] += 1
                    stats.subtypes[f"{d['category']}/{d['subtype']}"] += 1
                    stats.severities[int(d["severity"])] += 1
    stats.images = len(seen_images)
    stats.sources = len(sources)
    return stats


def _local_target(record: dict) -> dict | None:
    """The one target region of a grounding record when it is local (has position words)."""
    targets = record.get("target_regions") or []
    if record.get("task") != "grounding" or len(targets) != 1:
        return None
    region = {r["id"]: r for r in record.get("regions") or []}.get(targets[0])
    if region is None or region.get("whole_image") or not region.get("position"):
        return None
    return region


def format_stats(stats: DatasetStats) -> str:
    """Plain-text report, one "name count" line per entry, sections in a fixed order."""
    lines = [f"images {stats.images}  sources {stats.sources}"]
    total = sum(stats.positions.values())
    if total:
        lines.append(f"grounding position answers {total}: most frequent {100 * stats.top_position_share:.1f}%, "
                     f"ambiguous targets {stats.ambiguous_targets} ({100 * stats.ambiguous_share:.1f}%)")
    sections = [("split", stats.splits), ("task", stats.tasks), ("task/subtask", stats.subtasks),
                ("position answer", stats.positions),
                ("distortion", stats.categories), ("sub-type", stats.subtypes), ("severity", stats.severities)]
    for title, counter in sections:
        if not counter:
            continue
        lines.append(f"\n{title}:")
        width = max(len(str(k)) for k in counter)
        for key in sorted(counter, key=str):
            lines.append(f"  {str(key):<{width}}  {counter[key]}")
    return "\n".join(lines)
