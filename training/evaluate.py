"""`octopus-rt eval`: measure a bundle on a dataset split, with baselines and 95 % intervals.

What is measured (per task and sub-task of the record form, docs/eval.md):
- grounding: mIoU (paper metric, empty union = 1), positional accuracy per axis and both (the
  runtime's closed-set probabilities, argmax per axis = the side its point lands on, against the
  target region's eq. 1 terms), whole-image detection recall for both classes;
- referring: short-answer accuracy (the set of distortion names said equals the reference's set),
  long-answer keyword precision / recall (distortion names); descriptions: keyword precision / recall;
- quality: closed-set score over level words -> SRCC / PLCC (raw and after a 4-parameter logistic
  fit) on records with `mos`; multiple-choice accuracy on records with `candidates` / `answer`.
Every grounding figure is also given per difficulty bucket (training/eval_difficulty.py: one
distorted region of severity >= 3, one of any severity, "most degraded" among several), and the
model's position answers as a histogram against the ground truth's (share of each "top left", ...
answer and of the most frequent one: a model that always gives one answer shows here).
Baselines in the same table: majority class (from the train split), the same model on a blank image,
the segmenter prompted at the image centre, at a seeded random point, and at the oracle point (the
ground-truth mask's pixel farthest from its border) as the ceiling. The tau / point-mapping sweep
is training/eval_sweep.py.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt import vocab
from octopus_rt.training import eval_difficulty as difficulty
from octopus_rt.training import eval_metrics as m
from octopus_rt.training.eval_data import (
    load_record_mask,
    load_record_rgb,
    load_split,
    progress,
    question_of,
    reference_of,
    target_region,
)

__all__ = ["EvalOptions", "Row", "EvalReport", "evaluate", "open_bundle", "ask_model", "segment_at"]

PIPELINE = "model"


@dataclass
class EvalOptions:
    """bundle: bundle dir; data_dir: dataset folder with {split}.jsonl. max_records: cap per split
    (first records in file order; None = all). baselines: run the blank-image / point baselines.
    tau / point_mapping: None = the bundle's manifest defaults. seed: random-point baseline and
    bootstrap. threads: onnxruntime intra-op threads."""

    bundle: Path
    data_dir: Path
    split: str = "test"
    max_records: int | None = None
    baselines: bool = True
    tau: float | None = None
    point_mapping: str | None = None
    seed: int = 0
    threads: int = 1
    progress: bool = True


@dataclass
class Row:
    """One figure of the table: task / sub-task, metric name, system (model or baseline), estimate."""

    task: str
    subtask: str
    metric: str
    system: str
    estimate: m.Estimate

    def to_json(self) -> dict:
        return {"task": self.task, "subtask": self.subtask, "metric": self.metric, "system": self.system,
                **self.estimate.to_json()}


@dataclass
class EvalReport:
    bundle: str
    data_dir: str
    split: str
    tau: float
    point_mapping: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sweep: dict | None = None

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "data_dir": self.data_dir, "split": self.split, "tau": self.tau,
                "point_mapping": self.point_mapping, "rows": [r.to_json() for r in self.rows],
                "notes": list(self.notes), "sweep": self.sweep}

    def find(self, task: str, subtask: str, metric: str, system: str = PIPELINE) -> m.Estimate | None:
        for row in self.rows:
            if (row.task, row.subtask, row.metric, row.system) == (task, subtask, metric, system):
                return row.estimate
        return None


def open_bundle(bundle: Path, threads: int):
    """The runtime API over the bundle: `ask` for the model, `segment` (the SAM stage, embedding
    cached per image with the rest of the image's state) for the point-prompted baselines."""
    from octopus_rt.runtime.api import Octopus

    return Octopus(Path(bundle), threads=threads)


def ask_model(octopus, image: Any, question: str, tau: float, mapping: str, segment: bool = True):
    """The model's answer (runtime.results.Answer) at this tau and point mapping."""
    return octopus.ask(image, question, tau=tau, point_mapping=mapping, segment=segment)


def segment_at(octopus, rgb: np.ndarray, point: tuple[float, float]) -> np.ndarray | None:
    """Mask (H x W bool) for one positive point, or None without a SAM section."""
    return octopus.segment(rgb, point).mask if octopus.has_sam else None


def _axis_guess(probs: dict | None, words: tuple[str, str]) -> str | None:
    if not probs or words[0] not in probs:
        return None
    return words[0] if probs[words[0]] >= probs[words[1]] else words[1]


def _answer_mask(answer: Any, shape: tuple[int, int]) -> np.ndarray:
    if answer.whole_image:
        return np.ones(shape, dtype=bool)
    return np.zeros(shape, dtype=bool) if answer.mask is None else np.asarray(answer.mask, dtype=bool)


def _majority(train: list[dict]) -> dict[str, Any]:
    """Majority-class answers from the train split: grounding side pair, whole vs local, distortion set."""
    sides: Counter = Counter()
    whole: Counter = Counter()
    names: Counter = Counter()
    for record in train:
        if record.get("task") == "grounding":
            target = target_region(record)
            if target is None:
                continue
            whole[bool(target.get("whole_image"))] += 1
            if target.get("position"):
                sides[tuple(target["position"])] += 1
        elif record.get("task") == "referring" and str(record.get("subtask", "")).startswith("short"):
            names[frozenset(m.distortion_keywords(reference_of(record)))] += 1
    return {"sides": sides.most_common(1)[0][0] if sides else None,
            "whole": whole.most_common(1)[0][0] if whole else False,
            "names": set(names.most_common(1)[0][0]) if names else set()}


def _grounding(octopus, options: EvalOptions, records: list[dict], tau: float, mapping: str,
               majority: dict) -> list[Row]:
    """Rows of the grounding task (overall and per sub-task) for the model and the baselines."""
    data_dir = Path(options.data_dir)
    rng = np.random.default_rng(options.seed)
    # per (subtask, metric, system) -> values
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    said: dict[str, list[str]] = defaultdict(list)  # system -> position answer phrase per local record
    buckets: list[str] = []

    def put(sub: str, metric: str, system: str, value: float) -> None:
        for key in (sub, "all", *buckets):
            values[(key, metric, system)].append(value)

    for record in progress(records, options.progress, "grounding"):
        target = target_region(record)
        if target is None or not record.get("answer_mask"):
            continue
        sub = str(record.get("subtask") or "all")
        buckets[:] = difficulty.difficulty_buckets(record)
        rgb = load_record_rgb(data_dir, record["image"])
        gt = load_record_mask(data_dir, record["answer_mask"])
        height, width = gt.shape
        is_whole = bool(target.get("whole_image"))
        question = question_of(record)
        systems: dict[str, Any] = {PIPELINE: ask_model(octopus, rgb, question, tau, mapping)}
        if options.baselines:
            systems["blank image"] = ask_model(octopus, np.full_like(rgb, 128), question, tau, mapping, segment=False)
        for system, answer in systems.items():
            put(sub, "whole-image recall (whole)" if is_whole else "whole-image recall (local)", system,
                float(bool(answer.whole_image) == is_whole))
            if system == PIPELINE:
                pred = _answer_mask(answer, gt.shape)
            elif answer.whole_image:
                pred = np.ones(gt.shape, dtype=bool)
            else:  # the blank image's point, prompted on the real image
                pred = None if answer.point is None else segment_at(octopus, rgb, answer.point)
            put(sub, "mIoU", system, m.mask_iou(pred, gt))
            if not is_whole and target.get("position"):
                want_h, want_v = target["position"]
                got_h = _axis_guess(answer.probs, vocab.HORIZONTAL_WORDS)
                got_v = _axis_guess(answer.probs, vocab.VERTICAL_WORDS)
                put(sub, "position: horizontal", system, float(got_h == want_h))
                put(sub, "position: vertical", system, float(got_v == want_v))
                put(sub, "position: both", system, float(got_h == want_h and got_v == want_v))
                if system == PIPELINE:
                    said[PIPELINE].append(difficulty.answer_phrase(got_h, got_v))
                    said["ground truth"].append(difficulty.answer_phrase(want_h, want_v))
        if options.baselines:
            if majority["sides"] is not None and not is_whole and target.get("position"):
                want_h, want_v = target["position"]
                maj_h, maj_v = majority["sides"]
                put(sub, "position: horizontal", "majority class", float(maj_h == want_h))
                put(sub, "position: vertical", "majority class", float(maj_v == want_v))
                put(sub, "position: both", "majority class", float((maj_h, maj_v) == (want_h, want_v)))
            put(sub, "whole-image recall (whole)" if is_whole else "whole-image recall (local)", "majority class",
                float(majority["whole"] == is_whole))
            if octopus.has_sam:
                prompts = {"SAM @ centre": (width / 2.0, height / 2.0),
                           "SAM @ random point": (float(rng.uniform(0, width)), float(rng.uniform(0, height))),
                           "SAM @ oracle point (ceiling)": m.oracle_point(gt)}
                for system, point in prompts.items():
                    put(sub, "mIoU", system, m.mask_iou(segment_at(octopus, rgb, point), gt))
    for system, phrases in said.items():
        most = Counter(phrases).most_common(1)[0][0]
        values[(difficulty.HISTOGRAM, "most frequent answer share", system)] = [float(p == most) for p in phrases]
        for phrase in difficulty.PHRASES + ("none",) * (system == PIPELINE):
            values[(difficulty.HISTOGRAM, f"share: {phrase}", system)] = [float(p == phrase) for p in phrases]
    return _rows("grounding", values, options.seed)


SYSTEM_ORDER = (PIPELINE, "ground truth", "majority class", "blank image", "SAM @ centre", "SAM @ random point",
                "SAM @ oracle point (ceiling)")


def _row_order(sub: str, metric: str, system: str) -> tuple:
    """Table order: sub-task "all" first, the difficulty buckets, the position-answer histogram, then
    the sub-tasks by name; metric; the model before its baselines."""
    rank = SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
    ordered = difficulty.BUCKETS + (difficulty.HISTOGRAM,)
    group = 0 if sub in ("all", "short (all)") else (1 + ordered.index(sub) if sub in ordered else 1 + len(ordered))
    return (group, sub, metric, rank, system)


def _rows(task: str, values: dict[tuple[str, str, str], list[float]], seed: int) -> list[Row]:
    rows = []
    for (sub, metric, system), vals in sorted(values.items(), key=lambda kv: _row_order(*kv[0])):
        # mIoU is a mean of per-record IoUs (bootstrap); the other grounding figures are proportions.
        estimate = m.bootstrap_mean(vals, seed=seed) if metric == "mIoU" else m.proportion(v == 1.0 for v in vals)
        rows.append(Row(task, sub, metric, system, estimate))
    return rows


def _text_tasks(octopus, options: EvalOptions, records: list[dict], tau: float, mapping: str,
                majority: dict) -> list[Row]:
    """Referring (short: exact name-set accuracy; long: keyword P/R) and descriptions (keyword P/R)."""
    data_dir = Path(options.data_dir)
    out: list[Row] = []
    by_task: dict[str, dict[tuple[str, str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in progress(records, options.progress, "text tasks"):
        task = record.get("task")
        if task not in ("referring", "global_description", "local_description"):
            continue
        sub = str(record.get("subtask") or "all")
        reference = m.distortion_keywords(reference_of(record))
        rgb = load_record_rgb(data_dir, record["image"])
        systems = {PIPELINE: ask_model(octopus, rgb, question_of(record), tau, mapping, segment=False).text}
        if options.baselines:
            systems["blank image"] = ask_model(octopus, np.full_like(rgb, 128), question_of(record), tau, mapping,
                                           segment=False).text
        table = by_task[task]
        for system, text in systems.items():
            said = m.distortion_keywords(text)
            if task == "referring" and sub.startswith("short"):
                table[(sub, "short answer: names exact", system)].append(float(said == reference))
                table[("short (all)", "short answer: names exact", system)].append(float(said == reference))
            else:
                precision, recall = m.keyword_precision_recall(said, reference)
                if precision is not None:
                    table[(sub, "keyword precision", system)].append(precision)
                if recall is not None:
                    table[(sub, "keyword recall", system)].append(recall)
        if options.baselines and task == "referring" and sub.startswith("short"):
            hit = float(majority["names"] == reference)
            table[(sub, "short answer: names exact", "majority class")].append(hit)
            table[("short (all)", "short answer: names exact", "majority class")].append(hit)
    for task, table in by_task.items():
        for (sub, metric, system), vals in sorted(table.items(), key=lambda kv: _row_order(*kv[0])):
            estimate = (m.proportion(v == 1.0 for v in vals) if metric.startswith("short")
                        else m.bootstrap_mean(vals, seed=options.seed))
            out.append(Row(task, sub, metric, system, estimate))
    return out


def _mcq_answer_index(record: dict) -> int | None:
    answer, options = record.get("answer"), list(record.get("candidates") or [])
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        if answer in options:
            return options.index(answer)
        if answer.strip().upper() in vocab.OPTION_LETTERS[: len(options)]:
            return vocab.OPTION_LETTERS.index(answer.strip().upper())
    return None


def _quality(octopus, options: EvalOptions, records: list[dict]) -> tuple[list[Row], list[str]]:
    """SRCC / PLCC of the closed-set level score against `mos`; MCQ accuracy on `candidates`."""
    data_dir = Path(options.data_dir)
    preds, mos, hits = [], [], []
    for record in progress(records, options.progress, "quality"):
        if record.get("mos") is not None:
            preds.append(octopus.score(load_record_rgb(data_dir, record["image"])).score)
            mos.append(float(record["mos"]))
        if record.get("candidates") and record.get("answer") is not None:
            want = _mcq_answer_index(record)
            if want is None:
                continue
            # The record's human turn holds the Q-Bench layout already (question + options); `choose`
            # lays the options out itself, so it gets the bare question.
            question = record.get("question") or question_of(record).split(vocab.MCQ_INSTRUCTION)[0].strip()
            choice = octopus.choose(load_record_rgb(data_dir, record["image"]), question, list(record["candidates"]))
            hits.append((str(record.get("subtask") or "all"), choice.index == want))
    rows, notes = [], []
    if preds:
        n = len(preds)
        for metric, value in (("SRCC", m.srcc(preds, mos)), ("PLCC (raw)", m.plcc(preds, mos)),
                              ("PLCC (4-param logistic fit)", m.plcc_fitted(preds, mos))):
            rows.append(Row("quality", "mos", metric, PIPELINE, m.Estimate(value, n, float("nan"), float("nan"), "none")))
        notes.append("quality score: closed-set softmax over level words, score = sum p_i w_i "
                     "(w = 1, .75, .5, .25, 0); PLCC reported raw and after a 4-parameter logistic fit")
    if hits:
        rows.append(Row("mcq", "all", "accuracy", PIPELINE, m.proportion(hit for _, hit in hits)))
        for sub in sorted({sub for sub, _ in hits} - {"all"}):
            rows.append(Row("mcq", sub, "accuracy", PIPELINE, m.proportion(hit for s, hit in hits if s == sub)))
    return rows, notes


def evaluate(options: EvalOptions) -> EvalReport:
    """Run every measurement the split's records allow and return the table (see module docstring)."""
    from octopus_rt.errors import InputError

    records = load_split(options.data_dir, options.split, options.max_records)
    if not records:
        raise InputError(f"the {options.split} split of {options.data_dir} is empty")
    octopus = open_bundle(options.bundle, options.threads)
    tau = float(options.tau if options.tau is not None else octopus.defaults.tau)
    mapping = str(options.point_mapping or octopus.defaults.point_mapping)
    train_path = Path(options.data_dir) / "train.jsonl"
    majority = _majority(load_split(options.data_dir, "train")) if train_path.is_file() else \
        {"sides": None, "whole": False, "names": set()}
    report = EvalReport(str(options.bundle), str(options.data_dir), options.split, tau, mapping)
    report.rows += _grounding(octopus, options, [r for r in records if r.get("task") == "grounding"], tau, mapping,
                              majority)
    report.rows += _text_tasks(octopus, options, records, tau, mapping, majority)
    quality_rows, notes = _quality(octopus, options, records)
    report.rows += quality_rows
    report.notes += notes
    report.notes.append(f"tau {tau:g}, point mapping {mapping}; majority class from the train split; "
                        f"random point seeded with {options.seed}; 95% CI: Wilson for proportions, "
                        "percentile bootstrap (2000 resamples) for means")
    return report
