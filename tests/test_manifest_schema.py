"""octopus_rt/manifest.py (with manifest_lmm.py, manifest_section.py): one definition of every manifest field,
read by the runtime, written by the exporters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from octopus_rt import bundle, vocab
from octopus_rt.bundle import BundleError
from octopus_rt.manifest import Defaults, Manifest, SamSection, parse_manifest
from octopus_rt.manifest_lmm import LmmSection

DEMO = Path(__file__).resolve().parents[1] / "octopus_rt" / "demo" / "bundle"


def _demo_manifest() -> dict:
    return json.loads((DEMO / bundle.MANIFEST_NAME).read_text(encoding="utf-8"))


def test_the_shipped_manifest_is_exactly_what_the_schema_declares():
    """Every key the exporters wrote into the demo bundle is a declared field (nothing is dropped on a
    round trip), and nothing is invented."""
    raw = _demo_manifest()
    assert parse_manifest(raw).to_dict() == raw


def test_a_fresh_export_round_trips(runtime_bundle):
    raw = json.loads((runtime_bundle / bundle.MANIFEST_NAME).read_text(encoding="utf-8"))
    parsed = parse_manifest(raw)
    assert parsed.to_dict() == raw
    assert isinstance(parsed.lmm, LmmSection) and isinstance(parsed.sam, SamSection)
    # Key order of the lmm section is the documented one (dir, files, written first).
    assert list(parsed.to_dict()["lmm"])[:3] == ["dir", "files", "written"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("lmm", "decoder", "num_layers"), None, r"lmm\.decoder\.num_layers is missing"),
        (("lmm", "decoder", "num_layers"), "32", r"lmm\.decoder\.num_layers must be an integer, got str"),
        (("lmm", "prompt", "add_special_tokens"), 1, r"lmm\.prompt\.add_special_tokens must be true or false"),
        (("lmm", "closed_set", "left"), [1, "x"], r"lmm\.closed_set\.left\[1\] must be an integer"),
        (("sam", "encoder", "embedding_shape"), "1x256", r"sam\.encoder\.embedding_shape must be a list"),
        (("lmm", "files", "decoder.onnx", "size"), 1.5, r"lmm\.files\.decoder\.onnx\.size must be an integer"),
        (("defaults", "tau"), "hot", r"defaults\.tau must be a number"),
        (("format_version",), "1", r"format_version must be an integer"),
    ],
)
def test_a_missing_or_mistyped_field_is_named(path, value, message):
    raw = _demo_manifest()
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(BundleError, match=message):
        parse_manifest(raw)


def test_absent_optional_fields_take_the_documented_defaults():
    raw = _demo_manifest()
    for key in ("whole_image_phrases", "score_prompt", "closed_set_forms", "verification", "source"):
        del raw["lmm"][key]
    del raw["lmm"]["tokenizer"]["file"]
    del raw["sam"]["preprocess"]
    raw["defaults"] = {}
    parsed = parse_manifest(raw)
    assert parsed.lmm.whole_image_phrases == list(vocab.WHOLE_IMAGE_PHRASES)
    assert (parsed.lmm.score_prompt.question, parsed.lmm.score_prompt.answer_prefix) == (
        vocab.SCORE_QUESTION, vocab.SCORE_ANSWER_PREFIX)
    assert parsed.lmm.tokenizer.file == "tokenizer.json"
    # SAM's official normalisation (segment_anything.modeling.Sam.pixel_mean / pixel_std).
    assert parsed.sam.preprocess.pixel_mean == [123.675, 116.28, 103.53]
    assert parsed.sam.preprocess.pixel_std == [58.395, 57.12, 57.375]
    assert parsed.sam.input_size == raw["sam"]["encoder"]["input_size"]
    assert parsed.defaults.to_dict() == bundle.DEFAULTS == Defaults().to_dict()


def test_decoder_form_and_verification_record_read_old_bundles_and_check_new_ones():
    """Bundles written before the decoder forms and the verification record existed read as flat_kv,
    verified at the defaults; a form's KV contract is checked."""
    raw = _demo_manifest()
    for key in ("form", "kv_buffer"):
        del raw["lmm"]["decoder"][key]
    # The verification record as the first exporters wrote it (no form, thresholds, overrides or vision precision).
    old_keys = ("precision", "vision_max_abs_diff", "vision_min_cosine", "decoder_max_abs_diff", "decoder_min_cosine",
                "generation_max_abs_diff", "generation_min_cosine", "top1_agreement", "tokens_identical", "steps")
    raw["lmm"]["verification"] = {key: raw["lmm"]["verification"][key] for key in old_keys}
    raw["lmm"]["verification"]["precision"] = "fp32"
    parsed = parse_manifest(raw)
    assert (parsed.lmm.decoder.form, parsed.lmm.decoder.kv_buffer, parsed.lmm.decoder.quantization) == (
        "flat_kv", "concat", None)
    record = parsed.lmm.verification
    assert record.overrides is None and not record.quality_loss_accepted and record.agreement_warning() is None
    assert record.warnings() == [] and record.describe("lmm")[0].startswith("lmm: fp32 (flat_kv decoder) verified")
    for form, buffer, message in (("gqa", "concat", r"kv_buffer of the gqa form is 'shared'"),
                                  ("paged", "concat", r"lmm\.decoder\.form must be one of flat_kv, gqa")):
        broken = _demo_manifest()
        broken["lmm"]["decoder"].update(form=form, kv_buffer=buffer)
        with pytest.raises(BundleError, match=message):
            parse_manifest(broken)
    quantised = _demo_manifest()
    quantised["lmm"]["decoder"].update(form="gqa", kv_buffer="shared", quantization={
        "method": "MatMulNBits", "bits": 4, "block_size": 32, "accuracy_level": 4, "symmetric": False, "lm_head_bits": 8})
    assert parse_manifest(quantised).to_dict() == quantised


