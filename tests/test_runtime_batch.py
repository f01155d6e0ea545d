"""`Octopus.ask_batch` with the batched decode: several sequences per decoder call, each answer as
`ask` gives it alone, per-item stop, per-item failure and per-item cancellation.

Both decoder forms: gqa (per-row lengths in one shared buffer, one call per step) and flat_kv (one
call per step for the rows of each cache length; no padding, which would change the last bits of
the logits). The runtime_bundle model is grounded (positional words boosted), so closed-set
probabilities, points and SAM masks are compared too, exactly. The server's contract tests (demo bundle,
flat_kv) are in test_runtime_batch_stream.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from octopus_rt.errors import InputError  # noqa: E402
from octopus_rt.runtime import Octopus  # noqa: E402
from octopus_rt.runtime.results import AskOptions  # noqa: E402

QUESTIONS = ("Which region is most degraded?", "Where is the blur?", "Describe the quality of the image.")


@pytest.fixture(params=["gqa", "flat_kv"])
def bundle(request):
    return request.getfixturevalue("runtime_bundle" if request.param == "gqa" else "flat_kv_runtime_bundle")


def _decode_calls(monkeypatch, decoder) -> list[int]:
    """Rows of every decoder call (prefill and decode), for either form; flat_kv decode calls (one
    new position) are recorded as (rows, cache length)."""
    sizes: list = []
    if decoder.graph.input_names[1] == "attention_mask":  # flat_kv
        original = decoder.graph.run

        def run(inputs, outputs=None):
            rows, new = inputs["inputs_embeds"].shape[:2]
            sizes.append(rows if new > 1 else (rows, inputs["attention_mask"].shape[1] - 1))
            return original(inputs, outputs)

        monkeypatch.setattr(decoder.graph, "run", run)
    else:
        original = decoder.run_buffers

        def run_buffers(embeds, lengths, buffers):
            sizes.append(embeds.shape[0])
            return original(embeds, lengths, buffers)

        monkeypatch.setattr(decoder, "run_buffers", run_buffers)
    return sizes


def _assert_same(ours, ref) -> None:
    assert ours.token_ids == ref.token_ids and ours.text == ref.text
    assert ours.whole_image == ref.whole_image and ours.prompt_tokens == ref.prompt_tokens
    # Exactly: a row's numbers never depend on the other rows of its batch.
    assert (ours.probs, ours.point) == (ref.probs, ref.point)
    assert (ours.mask is None) == (ref.mask is None)
    if ref.mask is not None:
        np.testing.assert_array_equal(ours.mask, ref.mask)
        assert ours.mask_iou == ref.mask_iou


def test_batch_answers_equal_single_answers(bundle, runtime_images, monkeypatch):
    # Mixed prompt lengths and limits, a repeated image (shared prefix cache), more items than images.
    images = [runtime_images[0], runtime_images[1], runtime_images[0], runtime_images[2]]
    questions = [QUESTIONS[0], QUESTIONS[2], QUESTIONS[1], QUESTIONS[0]]
    options = [AskOptions(max_new_tokens=14, tau=4.0), AskOptions(max_new_tokens=6), AskOptions(max_new_tokens=14),
               AskOptions(max_new_tokens=11, point_mapping="quadrant", multimask=False)]
    alone = Octopus(bundle, device="cpu", threads=1)
    singles = [alone.ask(img, q, options=o) for img, q, o in zip(images, questions, options)]

    octo = Octopus(bundle, device="cpu", threads=1)
    sizes = _decode_calls(monkeypatch, octo.decoder)
    batch = octo.ask_batch(images, questions, options)

    assert len(batch) == len(singles)
    for ours, ref in zip(batch, singles):
        _assert_same(ours, ref)
        assert ours.timings_ms["decode"] > 0
    assert sum(a.mask is not None for a in batch) >= 1  # the comparison covered SAM
    assert len(batch[1].token_ids) <= 6
    steps = max(len(a.token_ids) for a in batch) - 1
    if isinstance(sizes[-1], tuple):  # flat_kv: items 0 and 3 have one prompt length, 1 and 2 others
        prefills = [s for s in sizes if not isinstance(s, tuple)]
        decode = [s for s in sizes if isinstance(s, tuple)]
        assert sorted(rows for rows, _ in decode[:3]) == [1, 1, 2] and len({n for _, n in decode[:3]}) == 3
        assert len(decode) >= steps and sum(rows for rows, _ in decode) >= sum(len(a.token_ids) - 1 for a in batch)
        assert set(prefills) == {1} and len(prefills) == 7
        return
    # gqa: prefill calls of one row each (the per-image cache serves item 2's prefix), then decode
    # calls of 4 rows until half the rows are done, then of the rows still running.
    prefills = sizes[: len(sizes) - steps]
    assert set(prefills) == {1} and len(prefills) == 7
    decode = sizes[len(prefills):]
    assert decode[0] == 4 and decode == sorted(decode, reverse=True)
    lengths = sorted(len(a.token_ids) for a in batch)
    # Rows leave once at least half of the call's rows are done: after the two shortest, 2 remain.
    assert decode.count(4) == lengths[1] - 1


def test_batch_rows_stop_at_their_own_eos_or_limit(bundle, runtime_images):
    octo = Octopus(bundle, device="cpu", threads=1)
    answers = octo.ask_batch(runtime_images[:3], QUESTIONS, [AskOptions(max_new_tokens=n) for n in (2, 5, 9)])
    for answer, limit in zip(answers, (2, 5, 9)):
        assert 1 <= len(answer.token_ids) <= limit
        if len(answer.token_ids) < limit:
            assert answer.token_ids[-1] in octo.eos_ids


def test_failing_and_cancelled_items_keep_to_their_slots(bundle, runtime_images):
    """A bad image, a bad option and an on_token that raises after 3 tokens: each is that item's
    result; the others equal `ask` alone, and the cancelled item stopped decoding at once."""
    seen: list[str] = []

    def cancel_after_three(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 3:
            raise RuntimeError("client left")

    octo = Octopus(bundle, device="cpu", threads=1)
    images = [runtime_images[0], b"not an image", runtime_images[1], runtime_images[2], runtime_images[1]]
    questions = [QUESTIONS[0], QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], "  "]
    options = [AskOptions(max_new_tokens=12, on_token=cancel_after_three), None, AskOptions(max_new_tokens=12),
               AskOptions(max_new_tokens=12, tau=-1.0), None]
    results = octo.ask_batch(images, questions, options)
    assert isinstance(results[0], RuntimeError) and len(seen) == 3
    assert isinstance(results[1], InputError) and "not a readable image" in str(results[1])
    assert isinstance(results[3], InputError) and "tau must be > 0" in str(results[3])
    assert isinstance(results[4], InputError) and "empty" in str(results[4])
    _assert_same(results[2], Octopus(bundle, device="cpu", threads=1).ask(runtime_images[1], QUESTIONS[1],
                                                                           max_new_tokens=12))
    with pytest.raises(InputError, match="2 images, 1 questions"):
        octo.ask_batch(runtime_images[:2], ["Where?"])
    assert octo.ask_batch([], []) == []


def test_ask_raises_what_its_on_token_raises(bundle, runtime_images):
    octo = Octopus(bundle, device="cpu", threads=1)

    def stop(_delta: str) -> None:
        raise KeyError("stop")

    with pytest.raises(KeyError, match="stop"):
        octo.ask(runtime_images[0], QUESTIONS[0], on_token=stop)
