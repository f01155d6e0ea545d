"""`octopus-rt eval` on a tiny exported bundle (random LLaVA + random SAM) and a quadrant dataset.

A random model grounds at chance, so these tests check the bookkeeping against independent
computations: the model's mIoU equals the mean IoU of masks obtained straight from the runtime API,
the oracle-point baseline equals SAM prompted at the distance-transform maximum, the sweep picks the
maximum of its own curves and writes it into the manifest, and the CLI prints and saves the table.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats
from scipy.special import softmax

from octopus_rt.training import evaluate as ev
from octopus_rt.training.eval_data import load_split
from octopus_rt.training.eval_sweep import retemper
from octopus_rt.training.data.quadrant import make_quadrant_dataset


def test_retemper_equals_softmax_of_scaled_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(scale=3.0, size=2)
        p1 = softmax(scores)[0]
        for tau in (0.1, 0.5, 1.0, 3.0):
            assert retemper(p1, tau) == pytest.approx(softmax(scores / tau)[0], abs=1e-9)


@pytest.fixture(scope="module")
def quad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_quad") / "data"
    make_quadrant_dataset(root, 40, size=64, seed=3)  # 32 train / 4 val / 4 test
    return root


def test_grounding_figures_match_the_runtime(tiny_grounding_bundle, quad_data):
    from octopus_rt.runtime.api import Octopus

    options = ev.EvalOptions(tiny_grounding_bundle, quad_data, split="test", progress=False)
    report = ev.evaluate(options)
    records = load_split(quad_data, "test")
    octopus = Octopus(tiny_grounding_bundle, threads=1)
    ious, both = [], []
    oracle_ious = []
    for record in records:
        rgb = np.asarray(Image.open(quad_data / record["image"]).convert("RGB"))
        gt = np.asarray(Image.open(quad_data / record["answer_mask"]).convert("L")) >= 128
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        answer = octopus.ask(rgb, question)
        pred = np.ones_like(gt) if answer.whole_image else (np.zeros_like(gt) if answer.mask is None else answer.mask)
        union = (pred | gt).sum()
        ious.append(1.0 if union == 0 else (pred & gt).sum() / union)
        target = record["regions"][record["target_regions"][0]]
        probs = answer.probs or {}
        got = ("left" if probs.get("left", 0) >= probs.get("right", 1) else "right",
               "top" if probs.get("top", 0) >= probs.get("bottom", 1) else "bottom") if len(probs) == 4 else None
        both.append(got == tuple(target["position"]))
        # Oracle: the farthest-from-border pixel, computed here with scipy directly.
        dist = ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(dist), gt.shape)
        mask = octopus.segment(rgb, (x + 0.5, y + 0.5), multimask=True).mask
        oracle_ious.append(((mask & gt).sum() / max((mask | gt).sum(), 1)) if (mask | gt).any() else 1.0)
    miou = report.find("grounding", "all", "mIoU")
    assert miou.n == len(records)
    assert miou.value == pytest.approx(float(np.mean(ious)), abs=1e-9)
    pos = report.find("grounding", "all", "position: both")
    assert pos.n == len(records) and pos.value == pytest.approx(float(np.mean(both)))
    assert report.find("grounding", "all", "mIoU", "SAM @ oracle point (ceiling)").value == pytest.approx(
        float(np.mean(oracle_ious)), abs=1e-9)
    for system in ("blank image", "SAM @ centre", "SAM @ random point"):
        est = report.find("grounding", "all", "mIoU", system)
        assert est is not None and est.n == len(records) and 0.0 <= est.value <= 1.0
    # Majority class from the train split: its accuracy is the test share of the train's most common side.
    train = load_split(quad_data, "train")
    sides = [tuple(r["regions"][r["target_regions"][0]]["position"]) for r in train]
    common = max(set(sides), key=sides.count)
    want = np.mean([tuple(r["regions"][r["target_regions"][0]]["position"]) == common for r in records])
    assert report.find("grounding", "all", "position: both", "majority class").value == pytest.approx(want)


def test_sweep_writes_the_best_defaults_and_plot(tiny_grounding_bundle, quad_data, tmp_path):
    from octopus_rt.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_grounding_bundle, bundle)
    out_json = tmp_path / "eval.json"
    code = main(["eval", str(bundle), str(quad_data), "--sweep", "--plots", str(tmp_path / "plots"),
                 "--json", str(out_json), "--no-baselines", "--seed", "1"])
    assert code == 0
    data = json.loads(out_json.read_text())
    sweep = data["sweep"]
    best_value = max(max(values) for values in sweep["miou"].values())
    assert sweep["best"]["miou"] == pytest.approx(best_value)
    chosen = sweep["miou"][sweep["best"]["point_mapping"]][sweep["taus"].index(sweep["best"]["tau"])]
    assert chosen == pytest.approx(best_value)
    defaults = json.loads((bundle / "manifest.json").read_text())["defaults"]
    assert defaults["tau"] == sweep["best"]["tau"] and defaults["point_mapping"] == sweep["best"]["point_mapping"]
    # The evaluation after the sweep ran with the new defaults.
    assert data["tau"] == sweep["best"]["tau"] and data["point_mapping"] == sweep["best"]["point_mapping"]
    plot = Image.open(tmp_path / "plots" / "sweep_miou_vs_tau.png")
    assert plot.size == (640, 420)
    assert {row["task"] for row in data["rows"]} >= {"grounding"}


def test_quality_and_mcq_figures_match_the_runtime(tiny_grounding_bundle, tmp_path):
    from octopus_rt import vocab
    from octopus_rt.runtime.api import Octopus
    from octopus_rt.training.data.records import write_jsonl

    rng = np.random.default_rng(4)
    (tmp_path / "images").mkdir()
    records = []
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        records.append({"id": f"s{k}", "image": f"images/{k}.png", "task": "score", "subtask": None,
                        "conversations": [{"from": "human", "value": "<image>\n" + vocab.SCORE_QUESTION},
                                          {"from": "gpt", "value": "The quality of the image is fair."}],
                        "mos": float(rng.uniform(1, 5)), "mos_scale": [1.0, 5.0]})
    options = ["blur", "noise", "none"]
    for k in range(6):
        question = "Which distortion is the most visible?"
        records.append({"id": f"m{k}", "image": f"images/{k}.png", "task": "mcq", "subtask": "local",
                        "conversations": [{"from": "human", "value": "<image>\n" + vocab.format_mcq_question(question, options)},
                                          {"from": "gpt", "value": "A. blur"}],
                        "candidates": options, "answer": options[k % 3]})
    write_jsonl(records, tmp_path / "test.jsonl")
    report = ev.evaluate(ev.EvalOptions(tiny_grounding_bundle, tmp_path, progress=False))
    octopus = Octopus(tiny_grounding_bundle, threads=1)
    scores = [octopus.score(tmp_path / r["image"]).score for r in records[:8]]
    mos = [r["mos"] for r in records[:8]]
    assert report.find("quality", "mos", "SRCC").value == pytest.approx(stats.spearmanr(scores, mos)[0], abs=1e-9)
    assert report.find("quality", "mos", "PLCC (raw)").value == pytest.approx(stats.pearsonr(scores, mos)[0], abs=1e-9)
    hits = [octopus.choose(tmp_path / r["image"], "Which distortion is the most visible?", options).option == r["answer"]
            for r in records[8:]]
    acc = report.find("mcq", "all", "accuracy")
    assert acc.n == 6 and acc.value == pytest.approx(np.mean(hits))
    assert report.find("mcq", "local", "accuracy").n == 6
