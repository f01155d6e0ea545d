"""The benchmarks' --work (benchmarks/bench_work.py): bench_runtime.py deletes and rebuilds sub-folders of
it, so it only takes a folder it made (its marker), a new one or an empty one, and refuses anything else
before touching it (bench_serve.py and bench_peers.py build into the same kind of folder through it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_work():
    spec = importlib.util.spec_from_file_location("bench_work_under_test", ROOT / "benchmarks" / "bench_work.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_foreign_folder_is_refused_and_left_alone(bench_work, tmp_path):
    foreign = tmp_path / "home"
    (foreign / "100m").mkdir(parents=True)
    keep = foreign / "100m" / "thesis.tex"
    keep.write_text("years of work")
    with pytest.raises(SystemExit, match="not empty and was not made by the octopus-rt benchmarks"):
        bench_work.prepare("100m", foreign)  # before the fix: rmtree(foreign / "100m"), then a build
    assert keep.read_text() == "years of work" and not (foreign / bench_work.WORK_MARKER).exists()
    with pytest.raises(SystemExit, match="not a folder"):
        bench_work.claim_work(keep)


def test_new_empty_and_own_folders_are_taken(bench_work, tmp_path):
    new = bench_work.claim_work(tmp_path / "new" / "work")
    assert (new / bench_work.WORK_MARKER).is_file()
    (new / "100m").mkdir()
    assert bench_work.claim_work(new) == new  # its own, with content: taken again
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (bench_work.claim_work(empty) / bench_work.WORK_MARKER).is_file()
