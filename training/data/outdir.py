"""Output folders of `data synth` and `data import`: what counts as ours, and what `--overwrite` may
replace.

A dataset folder is ours when its `dataset.json` names one of our formats (synth writes it before any
other file, import before its split files), or, for folders written before dataset.json existed,
when it holds synth's `report.json` or an unfinished run's `.work/state.json`. `--overwrite` replaces
only such a folder, only the names a run writes, and never a folder that holds the run's inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from octopus_rt.errors import InputError
from octopus_rt.paths import is_inside

__all__ = ["SYNTH_FORMAT", "META_NAME", "is_our_dataset", "check_inputs_outside", "prepare_overwrite",
           "remove_generated", "write_meta", "prepare_run", "discard_unstarted"]

SYNTH_FORMAT = "octopus-rt-synth"
META_NAME = "dataset.json"
_LEGACY_REPORT_KEYS = {"samples", "records", "sources", "groups", "skipped"}
_LEGACY_STATE_KEYS = {"src", "seed", "size", "uniform_prob"}


def _json_keys(path: Path) -> set[str] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return set(value) if isinstance(value, dict) else None


def is_our_dataset(folder: Path) -> bool:
    """True when `folder` is recognisably a dataset octopus-rt wrote (see the module docstring)."""
    from octopus_rt.training.data.importers import FORMATS

    folder = Path(folder)
    meta = folder / META_NAME
    if meta.is_file() and not meta.is_symlink():
        try:
            value = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(value, dict) and value.get("format") in (SYNTH_FORMAT, *FORMATS)
    report = _json_keys(folder / "report.json")
    state = _json_keys(folder / ".work" / "state.json")
    return bool((report and _LEGACY_REPORT_KEYS <= report) or (state and _LEGACY_STATE_KEYS <= state))


def check_inputs_outside(out: Path, inputs: dict[str, Path]) -> None:
    """InputError when an input (source folder, input file, ...) is OUT or lies inside it: the run
    would write over (or --overwrite delete) what it reads."""
    for what, path in inputs.items():
        if path is not None and is_inside(path, out):
            raise InputError(f"the {what} {path} lies inside --out {out}; writing there could destroy it, "
                             "so choose another --out")


def prepare_overwrite(out: Path, overwrite: bool, generated: tuple[str, ...], *, can_resume: bool = False) -> None:
    """Make `out` ready for a fresh run: absent or empty is fine; a non-empty folder needs --overwrite
    and must be ours, and then only the names in `generated` (plus dataset.json) are removed."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite" + (" or --resume" if can_resume else ""))
    if not is_our_dataset(out):
        raise InputError(f"output folder {out} does not hold a dataset octopus-rt wrote (no {META_NAME}); "
                         "--overwrite replaces only those: remove it yourself or choose another --out")
    remove_generated(out, generated + (META_NAME,))


def remove_generated(out: Path, names: tuple[str, ...]) -> None:
    """Remove out/<name> for each name: a symbolic link is unlinked, never followed."""
    for name in names:
        target = out / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)


def write_meta(out: Path, meta: dict) -> None:
    """Write out/dataset.json (the mark that the folder is ours)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def prepare_run(out: Path, inputs: dict[str, Path | None], state: dict, *, resume: bool, overwrite: bool,
                generated: tuple[str, ...]) -> None:
    """Ready `out` for a `data synth` run: inputs outside it; --resume only with the same `state`
    (`.work/state.json`); else absent / empty / ours with --overwrite. Writes dataset.json first."""
    work = out / ".work"
    check_inputs_outside(out, inputs)
    if resume and out.exists() and any(out.iterdir()):
        state_file = work / "state.json"
        if not state_file.exists():
            raise InputError(f"nothing to resume in {out} (no unfinished run there)")
        if json.loads(state_file.read_text(encoding="utf-8")) != state:
            raise InputError(f"--resume with different options than the run in {out}; use --overwrite")
        return
    prepare_overwrite(out, overwrite, generated, can_resume=True)
    write_meta(out, {"format": SYNTH_FORMAT, "src": state.get("src"), "seed": state.get("seed")})
    work.mkdir(parents=True, exist_ok=True)
    (work / "state.json").write_text(json.dumps(state, sort_keys=True), encoding="utf-8")


def discard_unstarted(out: Path, created: bool) -> None:
    """After a failed synth run that made no sample: remove .work and dataset.json (and `out` when the
    run created it and it is empty). With samples made, .work stays for --resume."""
    if any((out / ".work").glob("s[0-9]*.json")):  # sample parts (not state.json)
        return
    remove_generated(out, (".work", META_NAME))
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
