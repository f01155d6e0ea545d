"""Question pools and answer wording for the four task paradigms (paper 3.1).

The phrasings are ours, written in the spirit of the paper's appendix tables 9-17: at least 12 per
pool. Placeholders: {region} (a region reference such as "the dark blue area in the top left of the
image"), {d} (a distortion name), {first} / {second} (an accumulation order). Answer wording for
positions, whole-image phrases and distortion names comes from `octopus_rt.vocab`.
"""

from __future__ import annotations

from octopus_rt import vocab

__all__ = ["POOLS", "SEVERITY_WORDS", "EFFECTS", "distortion_name", "names_phrase", "region_reference",
           "spatial_lead", "describe_chain", "effects_sentence", "quality_word"]

POOLS: dict[str, tuple[str, ...]] = {
    "global_description": (
        "Describe the quality of this image in detail.",
        "How good is this image technically? Explain your judgement thoroughly.",
        "Give a detailed account of the visual quality of this picture.",
        "Walk me through the quality problems you can see in this image, if any.",
        "Assess this photo's quality and explain which factors shape your view.",
        "What can you say about the image quality here? Please be specific.",
        "Review this image for quality, covering both its clean parts and its defects.",
        "Inspect the picture and report on its overall quality with reasons.",
        "Provide an in-depth quality evaluation of the image.",
        "Which quality issues affect this image, and how badly? Explain in detail.",
        "Tell me about the visual fidelity of this image, part by part.",
        "Evaluate the technical quality of the image and justify your assessment.",
        "Write a careful quality report for this image.",
        "How would you judge the clarity and fidelity of this picture? Explain.",
    ),
    "local_description": (
        "Describe the quality of {region} in detail.",
        "How does {region} look in terms of quality? Explain.",
        "Give a detailed quality assessment of {region}.",
        "Focus on {region}: what can you say about its visual quality?",
        "Examine {region} and report any quality problems you find.",
        "Evaluate the technical quality of {region} thoroughly.",
        "What is the quality of {region} like? Please elaborate.",
        "Write a careful quality description of {region}.",
        "Inspect {region} closely and explain how good its quality is.",
        "Tell me about the fidelity and clarity of {region}.",
        "Analyse {region} with a focus on quality and explain your view.",
        "How well preserved is {region}? Describe its quality in detail.",
    ),
    "HyD-G-max": (
        "Which region of the image is degraded the most?",
        "Where in this image is the quality damaged most severely?",
        "Point out the region that suffers the heaviest overall distortion.",
        "Which part of the picture has the worst quality?",
        "Locate the region whose quality is hurt most by distortions.",
        "Find the most heavily distorted region in this image.",
        "Which area shows the strongest combined degradation?",
        "Show me the region where the distortions are most severe overall.",
        "In this image, which region has the poorest visual quality?",
        "Identify the region that is most damaged by distortion.",
        "Which region looks the most corrupted in this picture?",
        "Where is the image degraded the most? Name the region.",
    ),
    "HyD-G-min": (
        "Which region of the image is degraded the least?",
        "Where in this image is the quality best preserved?",
        "Point out the region that suffers the least overall distortion.",
        "Which part of the picture has the best quality?",
        "Locate the region whose quality is hurt least by distortions.",
        "Find the cleanest region in this image.",
        "Which area shows the weakest combined degradation?",
        "Show me the region where distortions are the mildest overall.",
        "In this image, which region has the highest visual quality?",
        "Identify the region that is least damaged by distortion.",
        "Which region looks the most intact in this picture?",
        "Where is the image degraded the least? Name the region.",
    ),
    "SiD-G-max": (
        "Which region shows the strongest {d}?",
        "Where in the image is the {d} most severe?",
        "Point out the region most affected by {d}.",
        "Locate the area with the highest level of {d}.",
        "Which part of this picture suffers from {d} the most?",
        "Find the region where {d} is most pronounced.",
        "In which region is the {d} at its worst?",
        "Identify the region with the most intense {d}.",
        "Show me where {d} hits the image hardest.",
        "Which region is degraded most by {d}?",
        "Where does {d} appear most strongly in this image?",
        "Name the region with the greatest amount of {d}.",
    ),
    "SiD-G-min": (
        "Among the regions affected by {d}, which shows it the least?",
        "Of the areas that show {d}, where is it mildest?",
        "Which region has the weakest {d}, among those that have any?",
        "Point out the region where {d} is present but least severe.",
        "Among the regions with {d}, locate the one with the lowest level.",
        "Where is the {d} slightest, considering only regions that show it?",
        "Find the region with the faintest {d} among the affected ones.",
        "Considering the regions with {d}, which one is least affected?",
        "Which of the regions showing {d} has it to the smallest degree?",
        "Identify the region whose {d} is the mildest of all affected regions.",
        "Among the areas degraded by {d}, which is degraded least by it?",
        "Of all regions suffering from {d}, name the least affected one.",
    ),
    "DAO-G-pair": (
        "Which region received {first} first and then {second}?",
        "Locate the region where {first} was applied before {second}.",
        "Find the area degraded by {first}, followed by {second}.",
        "Which part of the image shows {first} with {second} added on top?",
        "Point out the region whose distortions were added in the order {first}, then {second}.",
        "Where was {second} introduced after {first}?",
        "Identify the region that went through {first} and afterwards {second}.",
        "Which region matches the sequence: first {first}, second {second}?",
        "Show me the region where {first} came before {second}.",
        "In which region was {first} followed by {second}?",
        "Name the region that accumulated {first} first and {second} last.",
        "Which area carries {second} layered over earlier {first}?",
    ),
    "DAO-G-first": (
        "Which region had {first} applied as its first distortion?",
        "Locate the region whose distortion sequence starts with {first}.",
        "Find the area where {first} was the first degradation added.",
        "Which part of the image began its degradation with {first}?",
        "Point out the region in which {first} came first.",
        "In which region was {first} the opening step of the distortion sequence?",
        "Identify the region whose first added distortion is {first}.",
        "Show me the region where the distortion process started with {first}.",
        "Which region opens its accumulation of distortions with {first}?",
        "Where was {first} introduced before any other distortion?",
        "Name the region that received {first} at the start.",
        "Which area was hit by {first} first, before anything else?",
    ),
    "DAO-G-last": (
        "Which region had {second} applied as its last distortion?",
        "Locate the region whose distortion sequence ends with {second}.",
        "Find the area where {second} was the final degradation added.",
        "Which part of the image finished its degradation with {second}?",
        "Point out the region in which {second} came last.",
        "In which region was {second} the closing step of the distortion sequence?",
        "Identify the region whose last added distortion is {second}.",
        "Show me the region where the distortion process ended with {second}.",
        "Which region closes its accumulation of distortions with {second}?",
        "Where was {second} introduced after another distortion?",
        "Name the region that received {second} at the end.",
        "Which area was hit by {second} last, after another distortion?",
    ),
    "short-single": (
        "What distortion affects {region}? Reply briefly.",
        "Name the distortion in {region}. Keep it short.",
        "Which quality issue is present in {region}? Answer in a few words.",
        "What degrades {region}? Give a short answer.",
        "Identify the main distortion of {region}, briefly.",
        "Which type of degradation does {region} show? One short phrase, please.",
        "What is wrong with the quality of {region}? Answer tersely.",
        "State the distortion type found in {region}, in short.",
        "Tell me the distortion of {region} in a word or two.",
        "What kind of artefact appears in {region}? Be brief.",
        "Briefly, which distortion dominates {region}?",
        "List the distortion of {region} using a short phrase.",
    ),
    "long-single": (
        "What distortion affects {region}, and how does it change its appearance?",
        "Name the distortion in {region} and describe its visual effect.",
        "Which quality issue is present in {region}? Explain what it does to the region.",
        "What degrades {region}? Describe the resulting artefacts.",
        "Identify the main distortion of {region} and explain its impact.",
        "Which type of degradation does {region} show, and how is it perceived?",
        "What is wrong with the quality of {region}? Describe the effect in detail.",
        "State the distortion type found in {region} and characterise its effect.",
        "Tell me which distortion {region} has and how it alters the content.",
        "What kind of artefact appears in {region}, and what does it look like?",
        "Which distortion dominates {region}? Describe its perceptual consequences.",
        "Diagnose the distortion of {region} and explain how it shows.",
    ),
    "short-multi": (
        "Which two distortions affect {region}? Reply briefly.",
        "Name the distortions in {region}. Keep it short.",
        "Which quality issues are present in {region}? Answer in a few words.",
        "What degrades {region}? List the distortion types briefly.",
        "Identify the two main distortions of {region}, briefly.",
        "Which types of degradation does {region} show? Short phrases, please.",
        "What is wrong with the quality of {region}? Answer tersely.",
        "State the distortion types found in {region}, in short.",
        "Tell me the distortions of {region} in a few words.",
        "What kinds of artefacts appear in {region}? Be brief.",
        "Briefly, which distortions combine in {region}?",
        "List the distortions of {region} using short phrases.",
    ),
    "long-multi": (
        "Which two distortions affect {region}, and how do they change its appearance?",
        "Name the distortions in {region} and describe their visual effects.",
        "Which quality issues are present in {region}? Explain what they do to the region.",
        "What degrades {region}? Describe the resulting artefacts of each distortion.",
        "Identify the two main distortions of {region} and explain their impact.",
        "Which types of degradation does {region} show, and how are they perceived?",
        "What is wrong with the quality of {region}? Describe the effects in detail.",
        "State the distortion types found in {region} and characterise their effects.",
        "Tell me which distortions {region} has and how they alter the content.",
        "What kinds of artefacts appear in {region}, and what do they look like?",
        "Which distortions combine in {region}? Describe their perceptual consequences.",
        "Diagnose the distortions of {region} and explain how each one shows.",
    ),
}

