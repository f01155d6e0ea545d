"""`octopus-rt export lmm` on official-layout Phi-3(.5)-Vision checkpoints (export/phi3v_*.py).

References: transformers' Phi3 decoder itself (the model's unchanged `language_model`), a no-cache
greedy loop (every step a full forward: what the official generate() computes, since it re-runs the
cache when the sequence first passes the longrope switch), the checkpoint's own tokenizer files and
the literal ids of the official special tokens. Tiny seeded checkpoints (tests/fixtures_phi3v*.py):
the longrope switch is at 512 tokens, so real prompts (457-781 image tokens) reach both sides."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

from octopus_rt.bundle import check_files, read_manifest  # noqa: E402
from octopus_rt.cli import main  # noqa: E402
from octopus_rt.errors import InputError, OctopusError  # noqa: E402
from octopus_rt.manifest import parse_manifest  # noqa: E402

SWITCH = 512  # tiny checkpoint's original_max_position_embeddings (training/phi3v_factory.py)


def _section(bundle: Path) -> tuple[dict, Path]:
    manifest = read_manifest(bundle)
    return manifest["lmm"], bundle / manifest["lmm"]["dir"]


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_section_follows_the_contract(phi3v_bundle, phi3v_grounding_dir):
    section, folder = _section(phi3v_bundle)
    typed = parse_manifest(read_manifest(phi3v_bundle)).lmm
    assert typed.architecture == "phi3v" and section["source"]["model_dir"] == str(phi3v_grounding_dir)
    assert section["hd"] == {"num_crops": 4, "separators": {"file": "separators.npy", "dtype": "float32"},
                             "crop_size": 336, "tokens_per_side": 12, "layout": "sub_glb"}
    # The most tokens at 4 crops: a 4 x 1 grid (portrait), (4 + 1) * 144 + 1 + 5 * 12.
    assert section["vision"]["num_image_tokens"] == section["prompt"]["num_image_tokens"] == 781
    prompt = section["prompt"]
    assert (prompt["prefix"], prompt["image_token"], prompt["infix"], prompt["suffix"]) == (
        "<|user|>\n", "<|image_1|>", "\n", "<|end|>\n<|assistant|>\n")
    assert prompt["image_token_id"] == -1 and prompt["tokenize_chunks"] and prompt["variable_image_tokens"]
    assert prompt["add_special_tokens"]
    # Stop ids: config eos </s> 2, the tokenizer's eos <|endoftext|> 32000, <|end|> 32007 (official ids).
    assert section["tokenizer"]["eos_token_ids"] == [2, 32000, 32007] and section["tokenizer"]["bos_token_id"] == 1
    decoder = section["decoder"]
    assert decoder["form"] == "flat_kv" and decoder["original_max_position_embeddings"] == SWITCH
    # Closed-set ids are the SentencePiece word pieces of the checkpoint's own tokenizer.
    pieces = json.loads((phi3v_grounding_dir / "tokenizer.json").read_text())["model"]["vocab"]
    for word in ("left", "right", "top", "bottom"):
        assert pieces["▁" + word] in section["closed_set"][word]
    assert (folder / "tokenizer.json").read_bytes() == (phi3v_grounding_dir / "tokenizer.json").read_bytes()
    check = section["verification"]
    assert check["tokens_identical"] and check["closed_set_max_abs_diff"] <= 1e-4
    assert check["vision_num_crops"] == [4, 16] and check["rope_switch_crossings"] >= 1
    # One generation prompt below the switch (crossed while decoding), one above it from the start.
    assert min(check["generation_prompt_tokens"]) < SWITCH < max(check["generation_prompt_tokens"])
    assert set(section["files"]) >= {"vision.onnx", "decoder.onnx", "separators.npy", "embed_tokens.npy", "tokenizer.json"}
    assert check_files(phi3v_bundle, read_manifest(phi3v_bundle), hashes=True) == []


def test_old_bundles_read_with_the_new_fields_defaulted(runtime_bundle):
    """A LLaVA manifest written without the Phi-3-V fields parses with their defaults."""
    raw = read_manifest(runtime_bundle)
    for key in ("architecture", "hd"):
        raw["lmm"].pop(key, None)
    for key in ("form", "kv_buffer", "form_reason", "quantization", "original_max_position_embeddings"):
        raw["lmm"]["decoder"].pop(key, None)
    for key in ("tokenize_chunks", "variable_image_tokens"):
        raw["lmm"]["prompt"].pop(key, None)
    lmm = parse_manifest(raw).lmm
    assert (lmm.architecture, lmm.hd, lmm.decoder.form, lmm.decoder.original_max_position_embeddings) == (
        "llava", None, "flat_kv", None)
    assert not lmm.prompt.tokenize_chunks and not lmm.prompt.variable_image_tokens


def test_manifest_refuses_a_phi3v_section_without_hd(phi3v_bundle):
    from octopus_rt.schema import ManifestError

    raw = read_manifest(phi3v_bundle)
    del raw["lmm"]["hd"]
    with pytest.raises(ManifestError, match="lmm.hd"):
        parse_manifest(raw)
    raw = read_manifest(phi3v_bundle)
    raw["lmm"]["decoder"]["form"] = "gqa_nonexistent"
    with pytest.raises(ManifestError, match="lmm.decoder.form"):
        parse_manifest(raw)
    raw = read_manifest(phi3v_bundle)
    raw["lmm"]["decoder"].update(form="gqa", kv_buffer="shared")  # a longrope decoder must be flat_kv
    with pytest.raises(ManifestError, match="longrope decoder"):
        parse_manifest(raw)


def _lm_forward(lm, embeds, past, positions, switch=None):
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(past[2 * i].clone(), past[2 * i + 1].clone()) for i in range(len(past) // 2)])
    mask = torch.ones(1, past[0].shape[2] + embeds.shape[1], dtype=torch.long)
    params = lm.config.rope_parameters
    saved = params["original_max_position_embeddings"]
    if switch is not None:
        params["original_max_position_embeddings"] = switch
    try:
        with torch.no_grad():
            return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    finally:
        params["original_max_position_embeddings"] = saved


def test_decoder_graph_picks_the_rope_table_per_call(phi3v_bundle, phi3v_grounding_dir):
    """decoder.onnx against transformers' Phi3 decoder on both sides of the switch and across it in one
    call; control: transformers with the switch moved away (short table only) differs at the long side."""
    from octopus_rt.export.llava_wrappers import decoder_input_names
    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    section, folder = _section(phi3v_bundle)
    session = _session(folder / section["decoder"]["file"])
    lm = load_phi3v(phi3v_grounding_dir).language_model
    dims = section["decoder"]
    names = decoder_input_names(dims["num_layers"])
    generator = torch.Generator().manual_seed(5)
    for seq, past_len, first in ((1, SWITCH - 1, SWITCH - 1), (1, SWITCH, SWITCH), (3, SWITCH - 1, SWITCH - 1), (40, 0, 0),
                                 (SWITCH + 30, 0, 0)):
        embeds = torch.randn(1, seq, dims["hidden_size"], generator=generator) * 0.05
        past = [torch.randn(1, dims["num_key_value_heads"], past_len, dims["head_dim"], generator=generator)
                for _ in range(2 * dims["num_layers"])]
        positions = torch.arange(first, first + seq)[None]
        expected = _lm_forward(lm, embeds, past, positions)
        got = session.run(None, dict(zip(names, [embeds.numpy(), np.ones((1, past_len + seq), np.int64),
                                                 positions.numpy(), *[p.numpy() for p in past]])))
        np.testing.assert_allclose(got[0], expected.logits[:, -1].numpy(), rtol=0, atol=1e-5)
        for layer, present in enumerate(expected.past_key_values.layers):
            np.testing.assert_allclose(got[1 + 2 * layer], present.keys.numpy(), rtol=0, atol=1e-5)
        short_only = _lm_forward(lm, embeds, past, positions, switch=10**9).logits[:, -1].numpy()
        gap = float(np.abs(got[0] - short_only).max())
        assert (gap > 1e-3) if first + seq > SWITCH else (gap < 1e-5), (seq, past_len, gap)


def _no_cache_greedy(lm, embeds: torch.Tensor, table: torch.Tensor, steps: int) -> tuple[list[int], list[np.ndarray]]:
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            row = lm(inputs_embeds=embeds).logits[0, -1]
            logits.append(row.numpy())
            tokens.append(int(row.argmax()))
            embeds = torch.cat([embeds, table[tokens[-1]][None, None]], dim=1)
    return tokens, logits


def test_runtime_decoding_across_the_switch_matches_a_full_recompute(phi3v_bundle, phi3v_grounding_dir):
    """A prompt of 500 tokens decoded for 30 (crossing 512) by the runtime's loops (runtime/generate.py:
    forward step by step, greedy and greedy_batch) equals the no-cache greedy of transformers' decoder (what the official generate()'s cache re-run
    computes). The reference's own loop (export/phi3v_reference.greedy) agrees; control: keeping the
    short-rotated cache (no re-run) changes the logits from the crossing step on."""
    import dataclasses

    from octopus_rt.export.phi3v_checkpoint import load_phi3v
    from octopus_rt.export.phi3v_reference import greedy
    from octopus_rt.runtime.backends import Graph
    from octopus_rt.runtime.generate import Decoder

    section, folder = _section(phi3v_bundle)
    spec = parse_manifest(read_manifest(phi3v_bundle)).lmm.decoder
    model = load_phi3v(phi3v_grounding_dir)
    table = model.language_model.get_input_embeddings().weight.detach()
    ids = torch.randint(259, 900, (1, 500), generator=torch.Generator().manual_seed(2))
    steps = 30
    expected_tokens, expected_logits = _no_cache_greedy(model.language_model, table[ids], table, steps)

    embed = np.load(folder / section["embedding"]["file"])
    graph = Graph("decoder", _session(folder / section["decoder"]["file"]), "cpu")

    def run(decoder):
        logits, state = decoder.forward(decoder.embed(ids[0].tolist()), decoder.empty_state())
        tokens, rows = [], []
        for step in range(steps):
            rows.append(logits)
            tokens.append(int(np.argmax(logits)))
            if step < steps - 1:
                logits, state = decoder.forward(decoder.embed([tokens[-1]]), state)
        return tokens, rows

    tokens, rows = run(Decoder(graph, embed, spec))
    assert tokens == expected_tokens
    np.testing.assert_allclose(np.stack(rows), np.stack(expected_logits), rtol=0, atol=1e-4)
    # The loops ask and ask_batch use (Decoder.greedy -> greedy_batch) re-run the same way: their decode
    # steps bypass `forward` for flat_kv LLaVA decoders, so a longrope decoder takes a per-row path.
    class Recording:  # the graph, keeping the logits of every call
        def __init__(self, inner):
            self.inner, self.logits = inner, []

        def run(self, feeds, names):
            outputs = self.inner.run(feeds, names)
            self.logits.append(outputs[0].numpy())
            return outputs

        def __getattr__(self, name):
            return getattr(self.inner, name)

    recording = Recording(graph)
    decoder = Decoder(recording, embed, spec)
    first, state = decoder.forward(decoder.embed(ids[0].tolist()), decoder.empty_state())
    assert decoder.greedy(first, state, steps, eos_ids=[]).token_ids == expected_tokens
    np.testing.assert_allclose(np.concatenate(recording.logits[1:]), np.stack(expected_logits[1:]), rtol=0, atol=1e-4)
    batch = decoder.greedy_batch([first, first], [state, state], [steps, steps - 5], eos_ids=[])
    assert [r.token_ids for r in batch] == [expected_tokens, expected_tokens[: steps - 5]]
    ref_tokens, ref_logits = greedy(model, ids, torch.zeros(1, 3, 336, 336), (336, 336), steps)
    assert ref_tokens == expected_tokens
    np.testing.assert_allclose(torch.stack(ref_logits).numpy(), np.stack(expected_logits), rtol=0, atol=1e-4)

    stale, stale_rows = run(Decoder(graph, embed, dataclasses.replace(spec, original_max_position_embeddings=None)))
    crossing = SWITCH + 1 - 500  # rows[k] follows the input at position 499 + k: position 512 at k = 13
    assert np.abs(stale_rows[crossing] - expected_logits[crossing]).max() > 1e-2
    np.testing.assert_allclose(np.stack(stale_rows[:crossing]), np.stack(expected_logits[:crossing]), rtol=0, atol=1e-4)


def test_reference_is_independent_of_the_runtime():
    """export/phi3v_reference.py imports nothing from octopus_rt.runtime (the parity would prove nothing)."""
    source = Path(__file__).parents[1] / "export" / "phi3v_reference.py"
    imported = [node.module for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.ImportFrom)]
    assert imported and not [m for m in imported if m and m.startswith("octopus_rt.runtime")]


def test_official_prompt_ids_structure(tiny_phi3v_dir):
    """Phi3VProcessor's structure with the checkpoint's tokenizer: 4 ids before the image (<s> <|user|>
    ▁ \\n), <s> right after it, the generation prompt last (transformers.js' 4 + 757 + 12 layout)."""
    from transformers import PreTrainedTokenizerFast

    from octopus_rt.export.phi3v_reference import official_prompt_ids

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_phi3v_dir)
    ids = official_prompt_ids(tokenizer, "Describe this image.", 757)[0].tolist()
    assert ids[:2] == [1, 32010] and len(ids[: ids.index(-1)]) == 4
    assert ids.count(-1) == 757 and ids[4 + 757] == 1 and ids[-1] == 32001