def test_lookup_reads_one_field_as_the_full_parse_reads_it():
    """`Manifest.lookup` (how the provider plan and the TensorRT build read a manifest) gives what
    parse_manifest gives for the same field, defaults included, and reads nothing off its path."""
    raw = _demo_manifest()
    for key in ("form", "kv_buffer"):
        del raw["lmm"]["decoder"][key]
    del raw["sam"]["encoder"]["input_size"]
    raw["defaults"] = {}
    parsed = parse_manifest(raw)
    vision = parsed.lmm.vision.file
    assert Manifest.lookup(raw, "lmm", "decoder", "form") == parsed.lmm.decoder.form == "flat_kv"
    assert Manifest.lookup(raw, "sam", "encoder", "input_size") == parsed.sam.encoder.input_size == 1024
    assert Manifest.lookup(raw, "lmm", "files", vision, "sha256") == parsed.lmm.files[vision].sha256
    assert Manifest.lookup(raw, "lmm", "dir") == parsed.lmm.dir
    assert Manifest.lookup(raw, "defaults") == parsed.defaults and Manifest.lookup(raw, "defaults", "providers") is None
    assert Manifest.lookup(raw, "engines") is parsed.engines is None
    # Only the path is read: the rest of this lmm section is far from complete.
    partial = {"lmm": {"dir": "lmm-0", "decoder": {"file": "d.onnx"}, "files": {"d.onnx": {"sha256": "x"}}}}
    assert Manifest.lookup(partial, "lmm", "decoder", "form") == "flat_kv"
    assert Manifest.lookup(partial, "lmm", "files", "d.onnx", "sha256") == "x"
    assert Manifest.lookup(partial, "lmm", "files", "other.onnx", "sha256") is None
    assert Manifest.lookup(partial, "sam", "encoder", "input_size") is None  # no sam section
    assert Manifest.lookup(partial, "defaults").provider("vision") == "tensorrt"
    with pytest.raises(BundleError, match=r"lmm\.decoder\.num_layers is missing"):
        Manifest.lookup(partial, "lmm", "decoder", "num_layers")
    with pytest.raises(BundleError, match=r"lmm\.files\.d\.onnx\.size is missing"):
        Manifest.lookup(partial, "lmm", "files", "d.onnx", "size")
    partial["lmm"]["decoder"]["form"] = 2
    with pytest.raises(BundleError, match=r"lmm\.decoder\.form must be a string, got int"):
        Manifest.lookup(partial, "lmm", "decoder", "form")
    with pytest.raises(TypeError, match="declares no field 'shape'"):  # a reader asking for an undeclared field
        Manifest.lookup(partial, "lmm", "decoder", "shape")


def test_unknown_keys_are_ignored_when_reading():
    raw = _demo_manifest()
    raw["lmm"]["decoder"]["graph_form"] = "a later exporter's field"
    raw["future_section"] = {"x": 1}
    assert parse_manifest(raw).lmm.decoder.num_layers == raw["lmm"]["decoder"]["num_layers"]


def test_header_and_section_folder_checks(tmp_path):
    raw = _demo_manifest()
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(BundleError, match="format version 2 is not supported"):
        bundle.read_manifest(tmp_path)  # header values: where the file is read
    with pytest.raises(BundleError, match="format must be a string"):
        parse_manifest({**raw, "format": 1})
    no_dir = copy.deepcopy(raw)
    del no_dir["sam"]["dir"]
    with pytest.raises(BundleError, match=r"sam\.dir is missing"):
        parse_manifest(no_dir)
    assert isinstance(parse_manifest({"format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION}), Manifest)


def test_the_runtime_refuses_a_bad_manifest_with_one_line(tmp_path):
    from octopus_rt.runtime import Octopus

    copy_dir = tmp_path / "bundle"
    (copy_dir).mkdir()
    raw = _demo_manifest()
    del raw["lmm"]["prompt"]["image_token_id"]
    (copy_dir / bundle.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"lmm\.prompt\.image_token_id is missing") as error:
        Octopus(copy_dir, device="cpu")
    assert "\n" not in str(error.value)


def _required_paths(cls, data: dict, prefix: tuple) -> list[tuple]:
    """Paths of every field the schema declares required, in the sections present in `data`."""
    import dataclasses
    import typing

    from octopus_rt.schema import Schema

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out.append(prefix + (f.name,))
        kinds = [k for k in (typing.get_args(hints[f.name]) or (hints[f.name],)) if isinstance(k, type)]
        for kind in kinds:
            if issubclass(kind, Schema) and isinstance(data[f.name], dict):
                out += _required_paths(kind, data[f.name], prefix + (f.name,))
    return out


def test_the_bundle_check_requires_exactly_what_the_schema_declares(tmp_path):
    """One definition: validate_manifest (every read and commit) refuses a runnable manifest without any
    field the dataclasses declare required, naming it; there is no second field list to drift."""
    raw = _demo_manifest()
    paths = [p for p in _required_paths(Manifest, raw, ()) if p[0] in ("lmm", "sam")]
    assert ("lmm", "decoder", "num_layers") in paths and ("lmm", "source", "model_dir") in paths
    assert len(paths) > 25
    for path in paths:
        broken = copy.deepcopy(raw)
        target = broken
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        with pytest.raises(BundleError) as caught:
            bundle.validate_manifest(broken, runnable=True)
        assert ".".join(path) in str(caught.value) and "\n" not in str(caught.value)
