"""`octopus-rt eval` by difficulty: bucket membership, per-bucket figures and the position-answer
histogram, checked against answers taken straight from the runtime API (independent bookkeeping)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from octopus_rt.training import evaluate as ev
from octopus_rt.training.eval_data import load_split
from octopus_rt.training.data.quadrant import make_quadrant_dataset
from octopus_rt.training.eval_difficulty import MULTI, SINGLE, SINGLE_VISIBLE, difficulty_buckets


def _record(severities: list[list[int]], target: int = 0, subtask: str = "HyD-G-max", whole: bool = False) -> dict:
    regions = [{"id": i, "whole_image": whole, "distortions": [{"category": "blur", "subtype": "gaussian",
                                                                 "severity": s} for s in chain]}
               for i, chain in enumerate(severities)]
    return {"task": "grounding", "subtask": subtask, "regions": regions, "target_regions": [target]}


def test_bucket_membership():
    assert difficulty_buckets(_record([[3], [], []])) == [SINGLE_VISIBLE, SINGLE]
    assert difficulty_buckets(_record([[1, 2], [], []])) == [SINGLE]  # strongest step 2 < 3
    assert difficulty_buckets(_record([[2, 3], []], target=1, subtask="HyD-G-min")) == [SINGLE_VISIBLE, SINGLE]
    assert difficulty_buckets(_record([[5], [1], []])) == [MULTI]
    assert difficulty_buckets(_record([[5], [1], []], subtask="SiD-G-max")) == []  # multi, not "most degraded"
    assert difficulty_buckets(_record([[4]], whole=True)) == []


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Quadrant records (12 in test) relabelled into the three buckets: kept as made (one region,
    severity 5), severity lowered to 2, or a second region given a severity-1 distortion."""
    root = tmp_path_factory.mktemp("eval_mixed") / "data"
    make_quadrant_dataset(root, 120, size=64, seed=4)
    lines = (root / "test.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        target = record["target_regions"][0]
        if i % 3 == 1:
            record["regions"][target]["distortions"][0]["severity"] = 2
        elif i % 3 == 2:
            other = (target + 1) % 4
            record["regions"][other]["distortions"] = [{"category": "blur", "subtype": "gaussian", "severity": 1}]
        out.append(json.dumps(record))
    (root / "test.jsonl").write_text("\n".join(out) + "\n")
    return root


def test_figures_per_bucket_and_histogram_match_the_runtime(tiny_grounding_bundle, mixed_data):
    from octopus_rt.runtime.api import Octopus

    report = ev.evaluate(ev.EvalOptions(tiny_grounding_bundle, mixed_data, split="test", progress=False))
    records = load_split(mixed_data, "test")
    octopus = Octopus(tiny_grounding_bundle, threads=1)
    per_bucket: dict[str, list[tuple[float, bool]]] = {SINGLE_VISIBLE: [], SINGLE: [], MULTI: []}
    said, truth = [], []
    for i, record in enumerate(records):
        rgb = np.asarray(Image.open(mixed_data / record["image"]).convert("RGB"))
        gt = np.asarray(Image.open(mixed_data / record["answer_mask"]).convert("L")) >= 128
        answer = octopus.ask(rgb, record["conversations"][0]["value"].replace("<image>\n", ""))
        pred = np.ones_like(gt) if answer.whole_image else (np.zeros_like(gt) if answer.mask is None else answer.mask)
        union = (pred | gt).sum()
        iou = 1.0 if union == 0 else (pred & gt).sum() / union
        p = answer.probs or {}
        got = (None if "left" not in p else ("left" if p["left"] >= p["right"] else "right"),
               None if "top" not in p else ("top" if p["top"] >= p["bottom"] else "bottom"))
        want = tuple(record["regions"][record["target_regions"][0]]["position"])
        said.append("none" if None in got else f"{got[1]} {got[0]}")
        truth.append(f"{want[1]} {want[0]}")
        buckets = {0: [SINGLE_VISIBLE, SINGLE], 1: [SINGLE], 2: [MULTI]}[i % 3]  # by construction
        for bucket in buckets:
            per_bucket[bucket].append((iou, got == want))
    for bucket, pairs in per_bucket.items():
        miou = report.find("grounding", bucket, "mIoU")
        both = report.find("grounding", bucket, "position: both")
        assert miou.n == len(pairs) == both.n
        assert miou.value == pytest.approx(float(np.mean([iou for iou, _ in pairs])), abs=1e-9)
        assert both.value == pytest.approx(float(np.mean([hit for _, hit in pairs])))
        assert report.find("grounding", bucket, "mIoU", "SAM @ centre").n == len(pairs)
    top_said = Counter(said).most_common(1)[0][1] / len(said)
    assert report.find("grounding", "position answers", "most frequent answer share").value == pytest.approx(top_said)
    assert report.find("grounding", "position answers", "most frequent answer share", "ground truth").value == \
        pytest.approx(Counter(truth).most_common(1)[0][1] / len(truth))
    for phrase in ("top left", "top right", "bottom left", "bottom right", "none"):
        share = report.find("grounding", "position answers", f"share: {phrase}")
        assert share.n == len(records) and share.value == pytest.approx(said.count(phrase) / len(said))
    subs = [row.subtask for row in report.rows if row.task == "grounding"]
    assert subs.index(SINGLE_VISIBLE) < subs.index(MULTI) < subs.index("position answers") < subs.index("HyD-G-max")