def test_prompt_check_catches_pieces_that_tokenize_differently(phi3v_bundle, phi3v_grounding_dir, tmp_path):
    import dataclasses

    from transformers import PreTrainedTokenizerFast

    from octopus_rt.export.phi3v_lmm import check_phi3v_prompt, phi3v_prompt_spec

    lmm = parse_manifest(read_manifest(phi3v_bundle)).lmm
    tokenizer = PreTrainedTokenizerFast.from_pretrained(phi3v_grounding_dir)
    prompt = phi3v_prompt_spec(tokenizer, 781)
    assert prompt == lmm.prompt
    check_phi3v_prompt(prompt, phi3v_grounding_dir / "tokenizer.json", tokenizer, lmm.hd)
    for broken in (dataclasses.replace(prompt, suffix="<|end|>\n"), dataclasses.replace(prompt, add_special_tokens=False)):
        with pytest.raises(OctopusError, match="does not tokenize like the official processor"):
            check_phi3v_prompt(broken, phi3v_grounding_dir / "tokenizer.json", tokenizer, lmm.hd)
    with pytest.raises(OctopusError, match="tokenize_chunks"):
        check_phi3v_prompt(dataclasses.replace(prompt, tokenize_chunks=False), phi3v_grounding_dir / "tokenizer.json",
                           tokenizer, lmm.hd)


