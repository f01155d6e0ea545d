"""The `lmm.verification` record of a manifest: what `export lmm` measured against PyTorch, the
criteria it applied, and what the user lowered or accepted (typed; part of the manifest schema:
octopus_rt/manifest_lmm.LmmSection.verification).

`export lmm` writes it (export/lmm_verify.verification_record); `octopus-rt verify` prints every
line of `describe` and `octopus-rt infer` prints `agreement_warning` once, so a bundle exported
under lowered criteria (`--min-cosine`, `--min-top1`) or with a kept failure
(`--accept-quality-loss`) says so each time it is used, never silently. Bundles written before these
fields existed read with the defaults (nothing lowered, nothing accepted).
"""

from __future__ import annotations

from dataclasses import dataclass

from octopus_rt.schema import Schema, optional

__all__ = ["VerifyThresholds", "VerifyOverrides", "LmmVerification"]


@dataclass(frozen=True)
class VerifyThresholds(Schema):
    """Pass criteria of one export. rtol / atol: fp32 only, per output max |diff| <= atol + rtol x
    max |reference| (scale-aware); min_cosine: logits (and vision features) cosine; min_top1:
    teacher-forced top-1 agreement; identical_tokens: greedy tokens must equal generate()'s."""

    min_cosine: float
    min_top1: float
    identical_tokens: bool = False
    rtol: float | None = None
    atol: float | None = None


@dataclass(frozen=True)
class VerifyOverrides(Schema):
    """What the user changed at export (quantised precisions only); None / False: the default."""

    min_cosine: float | None = optional()
    min_top1: float | None = optional()
    accept_quality_loss: bool = False

    @property
    def any(self) -> bool:
        return self.min_cosine is not None or self.min_top1 is not None or self.accept_quality_loss


@dataclass(frozen=True)
class LmmVerification(Schema):
    """Measured agreement of the exported graphs with the PyTorch model (export/lmm_verify.py).

    *_max_abs_diff / *_max_rel_diff (max |diff| over max |reference|), *_min_cosine: vision
    features, the decoder at the seeded cases, the generation logits; top1_agreement: teacher-forced
    (quantised) or greedy (fp32); tokens_identical: greedy tokens equal generate()'s (fp32).
    thresholds: the criteria applied; defaults: the precision's defaults; accepted_failures: checks
    that failed and were kept with --accept-quality-loss (then quality_loss_accepted is true).
    """

    precision: str | None = optional()
    form: str | None = optional()  # the decoder form verified (manifest lmm.decoder.form)
    # The vision graph's precision when it was set apart from the decoder's (export lmm
    # --vision-precision; manifest lmm.vision.precision); the criteria are then the lower one's.
    vision_precision: str | None = optional()
    vision_max_abs_diff: float | None = optional()
    vision_max_rel_diff: float | None = optional()
    vision_min_cosine: float | None = optional()
    decoder_max_abs_diff: float | None = optional()
    decoder_max_rel_diff: float | None = optional()
    decoder_min_cosine: float | None = optional()
    generation_max_abs_diff: float | None = optional()
    generation_max_rel_diff: float | None = optional()
    generation_min_cosine: float | None = optional()
    top1_agreement: float | None = optional()
    tokens_identical: bool | None = optional()
    steps: int | None = optional()
    thresholds: VerifyThresholds | None = optional()
    defaults: VerifyThresholds | None = optional()
    # Absent in bundles written before the user could lower or accept anything: nothing was.
    overrides: VerifyOverrides | None = optional()
    quality_loss_accepted: bool | None = optional()
    accepted_failures: list[str] | None = optional()
    # Phi-3(.5)-Vision exports (export/phi3v_verify.py) add: the closed-set probabilities' largest
    # difference over every generated step (eq. 2, tau 1), the crop budgets the vision graph was
    # checked at, the prompt lengths of the generation cases and how many of them crossed the longrope switch.
    closed_set_max_abs_diff: float | None = optional()
    vision_num_crops: list[int] | None = optional()
    generation_prompt_tokens: list[int] | None = optional()
    rope_switch_crossings: int | None = optional()

    def warnings(self) -> list[str]:
        """One line per lowered threshold and per accepted failure (empty: verified at the defaults)."""
        lines = []
        defaults = self.defaults
        overrides = self.overrides or VerifyOverrides()
        for key in ("min_cosine", "min_top1"):
            value = getattr(overrides, key)
            if value is not None:
                default = getattr(defaults, key) if defaults is not None else None
                lines.append(f"threshold {key} lowered to {value:g} by the user at export (default {default})")
        if self.quality_loss_accepted:
            lines += [f"quality loss accepted at export (--accept-quality-loss): {f}" for f in self.accepted_failures or []]
        return lines

    def describe(self, section: str = "lmm") -> list[str]:
        """"<section>: " + the measured agreement in one line (when recorded), then each of `warnings`
        as "WARNING <section>: ..."."""
        lines = []
        if self.generation_min_cosine is not None:
            top1 = f"{self.top1_agreement:.3f}" if self.top1_agreement is not None else "?"
            rel = (f", logits max relative diff {self.generation_max_rel_diff:.1e}"
                   if self.generation_max_rel_diff is not None else "")
            vision = f", {self.vision_precision} vision" if self.vision_precision else ""
            lines.append(
                f"{section}: {self.precision or '?'} ({self.form or 'flat_kv'} decoder{vision}) verified at export "
                f"against PyTorch: "
                f"logits cosine >= {self.generation_min_cosine:.5f}, top-1 {top1}, "
                f"greedy tokens identical: {self.tokens_identical}{rel}"
            )
        return lines + [f"WARNING {section}: {line}" for line in self.warnings()]

    def below_defaults(self) -> bool:
        """True when the export was kept although it misses its precision's default criteria: a
        failure accepted with --accept-quality-loss, or agreement under a default the user lowered."""
        if self.quality_loss_accepted:
            return True
        d = self.defaults
        if d is None:
            return False
        return bool((self.generation_min_cosine is not None and self.generation_min_cosine < d.min_cosine)
                    or (self.top1_agreement is not None and self.top1_agreement < d.min_top1))

    def agreement_warning(self) -> str | None:
        """One line for `octopus-rt infer` whenever the export ran under lowered criteria
        (--min-cosine / --min-top1) or kept a failure (--accept-quality-loss), or its agreement lies
        below the defaults; None for a bundle verified at the defaults."""
        overrides = self.overrides or VerifyOverrides()
        if not (overrides.any or self.below_defaults()):
            return None
        measured = ""
        if self.generation_min_cosine is not None and self.top1_agreement is not None:
            measured = f"; measured logits cosine {self.generation_min_cosine:.4f}, top-1 {self.top1_agreement:.3f}"
        model = f"this bundle's {self.precision or 'quantised'} model"
        if self.below_defaults():
            what = f"{model} was accepted at export below the default agreement with PyTorch"
        else:
            lowered = ", ".join(f"--{k.replace('_', '-')} {getattr(overrides, k):g}"
                                for k in ("min_cosine", "min_top1") if getattr(overrides, k) is not None)
            what = f"{model} was exported with lowered agreement criteria ({lowered or '--accept-quality-loss'})"
        return f"WARNING: {what}{measured} (`octopus-rt verify BUNDLE` shows what was lowered)"