SEVERITY_WORDS: tuple[str, ...] = ("slight", "mild", "moderate", "severe", "extreme")

# Perceptual effect of each category, for long answers and descriptions.
EFFECTS: dict[str, str] = {
    "blur": "edges are smeared and fine textures are lost",
    "noise": "grainy random speckles cover flat surfaces and mask fine detail",
    "compression": "blocky patches and ringing appear around edges, with banding in smooth areas",
    "brighten": "highlights are washed out and details in bright parts disappear",
    "darken": "shadows swallow detail and the content is hard to make out",
    "contrast_strengthen": "tones are pushed to extremes, clipping both shadows and highlights",
    "contrast_weaken": "the content looks flat and hazy, with little separation between tones",
    "saturate_strengthen": "colours look garish and unnatural, with clipped hues",
    "saturate_weaken": "colours are faded towards gray and look lifeless",
    "oversharpen": "edges carry bright and dark halos and textures look harsh",
    "pixelate": "the content breaks into visible square blocks and loses detail",
    "quantization": "smooth gradients turn into flat bands with false contours",
}


def distortion_name(category: str) -> str:
    """The answer name of a category (vocab.DISTORTION_NAMES)."""
    return vocab.DISTORTION_NAMES[category]


def names_phrase(categories: list[str]) -> str:
    """Distortion names in order, repeated categories said once, joined with " and "."""
    names = []
    for category in categories:
        name = distortion_name(category)
        if name not in names:
            names.append(name)
    return " and ".join(names)


