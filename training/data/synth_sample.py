"""One sample of `data synth` (the worker body): a distorted image, its region masks, its records.

Sample i draws only from `numpy.random.default_rng([seed, i])`, so its files do not depend on the
worker that makes it. Regions come from the user's label map for the source when there is one, else
from the proposals (training/data/regions.py); the whole image (uniform case) or 1-3 regions get one
distortion (severity 1-5; 2-5 for the categories whose light level is hard to see) or a table-8
ordered pair (severities 1-3 each). The sample's records (training/data/tasks.py) are written last,
atomically, to ``.work/s<index>.json``: the marker `--resume` trusts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from octopus_rt.training.data.sources import load_source

__all__ = ["make_sample"]

# Light levels of these are hard to see (spec): single distortions of them start at severity 2.
_FAINT_AT_ONE = ("brighten", "darken", "contrast_strengthen", "contrast_weaken", "saturate_strengthen",
                 "saturate_weaken", "quantization", "oversharpen")
# Ordered pairs draw severities 1-3 per step (DQ-495K), so they exist only up to this --min-severity.
_PAIR_MAX_SEVERITY = 3


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
    image = load_source(Path(source_path), options["size"])
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
