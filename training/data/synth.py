"""`octopus-rt data synth`: a folder of clean images -> a region-wise distortion dataset.

Pipeline per distorted image ("sample" i, source i mod n_sources): load and downscale the source so
its long side is at most `size`; propose regions that tile it (regions.py); either distort the whole
image (uniform case) or 1-3 regions, each with one distortion (severity 1-5; 2-5 for the categories
whose light level is hard to see) or a table-8 ordered pair (severities 1-3 each); write the image
and the region masks as PNG; build the records (tasks.py).

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

__all__ = ["SynthOptions", "SynthReport", "IMAGE_EXTENSIONS", "synthesize", "make_sample", "list_sources", "dhash", "group_sources"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 32
# Sources above this are skipped before decoding (a 420 KB PNG can claim 12000 x 12000 pixels and
# take gigabytes): the runtime's limit (octopus_rt.runtime.images.DEFAULT_MAX_PIXELS, 64 megapixels).
MAX_SOURCE_PIXELS = 64_000_000
# Light levels of these are hard to see (spec): single distortions of them start at severity 2.
_FAINT_AT_ONE = ("brighten", "darken", "contrast_strengthen", "contrast_weaken", "saturate_strengthen",
                 "saturate_weaken", "quantization", "oversharpen")
_GENERATED = ("images", "masks", "train.jsonl", "val.jsonl", "test.jsonl", "report.json", "dataset.json", ".work")
# Ordered pairs draw severities 1-3 per step (DQ-495K), so they exist only up to this --min-severity.
_PAIR_MAX_SEVERITY = 3


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


def list_sources(src_dir: Path) -> list[Path]:
    """Image files directly in `src_dir` (by extension), sorted by name."""
    if not src_dir.is_dir():
        raise InputError(f"source folder not found: {src_dir}")
    files = sorted(p for p in src_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src_dir}")
    return files


def _load(path: Path, size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB, long side at most `size`. Raises ValueError / OSError when unusable,
    ValueError before decoding when the header promises more than MAX_SOURCE_PIXELS pixels."""
    import warnings

    import cv2
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"too large to decode safely ({exc})") from None
    with im:
        if im.width * im.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{im.width}x{im.height} = {im.width * im.height} pixels, above the limit of "
                             f"{MAX_SOURCE_PIXELS} (downscale it)")
        # phone photos store their rotation in EXIF; apply it so masks match what people see
        image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"too small ({width}x{height} < {MIN_SIDE}x{MIN_SIDE})")
    scale = size / max(height, width)
    if scale < 1.0:
        new = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
        image = cv2.resize(image, new, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a (H, W, 3) uint8 image (9x8 grayscale, horizontal gradients)."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


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


# ------------------------------------------------------------------------------------ per-sample
def _sample_chain(rng: np.random.Generator, pair: bool, category: str | None = None,
                  min_severity: int = 1) -> list[dict]:
    from octopus_rt.training.data.composite import ORDERED_PAIRS
    from octopus_rt.training.data.distortions import CATEGORIES, subtypes

    pair = pair and min_severity <= _PAIR_MAX_SEVERITY
    if pair:
        cats = ORDERED_PAIRS[int(rng.integers(len(ORDERED_PAIRS)))]
        # 1-3 each (DQ-495K); the faint categories from 2, so their label stays perceivable
        severities = [int(rng.integers(max(2 if c in _FAINT_AT_ONE else 1, min_severity), 4)) for c in cats]
    else:
        cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        cats = (cat,)
        low = max(2 if cat in _FAINT_AT_ONE else 1, min_severity)
        severities = [int(rng.integers(low, 6))]
    chain = []
    for cat, severity in zip(cats, severities):
        names = subtypes(cat)
        chain.append({"category": cat, "subtype": names[int(rng.integers(len(names)))], "severity": severity})
    return chain


def _user_regions(labels_dir: str | None, source_path: str, shape: tuple[int, int]):
    """(masks, names) from the user's label map for this source, None when there is none."""
    if not labels_dir:
        return None
    import cv2

    from octopus_rt.training.data.regions import label_map_regions, read_label_map

    path = Path(labels_dir) / (Path(source_path).stem + ".png")
    if not path.is_file():
        return None
    label_map = read_label_map(path)
    label_map = cv2.resize(label_map.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    names_file = Path(labels_dir) / "names.json"
    names = json.loads(names_file.read_text(encoding="utf-8")) if names_file.is_file() else {}
    regions = label_map_regions(label_map.astype(np.int32))
    if not regions:
        return None
    return [m for m, _ in regions], [names.get(str(v)) for _, v in regions]


def make_sample(task: tuple) -> int:
    """Worker body: one distorted image, its masks, and its records in ``.work/s<index>.json``
    (written last, atomically: the marker --resume trusts). Returns the sample index."""
    import cv2

    from octopus_rt.training.data.composite import apply_chain
    from octopus_rt.training.data.records import region_from_mask, save_image, save_mask
    from octopus_rt.training.data.regions import RegionOptions, describe_region, load_sam, propose_regions
    from octopus_rt.training.data.tasks import build_records

    cv2.setNumThreads(1)  # one process per core already
    index, source_path, source_id, out_dir, options = task
    out = Path(out_dir)
    rng = np.random.default_rng([options["seed"], index])
    image = _load(Path(source_path), options["size"])
    height, width = image.shape[:2]
    sample_id = f"s{index:06d}"
    sam = load_sam(options["sam"]) if options["sam"] else None
    # A third of the images get at most 4 regions, all but one distorted (see below).
    coarse = rng.random() < 0.35
    user = _user_regions(options["labels"], source_path, (height, width))
    if user is not None:
        masks, names = user
        coarse = coarse and len(masks) <= 4
    else:
        masks = propose_regions(image, rng, RegionOptions(max_kept=4) if coarse else RegionOptions(),
                                sam_generator=sam)
        names = [None] * len(masks)
    uniform = len(masks) < 2 or rng.random() < options["uniform_prob"]
    regions = []
    if uniform:
        full = np.ones((height, width), dtype=bool)
        rel = f"masks/{sample_id}_whole.png"
        save_mask(full, out / rel)
        region = region_from_mask(0, full, rel, "whole image", whole_image=True)
        region.distortions = _sample_chain(rng, rng.random() < options["pair_prob"],
                                           min_severity=options["min_severity"])
        image = apply_chain(image, full, region.distortions, rng, options["feather"])
        regions.append(region)
    else:
        labels = [name or describe_region(image, m) for name, m in zip(names, masks)]
        most = options["max_regions"]
        k = int(rng.integers(1, min(most, len(masks)) + 1))
        if coarse:
            # all regions but one: the clean one is then the unique "least degraded" (HyD-G-min)
            k = min(len(masks) - 1, most)
        chosen = sorted(int(i) for i in rng.choice(len(masks), size=k, replace=False))
        shared = None
        chains = {}
        for i in chosen:
            pair = rng.random() < options["pair_prob"]
            # Sometimes reuse one category in several regions, so SiD-G can compare intensities.
            category = shared if (shared is not None and not pair and rng.random() < 0.5) else None
            chains[i] = _sample_chain(rng, pair, category, options["min_severity"])
            shared = shared or chains[i][0]["category"]
        distorted = image
        for i in chosen:
            distorted = apply_chain(distorted, masks[i], chains[i], rng, options["feather"])
        image = distorted
        for i, mask in enumerate(masks):
            rel = f"masks/{sample_id}_r{i}.png"
            save_mask(mask, out / rel)
            region = region_from_mask(i, mask, rel, labels[i])
            region.distortions = chains.get(i, [])
            regions.append(region)
    image_rel = f"images/{sample_id}.png"
    save_image(image, out / image_rel)
    records = build_records(sample_id, image_rel, regions, rng, width=width, height=height, source=source_id)
    result = {"index": index, "source": source_id, "records": records}
    part = out / ".work" / f"{sample_id}.json"
    tmp = part.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    tmp.replace(part)  # the part file is the commit marker for --resume
    return index


def _probe(task: tuple) -> tuple[str, int | None, str | None]:
    path, size, labels = task
    try:
        digest = dhash(_load(Path(path), size))
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

    # spawn, not fork: the parent may hold OpenCV / torch thread pools that fork would break.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(fn, tasks), **bar)


def synthesize(src_dir: str | Path, out_dir: str | Path, options: SynthOptions = SynthOptions()) -> SynthReport:
    """Build a dataset in `out_dir` from the images in `src_dir` (see the module docstring)."""
    from octopus_rt.training.data.outdir import discard_unstarted, prepare_run

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
