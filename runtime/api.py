"""`Octopus`: the public runtime API over a model bundle (numpy + onnxruntime + tokenizers + Pillow).

    from octopus_rt.runtime import Octopus
    model = Octopus("bundle/")                     # device="auto": CUDA if available, else CPU
    answer = model.ask("photo.jpg", "Which region is most degraded?")
    answer.text, answer.point, answer.probs, answer.mask

Pipeline of `ask` (stage names as in `Answer.timings_ms`):
read_image (file bytes + content hash) -> decode_image (skipped on a cache hit) -> preprocess ->
vision (-> layout for Phi-3-V; runtime/image_stage.py owns these stages per architecture) ->
prefill_prefix (prompt prefix + image tokens, cached per image) -> prefill (the question's own
tokens; runtime/prefill.py owns these two and the per-image cache lookups) -> decode (greedy, KV
cache) -> closed-set point -> the SAM stage (runtime/sam_stage.py): sam_preprocess + sam_encoder
(cached per image, `SamStage.predict_cached`) -> sam_decoder -> postprocess.
A whole-image answer (manifest `whole_image_phrases`) skips SAM and returns a full mask.

`ask_batch` runs the same steps for several questions, with one decode for all of them
(runtime/generate.py: one decoder call per token for every sequence still running); `ask` is
`ask_batch` of one question, so the two give the same answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from octopus_rt import vocab
from octopus_rt.bundle import BundleError, check_files, read_manifest, section_path
from octopus_rt.errors import InputError
from octopus_rt.manifest import parse_manifest
from octopus_rt.runtime import closed_set
from octopus_rt.runtime.backends import Backend
from octopus_rt.runtime.cache import ImageCache
from octopus_rt.runtime.device_info import DeviceInfo, probe_device
from octopus_rt.runtime.generate import Decoder, DecodeResult, make_decoder
from octopus_rt.runtime.image_stage import image_stage_for
from octopus_rt.runtime.images import DEFAULT_MAX_PIXELS, ImageInput, open_image
from octopus_rt.runtime.overlay import render_overlay
from octopus_rt.runtime.prefill import PromptPrefill, decoded_rgb
from octopus_rt.runtime.profiling import StageTimer, write_chrome_trace
from octopus_rt.runtime.prompt import check_text
from octopus_rt.runtime.questions import Question
from octopus_rt.runtime.results import Answer, AskOptions, ChoiceResult, MaskResult, ScoreResult
from octopus_rt.runtime.streaming import TextStream

__all__ = ["Octopus"]


class Octopus:
    """A loaded bundle. Sessions are created lazily, on the first call that needs each graph.

    bundle_dir: a bundle folder (docs/bundle.md). device: "auto" | "cpu" | "cuda" | "tensorrt".
    threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
    cache_images: how many images' features / prefix KV cache / SAM embedding to keep (LRU).
    max_pixels: refuse larger images before decoding them (None: no limit).
    profile_dir: when set, onnxruntime writes per-node profiles there (see `end_profiling`).
    num_crops: Phi-3-Vision bundles only, the HD crop budget (default: the bundle's `lmm.hd.num_crops`).
    device_info: what runtime/device_info.probe_device found on this machine; None: probed here when
    the device resolves to a GPU (the device is resolved at construction; a CPU run probes nothing).

    Load-time checks (one-line `BundleError`): folder and manifest present, the manifest valid
    (`bundle.validate_manifest`: format version, paths inside the bundle, an `lmm` section with every
    field the runtime reads), every listed file present with the recorded size (hashes: `verify`).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        device: str = "auto",
        threads: int | None = None,
        *,
        cache_images: int = 4,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        profile_dir: str | os.PathLike[str] | None = None,
        device_info: DeviceInfo | None = None,
        num_crops: int | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = read_manifest(self.bundle_dir, runnable=True)  # fields checked by the schema
        self.spec = parse_manifest(self.manifest)  # typed (octopus_rt/manifest.py)
        lmm = self.spec.lmm
        problems = check_files(self.bundle_dir, self.manifest, sections=("lmm", "sam"))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BundleError(f"bundle {self.bundle_dir}: {problems[0]}{more}; re-export or run `octopus-rt verify`")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        self.lmm = lmm
        self.defaults = self.spec.defaults
        self.max_pixels = max_pixels
        self.backend = Backend(device=device, threads=threads, profile_dir=Path(profile_dir) if profile_dir else None,
                               bundle_dir=self.bundle_dir, manifest=self.manifest, device_info=device_info)
        if device_info is None and self.backend.choice.name != "cpu":
            # The GPU facts the provider plan needs (nvidia-smi, libnvinfer), probed once, here; TensorRT
            # is probed (a tiny engine build) only when the bundle has engines to run.
            self.backend.device_info = probe_device(probe_devices=("cuda", "tensorrt") if self.spec.engines else ("cuda",))
        self.cache = ImageCache(cache_images)
        self._tokenizer = None
        self._decoder: Decoder | None = None
        self._sam = None
        # What differs per architecture before the decoder (prompt ids, image tokens): runtime/image_stage.py.
        self.image_stage = image_stage_for(lmm, lambda: self.backend.graph("vision", self._file(lmm.vision.file)),
                                           self._file, num_crops=num_crops)
        self.prompt = lmm.prompt
        self.closed_set: dict[str, list[int]] = {w: list(ids) for w, ids in lmm.closed_set.items()}
        self.axis_ids = closed_set.axis_token_ids(self.closed_set)
        self.eos_ids = list(lmm.tokenizer.eos_token_ids)
        self.context = lmm.decoder.max_position_embeddings
        # Image cache entry -> vision features -> prompt prefix KV (cached per image) -> prompt KV: runtime/prefill.py.
        self._prefill = PromptPrefill(self)
        self.whole_image_phrases = tuple(lmm.whole_image_phrases or vocab.WHOLE_IMAGE_PHRASES)
        self.score_question = lmm.score_prompt.question
        self.score_answer_prefix = lmm.score_prompt.answer_prefix

    # ----------------------------------------------------------------------------------- parts
    @property
    def device(self) -> str:
        """The resolved device name ("cpu", "cuda", "tensorrt")."""
        return self.backend.choice.name

    @property
    def has_sam(self) -> bool:
        return self.spec.sam is not None and self.spec.sam.files is not None

    @property
    def agreement_warning(self) -> str | None:
        """One "WARNING: ..." line when the bundle's lmm was exported under lowered agreement criteria
        or kept a failure (verification.LmmVerification.agreement_warning); None otherwise."""
        record = self.spec.lmm.verification
        return record.agreement_warning() if record is not None else None

    def _file(self, name: str) -> Path:
        return section_path(self.bundle_dir, self.manifest["lmm"], name)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self._file(self.lmm.tokenizer.file)))
        return self._tokenizer

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            table = np.load(self._file(self.lmm.embedding.file), mmap_mode="r")
            graph = self.backend.graph("decoder", self._file(self.lmm.decoder.file))
            self._decoder = make_decoder(graph, table, self.lmm.decoder)
        return self._decoder

    def require_sam(self) -> None:
        """BundleError (one line) unless the bundle can segment: check it before work that needs masks."""
        if not self.has_sam:
            raise BundleError(
                f"bundle {self.bundle_dir} has no sam section, so it cannot segment; "
                "run `octopus-rt export sam` into it, or do not ask for a mask"
            )

    @property
    def sam(self):
        if self._sam is None:
            self.require_sam()
            from octopus_rt.runtime.sam_stage import SamStage

            self._sam = SamStage(self.backend, self.bundle_dir, self.spec.sam)
        return self._sam

    # ---------------------------------------------------------------------------------- public
    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        max_new_tokens: int | None = None,
        tau: float | None = None,
        point_mapping: str | None = None,
        multimask: bool | None = None,
        segment: bool | None = None,
        overlay: bool | None = None,
        on_token: Callable[[str], None] | None = None,
        options: AskOptions | None = None,
    ) -> Answer:
        """Answer `question` about `image`, ground it to a point and (with a SAM section) a mask.

        Options may come as keywords or as one `AskOptions`; keywords win. None takes the manifest's
        `defaults`. `segment=False` skips SAM even when the bundle has it; `overlay=True` also
        renders `Answer.overlay`. `on_token` streams the answer's text as it is decoded (contract in
        `AskOptions`). Raises InputError (bad image / question / option) or BundleError (bundle problems).
        """
        opts = (options or AskOptions()).merged(
            max_new_tokens=max_new_tokens, tau=tau, point_mapping=point_mapping, multimask=multimask,
            segment=segment, overlay=overlay, on_token=on_token)
        result = self._answer([(image, question, opts)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def ask_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        options: AskOptions | Sequence[AskOptions | None] | None = None,
    ) -> list[Answer | Exception]:
        """Answer several (image, question) pairs with one batched decode; the server's batch path.

        Each prompt is prefilled alone (the per-image cache applies, so questions about one image
        share its vision features and prefix); then every answer is decoded in the same decoder
        calls, one token per answer per call, each stopping at its own stop token or limit.
        Contract: one result per pair, in order; each Answer is what `ask(images[i], questions[i],
        options=options[i])` gives alone (text, token_ids, point, probs, mask; timings aside: an
        answer's `decode` time is the batch's); a pair that fails holds its exception in its slot
        (InputError for bad input, or what that item's `on_token` raised, which stops that answer
        only) and never fails the others. `options`: one AskOptions for all, or one per pair (None:
        defaults). Mismatched lengths raise InputError.
        """
        per_item = list(options) if isinstance(options, Sequence) else [options] * len(images)
        if not len(images) == len(questions) == len(per_item):
            raise InputError(f"ask_batch got {len(images)} images, {len(questions)} questions, {len(per_item)} options")
        return self._answer([(image, question, item or AskOptions())
                             for image, question, item in zip(images, questions, per_item)])

    # ----------------------------------------------------------------------------- ask's steps
    def _answer(self, requests: list[tuple[ImageInput, str, AskOptions]]) -> list[Answer | Exception]:
        """Prepare (options, image, prompt, prefill) each question, decode all together, finish each;
        a step that fails for one question becomes that question's result."""
        items: list[Question | Exception] = []
        for image, question, opts in requests:
            try:
                items.append(self._prepare(image, question, opts))
            except Exception as exc:  # noqa: BLE001 - a per-item failure becomes that item's result
                items.append(exc)
        live = [item for item in items if isinstance(item, Question)]
        decoded: dict[int, DecodeResult | Exception] = {}
        if live:
            start = time.perf_counter()
            try:
                results = self.decoder.greedy_batch(
                    [i.prompt["logits"] for i in live], [i.prompt["state"] for i in live], [i.limit for i in live],
                    self.eos_ids, self.axis_ids, [None if i.stream is None else i.stream.push for i in live])
            except Exception as exc:  # noqa: BLE001 - the decoder failed for the whole batch
                results = [exc] * len(live)
            elapsed = time.perf_counter() - start
            for item, result in zip(live, results):
                item.timer.record("decode", start, elapsed)
                decoded[id(item)] = result.error if isinstance(result, DecodeResult) and result.error else result
        answers: list[Answer | Exception] = []
        for item in items:
            outcome = item if isinstance(item, Exception) else decoded[id(item)]
            if not isinstance(outcome, Exception):
                try:
                    outcome = self._finish(item, outcome)
                except Exception as exc:  # noqa: BLE001 - e.g. the SAM stage or on_token failing for this item
                    outcome = exc
            answers.append(outcome)
        return answers

    def _prepare(self, image: ImageInput, question: str, opts: AskOptions) -> Question:
        """Options checked, image read, prompt tokenised and prefilled."""
        item = Question.resolve(image, question, opts, self.defaults, load_before=self.backend.load_ms)
        with item.timer.stage("read_image"):
            pending = open_image(image, max_pixels=self.max_pixels)
        logits, state, entry, rgb, prompt_tokens = self._prefill.run(pending, question, "", item.timer, item.cached,
                                                                     new_tokens=item.limit)
        item.limit = min(item.limit, self.context - prompt_tokens)
        item.prompt = {"pending": pending, "prompt_tokens": prompt_tokens, "logits": logits, "state": state,
                       "entry": entry, "rgb": rgb}
        if opts.on_token is not None:
            item.stream = TextStream(self.tokenizer, opts.on_token)
        return item

    def _finish(self, item: Question, result: DecodeResult) -> Answer:
        """Text, closed-set point, mask, overlay and timings of one decoded answer."""
        timer, cached, entry, rgb = item.timer, item.cached, item.prompt["entry"], item.prompt["rgb"]
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if item.stream is not None:
            item.stream.finish(text)
        width, height = entry.size
        probs = closed_set.position_probs(result.axis_logits, self.closed_set, item.tau)
        point = closed_set.point_from_position_probs(probs, width, height, item.mapping)
        whole = vocab.says_whole_image(text, self.whole_image_phrases)
        mask, mask_iou = None, None
        if whole:
            mask, mask_iou = np.ones((height, width), dtype=bool), 1.0
        elif item.options.segment and point is not None and self.has_sam:
            pending = item.prompt["pending"]
            segmented = self.sam.predict_cached(entry, lambda: decoded_rgb(pending, rgb, timer), point,
                                                multimask=item.multimask, timer=timer.stage, cached=cached)
            mask, mask_iou = segmented.mask, segmented.iou
        picture = None
        if item.options.overlay:
            # A cache hit skipped decoding; the overlay needs the pixels.
            rgb = decoded_rgb(item.prompt["pending"], rgb, timer)
            with timer.stage("overlay"):
                picture = render_overlay(rgb, mask, point, text)
        timings = item.timings(self.backend.load_ms, result.step_ms)
        self._last_events = timer.events
        self._last_step_ms = result.step_ms
        return Answer(
            text=text,
            token_ids=result.token_ids,
            point=point,
            probs=probs or None,
            whole_image=whole,
            mask=mask,
            mask_iou=mask_iou,
            image_size=(width, height),
            timings_ms=timings,
            cached=tuple(cached),
            prompt_tokens=item.prompt["prompt_tokens"],
            overlay=picture,
        )

    def segment(
        self, image: ImageInput, point: tuple[float, float], *, multimask: bool | None = None
    ) -> MaskResult:
        """SAM's mask for a given point (x, y) in original pixels, without asking anything (e.g. an
        oracle point in evaluation). Shares the per-image cache (SAM embedding) with `ask`."""
        timer = StageTimer()
        multimask = bool(self.defaults.multimask if multimask is None else multimask)
        with timer.stage("read_image"):
            pending = open_image(image, max_pixels=self.max_pixels)
        entry, rgb = self._prefill.entry(pending, timer)
        x, y = float(point[0]), float(point[1])
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"point must be finite, got {point}")
        cached: list[str] = []
        result = self.sam.predict_cached(entry, lambda: decoded_rgb(pending, rgb, timer), (x, y),
                                         multimask=multimask, timer=timer.stage, cached=cached)
        return MaskResult(mask=result.mask, iou=result.iou, cached="sam_embedding" in cached,
                          timings_ms=dict(timer.ms))

    def _next_token_probs(self, image: ImageInput, question: str, answer_prefix: str, words: Sequence[str], tau: float):
        timer, cached = StageTimer(), []
        start = time.perf_counter()
        with timer.stage("read_image"):
            pending = open_image(image, max_pixels=self.max_pixels)
        logits = self._prefill.run(pending, question, answer_prefix, timer, cached)[0]
        probs = closed_set.closed_set_probs(logits, [self.closed_set[w] for w in words], tau)
        timings = dict(timer.ms)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return {w: float(p) for w, p in zip(words, probs)}, timings

    def score(self, image: ImageInput) -> ScoreResult:
        """Scalar quality in [0, 1]: closed-set softmax over the level words at the token after the
        manifest's score prompt (Q-Align), weighted by vocab.LEVEL_WEIGHTS."""
        probs, timings = self._next_token_probs(
            image, self.score_question, self.score_answer_prefix, vocab.LEVEL_WORDS, 1.0
        )
        score = closed_set.level_score([probs[w] for w in vocab.LEVEL_WORDS], vocab.LEVEL_WEIGHTS)
        return ScoreResult(score=score, probs=probs, timings_ms=timings)

    def choose(self, image: ImageInput, question: str, options: Sequence[str]) -> ChoiceResult:
        """Multiple choice (Q-Bench-A1 layout, vocab.format_mcq_question): softmax over the offered
        option letters at the first answer token."""
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
            raise InputError(f"options must be a list of strings, got {type(options).__name__}")
        options = list(options)
        if not 1 <= len(options) <= len(vocab.OPTION_LETTERS):
            raise InputError(f"multiple choice takes 1 to {len(vocab.OPTION_LETTERS)} options, got {len(options)}")
        for option in options:
            check_text(option, "option")
        check_text(question, "question")
        letters = vocab.OPTION_LETTERS[: len(options)]
        probs, timings = self._next_token_probs(image, vocab.format_mcq_question(question, options), "", letters, 1.0)
        index = int(np.argmax([probs[letter] for letter in letters]))
        return ChoiceResult(letter=letters[index], index=index, option=options[index], probs=probs, timings_ms=timings)

    def end_profiling(self, path: str | os.PathLike[str] | None = None) -> list[Path]:
        """Stop onnxruntime profiling (`profile_dir` set) and return the profile files written. With
        `path`, also write one Chrome trace there: those files' per-node events and the stage spans of
        the last `ask` on their own track (runtime/profiling.py)."""
        files = self.backend.end_profiling()
        if path is not None:
            write_chrome_trace(path, files, self.last_stage_events)
        return files

    @property
    def last_step_ms(self) -> list[float]:
        """Wall time (ms) of each decode call of the last `ask`, in order (step i emits token i + 1)."""
        return list(getattr(self, "_last_step_ms", []))

    @property
    def last_stage_events(self) -> list[tuple[str, float, float]]:
        """(stage, start time.perf_counter() seconds, duration seconds) of the last `ask`."""
        return list(getattr(self, "_last_events", []))
