"""export/trt_profiles.py: TensorRT optimisation profiles and build options, computed from a manifest."""

from __future__ import annotations

import pytest

from octopus_rt.errors import BundleError, InputError
from octopus_rt.export.trt_profiles import (
    MAX_SAM_POINTS,
    ShapeRange,
    dynamic_only,
    graph_profile,
    profile_strings,
    tensorrt_build_options,
)
from octopus_rt.manifest import ProfileLimits
from trt_helpers import GIB, phi3_manifest


def test_decoder_profile_shapes():
    manifest = phi3_manifest()
    limits = ProfileLimits(max_batch=2, max_seq=832, max_past=895, opt_batch=1, opt_seq=1, opt_past=600)
    profile = graph_profile(manifest, "decoder", limits)
    assert list(profile) == manifest["lmm"]["decoder"]["input_names"]
    assert profile["inputs_embeds"] == ShapeRange((1, 1, 3072), (1, 1, 3072), (2, 832, 3072))
    assert profile["attention_mask"] == ShapeRange((1, 1), (1, 601), (2, 832 + 895))
    assert profile["position_ids"] == ShapeRange((1, 1), (1, 1), (2, 832))
    for i in (0, 31):
        for kind in ("key", "value"):
            assert profile[f"past_key_values.{i}.{kind}"] == ShapeRange((1, 32, 0, 96), (1, 32, 600, 96), (2, 32, 895, 96))
    # Every call the runtime makes lies inside: prefill (P = 0) and the last decode step.
    assert profile["attention_mask"].contains((1, 832)) and profile["attention_mask"].contains((1, 896))
    assert profile["past_key_values.0.key"].contains((1, 32, 0, 96))
    assert not profile["past_key_values.0.key"].contains((1, 32, 896, 96))


def test_gqa_decoder_form_is_refused_with_the_fix():
    manifest = phi3_manifest()
    manifest["lmm"]["decoder"].update(form="gqa", kv_buffer="shared")
    with pytest.raises(InputError, match="cannot build; re-export with `octopus-rt export lmm --decoder-form flat_kv`"):
        graph_profile(manifest, "decoder", ProfileLimits())
    assert graph_profile(manifest, "vision", ProfileLimits())  # the other graphs still build


def test_vision_and_sam_profiles_and_dynamic_filter():
    manifest = phi3_manifest()
    limits = ProfileLimits(max_batch=4, max_seq=8, max_past=8, opt_past=4)
    vision = graph_profile(manifest, "vision", limits)
    assert vision == {"pixel_values": ShapeRange((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))}
    encoder = graph_profile(manifest, "sam_encoder", limits)
    assert encoder["image"] == ShapeRange(*[(1, 3, 1024, 1024)] * 3) and not encoder["image"].dynamic
    decoder = graph_profile(manifest, "sam_decoder", limits)
    assert decoder["image_embeddings"].max == (1, 256, 64, 64)
    assert decoder["mask_input"].max == (1, 1, 256, 256)
    assert decoder["point_coords"] == ShapeRange((1, 1, 2), (1, 2, 2), (1, MAX_SAM_POINTS, 2))
    assert decoder["point_labels"].opt == (1, 2)
    assert list(dynamic_only(decoder)) == ["point_coords", "point_labels"]
    # A dimension the ONNX graph declares symbolic needs a profile even where min == max.
    declared = {"image": ["batch", 3, 1024, 1024]}
    assert list(dynamic_only(encoder, declared)) == ["image"]
    assert dynamic_only(encoder, {"image": [1, 3, 1024, 1024]}) == {}
    # A batch the graph fixes is fixed in the profile; a graph without the dimension gets none.
    assert dynamic_only(vision, {"pixel_values": [1, 3, 336, 336]}) == {}
    pinned = dynamic_only(vision, {"pixel_values": ["batch", 3, 336, 336]})
    assert pinned["pixel_values"].max == (4, 3, 336, 336)
    assert dynamic_only(decoder, {"point_coords": [1, "num_points", 2], "point_labels": [1, None]}) == {
        "point_coords": decoder["point_coords"], "point_labels": decoder["point_labels"]}
    odd = dynamic_only({"x": ShapeRange((1, 1), (1, 2), (4, 8))}, {"x": [1, "n"]})
    assert odd["x"] == ShapeRange((1, 1), (1, 2), (1, 8))


