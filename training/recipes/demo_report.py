"""What the demo recipe writes for people: the targets-vs-measured table, the example images with
their ground truth, and the installed bundle (used by build_demo.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["headline", "pick_examples", "install", "bundle_megabytes"]

REPO = Path(__file__).resolve().parents[2]


def bundle_megabytes(bundle: Path) -> float:
    """Size of every file under `bundle` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.is_file()) / 1e6


def headline(report: dict, bundle_mb: float | None = None, minutes: float | None = None) -> str:
    """Markdown table of issue 16's targets vs the measured figures of an eval JSON (test split)."""
    from octopus_rt.training.eval_difficulty import HISTOGRAM, SINGLE_VISIBLE

    def find(sub, metric, system="model", task="grounding"):
        for row in report["rows"]:
            if (row["task"], row["subtask"], row["metric"], row["system"]) == (task, sub, metric, system):
                return row
        return None

    def cell(row) -> str:
        if row is None or row["value"] is None:
            return "n/a"
        low, high = row["ci95"]
        ci = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
        return f"{100 * row['value']:.1f}%{ci} (n={row['n']})"

    def ratio(sub) -> str:
        model, centre = find(sub, "mIoU"), find(sub, "mIoU", "SAM @ centre")
        if not model or not centre or not centre["value"]:
            return "n/a"
        return f"{cell(model)}, {model['value'] / centre['value']:.2f}x the centre point ({cell(centre)})"

    rows = [("single region, severity >= 3: both axes >= 85%", cell(find(SINGLE_VISIBLE, "position: both")),
             f"majority class {cell(find(SINGLE_VISIBLE, 'position: both', 'majority class'))}"),
            ("single region, severity >= 3: mIoU >= 2x centre point", ratio(SINGLE_VISIBLE),
             f"oracle point {cell(find(SINGLE_VISIBLE, 'mIoU', 'SAM @ oracle point (ceiling)'))}"),
            ("all grounding: both axes >= 60%", cell(find("all", "position: both")),
             f"majority class {cell(find('all', 'position: both', 'majority class'))}"),
            ("all grounding: mIoU >= 1.5x centre point", ratio("all"),
             f"oracle point {cell(find('all', 'mIoU', 'SAM @ oracle point (ceiling)'))}"),
            ("most frequent position answer <= 35%", cell(find(HISTOGRAM, "most frequent answer share")),
             f"ground truth {cell(find(HISTOGRAM, 'most frequent answer share', 'ground truth'))}"),
            ("whole-image recall >= 90%, whole class", cell(find("all", "whole-image recall (whole)")),
             f"blank image {cell(find('all', 'whole-image recall (whole)', 'blank image'))}"),
            ("whole-image recall >= 90%, local class", cell(find("all", "whole-image recall (local)")),
             f"blank image {cell(find('all', 'whole-image recall (local)', 'blank image'))}"),
            ("referring short answers (single distortion) >= 60%",
             cell(find("short-single", "short answer: names exact", task="referring")),
             f"majority class {cell(find('short-single', 'short answer: names exact', 'majority class', 'referring'))}")]
    if bundle_mb is not None:
        rows.append(("bundle <= 25 MB", f"{bundle_mb:.1f} MB", ""))
    if minutes is not None:
        rows.append(("recipe <= 90 min on the 2-core CPU", f"{minutes:.0f} min (wall, this run)", ""))
    lines = ["| target | measured on the held-out test split (95% CI, n) | reference |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def pick_examples(records: list[dict]) -> list[tuple[str, dict]]:
    """One "most degraded" test record per quadrant (top left, top right, bottom left, bottom right)
    from the single-region, severity >= 3 bucket, then one whole-image record: the first in file
    order of each kind, distinct photos where possible. Chosen by ground truth only (never by what
    the model answers), so the examples cannot follow the model's answer bias."""
    from octopus_rt import vocab
    from octopus_rt.training.eval_difficulty import SINGLE_VISIBLE, difficulty_buckets

    chosen: dict[str, dict] = {}
    photos: set[str] = set()
    for prefer_new_photo in (True, False):
        for record in records:
            if record["task"] != "grounding" or record.get("subtask") != "HyD-G-max":
                continue
            target = {r["id"]: r for r in record["regions"]}[record["target_regions"][0]]
            if target.get("whole_image"):
                kind = "whole image"
            elif SINGLE_VISIBLE in difficulty_buckets(record):
                kind = vocab.position_phrase(*target["position"])
            else:
                continue
            photo = str(record.get("source", "")).rsplit("_", 1)[0]
            if kind in chosen or (prefer_new_photo and photo in photos):
                continue
            chosen[kind] = record
            photos.add(photo)
    order = ["top left", "top right", "bottom left", "bottom right", "whole image"]
    return [(kind, chosen[kind]) for kind in order if kind in chosen]


def install(work: Path, bundle: Path, data_dir: Path, header: str) -> None:
    """Copy the bundle to octopus_rt/demo/bundle, the examples (pick_examples) with their ground truth
    to examples/, and the sweep plot and the tables to docs/."""
    from octopus_rt.training.data.records import read_jsonl

    target = REPO / "octopus_rt" / "demo" / "bundle"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns(".lock", ".staging-*"))
    examples = REPO / "examples"
    examples.mkdir(exist_ok=True)
    for old in examples.glob("example_*.png"):
        old.unlink()
    lines = []
    for number, (kind, record) in enumerate(pick_examples(read_jsonl(data_dir / "test.jsonl")), 1):
        name = f"example_{number}.png"
        shutil.copyfile(data_dir / record["image"], examples / name)
        region = {r["id"]: r for r in record["regions"]}[record["target_regions"][0]]
        chain = ", ".join(f"{d['category']}/{d['subtype']} severity {d['severity']}" for d in region["distortions"])
        photo = str(record.get("source", "")).rsplit("_", 1)[0]
        lines.append(f"{name}: ground truth {kind} ({chain}); photo {photo}; record {record['id']}")
    (examples / "README.txt").write_text(
        "Images made by the data engine (octopus-rt data synth) from scikit-image sample photos that were\n"
        "never in the demo model's training data (the held-out photos of docs/demo.md). Chosen by their\n"
        "ground truth only (demo_report.pick_examples: the first test image of each quadrant with one\n"
        "distorted region of severity >= 3, then the first whole-image one), not by the model's answers.\n"
        "Question: which region is most degraded? Ground truth:\n" + "\n".join(lines) + "\n", encoding="utf-8")
    docs = REPO / "docs"
    shutil.copyfile(work / "sweep_miou_vs_tau.png", docs / "demo_sweep_miou_vs_tau.png")
    report = json.loads((work / "eval_test.json").read_text(encoding="utf-8"))
    (docs / "demo_eval_table.md").write_text(
        "# Demo bundle: evaluation on the held-out test split\n\n"
        f"`octopus-rt eval` on {report['split']} (tau {report['tau']:g}, point mapping {report['point_mapping']}, "
        "chosen on val by `--sweep`). Targets of issue 16:\n\n" + header + "\nFull table:\n\n"
        + (work / "eval_test.md").read_text(encoding="utf-8"), encoding="utf-8")