def _cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_input_is_one_line_and_leaves_nothing(tiny_phi3v_dir, tiny_llava_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "b"
    code, line = _cli(["export", "lmm", str(tiny_llava_dir("phi3_clip")), "--out", str(out), "--num-crops", "16"], capsys)
    assert code != 0 and "Phi-3-Vision checkpoints only" in line and not out.exists()
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_phi3v_dir, broken)
    (broken / "tokenizer.json").unlink()
    code, line = _cli(["export", "lmm", str(broken), "--out", str(out)], capsys)
    assert code != 0 and "tokenizer.json" in line and not out.exists()
    # The gqa form has no cache re-run at the longrope switch: refused, not silently exported.
    code, line = _cli(["export", "lmm", str(tiny_phi3v_dir), "--out", str(out), "--decoder-form", "gqa"], capsys)
    assert code != 0 and "gqa decoder form is not available for Phi-3-Vision" in line and not out.exists()
    with pytest.raises(InputError, match="num_crops"):
        from octopus_rt.export.lmm import export_lmm

        export_lmm(tiny_phi3v_dir, out, num_crops=0)
    assert not out.exists()


def test_int4_export_is_verified_teacher_forced(phi3v_grounding_dir, tmp_path):
    """int4: MatMulNBits decoder weights, fp32 vision, the same verification path (teacher forcing
    along the PyTorch tokens, export/lmm_verify.THRESHOLDS)."""
    import onnx

    from octopus_rt.export.lmm import export_lmm

    section = export_lmm(phi3v_grounding_dir, tmp_path / "b", precision="int4")
    folder = tmp_path / "b" / section["dir"]
    ops = {node.op_type for node in onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and section["precision"] == "int4"
    check = section["verification"]
    assert check["top1_agreement"] >= 0.99 and check["generation_min_cosine"] >= 0.99
    assert (folder / "separators.npy").is_file() and not (folder / ".fp32").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_other_precisions_are_verified(phi3v_grounding_dir, tmp_path, precision):
    from octopus_rt.export.lmm import export_lmm

    section = export_lmm(phi3v_grounding_dir, tmp_path / "b", precision=precision)
    assert section["precision"] == precision and section["verification"]["top1_agreement"] >= 0.99


@pytest.mark.slow
def test_num_crops_16_export_through_the_cli(phi3v_grounding_dir, tmp_path, capsys):
    code = main(["export", "lmm", str(phi3v_grounding_dir), "--out", str(tmp_path / "b"), "--num-crops", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "16 crops" in out and "greedy tokens identical: True" in out
    section = read_manifest(tmp_path / "b")["lmm"]
    assert section["hd"]["num_crops"] == 16 and section["verification"]["tokens_identical"]


@pytest.mark.slow
def test_verification_catches_a_graph_that_freezes_the_rope_table(phi3v_grounding_dir, tmp_path, monkeypatch):
    """A decoder traced with the short table only (what a plain trace of transformers' longrope
    would bake in when traced below the switch) fails the built-in verification; nothing is written."""
    from octopus_rt.export import phi3v_wrappers
    from octopus_rt.export.lmm import export_lmm

    def short_only(self, x, position_ids):
        expanded = self.short_inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        angles = (expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(phi3v_wrappers.LongRopeSelect, "forward", short_only)
    with pytest.raises(OctopusError, match="failed verification"):
        export_lmm(phi3v_grounding_dir, tmp_path / "b")
    assert not (tmp_path / "b").exists()