def test_profiles_read_fields_as_the_schema_declares_them():
    """Fields a record may leave out take the defaults octopus_rt/manifest.py declares (the ones the
    runtime runs with): SAM vit_b's 1024 x 1024 input and 256 x 64 x 64 embeddings, the documented
    input names; before, an absent input_names gave an empty profile and input_size a KeyError. The
    vision size is lmm.preprocess.input_height x input_width, the size the runtime feeds the graph,
    never crop_size."""
    manifest = phi3_manifest()
    del manifest["lmm"]["vision"]["input_names"]
    for key in ("input_names", "input_size", "embedding_shape"):
        del manifest["sam"]["encoder"][key]
    del manifest["sam"]["decoder"]["input_names"]
    limits = ProfileLimits(max_batch=4, max_seq=8, max_past=8, opt_past=4)
    assert graph_profile(manifest, "vision", limits) == {
        "pixel_values": ShapeRange((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))}
    assert graph_profile(manifest, "sam_encoder", limits) == {"image": ShapeRange(*[(1, 3, 1024, 1024)] * 3)}
    decoder = graph_profile(manifest, "sam_decoder", limits)
    assert list(decoder) == ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    assert decoder["image_embeddings"].max == (1, 256, 64, 64) and decoder["mask_input"].max == (1, 1, 256, 256)
    preprocess = manifest["lmm"]["preprocess"]
    del preprocess["input_height"], preprocess["input_width"]
    preprocess["crop_size"] = {"height": 224, "width": 224}
    with pytest.raises(BundleError, match="lmm.preprocess.input_height is missing"):
        graph_profile(manifest, "vision", limits)


def test_profile_strings_format():
    profile = {
        "point_coords": ShapeRange((1, 1, 2), (1, 2, 2), (1, 16, 2)),
        "point_labels": ShapeRange((1, 1), (1, 2), (1, 16)),
    }
    assert profile_strings(profile) == {
        "trt_profile_min_shapes": "point_coords:1x1x2,point_labels:1x1",
        "trt_profile_opt_shapes": "point_coords:1x2x2,point_labels:1x2",
        "trt_profile_max_shapes": "point_coords:1x16x2,point_labels:1x16",
    }
    assert profile_strings({}) == {}


def test_missing_graph_and_unknown_inputs_are_clear():
    manifest = phi3_manifest()
    del manifest["sam"]
    with pytest.raises(InputError, match="no sam.encoder"):
        graph_profile(manifest, "sam_encoder", ProfileLimits())
    manifest = phi3_manifest()
    manifest["lmm"]["decoder"]["input_names"].append("cache_position")
    with pytest.raises(InputError, match="cache_position"):
        graph_profile(manifest, "decoder", ProfileLimits())


def test_tensorrt_build_options():
    profile = {"point_coords": ShapeRange((1, 1, 2), (1, 2, 2), (1, 16, 2))}
    opts = tensorrt_build_options(profile, ctx_file="/b/sm87-trt10.3.0/sam_encoder_ctx.onnx", timing_cache_dir="/b/t",
                                     cache_prefix="sam_encoder", fp16=True, layer_norm_fp32=True, workspace_bytes=3 * GIB)
    assert opts["trt_fp16_enable"] is True and opts["trt_layer_norm_fp32_fallback"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == "cache"
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == "/b/t"
    assert opts["trt_dump_ep_context_model"] is True and opts["trt_ep_context_embed_mode"] == 0
    assert opts["trt_ep_context_file_path"].endswith("sam_encoder_ctx.onnx")
    assert opts["trt_max_workspace_size"] == 3 * GIB
    assert opts["trt_profile_max_shapes"] == "point_coords:1x16x2"
    # LayerNorm fallback only matters under fp16; the engine cache path must be relative.
    assert tensorrt_build_options({}, ctx_file="c", timing_cache_dir="t", cache_prefix="p", fp16=False,
                                     layer_norm_fp32=True)["trt_layer_norm_fp32_fallback"] is False
    assert "trt_profile_min_shapes" not in tensorrt_build_options({}, ctx_file="c", timing_cache_dir="t", cache_prefix="p")
    with pytest.raises(InputError, match="relative"):
        tensorrt_build_options({}, ctx_file="c", engine_cache_dir="/abs", timing_cache_dir="t", cache_prefix="p")
