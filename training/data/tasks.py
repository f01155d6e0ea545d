"""From one distorted image and its regions to question / answer records of the four tasks.

`build_records` writes a record only when its answer is unambiguous: a grounding target's box centre
must lie clearly off both midlines (records.POSITION_MARGIN; otherwise its position words are a
tie-break, not a position); HyD-G needs a unique maximum
(minimum) of cumulative intensity over the regions that tile the image; SiD-G a unique maximum of
one category's severity (the minimum is taken among the regions that show that distortion, and must
be unique too); DAO-G a region whose order (or first / last step) no other region shares; referring
and local description a region whose reference (label + position) no other region shares.
"""

from __future__ import annotations

import numpy as np

from octopus_rt.training.data import questions as q
from octopus_rt.training.data.records import Region, conversation, position_ambiguous

__all__ = ["build_records"]


def _pick(pool: str, rng: np.random.Generator, **fields: str) -> str:
    options = q.POOLS[pool]
    return options[int(rng.integers(len(options)))].format(**fields)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique_extreme(values: list[int], want_max: bool) -> int | None:
    """Index of the unique max (min) of `values`, None when tied."""
    target = max(values) if want_max else min(values)
    hits = [i for i, v in enumerate(values) if v == target]
    return hits[0] if len(hits) == 1 else None


def _categories(region: Region) -> list[str]:
    out: list[str] = []
    for d in region.distortions:
        if d["category"] not in out:
            out.append(d["category"])
    return out


