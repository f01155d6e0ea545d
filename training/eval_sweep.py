"""`octopus-rt eval --sweep`: choose tau and the point mapping by grounding mIoU on the VALIDATION split.

Points for each tau are recomputed from the tau = 1 closed-set probabilities with the runtime's
`closed_set_probs` (softmax(log p / tau) = softmax(s / tau) for word scores s, exactly), so the
language model runs once per record and only the SAM decoder runs per (tau, mapping). The records,
images and masks are read as training/evaluate.py reads them (training/eval_data.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octopus_rt.training import eval_metrics as m
from octopus_rt.training.eval_data import load_record_mask, load_record_rgb, load_split, progress, question_of, target_region
from octopus_rt.training.evaluate import EvalOptions, ask_model, open_bundle, segment_at

__all__ = ["DEFAULT_TAUS", "retemper", "sweep_defaults"]

DEFAULT_TAUS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def retemper(p_first: float, tau: float) -> float:
    """Probability of an axis' first word (left / top) at temperature tau, from its value at tau = 1,
    through the runtime's closed-set softmax over the log-probabilities."""
    from octopus_rt.runtime.closed_set import closed_set_probs

    p = min(max(float(p_first), 1e-12), 1.0 - 1e-12)
    return float(closed_set_probs(np.log([p, 1.0 - p]), [[0], [1]], tau)[0])


def sweep_defaults(options: EvalOptions, taus: tuple[float, ...] = DEFAULT_TAUS, write: bool = True) -> dict:
    """Choose tau and the point mapping by grounding mIoU on the VALIDATION split; write them into
    the bundle's manifest defaults (bundle.update_defaults) when `write`.

    Returns {"taus", "miou": {mapping: [mIoU per tau]}, "n", "best": {"tau", "point_mapping", "miou"}}.
    Ties go to the smaller |log tau| (closest to the plain softmax), then to "paper".
    """
    from octopus_rt.bundle import update_defaults
    from octopus_rt.errors import InputError
    from octopus_rt.runtime.closed_set import POINT_MAPPINGS, point_from_probs

    records = [r for r in load_split(options.data_dir, "val", options.max_records) if r.get("task") == "grounding"]
    records = [r for r in records if target_region(r) is not None and r.get("answer_mask")]
    if not records:
        raise InputError(f"the val split of {options.data_dir} has no grounding records to sweep tau on")
    octopus = open_bundle(options.bundle, options.threads)
    if not octopus.has_sam:
        raise InputError(f"{options.bundle} has no sam section: the sweep measures mIoU and needs a segmenter")
    data_dir = Path(options.data_dir)
    ious = {mapping: [[] for _ in taus] for mapping in POINT_MAPPINGS}
    for record in progress(records, options.progress, "sweep"):
        rgb = load_record_rgb(data_dir, record["image"])
        gt = load_record_mask(data_dir, record["answer_mask"])
        height, width = gt.shape
        answer = ask_model(octopus, rgb, question_of(record), 1.0, "paper", segment=False)
        for mapping in POINT_MAPPINGS:
            for i, tau in enumerate(taus):
                if answer.whole_image:
                    pred = np.ones(gt.shape, dtype=bool)
                elif answer.probs is None:
                    pred = None
                else:
                    p_right = None if "left" not in answer.probs else 1.0 - retemper(answer.probs["left"], tau)
                    p_bottom = None if "top" not in answer.probs else 1.0 - retemper(answer.probs["top"], tau)
                    point = point_from_probs(p_right, p_bottom, width, height, mapping)
                    pred = segment_at(octopus, rgb, point)
                ious[mapping][i].append(m.mask_iou(pred, gt))
    curves = {mapping: [float(np.mean(v)) for v in per_tau] for mapping, per_tau in ious.items()}
    candidates = [(curves[mp][i], -abs(np.log(t)), mp == "paper", t, mp)
                  for mp in POINT_MAPPINGS for i, t in enumerate(taus)]
    best = max(candidates)
    result = {"taus": list(taus), "miou": curves, "n": len(records), "split": "val",
              "best": {"tau": float(best[3]), "point_mapping": best[4], "miou": float(best[0])}}
    if write:
        update_defaults(options.bundle, {"tau": float(best[3]), "point_mapping": best[4]})
    return result