def region_reference(label: str, position: list[str] | None) -> str:
    """How questions refer to a region: "the dark blue area in the top left of the image"."""
    if position is None:
        return vocab.WHOLE_IMAGE_PHRASES[0]
    return f"the {label} in the {vocab.position_phrase(position[0], position[1])} of the image"


def spatial_lead(label: str, position: list[str] | None) -> str:
    """The phrase a grounding answer starts with: "The top left region, the dark blue area," or,
    for a whole-image region, "The whole image"."""
    if position is None:
        return vocab.WHOLE_IMAGE_PHRASES[0].capitalize()
    return f"The {vocab.position_phrase(position[0], position[1])} region, the {label},"


def describe_chain(chain: list[dict]) -> str:
    """"moderate blur followed by mild noise" for an ordered list of distortion dicts."""
    parts = [f"{SEVERITY_WORDS[int(d['severity']) - 1]} {distortion_name(d['category'])}" for d in chain]
    return " followed by ".join(parts)


def effects_sentence(chain: list[dict]) -> str:
    """One sentence on the perceptual effects of a chain, each category once."""
    seen: list[str] = []
    for d in chain:
        if d["category"] not in seen:
            seen.append(d["category"])
    parts = [f"{distortion_name(c)} means {EFFECTS[c]}" for c in seen]
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def quality_word(max_intensity: int, whole: bool) -> str:
    """Overall level word (vocab.LEVEL_WORDS) from the worst cumulative intensity in the image;
    a region-wise defect hurts the whole image less than a uniform one."""
    levels = vocab.LEVEL_WORDS
    if max_intensity <= 0:
        return levels[0]
    effective = max_intensity + (1 if whole else 0)
    if effective <= 2:
        return levels[1]
    if effective <= 4:
        return levels[2]
    if effective <= 6:
        return levels[3]
    return levels[4]
