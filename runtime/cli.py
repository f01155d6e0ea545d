"""`octopus-rt infer` and `octopus-rt infer-batch`: parse, call the API (`Octopus`, runtime/batch.py), print.

Imports only typer and the standard library at module level; numpy, onnxruntime and the runtime are
imported inside the commands (cold start of `octopus-rt infer` matters).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "resolve_bundle", "demo_bundle", "DEMO_BUNDLE_ENV"]

DEMO_BUNDLE_ENV = "OCTOPUS_BUNDLE"
_DEVICE_HELP = "auto (CUDA if available, else CPU) | cpu | cuda | tensorrt."


def demo_bundle() -> Path:
    """Where the built-in demo bundle is installed (it may be absent)."""
    import octopus_rt

    return Path(octopus_rt.__file__).resolve().parent / "demo" / "bundle"


def resolve_bundle(bundle: Optional[Path]) -> Path:
    """--bundle, else $OCTOPUS_BUNDLE, else the built-in demo bundle; BundleError when none exists."""
    from octopus_rt.bundle import BundleError

    if bundle is not None:
        return bundle
    env = os.environ.get(DEMO_BUNDLE_ENV)
    if env:
        return Path(env)
    demo = demo_bundle()
    if (demo / "manifest.json").is_file():
        return demo
    raise BundleError(
        f"no bundle: pass --bundle DIR or set {DEMO_BUNDLE_ENV} (the built-in demo bundle is not installed at {demo})"
    )


def _load(bundle: Optional[Path], device: str, threads: Optional[int], profile_dir: Optional[Path] = None):
    """The Octopus of the bundle; one WARNING line on stderr when its export ran under lowered
    agreement criteria (`export lmm --min-cosine/--min-top1`) or kept a failure (`--accept-quality-loss`)."""
    from octopus_rt.runtime.api import Octopus

    octo = Octopus(resolve_bundle(bundle), device=device, threads=threads, profile_dir=profile_dir)
    if octo.agreement_warning:
        typer.echo(octo.agreement_warning, err=True)
    return octo


def _human(answer, mask_path: Optional[str], overlay_path: Optional[str], device: str, mask_wanted: bool = False) -> str:
    lines = [f"answer: {answer.text}"]
    if answer.point is None:
        lines.append("point:  none (the answer names no position)")
    else:
        lines.append(f"point:  ({answer.point[0]:.1f}, {answer.point[1]:.1f}) px of {answer.image_size[0]}x{answer.image_size[1]}")
    if answer.probs:
        lines.append("probs:  " + "  ".join(f"{k} {v:.3f}" for k, v in answer.probs.items()))
    if answer.whole_image:
        lines.append("whole image: yes (full mask, SAM skipped)")
    if answer.mask is not None:
        where = f" -> {mask_path}" if mask_path else ""
        lines.append(f"mask:   {100.0 * float(answer.mask.mean()):.1f}% of the image, predicted IoU {answer.mask_iou:.3f}{where}")
    elif mask_wanted:
        lines.append("mask:   none (no point to segment; no mask file written)")
    if overlay_path:
        lines.append(f"overlay: {overlay_path}")
    total = answer.timings_ms.get("total", 0.0)
    lines.append(f"time:   {total:.0f} ms on {device}")
    return "\n".join(lines)


def infer(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, WebP, TIFF, ...)."),
    question: str = typer.Argument(..., help="Question about the image's quality."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help=f"Model bundle folder (default: ${DEMO_BUNDLE_ENV}, then the demo bundle)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in docs/runtime.md)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Write the mask as an 8-bit PNG (255 inside)."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Write the image with mask, point and answer."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    tau: Optional[float] = typer.Option(None, "--tau", help="Closed-set temperature (default: the bundle's)."),
    point_mapping: Optional[str] = typer.Option(None, "--point-mapping", help="paper | quadrant (default: the bundle's)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Answer length cap (default: the bundle's)."),
    multimask: Optional[bool] = typer.Option(None, "--multimask/--single-mask", help="Keep SAM's best-IoU multimask output, or its single mask."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Write onnxruntime's per-node profile + stage timings (Chrome trace JSON)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores)."),
) -> None:
    """Answer a question about an image, ground it to a point and a mask."""
    import tempfile

    from octopus_rt.errors import InputError
    from octopus_rt.runtime.cli_files import check_output_file

    # Outputs are checked before the work: a bad path fails in a second, not after inference, and an
    # input is never overwritten.
    for path, what in ((mask, "--mask"), (overlay, "--overlay"), (profile, "--profile")):
        if path is not None:
            check_output_file(path, what, inputs=(image,), image=what != "--profile")
    outputs = [p for p in (mask, overlay, profile) if p is not None]
    if len({str(p.resolve()) for p in outputs}) < len(outputs):
        raise InputError("--mask, --overlay and --profile must be different files")
    with tempfile.TemporaryDirectory(prefix="octopus-profile-") as tmp:
        model = _load(bundle, device, threads, Path(tmp) if profile else None)
        if mask is not None:
            model.require_sam()
        answer = model.ask(image, question, max_new_tokens=max_new_tokens, tau=tau, point_mapping=point_mapping,
                           multimask=multimask, segment=bool(mask or overlay), overlay=overlay is not None)
        if profile:
            model.end_profiling(profile)
    mask_path = None
    if mask is not None and answer.mask is not None:
        from octopus_rt.runtime.overlay import mask_to_png

        mask.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(answer.mask).save(mask)
        mask_path = str(mask)
    if overlay is not None:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        answer.overlay.save(overlay)
    if as_json:
        record = answer.to_json(mask_path)
        record.update({"overlay": str(overlay) if overlay else None, "device": model.device, "bundle": str(model.bundle_dir)})
        if profile:
            record["profile"] = str(profile)
        typer.echo(json.dumps(record))
    else:
        typer.echo(_human(answer, mask_path, str(overlay) if overlay else None, model.device, mask is not None))


def infer_batch(
    source: Path = typer.Argument(..., help="JSONL of {\"id\", \"image\", \"question\"} (or a folder of images)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL: one line per input; resumes from existing lines."),
    question: Optional[str] = typer.Option(None, "--question", "-q", help="Question for a folder (or for lines without one)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help=f"Model bundle folder (default: ${DEMO_BUNDLE_ENV}, then the demo bundle)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder for mask PNGs (default: no segmentation)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    tau: Optional[float] = typer.Option(None, "--tau"),
    point_mapping: Optional[str] = typer.Option(None, "--point-mapping"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Answer many questions; one output line per input, errors recorded per line; resumable."""
    from octopus_rt.runtime.batch import BatchRun
    from octopus_rt.runtime.results import AskOptions

    with BatchRun(source, out, question=question, masks=masks) as run:
        if run.report.repaired:
            typer.echo(f"dropped a cut-off last line ({run.report.repaired} bytes) of {out}; its input is redone", err=True)
        model = _load(bundle, device, threads)
        options = AskOptions(tau=tau, point_mapping=point_mapping, max_new_tokens=max_new_tokens)
        with typer.progressbar(run.items, label="infer-batch", file=sys.stderr, show_pos=True) as progress:
            report = run.run(model, options, progress)
    typer.echo(f"{report.done} answered, {report.errors} errors, {report.skipped} already in {out}", err=True)
    if report.errors:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the runtime's commands to the root app."""
    app.command("infer")(infer)
    app.command("infer-batch")(infer_batch)
