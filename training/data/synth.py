"""`octopus-rt data synth`: a folder of clean images -> a region-wise distortion dataset.

Pipeline per distorted image ("sample" i, source i mod n_sources): load and downscale the source so
its long side is at most `size` (sources.py); propose regions that tile it (regions.py); either
distort the whole image (uniform case) or 1-3 regions, each with one distortion (severity 1-5; 2-5 for
the categories whose light level is hard to see) or a table-8 ordered pair (severities 1-3 each); write
the image and the region masks as PNG; build the records (tasks.py). One sample is synth_sample.py's
`make_sample`; this module validates the options, groups the sources into splits, runs the samples
on a process pool and gathers their records.

Splits are made by source group: sources whose perceptual hashes (64-bit dHash) are within
`hash_distance` bits, or that a group file puts together, share a group, and a group goes to exactly
one split. Determinism: sample i draws only from `numpy.random.default_rng([seed, i])`, results are
gathered in sample order, so any worker count gives byte-identical files for one seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.training.data.records import POSITION_MARGIN
from octopus_rt.training.data.sources import MIN_SIDE, dhash, list_sources, load_source
from octopus_rt.training.data.synth_sample import make_sample

__all__ = ["SynthOptions", "SynthReport", "synthesize", "group_sources"]

_GENERATED = ("images", "masks", "train.jsonl", "val.jsonl", "test.jsonl", "report.json", "dataset.json", ".work")


@dataclass(frozen=True)
class SynthOptions:
    """Options of `synthesize`. `num`: distorted images to make (None: one per usable source);
    `size`: longest side in pixels (larger sources are downscaled, smaller kept); `sam`: a
    segment-anything checkpoint for region proposals; `groups`: a file of "filename,group" lines;
    `labels`: a folder of user label maps (<source stem>.png, integer values; optional names.json
    {"value": "name"}) used instead of proposals for the sources that have one;
    `uniform_prob`: share of whole-image samples; `feather`: composite feather in pixels;
    `max_regions`: most distorted regions per (non-uniform) image, 1-3; `min_severity`: lowest
    severity of any distortion, 1-5 (ordered pairs only while it is <= 3)."""

    num: int | None = None
    seed: int = 0
    size: int = 512
    sam: str | None = None
    workers: int = 2
    overwrite: bool = False
    resume: bool = False
    groups: str | None = None
    labels: str | None = None
    uniform_prob: float = 0.2
    pair_prob: float = 0.45
    hash_distance: int = 8
    feather: int = 2
    max_regions: int = 3
    min_severity: int = 1
    progress: bool = True


@dataclass
class SynthReport:
    """What a run did: counts per split, skipped sources with reasons."""

    samples: int = 0
    records: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def group_sources(names: list[str], hashes: list[int], max_distance: int, user_groups: dict[str, str]) -> list[int]:
    """Group index per source: union of near-duplicate hashes (Hamming <= max_distance) and the
    user's groups. Group ids are the index of the group's first member (deterministic)."""
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    codes = np.array(hashes, dtype=np.uint64)
    for i in range(len(names) - 1):  # vectorised over j: 10k sources take well under a second
        close = np.flatnonzero(np.bitwise_count(codes[i + 1:] ^ codes[i]) <= max_distance)
        for j in close:
            union(i, i + 1 + int(j))
    first_of: dict[str, int] = {}
    for i, name in enumerate(names):
        key = user_groups.get(name)
        if key is not None:
            if key in first_of:
                union(first_of[key], i)
            else:
                first_of[key] = i
    return [find(i) for i in range(len(names))]


def _read_groups(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    groups = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read group file {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        if len(parts) < 2:
            raise InputError(f"{path}:{number}: expected 'filename,group'")
        groups[parts[0]] = parts[1]
    return groups


def _assign_splits(groups: list[int], seed: int) -> dict[int, str]:
    """Group id -> split, about 80 / 10 / 10 of the groups (val and test get one each once >= 3)."""
    keys = sorted(set(groups))
    order = [keys[i] for i in np.random.default_rng([seed, 0x5EED]).permutation(len(keys))]
    n_eval = max(1, round(0.1 * len(keys))) if len(keys) >= 3 else 0
    out = {}
    for rank, key in enumerate(order):
        out[key] = "val" if rank < n_eval else ("test" if rank < 2 * n_eval else "train")
    return out


def _probe(task: tuple) -> tuple[str, int | None, str | None]:
    path, size, labels = task
    try:
        digest = dhash(load_source(Path(path), size))
        if labels and (label_path := Path(labels) / (Path(path).stem + ".png")).is_file():
            from octopus_rt.training.data.regions import read_label_map

            read_label_map(label_path, header_only=True)  # a bomb label map skips its source, like a bomb source
        return path, digest, None
    except Exception as exc:  # noqa: BLE001 - one bad source is skipped with its reason, never ends the run
        return path, None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _spawn_can_start() -> bool:
    """False when the main program was read from standard input (`python - <<EOF`): spawned workers
    re-run the parent's main file, cannot open "<stdin>", die, and the pool replaces them forever
    (measured: a 24-image run hung for 10 minutes). Such runs fall back to one process."""
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or not main_file.startswith("<")


def _map(fn, tasks: list, workers: int, progress: bool, desc: str):
    from tqdm import tqdm

    bar = dict(total=len(tasks), desc=desc, disable=not progress, unit="img")
    if workers <= 1 or len(tasks) <= 1 or not _spawn_can_start():
        yield from tqdm(map(fn, tasks), **bar)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the parent may hold OpenCV / torch thread pools that fork would break. An executor,
    # not multiprocessing.Pool: a worker that dies (e.g. at start-up) breaks it with an error, where a Pool
    # would replace the worker forever and the run would hang.
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield from tqdm(pool.map(fn, tasks), **bar)
    except BrokenProcessPool:
        raise InputError(f"a worker process of the data engine died ({desc}); if you call it from your own script with "
                         "workers > 1, put the call under `if __name__ == \"__main__\":` (each worker re-imports "
                         "the script), or use workers=1") from None


def synthesize(src_dir: str | Path, out_dir: str | Path, options: SynthOptions = SynthOptions()) -> SynthReport:
    """Build a dataset in `out_dir` from the images in `src_dir` (see the module docstring)."""
    import multiprocessing

    from octopus_rt.training.data.outdir import discard_unstarted, prepare_run

    # A spawned worker is importing a script that calls synthesize() at top level: stop before touching
    # out_dir (the parent's run owns it); the parent then reports the dead worker (_map).
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise InputError("synthesize() called while a worker process imports the main script: "
                         "guard the call with `if __name__ == \"__main__\":`")

    src, out = Path(src_dir), Path(out_dir)
    sources = list_sources(src)
    if options.num is not None and options.num < 1:
        raise InputError("--num must be >= 1")
    if not 0.0 <= options.uniform_prob <= 1.0:
        raise InputError("--uniform must be between 0 and 1")
    if options.workers < 1:
        raise InputError("--workers must be >= 1")
    if options.size < MIN_SIDE:
        raise InputError(f"--size must be >= {MIN_SIDE}")
    if not 1 <= options.max_regions <= 3:
        raise InputError("--max-regions must be 1, 2 or 3")
    if not 1 <= options.min_severity <= 5:
        raise InputError("--min-severity must be between 1 and 5")
    if options.sam:
        from octopus_rt.training.data.regions import load_sam

        load_sam(options.sam)  # fail early, with one line, on a bad checkpoint
    user_groups = _read_groups(options.groups)
    if options.labels and not Path(options.labels).is_dir():
        raise InputError(f"label map folder not found: {options.labels}")
    state = {k: v for k, v in asdict(options).items() if k not in ("workers", "overwrite", "resume", "progress")}
    state["src"] = str(src.resolve())
    created = not out.exists()
    inputs = {"source folder": src, "label folder": Path(options.labels) if options.labels else None,
              "group file": Path(options.groups) if options.groups else None}
    prepare_run(out, inputs, state, resume=options.resume, overwrite=options.overwrite, generated=_GENERATED)
    try:
        return _run(src, out, sources, options, user_groups)
    except BaseException:
        discard_unstarted(out, created)  # a failed run that made no sample leaves the folder as it was
        raise


def _run(src: Path, out: Path, sources: list[Path], options: SynthOptions, user_groups: dict[str, str]) -> SynthReport:
    report = SynthReport()
    probes = list(_map(_probe, [(str(p), options.size, options.labels) for p in sources], options.workers, options.progress, "check"))
    usable = [(Path(p), h) for p, h, err in probes if err is None]
    report.skipped = [(Path(p).name, err) for p, h, err in probes if err is not None]
    if not usable:
        raise InputError(f"none of the {len(sources)} images in {src} is usable (unreadable, under 32x32 or over the pixel limit)")
    names = [p.name for p, _ in usable]
    groups = group_sources(names, [h for _, h in usable], options.hash_distance, user_groups)
    split_of_group = _assign_splits(groups, options.seed)
    split_of_source = {names[i]: split_of_group[g] for i, g in enumerate(groups)}

    num = len(usable) if options.num is None else options.num
    plain = {"seed": options.seed, "size": options.size, "sam": options.sam,
             "uniform_prob": options.uniform_prob, "pair_prob": options.pair_prob, "feather": options.feather,
             "labels": options.labels, "max_regions": options.max_regions, "min_severity": options.min_severity}
    todo = []
    for i in range(num):
        if not (options.resume and (out / ".work" / f"s{i:06d}.json").exists()):
            path = usable[i % len(usable)][0]
            todo.append((i, str(path), path.name, str(out), plain))
    for _ in _map(make_sample, todo, options.workers, options.progress, "synth"):
        pass  # each sample's records are in its part file; gathered below in sample order
    counts = {split: 0 for split in ("train", "val", "test")}
    handles = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") for split in counts}
    try:
        for i in range(num):  # streamed, so a large run never holds all records in memory
            result = json.loads((out / ".work" / f"s{i:06d}.json").read_text(encoding="utf-8"))
            split = split_of_source[result["source"]]
            for record in result["records"]:
                handles[split].write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            counts[split] += len(result["records"])
    finally:
        for handle in handles.values():
            handle.close()
    report.records = counts
    report.samples = num
    (out / "report.json").write_text(json.dumps({
        "samples": num, "records": report.records, "sources": len(usable),
        "groups": len(set(groups)), "skipped": [{"file": f, "reason": r} for f, r in report.skipped],
    }, indent=1) + "\n", encoding="utf-8")
    # What a curriculum or a reader needs to know about how the data was made (difficulty knobs).
    # Rewritten in full: prepare_run's first version (the mark that the folder is ours) plus these.
    from octopus_rt.training.data.outdir import SYNTH_FORMAT, write_meta

    write_meta(out, {
        "format": SYNTH_FORMAT, "src": str(src.resolve()), "seed": options.seed, "size": options.size,
        "uniform_prob": options.uniform_prob, "pair_prob": options.pair_prob, "max_regions": options.max_regions,
        "min_severity": options.min_severity, "position_margin": POSITION_MARGIN, "records": report.records})
    shutil.rmtree(out / ".work")
    return report
