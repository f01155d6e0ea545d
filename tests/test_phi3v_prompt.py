"""runtime.phi3v_prompt: the Phi-3.5-Vision chat markup and the official placeholder handling.

Expected structure (processing_phi3_v.py, `_convert_images_texts_to_inputs`; transformers.js'
processor test counts 773 = 4 + 757 + 12 ids for "Describe this image." with a 672 x 672 image):
each text chunk between image tags is tokenised on its own with `<s>` in front, and `<|image_k|>`
becomes -k repeated the image's token count. The tiny tokenizer is laid out like Phi-3-Vision's
(training/phi3v_factory.py), so the first chunk "<|user|>\\n" is the same 4 ids as with the real one.
"""

from __future__ import annotations

import numpy as np
import pytest

from octopus_rt.errors import InputError
from octopus_rt.runtime.phi3v_prompt import embedding_ids, phi3v_chat_prompt, phi3v_prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3v_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_phi3v_dir / "tokenizer.json"))


def test_chat_markup():
    assert phi3v_chat_prompt("Describe this image.") == "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"
    assert phi3v_chat_prompt("Q", num_images=2) == "<|user|>\n<|image_1|>\n<|image_2|>\nQ<|end|>\n<|assistant|>\n"
    with pytest.raises(InputError):
        phi3v_chat_prompt("look at <|image_1|>")


def test_official_special_token_ids(tokenizer):
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
                "<|end|>": 32007, "<|user|>": 32010, "<|image|>": 32044, "<0x0A>": 13}
    assert {token: tokenizer.token_to_id(token) for token in expected} == expected
    for word in ("left", "right", "top", "bottom"):
        assert tokenizer.encode(word, add_special_tokens=False).tokens == ["▁" + word]


def test_one_image_structure(tokenizer):
    question = "Describe this image."
    prompt = phi3v_prompt_ids(tokenizer, phi3v_chat_prompt(question), [757])
    ids = prompt.input_ids.tolist()
    # Chunk 0: <s> <|user|> "▁" "\n" (the normaliser puts "▁" before every chunk between special tokens).
    assert ids[:4] == [1, 32010, tokenizer.token_to_id("▁"), 13]
    assert ids[4 : 4 + 757] == [-1] * 757 and prompt.image_spans == ((4, 757),)
    tail = ids[4 + 757 :]
    # The text after the image starts again with <s>, then "▁" "\n" and the question; it ends on
    # <|end|> "▁" "\n" <|assistant|> (whose rstrip swallows the final newline).
    assert tail[:3] == [1, tokenizer.token_to_id("▁"), 13]
    assert tail[-4:] == [32007, tokenizer.token_to_id("▁"), 13, 32001]
    assert tokenizer.decode(tail[3:-4]) == question
    assert -1 not in tail and min(tail) >= 0
    assert prompt.input_ids.dtype == np.int64 and prompt.image_prefix_length == 4 + 757


def test_image_prefix_is_shared_across_questions(tokenizer):
    first = phi3v_prompt_ids(tokenizer, phi3v_chat_prompt("Which region is most degraded?"), [457])
    second = phi3v_prompt_ids(tokenizer, phi3v_chat_prompt("Rate the quality of the image."), [457])
    n = first.image_prefix_length
    assert n == second.image_prefix_length == 4 + 457
    np.testing.assert_array_equal(first.input_ids[:n], second.input_ids[:n])


def test_two_images_and_errors(tokenizer):
    prompt = phi3v_prompt_ids(tokenizer, phi3v_chat_prompt("Compare them.", num_images=2), [5, 7])
    ids = prompt.input_ids.tolist()
    (s1, n1), (s2, n2) = prompt.image_spans
    assert (n1, n2) == (5, 7) and ids[s1 : s1 + 5] == [-1] * 5 and ids[s2 : s2 + 7] == [-2] * 7
    assert ids[s1 + 5] == 1 and ids[s2 + 7] == 1  # <s> after each image run
    with pytest.raises(InputError):
        phi3v_prompt_ids(tokenizer, "<|image_2|>\nhi", [5])  # numbering must start at 1
    with pytest.raises(InputError):
        phi3v_prompt_ids(tokenizer, phi3v_chat_prompt("hi"), [5, 6])  # one tag, two images
    with pytest.raises(InputError):
        phi3v_prompt_ids(tokenizer, phi3v_chat_prompt("hi"), [0])


def test_embedding_ids_clamp_placeholders():
    np.testing.assert_array_equal(embedding_ids(np.array([1, -1, -1, 32007, -2])), [1, 0, 0, 32007, 0])
