"""`octopus-rt data stats`: counts per split, task, sub-task, distortion and severity.

Distortion and severity counts are per distorted region of each distinct image (not per record, so
an image with six questions is not counted six times); sub-types are counted as category/subtype.
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
    images: int = 0
    sources: int = 0


def compute_stats(data_dir: str | Path) -> DatasetStats:
    """Count the records of `data_dir` (see the module docstring)."""
    from octopus_rt.training.data.records import read_records

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


def format_stats(stats: DatasetStats) -> str:
    """Plain-text report, one "name count" line per entry, sections in a fixed order."""
    lines = [f"images {stats.images}  sources {stats.sources}"]
    sections = [("split", stats.splits), ("task", stats.tasks), ("task/subtask", stats.subtasks),
                ("distortion", stats.categories), ("sub-type", stats.subtypes), ("severity", stats.severities)]
    for title, counter in sections:
        if not counter:
            continue
        lines.append(f"\n{title}:")
        width = max(len(str(k)) for k in counter)
        for key in sorted(counter, key=str):
            lines.append(f"  {str(key):<{width}}  {counter[key]}")
    return "\n".join(lines)