def build_records(
    sample_id: str, image_rel: str, regions: list[Region], rng: np.random.Generator, *, width: int, height: int,
    source: str,
) -> list[dict]:
    """All unambiguous records for one distorted image (see the module docstring). Regions tile the
    image (or there is one whole-image region). Record ids are `<sample_id>-<n>`."""
    records: list[dict] = []
    region_json = [r.to_json() for r in regions]
    by_id = {r.id: r for r in regions}

    def add(task: str, subtask: str | None, question: str, answer: str, targets: list[int], mask: str | None):
        if task == "grounding" and any(not by_id[t].whole_image and position_ambiguous(
                by_id[t].center, width, height) for t in targets):
            return  # ill-posed position words (see the module docstring)
        records.append({
            "id": f"{sample_id}-{len(records)}",
            "image": image_rel,
            "task": task,
            "subtask": subtask,
            "conversations": conversation(question, answer),
            "regions": region_json,
            "target_regions": targets,
            "answer_mask": mask,
            "source": source,
            "width": width,
            "height": height,
        })

    distorted = [r for r in regions if r.distortions]
    worst = max((r.intensity for r in regions), default=0)
    whole = len(regions) == 1 and regions[0].whole_image
    level = q.quality_word(worst, whole)

    # Task 1: global description.
    if whole:
        region = regions[0]
        answer = (f"{q.spatial_lead(region.label, None)} is affected by {q.describe_chain(region.distortions)}. "
                  f"{q.effects_sentence(region.distortions)} Overall, the quality of the image is {level}.")
    else:
        parts = [f"{q.spatial_lead(r.label, r.position)} shows {q.describe_chain(r.distortions)}" for r in distorted]
        clean = "The remaining regions look clean." if len(distorted) < len(regions) else ""
        effects = q.effects_sentence([d for r in distorted for d in r.distortions])
        answer = " ".join(p for p in ["The image is degraded region by region.", ". ".join(parts) + ".", clean,
                                      effects, f"Overall, the quality of the image is {level}."] if p)
    add("global_description", None, _pick("global_description", rng), answer, [r.id for r in distorted], None)

    references = [q.region_reference(r.label, r.position) for r in regions]
    unique_ref = [references.count(ref) == 1 for ref in references]

    # Task 2: local description of one distorted region and, when there is one, one clean region.
    described = [r for r in distorted if unique_ref[regions.index(r)]][:1]
    clean_regions = [r for r in regions if not r.distortions and unique_ref[regions.index(r)]]
    if clean_regions:
        described.append(clean_regions[int(rng.integers(len(clean_regions)))])
    for region in described:
        ref = references[regions.index(region)]
        if region.distortions:
            own = q.quality_word(region.intensity, True)
            answer = (f"{ref[0].upper() + ref[1:]} suffers from {q.describe_chain(region.distortions)}. "
                      f"{q.effects_sentence(region.distortions)} Its quality is {own}.")
        else:
            answer = (f"{ref[0].upper() + ref[1:]} is clean: it shows no visible distortion, with intact detail "
                      "and natural tones. Its quality is excellent.")
        add("local_description", None, _pick("local_description", rng, region=ref), answer, [region.id], region.mask)

    # Task 3: grounding.
    if whole:
        region = regions[0]
        answer = f"{q.spatial_lead(region.label, None)} is uniformly affected by {q.describe_chain(region.distortions)}."
        add("grounding", "HyD-G-max", _pick("HyD-G-max", rng), answer, [region.id], region.mask)
    else:
        intensities = [r.intensity for r in regions]
        for want_max in (True, False):
            index = _unique_extreme(intensities, want_max)
            if index is None or (want_max and intensities[index] == 0):
                continue
            r = regions[index]
            lead = q.spatial_lead(r.label, r.position)
            if want_max:
                answer = f"{lead} is the most degraded region, with {q.describe_chain(r.distortions)}."
            elif r.intensity == 0:
                answer = f"{lead} is the least degraded region; it shows no visible distortion."
            else:
                answer = f"{lead} is the least degraded region, with only {q.describe_chain(r.distortions)}."
            sub = "HyD-G-max" if want_max else "HyD-G-min"
            add("grounding", sub, _pick(sub, rng), answer, [r.id], r.mask)
        present = sorted({c for r in distorted for c in _categories(r)})
        for category in present:
            name = q.distortion_name(category)
            levels = [r.severity_of(category) for r in regions]
            index = _unique_extreme(levels, True)
            if index is not None:
                r = regions[index]
                word = q.SEVERITY_WORDS[min(levels[index], 5) - 1]
                answer = f"{q.spatial_lead(r.label, r.position)} shows the strongest {name}, at {_article(word)} {word} level."
                add("grounding", "SiD-G-max", _pick("SiD-G-max", rng, d=name), answer, [r.id], r.mask)
            affected = [i for i, v in enumerate(levels) if v > 0]
            if len(affected) >= 2:
                sub_index = _unique_extreme([levels[i] for i in affected], False)
                if sub_index is not None:
                    r = regions[affected[sub_index]]
                    word = q.SEVERITY_WORDS[min(r.severity_of(category), 5) - 1]
                    answer = (f"{q.spatial_lead(r.label, r.position)} shows the mildest {name} "
                              f"among the affected regions, at {_article(word)} {word} level.")
                    add("grounding", "SiD-G-min", _pick("SiD-G-min", rng, d=name), answer, [r.id], r.mask)
        orders = [tuple(d["category"] for d in r.distortions) for r in regions]
        for r, order in zip(regions, orders):
            if len(order) != 2:
                continue
            first, second = (q.distortion_name(c) for c in order)
            variants = []
            if orders.count(order) == 1:
                variants.append("DAO-G-pair")
            if sum(1 for o in orders if o and o[0] == order[0]) == 1:
                variants.append("DAO-G-first")
            if sum(1 for o in orders if len(o) == 2 and o[1] == order[1]) == 1 and \
                    sum(1 for o in orders if o and o[-1] == order[1]) == 1:
                variants.append("DAO-G-last")
            if not variants:
                continue
            variant = variants[int(rng.integers(len(variants)))]
            answer = f"{q.spatial_lead(r.label, r.position)} received {first} first and then {second}."
            add("grounding", "DAO-G", _pick(variant, rng, first=first, second=second), answer, [r.id], r.mask)

    # Task 4: referring, short or long, for each distorted region with a unique reference.
    for region in distorted:
        if not unique_ref[regions.index(region)]:
            continue
        ref = references[regions.index(region)]
        multi = len(_categories(region)) > 1
        style = "long" if rng.random() < 0.5 else "short"
        sub = f"{style}-{'multi' if multi else 'single'}"
        names = q.names_phrase([d["category"] for d in region.distortions])
        names = names[0].upper() + names[1:]
        answer = f"{names}." if style == "short" else f"{names}. {q.effects_sentence(region.distortions)}"
        add("referring", sub, _pick(sub, rng, region=ref), answer, [region.id], region.mask)
    return records
