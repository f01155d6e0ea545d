"""`octopus-rt data import`: public quality datasets -> our record form (shared/spec/formats.md).

Formats: q-instruct, dq495k, q-align, q-bench (LLVisionQA JSON), q-bench-hf (option0..3 variant),
kadid (dmos.csv), koniq (scores csv). JSON inputs may be a JSON list or JSON lines. Image paths stay
relative to the image root (`--image-root`, recorded in DATA_DIR/dataset.json) and must stay inside it
(no absolute path, no "..", no symbolic link out); records whose image is missing, outside the root or
not a path, and rows that cannot be converted, are skipped and reported, never abort the import. Scored data gets `mos` and `mos_scale` ([worst, best]);
multiple choice gets `candidates` and `answer`. Conversations use the "<image>\\n" token form.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octopus_rt import vocab
from octopus_rt.errors import InputError

__all__ = ["FORMATS", "ImportReport", "import_dataset", "convert", "level_for_score"]

FORMATS: tuple[str, ...] = ("q-instruct", "dq495k", "q-align", "q-bench", "q-bench-hf", "kadid", "koniq")
_IMAGE_TOKENS = ("<|image|>", "<image>")
_QBENCH_TYPES = {0: "yes-or-no", 1: "how", 2: "what"}
_QBENCH_CONCERNS = {0: "global-distortion", 1: "global-other", 2: "local-distortion", 3: "local-other"}


@dataclass
class ImportReport:
    """Counts per split and the records skipped (with why)."""

    records: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _load_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is neither JSON nor JSON lines: {exc}") from exc
    if isinstance(data, dict):
        # one record (a one-line JSON lines file), or a dump that wraps the list under some key
        record_keys = ("id", "image", "img_path", "image_A", "conversations", "question")
        wrapped = next((v for v in data.values() if isinstance(v, list)), None)
        data = [data] if any(k in data for k in record_keys) or wrapped is None else wrapped
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records")
    return data


def _load_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in required if rows and c not in rows[0]] or ([] if rows else ["(no rows)"])
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _normalise_turns(turns: list[dict]) -> list[dict]:
    """from/value turns with the image token written "<image>\\n" at the start of the first human turn."""
    out = []
    for k, turn in enumerate(turns):
        value = str(turn.get("value", ""))
        if turn.get("from") == "human":
            stripped = value
            for token in _IMAGE_TOKENS:
                stripped = stripped.replace(token + "\n", "").replace(token, "")
            value = ("<image>\n" + stripped.lstrip()) if k == 0 else stripped
        out.append({"from": "gpt" if turn.get("from") in ("gpt", "assistant") else "human", "value": value})
    return out


def level_for_score(mos: float, lo: float, hi: float) -> str:
    """Nearest Q-Align level word for a score on the [lo, hi] scale (hi = best)."""
    unit = (float(mos) - lo) / (hi - lo)
    weights = np.array(vocab.LEVEL_WEIGHTS)
    return vocab.LEVEL_WORDS[int(np.abs(weights - unit).argmin())]


def _score_record(rid: str, image: str, mos: float, scale: tuple[float, float], source: str) -> dict:
    answer = f"{vocab.SCORE_ANSWER_PREFIX} {level_for_score(mos, *scale)}."
    return {"id": rid, "image": image, "task": "score", "subtask": None,
            "conversations": [{"from": "human", "value": "<image>\n" + vocab.SCORE_QUESTION},
                              {"from": "gpt", "value": answer}],
            "source": source, "mos": float(mos), "mos_scale": [float(scale[0]), float(scale[1])]}


def _mcq_record(rid: str, image: str, question: str, options: list[str], correct: str, subtask, extra: dict) -> dict:
    if correct not in options:
        raise ValueError(f"correct answer {correct!r} is not among the candidates")
    letter = vocab.OPTION_LETTERS[options.index(correct)]
    record = {"id": rid, "image": image, "task": "mcq", "subtask": subtask,
              "conversations": [{"from": "human", "value": "<image>\n" + vocab.format_mcq_question(question, options)},
                                {"from": "gpt", "value": f"{letter}. {correct}"}],
              "source": image, "candidates": list(options), "answer": correct}
    record.update(extra)
    return record


def convert(fmt: str, path: Path, *, mos_scale: tuple[float, float] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Read one file of format `fmt`; returns (records, skipped [(item, reason)])."""
    records: list[dict] = []
    skipped: list[tuple[str, str]] = []
    if fmt in ("kadid", "koniq"):
        cols = ("dist_img", "ref_img", "dmos") if fmt == "kadid" else ("image_name", "MOS")
        for k, row in enumerate(_load_csv(path, cols)):
            try:
                if fmt == "kadid":
                    rec = _score_record(f"kadid-{k}", row["dist_img"], float(row["dmos"]), mos_scale or (1.0, 5.0),
                                        row["ref_img"])
                    parts = Path(row["dist_img"]).stem.split("_")
                    if len(parts) == 3:  # IXX_YY_ZZ: reference, distortion type, level
                        rec["subtask"] = f"kadid-type-{parts[1]}"
                        rec["level"] = int(parts[2])
                else:
                    rec = _score_record(f"koniq-{k}", row["image_name"], float(row["MOS"]), mos_scale or (1.0, 5.0),
                                        row["image_name"])
                    if row.get("MOS_zscore"):
                        rec["mos_zscore"] = float(row["MOS_zscore"])
            except Exception as exc:  # noqa: BLE001 - a bad row is recorded, never ends the import
                skipped.append((f"row {k + 2}", f"{type(exc).__name__}: {exc}"))
                continue
            records.append(rec)
        return records, skipped
    for k, item in enumerate(_load_json(path)):
        try:
            if fmt in ("q-instruct", "q-align"):
                rec = {"id": str(item.get("id", f"{fmt}-{k}")), "image": item["image"],
                       "task": "score" if fmt == "q-align" else "qa", "subtask": None,
                       "conversations": _normalise_turns(item["conversations"]), "source": item["image"]}
                if fmt == "q-align":
                    rec["mos"] = float(item["gt_score"])
                    rec["mos_scale"] = list(mos_scale or (1.0, 5.0))
            elif fmt == "dq495k":
                if item.get("image_B") or item.get("image_ref"):
                    skipped.append((str(item.get("id", k)), "not a no-reference single-image record"))
                    continue
                turns = item.get("conversations") or [{"from": "human", "value": item["query"]},
                                                      {"from": "gpt", "value": item["answer"]}]
                rec = {"id": str(item.get("id", f"dq-{k}")), "image": item["image_A"], "task": "qa",
                       "subtask": item.get("task_type"), "conversations": _normalise_turns(turns),
                       "source": item["image_A"]}
            elif fmt == "q-bench":
                rec = _mcq_record(f"qbench-{k}", item["img_path"], item["question"], list(item["candidates"]),
                                  item["correct_ans"], item.get("type"), {"concern": item.get("concern")})
            elif fmt == "q-bench-hf":
                options = [str(item[f"option{i}"]) for i in range(4) if f"option{i}" in item
                           and str(item[f"option{i}"]) != "N/A"]
                letter = str(item["correct_choice"]).strip().upper()
                correct = options[vocab.OPTION_LETTERS.index(letter)]
                image = item.get("img_path") or item.get("image_path") or item["image"]
                concern = _QBENCH_CONCERNS.get(int(item.get("question_concern", -1)))
                rec = _mcq_record(f"qbench-{k}", image, item["question"], options, correct,
                                  _QBENCH_TYPES.get(int(item.get("question_type", -1))), {"concern": concern})
            else:
                raise InputError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
        except Exception as exc:  # noqa: BLE001 - a bad record is recorded, never ends the import
            skipped.append((str(item.get("id", k)) if isinstance(item, dict) else str(k), f"{type(exc).__name__}: {exc}"))
            continue
        records.append(rec)
    return records, skipped


