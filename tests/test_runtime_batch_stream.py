"""`Octopus.ask_batch` (the server's batch path), the `on_token` streaming hook and `TextStream`."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fixtures_serve import DEMO, EXAMPLES, QUESTION
from octopus_rt.errors import InputError
from octopus_rt.runtime.api import Octopus
from octopus_rt.runtime.results import Answer, AskOptions
from octopus_rt.runtime.streaming import TextStream

QUESTIONS = (QUESTION, "What distortion affects the top left region?", "Describe the quality of this image.")


@pytest.fixture(scope="module")
def model() -> Octopus:
    return Octopus(DEMO, threads=1)


def _same(a: Answer, b: Answer) -> None:
    assert (a.text, a.token_ids, a.point, a.probs, a.whole_image, a.mask_iou, a.prompt_tokens) == (
        b.text, b.token_ids, b.point, b.probs, b.whole_image, b.mask_iou, b.prompt_tokens)
    assert (a.mask is None) == (b.mask is None) and (a.mask is None or np.array_equal(a.mask, b.mask))


def test_ask_batch_equals_ask_and_keeps_failures_per_item(model):
    fresh = Octopus(DEMO, threads=1)  # no cache shared with the batch
    images = [EXAMPLES[0], b"not an image", EXAMPLES[1], EXAMPLES[2]]
    questions = [QUESTIONS[0], QUESTIONS[0], QUESTIONS[1], "  "]
    options = [AskOptions(segment=True), None, AskOptions(max_new_tokens=5), None]
    results = model.ask_batch(images, questions, options)
    assert len(results) == 4
    assert isinstance(results[1], InputError) and "not a readable image" in str(results[1])
    assert isinstance(results[3], InputError) and "empty" in str(results[3])
    _same(results[0], fresh.ask(EXAMPLES[0], QUESTIONS[0], segment=True))
    _same(results[2], fresh.ask(EXAMPLES[1], QUESTIONS[1], max_new_tokens=5))
    assert len(results[2].token_ids) <= 5
    shared = model.ask_batch(EXAMPLES[:2], QUESTIONS[:2], AskOptions(segment=False))  # one options for all
    assert [a.mask for a in shared] == [None, None]
    with pytest.raises(InputError):
        model.ask_batch(EXAMPLES[:2], QUESTIONS[:1])


def test_on_token_streams_exactly_the_answer(model):
    for image, question in zip(EXAMPLES, QUESTIONS):
        deltas: list[str] = []
        answer = model.ask(image, question, on_token=deltas.append)
        assert "".join(deltas) == answer.text
        assert len(deltas) >= len(answer.token_ids)  # once per token (+ a possible last flush)
        via_options: list[str] = []
        again = model.ask(image, question, options=AskOptions(on_token=via_options.append))
        assert via_options == deltas and again.text == answer.text


def test_on_token_exception_stops_that_item_only(model):
    seen: list[str] = []

    def stop_after_three(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 3:
            raise RuntimeError("client left")

    results = model.ask_batch(EXAMPLES[:2], [QUESTION, QUESTION], [AskOptions(on_token=stop_after_three), None])
    assert isinstance(results[0], RuntimeError) and len(seen) == 3
    _same(results[1], Octopus(DEMO, threads=1).ask(EXAMPLES[1], QUESTION))


def _byte_level_tokenizer():
    """A small byte-level BPE (GPT-2 style): multi-byte characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the top left region is blurry"] * 20, trainer)
    return tokenizer


def test_text_stream_holds_back_split_characters():
    tokenizer = _byte_level_tokenizer()
    text = "naïve café: the top left 日本 region ✓"
    ids = tokenizer.encode(text).ids
    # Multi-byte characters really are split over several tokens: some prefixes end mid-character.
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    deltas: list[str] = []
    stream = TextStream(tokenizer, deltas.append)
    for token in ids:
        stream.push(token)
    assert len(deltas) == len(ids)
    stream.finish(tokenizer.decode(ids))
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    # A cut inside a character: the final text ends in U+FFFD, which only the last flush sends.
    cut = ids[: next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))]
    deltas.clear()
    stream = TextStream(tokenizer, deltas.append)
    for token in cut:
        stream.push(token)
    stream.finish(tokenizer.decode(cut))
    assert "".join(deltas) == tokenizer.decode(cut) and deltas[-1].endswith("\ufffd")


def test_batcher_cancels_a_running_question_at_its_next_token(model):
    pytest.importorskip("prometheus_client")
    from octopus_rt.runtime.serve.batching import Batcher, Cancelled, Job

    batcher = Batcher(model, max_batch=4, max_queue=8)
    gate = threading.Event()
    batcher.submit(Job("call", fn=lambda _m: gate.wait(30)))
    streamed: list[str] = []
    doomed = Job("ask", image=EXAMPLES[0], question=QUESTION)
    doomed.on_delta = lambda delta: (streamed.append(delta), batcher.cancel(doomed))
    kept = Job("ask", image=EXAMPLES[1], question=QUESTION)
    waiting = Job("ask", image=EXAMPLES[2], question=QUESTION)
    for job in (doomed, kept, waiting):
        batcher.submit(job)
    batcher.cancel(waiting)  # still queued: out at once
    assert batcher.depth == 3 and isinstance(waiting.future.exception(timeout=1), Cancelled)
    batcher.start()
    gate.set()
    try:
        assert isinstance(doomed.future.exception(timeout=60), Cancelled)
        assert len(streamed) == 1  # stopped at the token after the cancel
        _same(kept.future.result(timeout=60), Octopus(DEMO, threads=1).ask(EXAMPLES[1], QUESTION))
    finally:
        batcher.stop()
