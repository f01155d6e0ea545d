"""`octopus-rt export lmm`: parity of the exported graphs with transformers, manifest contract, bad input.

The exporter verifies itself; these tests check it independently: the bundle is driven the way the
runtime drives it (tokenizers + manifest prompt strings + embedding table + graphs; the runtime's
own decoder classes for batched greedy decoding) and compared with the transformers model's own
processor + generate(). Both decoder forms (gqa, the `auto` default for these models, and the
traced flat_kv) for Phi-3, Llama and Qwen2 text models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from octopus_rt import bundle as bundle_mod  # noqa: E402
from octopus_rt import vocab  # noqa: E402
from octopus_rt.cli import main  # noqa: E402
from octopus_rt.errors import OctopusError  # noqa: E402

STEPS = 12


def _section(bundle_dir: Path) -> tuple[dict, Path]:
    manifest = bundle_mod.read_manifest(bundle_dir)
    return manifest["lmm"], bundle_dir / manifest["lmm"]["dir"]


def _runtime_style_generate(bundle_dir: Path, questions, images, steps: int):
    """Greedy decoding driven only by what the bundle holds (plus the processor's pixel values)."""
    from tokenizers import Tokenizer
    from transformers import AutoProcessor

    from octopus_rt.export.decoder_forms import gqa_generate
    from octopus_rt.export.llava_wrappers import DecoderDims
    from octopus_rt.export.lmm_verify import make_session, onnx_generate

    section, folder = _section(bundle_dir)
    prompt = section["prompt"]
    tokenizer = Tokenizer.from_file(str(folder / section["tokenizer"]["file"]))
    rows = []
    for question in questions:
        text = prompt["prefix"] + prompt["image_token"] * prompt["num_image_tokens"] + prompt["infix"] + question + prompt["suffix"]
        rows.append(tokenizer.encode(text, add_special_tokens=prompt["add_special_tokens"]).ids)
    width = max(len(r) for r in rows)
    pad = section["tokenizer"]["pad_token_id"]
    input_ids = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    processor = AutoProcessor.from_pretrained(section["source"]["model_dir"])
    pixels = processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    dec = section["decoder"]
    dims = DecoderDims(
        num_layers=dec["num_layers"], num_attention_heads=0, num_key_value_heads=dec["num_key_value_heads"],
        head_dim=dec["head_dim"], hidden_size=dec["hidden_size"], vocab_size=dec["vocab_size"],
        max_position_embeddings=dec["max_position_embeddings"],
    )
    embed = np.load(folder / section["embedding"]["file"], mmap_mode="r")
    run = gqa_generate if dec["form"] == "gqa" else onnx_generate
    tokens, logits = run(
        make_session(folder / section["vision"]["file"]), make_session(folder / dec["file"]), embed, dims,
        prompt["image_token_id"], input_ids, mask, pixels, steps,
        min_new_tokens=steps, eos_token_ids=section["tokenizer"]["eos_token_ids"],
    )
    return input_ids, tokens, logits


def _transformers_generate(model_dir: Path, questions, images, steps: int):
    from transformers import AutoProcessor, AutoModelForImageTextToText

    from octopus_rt.export.lmm_reference import processor_inputs

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    inputs = processor_inputs(processor, questions, images)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
            output_logits=True, return_dict_in_generate=True,
        )
    length = inputs["input_ids"].shape[1]
    return inputs["input_ids"].numpy(), out.sequences[:, length:].numpy(), torch.stack(out.logits).numpy()


KINDS_AND_FORMS = [(kind, form) for kind in ("phi3_clip", "llama_clip", "qwen2_siglip") for form in ("gqa", "flat_kv")]
QUESTIONS = ["Is the sky noisy?", vocab.format_mcq_question("Where is the blur?", ["top left", "bottom right"]), "Rate it."]