def import_dataset(
    fmt: str, path: str | Path, out_dir: str | Path, *, image_root: str | Path | None = None, split: str = "auto",
    seed: int = 0, mos_scale: tuple[float, float] | None = None, overwrite: bool = False,
) -> ImportReport:
    """Convert `path` and write ``out_dir/{train,val,test}.jsonl`` + ``dataset.json``. `split`:
    train / val / test puts everything in one split; auto splits by source 80 / 10 / 10 (a KADID
    reference image and its distorted versions share a source)."""
    from octopus_rt.paths import resolve_inside
    from octopus_rt.training.data.outdir import META_NAME, prepare_overwrite, write_meta
    from octopus_rt.training.data.records import SPLITS, write_jsonl
    from octopus_rt.training.data.synth import _assign_splits

    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    if split not in SPLITS + ("auto",):
        raise InputError(f"--split must be auto, train, val or test, not {split!r}")
    written = tuple(f"{name}.jsonl" for name in SPLITS)
    if any(path.resolve() == (out / name).resolve() for name in written + (META_NAME,)):
        raise InputError(f"the input {path} is one of the files the import writes into --out {out}; choose another --out")
    prepare_overwrite(out, overwrite, written)
    if image_root is None:
        image_root = path.parent / "images" if fmt == "kadid" and (path.parent / "images").is_dir() else path.parent
    root = Path(image_root)
    records, skipped = convert(fmt, path, mos_scale=mos_scale)
    kept = []
    seen: set[str] = set()
    for rec in records:
        try:
            # Every image stays inside the image root: no absolute path, no "..", no link out of it.
            image = resolve_inside(root, rec["image"], "image path")
        except InputError as exc:
            skipped.append((rec["id"], str(exc)))
            continue
        if not image.is_file():
            skipped.append((rec["id"], f"image not found under {root}: {rec['image']}"))
            continue
        base, n = rec["id"], 1
        while rec["id"] in seen:  # ids must be unique: suffix repeats (never onto another record's id)
            rec["id"], n = f"{base}-{n}", n + 1
        seen.add(rec["id"])
        kept.append(rec)
    if not kept:
        raise InputError(f"no usable records in {path} ({len(skipped)} skipped)")
    sources = sorted({rec["source"] for rec in kept})
    if split == "auto":
        index = {s: i for i, s in enumerate(sources)}
        groups = _assign_splits(list(range(len(sources))), seed)
        split_of = {s: groups[index[s]] for s in sources}
    else:
        split_of = {s: split for s in sources}
    write_meta(out, {"format": fmt, "input": str(path.resolve()), "image_root": str(root.resolve())})  # first: ours
    report = ImportReport()
    for name in SPLITS:
        chosen = [rec for rec in kept if split_of[rec["source"]] == name]
        write_jsonl(chosen, out / f"{name}.jsonl")
        report.records[name] = len(chosen)
    report.skipped = skipped
    (out / "dataset.json").write_text(json.dumps({"format": fmt, "input": str(path.resolve()),
                                                  "image_root": str(root.resolve()), "records": report.records,
                                                  "skipped": len(skipped)}, indent=1) + "\n", encoding="utf-8")
    return report
