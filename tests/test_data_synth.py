"""`data synth` end to end on small images: record invariants, splits, determinism, schema."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from octopus_rt import vocab
from octopus_rt.training.data.composite import order_allowed
from octopus_rt.training.data.records import read_records
from octopus_rt.training.data.sources import dhash
from octopus_rt.training.data.synth import SynthOptions, group_sources, synthesize

SIZE = 96


def _write_sources(folder: Path) -> None:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        image = getattr(data, name)()
        h, w = image.shape[:2]
        small = cv2.resize(image, (SIZE * w // max(h, w), SIZE * h // max(h, w)), interpolation=cv2.INTER_AREA)
        Image.fromarray(small).save(folder / f"{name}.png")
    # a near duplicate: a slightly brighter copy of the astronaut; must share the astronaut's split
    astro = np.asarray(Image.open(folder / "astronaut.png")).astype(np.int16)
    Image.fromarray(np.clip(astro + 6, 0, 255).astype(np.uint8)).save(folder / "astronaut_copy.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((16, 40, 3), np.uint8)).save(folder / "tiny.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    _write_sources(root / "src")
    options = SynthOptions(num=24, seed=3, size=SIZE, workers=1, progress=False)
    report = synthesize(root / "src", root / "out", options)
    return root, report, options


def _records(out):
    return [r for records in read_records(out).values() for r in records]


def _mask(out, rel):
    return np.asarray(Image.open(out / rel)) > 127


def test_report_lists_skipped_images(dataset):
    _, report, _ = dataset
    assert sorted(name for name, _ in report.skipped) == ["broken.png", "tiny.png"]
    assert report.samples == 24


def test_all_tasks_and_subtasks_present(dataset):
    root, _, _ = dataset
    records = _records(root / "out")
    tasks = {r["task"] for r in records}
    assert tasks == {"global_description", "local_description", "grounding", "referring"}
    subtasks = {r["subtask"] for r in records}
    assert {"HyD-G-max", "SiD-G-max", "DAO-G"} <= subtasks
    assert any(s.startswith(("short-", "long-")) for s in subtasks if s)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


def test_records_validate_against_schema(dataset):
    import jsonschema

    schema = json.loads(resources.files("octopus_rt").joinpath("schemas/record.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    root, _, _ = dataset
    for record in _records(root / "out"):
        validator.validate(record)


def test_regions_recomputed_from_masks(dataset):
    """bbox, centre and eq. 1 positional terms recomputed from each mask PNG agree with the record."""
    root, _, _ = dataset
    out = root / "out"
    checked = set()
    for record in _records(out):
        image = np.asarray(Image.open(out / record["image"]))
        assert image.shape[:2] == (record["height"], record["width"])
        union = np.zeros(image.shape[:2], dtype=int)
        assert [r["id"] for r in record["regions"]] == list(range(len(record["regions"])))  # id = list index
        for region in record["regions"]:
            mask = _mask(out, region["mask"])
            union += mask
            if region["mask"] in checked:
                continue
            checked.add(region["mask"])
            ys, xs = np.nonzero(mask)
            bbox = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert region["bbox"] == [int(v) for v in bbox]
            cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
            assert region["center"] == [cx, cy]
            if region["whole_image"]:
                assert region["position"] is None and mask.all()
            else:
                horizontal = "left" if cx / record["width"] < 0.5 else "right"
                vertical = "top" if cy / record["height"] < 0.5 else "bottom"
                assert region["position"] == [horizontal, vertical]
            assert region["intensity"] == sum(d["severity"] for d in region["distortions"])
        assert (union == 1).all()  # regions tile the image


def test_orders_within_table8_and_severities(dataset):
    root, _, _ = dataset
    for record in _records(root / "out"):
        for region in record["regions"]:
            categories = [d["category"] for d in region["distortions"]]
            assert order_allowed(categories) if categories else True
            if len(categories) == 2:
                assert all(1 <= d["severity"] <= 3 for d in region["distortions"])


def test_answers_use_shared_vocabulary(dataset):
    root, _, _ = dataset
    out = root / "out"
    for record in _records(out):
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question.startswith("<image>\n")
        regions = {r["id"]: r for r in record["regions"]}
        if record["task"] == "grounding":
            target = regions[record["target_regions"][0]]
            assert len(record["target_regions"]) == 1 and record["answer_mask"] == target["mask"]
            if target["whole_image"]:
                assert vocab.says_whole_image(answer) and _mask(out, record["answer_mask"]).all()
            else:
                phrase = vocab.position_phrase(*target["position"])
                assert answer.startswith(f"The {phrase} region, the {target['label']},")
        if record["task"] == "referring":
            target = regions[record["target_regions"][0]]
            for d in target["distortions"]:
                assert vocab.DISTORTION_NAMES[d["category"]] in answer.lower()


def test_grounding_targets_are_unambiguous(dataset):
    root, _, _ = dataset
    for record in _records(root / "out"):
        if record["task"] != "grounding" or len(record["regions"]) == 1:
            continue
        regions = record["regions"]
        target = next(r for r in regions if r["id"] == record["target_regions"][0])
        others = [r for r in regions if r is not target]
        if record["subtask"] == "HyD-G-max":
            assert all(target["intensity"] > r["intensity"] for r in others)
        elif record["subtask"] == "HyD-G-min":
            assert all(target["intensity"] < r["intensity"] for r in others)
        elif record["subtask"] == "DAO-G":
            order = [d["category"] for d in target["distortions"]]
            assert len(order) == 2
            answer = record["conversations"][1]["value"]
            first, second = (vocab.DISTORTION_NAMES[c] for c in order)
            assert f"{first} first and then {second}" in answer


def test_splits_disjoint_by_source_group(dataset):
    root, _, _ = dataset
    split_of_source = {}
    for split, records in read_records(root / "out").items():
        for record in records:
            assert split_of_source.setdefault(record["source"], split) == split
    # the near-duplicate copy is in the astronaut's split (when both were sampled)
    if "astronaut_copy.png" in split_of_source and "astronaut.png" in split_of_source:
        assert split_of_source["astronaut_copy.png"] == split_of_source["astronaut.png"]


def test_near_duplicate_hash_groups():
    from skimage import data

    image = cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
    brighter = np.clip(image.astype(int) + 8, 0, 255).astype(np.uint8)
    other = cv2.resize(data.coffee(), (64, 64), interpolation=cv2.INTER_AREA)
    hashes = [dhash(image), dhash(brighter), dhash(other)]
    assert group_sources(["a", "b", "c"], hashes, 8, {}) == [0, 0, 2]
    assert group_sources(["a", "b", "c"], hashes, 8, {"c": "g", "a": "g"}) == [0, 0, 0]


def test_same_seed_byte_identical_with_two_workers(dataset, tmp_path):
    root, _, options = dataset
    again = tmp_path / "again"
    synthesize(root / "src", again, SynthOptions(**{**options.__dict__, "workers": 2}))
    first = sorted(p.relative_to(root / "out") for p in (root / "out").rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (root / "out" / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_two_workers_from_a_program_on_standard_input_finish(dataset, tmp_path):
    import subprocess
    import sys

    root, _, _ = dataset
    program = (f"from octopus_rt.training.data.synth import SynthOptions, synthesize\n"
               f"r = synthesize({str(root / 'src')!r}, {str(tmp_path / 'out')!r}, "
               f"SynthOptions(num=3, seed=0, size={SIZE}, workers=2, progress=False))\nprint(r.samples)\n")
    # Spawned workers cannot re-run a main program read from stdin; without the fallback this hangs.
    done = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


def test_two_workers_from_an_unguarded_script_fail_with_a_hint(dataset, tmp_path):
    """A script that calls synthesize() at top level without `if __name__ == "__main__":` makes every
    spawned worker re-run it; with multiprocessing.Pool this respawned workers forever (a silent hang).
    Now the workers stop before touching the output folder and the run fails with the hint."""
    import subprocess
    import sys

    root, _, _ = dataset
    script = tmp_path / "unguarded.py"
    script.write_text(f"from octopus_rt.training.data.synth import SynthOptions, synthesize\n"
                      f"synthesize({str(root / 'src')!r}, {str(tmp_path / 'out')!r}, "
                      f"SynthOptions(num=3, seed=0, size={SIZE}, workers=2, progress=False))\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert 'if __name__ == "__main__"' in done.stderr.splitlines()[-1]
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_other_seed_differs(dataset, tmp_path):
    root, _, options = dataset
    other = tmp_path / "other"
    synthesize(root / "src", other, SynthOptions(**{**options.__dict__, "num": 4, "seed": 4}))
    assert (other / "train.jsonl").read_bytes() != (root / "out" / "train.jsonl").read_bytes()


def test_images_are_png_not_jpeg(dataset):
    root, _, _ = dataset
    for path in (root / "out" / "images").iterdir():
        assert path.suffix == ".png" and path.read_bytes()[:4] == b"\x89PNG"


def test_user_label_maps_give_regions_and_names(tmp_path):
    src = tmp_path / "src"
    _write_sources(src)
    labels = tmp_path / "labels"
    labels.mkdir()
    with Image.open(src / "coffee.png") as im:
        w, h = im.size
    label_map = np.zeros((h, w), np.uint8)
    label_map[:, w // 2:] = 7
    label_map[: h // 3, : w // 2] = 3
    Image.fromarray(label_map, mode="L").save(labels / "coffee.png")
    (labels / "names.json").write_text(json.dumps({"0": "saucer", "7": "table", "3": "cup"}))
    (src / "astronaut_copy.png").unlink()
    for name in ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        (src / f"{name}.png").unlink()
    out = tmp_path / "out"
    synthesize(src, out, SynthOptions(num=6, seed=0, size=SIZE, workers=1, labels=str(labels), uniform_prob=0.0,
                                      progress=False))
    records = _records(out)
    for record in records:
        assert sorted(r["label"] for r in record["regions"]) == ["cup", "saucer", "table"]
        for region in record["regions"]:
            mask = _mask(out, region["mask"])
            expected = {"table": label_map == 7, "cup": label_map == 3, "saucer": label_map == 0}[region["label"]]
            assert np.array_equal(mask, expected)