@pytest.mark.parametrize("kind, form", KINDS_AND_FORMS)
def test_fp32_bundle_matches_transformers_generate(kind, form, tiny_llava_dir, tiny_lmm_bundle):
    """Batch 3 with left padding (the gqa form drops each row's padding), logits and tokens."""
    from octopus_rt.export.lmm_reference import synthetic_images

    bundle_dir = tiny_lmm_bundle(kind, "auto" if form == "gqa" else form)
    assert _section(bundle_dir)[0]["decoder"]["form"] == form
    # Questions and images the exporter's own verification did not use.
    images = synthetic_images(4, seed=7)[1:]
    ids_rt, tokens_rt, logits_rt = _runtime_style_generate(bundle_dir, QUESTIONS, images, STEPS)
    ids_ref, tokens_ref, logits_ref = _transformers_generate(tiny_llava_dir(kind), QUESTIONS, images, STEPS)
    np.testing.assert_array_equal(ids_rt, ids_ref)  # pre-rendered prompt == processor + chat template
    np.testing.assert_array_equal(tokens_rt, tokens_ref)
    assert np.abs(logits_rt - logits_ref).max() <= 1e-4


@pytest.mark.parametrize("kind, form", KINDS_AND_FORMS)
def test_runtime_batched_greedy_matches_transformers(kind, form, tiny_llava_dir, tiny_lmm_bundle):
    """The runtime's own decoder (runtime/generate.make_decoder: Decoder or BufferDecoder) decoding
    three prompts together, each stopping at its own eos or the limit, against generate() on the
    same batch: every row's tokens identical up to and including its stop token."""
    import onnxruntime as ort
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from octopus_rt.export.lmm_reference import processor_inputs, synthetic_images
    from octopus_rt.runtime import Octopus

    bundle_dir = tiny_lmm_bundle(kind, "auto" if form == "gqa" else form)
    section, folder = _section(bundle_dir)
    steps, eos = 24, section["tokenizer"]["eos_token_ids"]
    images = synthetic_images(4, seed=9)[1:]
    processor = AutoProcessor.from_pretrained(tiny_llava_dir(kind))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir(kind)).eval()
    inputs = processor_inputs(processor, QUESTIONS, images)
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=steps)[:, inputs["input_ids"].shape[1]:]

    octo = Octopus(bundle_dir, device="cpu", threads=1)
    decoder = octo.decoder
    assert type(decoder).__name__ == {"gqa": "BufferDecoder", "flat_kv": "Decoder"}[form]
    vision = ort.InferenceSession(str(folder / section["vision"]["file"]), providers=["CPUExecutionProvider"])
    features = vision.run(None, {"pixel_values": inputs["pixel_values"].float().numpy()})[0]
    firsts, states = [], []
    for row in range(len(QUESTIONS)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        embeds = decoder.embed(ids)
        embeds[0, np.flatnonzero(np.asarray(ids) == section["prompt"]["image_token_id"])] = features[row]
        logits, state = decoder.forward(embeds, decoder.empty_state(len(ids) + steps))
        firsts.append(logits)
        states.append(state)
    results = decoder.greedy_batch(firsts, states, [steps] * len(QUESTIONS), eos)
    compared = 0
    for row, result in enumerate(results):
        want = expected[row].tolist()
        stop = next((i for i, t in enumerate(want) if t in eos), len(want) - 1)
        assert result.token_ids == want[: stop + 1], (row, result.token_ids, want)
        compared += len(result.token_ids)
    assert compared >= steps  # the rows did not all stop at once


@pytest.mark.parametrize("form", ["auto", "flat_kv"])
def test_manifest_lmm_section_follows_the_contract(tiny_lmm_bundle, form):
    import onnx

    bundle_dir = tiny_lmm_bundle("phi3_clip", form)
    manifest = bundle_mod.read_manifest(bundle_dir)
    assert bundle_mod.check_files(bundle_dir, manifest, hashes=True) == []
    assert manifest["defaults"] == bundle_mod.DEFAULTS
    section, folder = _section(bundle_dir)
    assert set(section["files"]) >= {"vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json"}
    for key in ("versions", "opset", "ir_version", "precision", "source", "vision", "embedding", "decoder",
                "tokenizer", "preprocess", "prompt", "closed_set", "closed_set_forms", "whole_image_phrases",
                "score_prompt"):
        assert key in section, key
    assert section["precision"] == "fp32"
    dec = section["decoder"]
    n = dec["num_layers"]
    leading = ["inputs_embeds", "attention_mask", "position_ids"] if form == "flat_kv" else [
        "inputs_embeds", "seqlens_k", "total_sequence_length"]
    assert (dec["form"], dec["kv_buffer"]) == (("flat_kv", "concat") if form == "flat_kv" else ("gqa", "shared"))
    assert dec["form_reason"] == ("requested" if form == "flat_kv" else "auto")
    assert "quantization" not in dec  # fp32
    expected_inputs = leading + [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    expected_outputs = ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    graph = onnx.load(str(folder / dec["file"]))
    assert [i.name for i in graph.graph.input] == expected_inputs == dec["input_names"]
    assert [o.name for o in graph.graph.output] == expected_outputs == dec["output_names"]
    assert graph.opset_import[0].version == section["opset"] or any(o.version == section["opset"] for o in graph.opset_import)
    assert graph.ir_version == section["ir_version"]
    # Batch, sequence and past length are symbolic (dim_param), not frozen numbers.
    for value in graph.graph.input[3:]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[2].dim_param and dims[1].dim_value == dec["num_key_value_heads"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param
    embed = np.load(folder / "embed_tokens.npy", mmap_mode="r")
    assert embed.shape == (section["embedding"]["vocab_size"], section["embedding"]["hidden_size"])
    assert section["whole_image_phrases"] == list(vocab.WHOLE_IMAGE_PHRASES)
    assert section["score_prompt"] == {"question": vocab.SCORE_QUESTION, "answer_prefix": vocab.SCORE_ANSWER_PREFIX}
    assert section["preprocess"]["backend"] in ("torchvision", "pil")
    assert section["tokenizer"]["eos_token_ids"]


def test_closed_set_ids_are_the_in_context_ids(tiny_lmm_bundle):
    from tokenizers import Tokenizer

    section, folder = _section(tiny_lmm_bundle("phi3_clip"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for words in vocab.closed_set_words().values():
        for word in words:
            forms = section["closed_set_forms"][word]
            assert set(forms) == set(vocab.word_forms(word))
            single = {ids[0] for ids in forms.values() if len(ids) == 1}
            # Single-token forms only; first sub-tokens only for a word without any single-token form.
            assert set(section["closed_set"][word]) == (single or {ids[0] for ids in forms.values()})
            assert single, f"the test tokenizer should know {word!r} as one token"
            for form, ids in forms.items():
                if not form.startswith(" "):
                    continue
                # Mid-sentence, the word is tokenized exactly as recorded.
                sentence = tokenizer.encode("The" + form + " region", add_special_tokens=False).ids
                assert any(sentence[i:i + len(ids)] == ids for i in range(len(sentence))), (form, ids, sentence)


def test_prompt_check_rejects_strings_that_tokenize_differently(tiny_llava_dir, tiny_lmm_bundle):
    from transformers import AutoProcessor

    import dataclasses

    from octopus_rt.export.lmm_manifest import check_prompt
    from octopus_rt.manifest_lmm import PromptSpec

    section, folder = _section(tiny_lmm_bundle("phi3_clip"))
    processor = AutoProcessor.from_pretrained(tiny_llava_dir("phi3_clip"))
    prompt = PromptSpec.from_dict(section["prompt"])
    check_prompt(prompt, folder / "tokenizer.json", processor)
    broken = dataclasses.replace(prompt, suffix=prompt.suffix.replace("\n", " "))
    with pytest.raises(OctopusError, match="does not tokenize like the processor"):
        check_prompt(broken, folder / "tokenizer.json", processor)


def _export_precision(tiny_llava_dir, tmp_path, precision, *extra):
    out = tmp_path / f"bundle_{precision}"
    assert main(["export", "lmm", str(tiny_llava_dir("phi3_clip")), "--out", str(out), "--precision", precision,
                 *extra]) == 0
    return out


def _teacher_forced_agreement(bundle_dir: Path, model_dir: Path, steps: int = STEPS) -> tuple[float, float]:
    """(min cosine, top-1 agreement) of the bundle's next-token logits against transformers', measured
    here and not by the exporter: other questions and images than its verification, transformers'
    own forward pass over the greedy fp32 tokens as the reference, the bundle driven by the runtime's
    decoder loop (embedding table + decoder graph) along the same tokens."""
    import onnxruntime as ort
    from transformers import AutoProcessor, AutoModelForImageTextToText

    from octopus_rt.export.lmm_reference import processor_inputs, synthetic_images
    from octopus_rt.runtime import Octopus

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    octo = Octopus(bundle_dir, device="cpu", threads=1)
    section, folder = _section(bundle_dir)
    vision = ort.InferenceSession(str(folder / section["vision"]["file"]), providers=["CPUExecutionProvider"])
    cosines, agree = [], []
    for question, image in zip(["Is the sky noisy?", "Where is the blur?"], synthetic_images(3, seed=11)[1:]):
        inputs = processor_inputs(processor, [question], [image])
        length = inputs["input_ids"].shape[1]
        with torch.no_grad():
            tokens = model.generate(**inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)[0, length:]
            full = torch.cat([inputs["input_ids"][0], tokens[:-1]])[None]
            want = model(input_ids=full, attention_mask=torch.ones_like(full),
                         pixel_values=inputs["pixel_values"]).logits[0, length - 1:].numpy()
        ids = inputs["input_ids"][0].tolist()
        embeds = octo.decoder.embed(ids)
        features = vision.run(None, {"pixel_values": inputs["pixel_values"].float().numpy()})[0]
        embeds[0, np.flatnonzero(np.asarray(ids) == section["prompt"]["image_token_id"])] = features[0]
        logits, state = octo.decoder.forward(embeds, octo.decoder.empty_state())
        got = [logits]
        for token in tokens[:-1].tolist():
            logits, state = octo.decoder.forward(octo.decoder.embed([token]), state)
            got.append(logits)
        got = np.stack(got).astype(np.float64)
        cosines += list((got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)))
        agree += list(got.argmax(-1) == want.argmax(-1))
    return float(min(cosines)), float(np.mean(agree))


def test_fp16_export_matches_transformers(tiny_llava_dir, tmp_path):
    section, folder = _section(_export_precision(tiny_llava_dir, tmp_path, "fp16"))
    assert torch.is_grad_enabled()  # the export must not switch autograd off for the whole process
    assert section["precision"] == "fp16"
    assert np.load(folder / "embed_tokens.npy", mmap_mode="r").dtype == np.float16
    assert section["embedding"]["dtype"] == "float16"
    cosine, top1 = _teacher_forced_agreement(tmp_path / "bundle_fp16", tiny_llava_dir("phi3_clip"))
    assert cosine >= 0.999 and top1 >= 0.99, (cosine, top1)


def _float_weight_matmuls(graph) -> list[str]:
    """Names of the MatMul / Gemm nodes that still multiply by a float weight (an initializer)."""
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[:2])]


@pytest.mark.parametrize("form", ["auto", "flat_kv"])
def test_int8_export_matches_transformers(tiny_llava_dir, tmp_path, form):
    import onnx

    section, folder = _section(_export_precision(tiny_llava_dir, tmp_path, "int8", "--decoder-form", form))
    graph = onnx.load(str(folder / "decoder.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    # Every weight MatMul quantised, the lm_head included; the flat_kv form keeps its float
    # activation x activation MatMuls (attention scores, rotary), the gqa form fuses them away.
    assert _float_weight_matmuls(graph) == []
    assert form == "flat_kv" or "MatMul" not in ops
    assert ("GroupQueryAttention" in ops) == (form == "auto")
    assert section["decoder"]["quantization"] == {"method": "quantize_dynamic", "bits": 8, "per_channel": True}
    cosine, top1 = _teacher_forced_agreement(tmp_path / "bundle_int8", tiny_llava_dir("phi3_clip"))
    assert cosine >= 0.99 and top1 >= 0.99, (cosine, top1)


@pytest.mark.parametrize("form", ["auto", "flat_kv"])
def test_int4_export_uses_matmulnbits(tiny_llava_dir, tmp_path, form):
    import onnx

    section, folder = _section(_export_precision(tiny_llava_dir, tmp_path, "int4", "--decoder-form", form))
    nodes = onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    # 4-bit blocks of 32 with int8 compute (accuracy_level 4); the lm_head (fed to logits) at 8 bits.
    assert sorted(a["bits"] for a in attrs).count(8) == 1 and {a["bits"] for a in attrs} == {4, 8}
    assert {a["block_size"] for a in attrs} == {32} and {a["accuracy_level"] for a in attrs} == {4}
    assert _float_weight_matmuls(onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph) == []
    assert form == "flat_kv" or "MatMul" not in {n.op_type for n in nodes}
    assert section["decoder"]["quantization"]["lm_head_bits"] == 8
    cosine, top1 = _teacher_forced_agreement(tmp_path / "bundle_int4", tiny_llava_dir("phi3_clip"))
    assert cosine >= 0.99 and top1 >= 0.99, (cosine, top1)


def test_failed_verification_leaves_no_bundle_and_keeps_an_existing_one(tiny_llava_dir, tiny_lmm_bundle, tmp_path, monkeypatch):
    from octopus_rt.export import lmm_verify
    from octopus_rt.export.lmm import export_lmm

    from octopus_rt.verification import VerifyThresholds

    source = tiny_lmm_bundle("phi3_clip")  # built before the thresholds are made impossible
    impossible = VerifyThresholds(rtol=1e-3, atol=1e-4, min_cosine=1.5, min_top1=1.0, identical_tokens=True)
    monkeypatch.setitem(lmm_verify.THRESHOLDS, "fp32", impossible)
    fresh = tmp_path / "fresh"
    with pytest.raises(OctopusError, match="failed verification"):
        export_lmm(tiny_llava_dir("phi3_clip"), fresh)
    assert not fresh.exists()

    existing = tmp_path / "existing"
    shutil.copytree(source, existing)
    before = (existing / "manifest.json").read_text()
    with pytest.raises(OctopusError, match="failed verification"):
        export_lmm(tiny_llava_dir("phi3_clip"), existing)
    assert (existing / "manifest.json").read_text() == before
    manifest = json.loads(before)
    assert bundle_mod.check_files(existing, manifest, hashes=True) == []
    assert not [p for p in existing.iterdir() if p.name.startswith(".staging")]


# --- bad input through the CLI: one line on stderr, non-zero exit, nothing that looks like a bundle ---


def _run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_model_dir(tmp_path, capsys):
    code, line = _run_cli(["export", "lmm", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and line.startswith("error:") and "not found" in line
    assert not (tmp_path / "b").exists()


def test_non_model_dir(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("hello")
    code, line = _run_cli(["export", "lmm", str(tmp_path / "m"), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and "no config.json" in line
    assert not (tmp_path / "b").exists()


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    code, line = _run_cli(["export", "lmm", str(tmp_path / "llama"), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and "unsupported architecture LlamaForCausalLM" in line
    assert "LlavaForConditionalGeneration" in line and "phi3" in line and "siglip" in line
    assert not (tmp_path / "b").exists()


def test_truncated_weights(tiny_llava_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llava_dir("phi3_clip"), model_dir)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, line = _run_cli(["export", "lmm", str(model_dir), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and line.startswith("error:") and "cannot load model weights" in line
    assert not (tmp_path / "b").exists()


def test_unwritable_output(tiny_llava_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, line = _run_cli(["export", "lmm", str(tiny_llava_dir("phi3_clip")), "--out", str(blocker / "bundle")], capsys)
    assert code != 0 and line.startswith("error:") and "cannot write" in line
    assert blocker.read_text() == "not a folder"


def test_unknown_precision(tiny_llava_dir, tmp_path, capsys):
    code, line = _run_cli(["export", "lmm", str(tiny_llava_dir("phi3_clip")), "--out", str(tmp_path / "b"),
                           "--precision", "int3"], capsys)
    assert code != 0 and "unknown precision" in line


def test_decoder_form_errors(tiny_llava_dir, tmp_path, capsys):
    model = str(tiny_llava_dir("phi3_clip"))
    code, line = _run_cli(["export", "lmm", model, "--out", str(tmp_path / "a"), "--decoder-form", "fast"], capsys)
    assert code != 0 and "unknown decoder form 'fast'" in line and "flat_kv" in line
    code, line = _run_cli(["export", "lmm", model, "--out", str(tmp_path / "b"), "--precision", "fp16",
                           "--decoder-form", "gqa"], capsys)
    assert code != 0 and "gqa decoder form does not support precision fp16" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_opset17_with_external_data(tiny_llava_dir, tmp_path, monkeypatch):
    """--opset below 18 (TorchScript path) and weights in <graph>.data files (forced by a 0-byte threshold)."""
    import onnx

    from octopus_rt.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "bundle"
    assert main(["export", "lmm", str(tiny_llava_dir("llama_clip")), "--out", str(out), "--opset", "17",
                 "--decoder-form", "flat_kv"]) == 0
    section, folder = _section(out)
    assert {"decoder.onnx.data", "vision.onnx.data"} <= set(section["files"])
    assert section["opset"] == 17
    graph = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert section["verification"]["tokens_identical"]
    assert main(["verify", str(out)]) == 0
