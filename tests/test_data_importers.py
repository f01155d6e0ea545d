"""Importers on small files written in each public format (shared/spec/formats.md)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octopus_rt import vocab
from octopus_rt.cli import main
from octopus_rt.errors import InputError
from octopus_rt.training.data.importers import import_dataset, level_for_score
from octopus_rt.training.data.records import read_records


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(path)


def _all(out: Path) -> list[dict]:
    return [r for records in read_records(out).values() for r in records]


def _validate(records):
    import jsonschema

    schema = json.loads(resources.files("octopus_rt").joinpath("schemas/record.schema.json").read_text())
    for record in records:
        jsonschema.validate(record, schema)


def test_q_instruct_multi_turn(tmp_path):
    root = tmp_path / "imgs"
    _image(root / "spaq" / "1.jpg")
    data = [{"id": "qi-1", "image": "spaq/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nHow is the clarity?"}, {"from": "gpt", "value": "Fairly sharp."},
        {"from": "human", "value": "Any noise?"}, {"from": "gpt", "value": "Slight noise in the sky."}]},
        {"id": "qi-2", "image": "spaq/missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    src = tmp_path / "cleaned_labels.json"
    src.write_text(json.dumps(data))
    report = import_dataset("q-instruct", src, tmp_path / "out", image_root=root, split="train")
    records = _all(tmp_path / "out")
    assert [r["id"] for r in records] == ["qi-1"] and report.records["train"] == 1
    assert [s[0] for s in report.skipped] == ["qi-2"]
    assert len(records[0]["conversations"]) == 4 and records[0]["task"] == "qa"
    assert records[0]["image"] == "spaq/1.jpg"
    _validate(records)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert Path(meta["image_root"]) == root.resolve()


def test_dq495k_keeps_no_reference_single_image(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    data = [
        {"id": "1", "image_ref": None, "image_A": "a.png", "image_B": None, "task_type": "quality_single_A_noref",
         "conversations": [{"from": "human", "value": "<image>\nWhat distortions?"}, {"from": "gpt", "value": "Blur."}],
         "distortion_name": "blur_gaussian", "severity": 3},
        {"id": "2", "image_ref": None, "image_A": "a.png", "image_B": "b.png", "task_type": "quality_compare_noref",
         "conversations": [{"from": "human", "value": "Compare"}, {"from": "gpt", "value": "A"}]},
        {"id": "3", "image_ref": None, "image_A": "b.png", "image_B": None, "task_type": "quality_single_A_noref",
         "query": "Which distortion?", "answer": "Noise."},
    ]
    src = tmp_path / "dq.json"
    src.write_text(json.dumps(data))
    report = import_dataset("dq495k", src, tmp_path / "out", split="train")
    records = {r["id"]: r for r in _all(tmp_path / "out")}
    assert sorted(records) == ["1", "3"] and [s[0] for s in report.skipped] == ["2"]
    assert records["3"]["conversations"][0]["value"] == "<image>\nWhich distortion?"
    assert records["1"]["subtask"] == "quality_single_A_noref"
    _validate(records.values())


def test_q_align_jsonl_image_token_and_score(tmp_path):
    _image(tmp_path / "k" / "x.jpg")
    line = {"id": "x", "image": "k/x.jpg", "gt_score": 3.7, "conversations": [
        {"from": "human", "value": "<|image|>How would you rate the quality of this image?"},
        {"from": "gpt", "value": "The quality of the image is good."}]}
    src = tmp_path / "test_koniq.jsonl"
    src.write_text(json.dumps(line) + "\n")
    import_dataset("q-align", src, tmp_path / "out", split="test")
    (record,) = read_records(tmp_path / "out")["test"]
    assert record["mos"] == 3.7 and record["mos_scale"] == [1.0, 5.0] and record["task"] == "score"
    assert record["conversations"][0]["value"].startswith("<image>\nHow would")
    assert "<|image|>" not in record["conversations"][0]["value"]


def test_q_bench_json_and_hf_variants(tmp_path):
    _image(tmp_path / "dev" / "0.jpg")
    plain = [{"img_path": "dev/0.jpg", "question": "Is the image blurry?", "candidates": ["Yes", "No"],
              "correct_ans": "No", "type": "yes-or-no", "concern": "distortion"}]
    (tmp_path / "llvisionqa_dev.json").write_text(json.dumps(plain))
    import_dataset("q-bench", tmp_path / "llvisionqa_dev.json", tmp_path / "o1", split="test")
    (record,) = read_records(tmp_path / "o1")["test"]
    assert record["candidates"] == ["Yes", "No"] and record["answer"] == "No" and record["task"] == "mcq"
    assert record["conversations"][0]["value"] == "<image>\n" + vocab.format_mcq_question("Is the image blurry?",
                                                                                         ["Yes", "No"])
    assert record["conversations"][1]["value"].startswith("B.")
    hf = [{"img_path": "dev/0.jpg", "question": "How is the noise?", "option0": "Heavy", "option1": "Slight",
           "option2": "None", "option3": "N/A", "question_type": 1, "question_concern": 2, "correct_choice": "C"}]
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    import_dataset("q-bench-hf", tmp_path / "hf.json", tmp_path / "o2", split="test")
    (record,) = read_records(tmp_path / "o2")["test"]
    assert record["candidates"] == ["Heavy", "Slight", "None"] and record["answer"] == "None"
    assert record["subtask"] == "how" and record["concern"] == "local-distortion"
    _validate([record])


def test_kadid_split_by_reference(tmp_path):
    rows = []
    for ref in range(1, 9):
        for dtype, level in ((1, 1), (5, 3)):
            name = f"I{ref:02d}_{dtype:02d}_{level:02d}.png"
            _image(tmp_path / "images" / name)
            rows.append({"dist_img": name, "ref_img": f"I{ref:02d}.png", "dmos": f"{1 + (ref % 5) * 0.9:.2f}",
                         "var": "0.1"})
    with open(tmp_path / "dmos.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["dist_img", "ref_img", "dmos", "var"])
        writer.writeheader()
        writer.writerows(rows)
    import_dataset("kadid", tmp_path / "dmos.csv", tmp_path / "out")  # image root defaults to images/
    by_split = read_records(tmp_path / "out")
    assert sum(len(v) for v in by_split.values()) == 16
    assert all(by_split[s] for s in ("train", "val", "test"))
    seen = {}
    for split, records in by_split.items():
        for r in records:
            assert seen.setdefault(r["source"], split) == split  # a reference never spans splits
            assert 1 <= r["mos"] <= 5 and r["mos_scale"] == [1.0, 5.0]
            level = r["conversations"][1]["value"].split()[-1].rstrip(".")
            assert level == level_for_score(r["mos"], 1, 5)
    _validate([r for v in by_split.values() for r in v])


def test_koniq_csv(tmp_path):
    _image(tmp_path / "1024x768" / "a.jpg")
    text = "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\na.jpg,0,1,2,50,40,93,4.39,0.7,84.2\n"
    (tmp_path / "koniq.csv").write_text(text)
    import_dataset("koniq", tmp_path / "koniq.csv", tmp_path / "out", image_root=tmp_path / "1024x768",
                   split="train")
    (record,) = read_records(tmp_path / "out")["train"]
    assert record["mos"] == 4.39 and record["mos_zscore"] == 84.2
    assert record["conversations"][1]["value"] == f"{vocab.SCORE_ANSWER_PREFIX} good."


def test_level_words_follow_scale():
    words = [level_for_score(s, 1, 5) for s in (5, 4, 3, 2, 1)]
    assert words == list(vocab.LEVEL_WORDS)
    assert level_for_score(100, 0, 100) == vocab.LEVEL_WORDS[0]


def test_bad_input(tmp_path, capsys):
    with pytest.raises(InputError):
        import_dataset("nope", tmp_path / "x.json", tmp_path / "o")
    with pytest.raises(InputError):
        import_dataset("kadid", tmp_path / "missing.csv", tmp_path / "o")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main(["data", "import", "kadid", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing column" in capsys.readouterr().err


def test_show_imported_record(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    (tmp_path / "q.json").write_text(json.dumps([{"img_path": "a.png", "question": "Is it sharp?",
                                                  "candidates": ["Yes", "No"], "correct_ans": "Yes"}]))
    assert main(["data", "import", "q-bench", str(tmp_path / "q.json"), "--out", str(tmp_path / "o"),
                 "--image-root", str(tmp_path / "imgs"), "--split", "test"]) == 0
    assert main(["data", "show", str(tmp_path / "o"), "qbench-0", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
