"""Issue 11: `infer-batch` never loses or corrupts a record and never stops on one bad line; `infer`
checks its outputs before the work; usage errors and odd text give one clear message."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octopus_rt.cli import main
from octopus_rt.errors import InputError
from image_files import write_png_header

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "octopus_rt" / "demo" / "bundle"
IMAGE = REPO / "examples" / "example_1.png"
Q = "Which region is most degraded?"


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _batch(tmp_path: Path, lines: list) -> Path:
    """INPUT.jsonl in tmp_path with the example image beside it; `lines` are dicts or raw bytes."""
    shutil.copy(IMAGE, tmp_path / "a.png")
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return source


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("ascii").splitlines()]


def _batch_args(source: Path, out: Path, *extra) -> tuple:
    return ("infer-batch", source, "--out", out, "--bundle", DEMO, "--max-new-tokens", 3, "--device", "cpu", *extra)


# ------------------------------------------------------------------------------------ infer-batch
def test_every_bad_line_becomes_its_error_record_and_resume_goes_on(tmp_path, capsys, monkeypatch):
    from octopus_rt.runtime.api import Octopus

    real_ask = Octopus.ask

    def ask(self, image, question, **kwargs):
        if question == "boom":  # an unexpected failure inside the model (not an OctopusError)
            raise RuntimeError("onnxruntime fell over")
        return real_ask(self, image, question, **kwargs)

    monkeypatch.setattr(Octopus, "ask", ask)
    source = _batch(tmp_path, [
        {"id": "good", "image": "a.png", "question": Q},
        b'{"id": "surrogate", "image": "a.png", "question": "x \\ud800"}',
        {"id": "number", "image": "a.png", "question": 5},
        {"id": "options", "image": "a.png", "question": "Is it sharp?", "options": 5},
        b'{"id": "bytes", "image": "a.png", "question": "caf\xe9?"}',
        {"id": "boom", "image": "a.png", "question": "boom"},
        {"id": "last", "image": "a.png", "question": Q},
    ])
    out = tmp_path / "out.jsonl"
    code, _, err = _run(capsys, *_batch_args(source, out))
    assert code == 1, err
    records = _records(out)
    assert [r["id"] for r in records] == ["good", "surrogate", "number", "options", "line-5", "boom", "last"]
    by_id = {r["id"]: r for r in records}
    assert "text" in by_id["good"] and "text" in by_id["last"]
    for rid, line, needle in [("surrogate", 2, "UTF-8"), ("number", 3, "question"), ("options", 4, "options"),
                              ("line-5", 5, "UTF-8"), ("boom", 6, "RuntimeError: onnxruntime fell over")]:
        assert needle in by_id[rid]["error"] and by_id[rid]["line"] == line, by_id[rid]
    # Resume: nothing is redone or stops again; a new line is answered.
    with open(source, "ab") as handle:
        handle.write(json.dumps({"id": "new", "image": "a.png", "question": Q}).encode() + b"\n")
    code, _, err = _run(capsys, *_batch_args(source, out))
    assert code == 0, err
    assert [r["id"] for r in _records(out)] == [r["id"] for r in records] + ["new"]
    assert "1 answered, 0 errors, 7 already in" in err


def test_duplicate_ids_are_refused_before_any_work(tmp_path, capsys):
    source = _batch(tmp_path, [{"id": "a", "image": "a.png", "question": Q}, {"id": "b", "image": "a.png", "question": Q},
                               {"id": "a", "image": "a.png", "question": "Where?"}])
    out = tmp_path / "out.jsonl"
    code, _, err = _run(capsys, *_batch_args(source, out))
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "'a' on lines 1, 3" in err and "unique" in err
    assert not out.exists()


def test_ids_that_read_alike_get_their_own_mask_files(tmp_path, capsys):
    source = _batch(tmp_path, [{"id": i, "image": "a.png", "question": Q} for i in ("x/1", "x_1", "X_1")])
    out, masks = tmp_path / "out.jsonl", tmp_path / "masks"
    code, _, err = _run(capsys, *_batch_args(source, out, "--masks", masks))
    assert code == 0, err
    records = _records(out)
    paths = [Path(r["mask"]) for r in records]
    assert all(p is not None for p in paths) and len(set(paths)) == 3 and sorted(masks.iterdir()) == sorted(paths)
    from octopus_rt.runtime import Octopus

    model = Octopus(DEMO, device="cpu")
    for record, path in zip(records, paths):  # each file holds its own answer's mask
        expected = model.ask(tmp_path / "a.png", record["question"], max_new_tokens=3).mask
        np.testing.assert_array_equal(np.asarray(Image.open(path)) == 255, expected)


def test_a_cut_off_last_line_is_repaired_on_resume(tmp_path, capsys):
    source = _batch(tmp_path, [{"id": f"q{i}", "image": "a.png", "question": Q} for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert _run(capsys, *_batch_args(source, out))[0] == 0
    data = out.read_bytes()
    out.write_bytes(data[:-25])  # killed in the middle of writing the third record
    code, _, err = _run(capsys, *_batch_args(source, out))
    assert code == 0, err
    records = _records(out)  # every line parses: no record glued onto a partial one
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert "cut-off last line" in err


def test_a_second_writer_of_the_same_output_is_locked_out(tmp_path, capsys):
    source = _batch(tmp_path, [{"id": "a", "image": "a.png", "question": Q}])
    out = tmp_path / "out.jsonl"
    with open(out, "a") as other:  # another infer-batch holding the output
        fcntl.flock(other, fcntl.LOCK_EX)
        code, _, err = _run(capsys, *_batch_args(source, out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another process is writing" in err
    assert out.read_bytes() == b""


def test_the_output_may_not_be_the_input(tmp_path, capsys):
    source = _batch(tmp_path, [{"id": "a", "image": "a.png", "question": Q}])
    before = source.read_bytes()
    code, _, err = _run(capsys, *_batch_args(source, source))
    assert code == 2 and "is the batch input" in err and source.read_bytes() == before


# ------------------------------------------------------------------------------------------ infer
def test_outputs_are_checked_before_inference(tmp_path, capsys, monkeypatch):
    from octopus_rt.runtime.api import Octopus

    calls = []
    monkeypatch.setattr(Octopus, "ask", lambda *a, **k: calls.append(1))
    image = tmp_path / "photo.png"
    shutil.copy(IMAGE, image)
    before = image.read_bytes()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    cases = [
        (("--overlay", image), "is an input"),
        (("--mask", image), "is an input"),
        (("--mask", blocker / "m.png"), "not a writable folder"),
        (("--overlay", tmp_path / "o.xyz"), "unknown image file extension"),
        (("--mask", tmp_path), "is a folder"),
        (("--mask", tmp_path / "same.png", "--overlay", tmp_path / "same.png"), "different files"),
    ]
    for extra, needle in cases:
        code, _, err = _run(capsys, "infer", image, Q, "--bundle", DEMO, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (extra, err)
    assert calls == [] and image.read_bytes() == before


def test_non_utf8_question_on_the_command_line(tmp_path):
    """The shell passes raw bytes; Python turns \\xff into a lone surrogate, which the tokenizer refused
    with a TypeError."""
    proc = subprocess.run([sys.executable, "-m", "octopus_rt.cli", "infer", str(IMAGE), b"where is it \xff?",
                           "--bundle", str(DEMO), "--max-new-tokens", "2"], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: question is not valid UTF-8") and "TypeError" not in err


def test_usage_errors_print_usage_and_exit_2(capsys):
    code, _, err = _run(capsys, "infer", "--bogus")
    assert code == 2 and "Usage: octopus-rt infer" in err and "No such option: --bogus" in err
    assert "NoSuchOption" not in err and "error: " not in err
    # A question that is literally "--debug": no traceback, a usage error that says what to do...
    code, _, err = _run(capsys, "infer", IMAGE, "--debug")
    assert code == 2 and "No such option: --debug" in err and "'--'" in err
    # ... and after "--" it is just a question.
    code, out, err = _run(capsys, "infer", IMAGE, "--bundle", DEMO, "--max-new-tokens", 2, "--", "--debug")
    assert code == 0 and out.startswith("answer: "), err
    # --debug before the command still shows the traceback.
    with pytest.raises(InputError):
        main(["--debug", "infer", str(IMAGE.with_name("missing.png")), Q, "--bundle", str(DEMO)])


def test_an_image_over_the_pixel_limit_is_not_called_corrupt(tmp_path):
    from octopus_rt.runtime.images import load_image

    with pytest.raises(InputError) as caught:
        load_image(write_png_header(tmp_path / "big.png", 9000, 9000))
    message = str(caught.value)
    assert "above the limit of 64000000" in message and "corrupt" not in message and "truncated" not in message
