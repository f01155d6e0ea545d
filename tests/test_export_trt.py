"""`octopus-rt export trt` (export/trt.py): everything a CPU can check.

No machine here has a GPU, TensorRT or onnxruntime-gpu. What runs on CPU:
- `octopus-rt export trt` failing cleanly;
- export/trt.py's bookkeeping (staging, manifest records, carried-over targets, timing cache,
  parity gate) with a stand-in session factory that plays the TensorRT provider's part by writing
  files where the provider writes them and answering with onnxruntime CPU sessions. It checks
  what we write, not what TensorRT builds: the GPU tests at the end do that, on a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from octopus_rt.cli import main
from octopus_rt.errors import OctopusError
from octopus_rt.export.trt_profiles import MAX_SAM_POINTS, TRT_GRAPHS_DEFAULT, dynamic_only, graph_profile
from octopus_rt.manifest import ENGINES_FORMAT, ProfileLimits, parse_manifest
from octopus_rt.runtime.device_info import DeviceInfo, probe_device
from octopus_rt.runtime.doctor import diagnose
from trt_helpers import GIB, TRT, FakeTensorRT, orin, phi3_manifest, snapshot


def test_export_trt_fails_cleanly_without_tensorrt(tiny_sam_bundle, tmp_path, capsys):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider; the GPU tests cover this machine")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    before = snapshot(bundle)
    code = main(["export", "trt", str(bundle)])
    err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TensorrtExecutionProvider" in lines[0]
    assert "OK" not in err.out
    assert snapshot(bundle) == before  # nothing staged, nothing committed
    assert "engines" not in json.loads((bundle / "manifest.json").read_text())


def test_export_trt_reports_missing_gpu_and_tensorrt_by_name(tiny_sam_bundle):
    from octopus_rt.export.trt import TensorRTUnavailable, build_engines

    no_gpu = DeviceInfo("3", "Linux", onnxruntime="1.20", providers=TRT)
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU"):
        build_engines(tiny_sam_bundle, env=no_gpu)
    no_trt = DeviceInfo("3", "Linux", onnxruntime="1.20", providers=TRT, compute_capability="8.7")
    with pytest.raises(TensorRTUnavailable, match="TensorRT libraries not found"):
        build_engines(tiny_sam_bundle, env=no_trt)
    assert not list(tiny_sam_bundle.glob(".staging-*"))


def test_export_trt_rejects_bad_options(tiny_sam_bundle, capsys):
    assert main(["export", "trt", str(tiny_sam_bundle), "--workspace", "0"]) == 2
    assert "workspace" in capsys.readouterr().err
    assert main(["export", "trt", str(tiny_sam_bundle.parent / "missing")]) == 2
    assert "bundle not found" in capsys.readouterr().err


def test_build_records_engines_in_the_manifest(tiny_sam_bundle, tmp_path):
    from octopus_rt.bundle import check_files, read_manifest
    from octopus_rt.export.trt import TrtBuildOptions, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    fake = FakeTensorRT()
    result = build_engines(bundle, TrtBuildOptions(fp16=True, workspace_gib=1.5), env=orin(), session_factory=fake)
    assert result.name == "sm87-trt10.3.0"
    manifest = read_manifest(bundle)
    engines = manifest["engines"]
    assert engines["format"] == ENGINES_FORMAT and list(engines["targets"]) == ["sm87-trt10.3.0"]
    target = engines["targets"]["sm87-trt10.3.0"]
    assert target["precision"] == "fp16" and target["compute_capability"] == "8.7" and target["tensorrt"] == "10.3.0"
    assert set(target["graphs"]) == {"sam_encoder", "sam_decoder"}  # the bundle has no lmm
    enc, dec = target["graphs"]["sam_encoder"], target["graphs"]["sam_decoder"]
    assert enc["file"] == "sm87-trt10.3.0/sam_encoder_ctx.onnx" and enc["layer_norm_fp32_fallback"] is True
    assert dec["layer_norm_fp32_fallback"] is False
    assert enc["source_sha256"] == manifest["sam"]["files"]["sam_encoder.onnx"]["sha256"]
    assert enc["profile"] == {}  # static graph: no profile
    assert dec["profile"]["point_coords"] == {"min": [1, 1, 2], "opt": [1, 2, 2], "max": [1, MAX_SAM_POINTS, 2]}
    assert enc["parity"]["ok"] and dec["parity"]["outputs"]["low_res_masks"]["mask_iou"] == 1.0
    assert {"sm87-trt10.3.0/sam_encoder_ctx.onnx", "sm87-trt10.3.0/cache/sam_encoder_fake.engine"} <= set(engines["files"])
    assert check_files(bundle, manifest, hashes=True) == []
    assert parse_manifest(manifest).to_dict() == manifest  # the typed schema declares every field written
    assert result.target.to_dict() == target
    assert manifest["defaults"]["providers"]["sam_encoder"] == "tensorrt"
    assert manifest["defaults"]["providers"]["decoder"] == "cuda"
    # What the provider was asked for.
    options = {Path(b["trt_ep_context_file_path"]).name: b for b in fake.builds}
    assert options["sam_decoder_ctx.onnx"]["trt_profile_opt_shapes"] == "point_coords:1x2x2,point_labels:1x2"
    assert "trt_profile_min_shapes" not in options["sam_encoder_ctx.onnx"]
    assert options["sam_encoder_ctx.onnx"]["trt_max_workspace_size"] == int(1.5 * GIB)
    assert not list(bundle.glob(".staging-*"))

    # A second machine adds its target and keeps the first; rebuilding a target reuses its timing cache.
    build_engines(bundle, env=orin(cc="9.0", trt="10.7.0"), session_factory=FakeTensorRT())
    build_engines(bundle, env=orin(), session_factory=FakeTensorRT())
    manifest = read_manifest(bundle)
    assert sorted(manifest["engines"]["targets"]) == ["sm87-trt10.3.0", "sm90-trt10.7.0"]
    timing = bundle / manifest["engines"]["dir"] / "sm87-trt10.3.0/timing/TensorrtExecutionProvider_cache_sm87.timing"
    assert timing.read_bytes() == b"timing+++"  # built on by each of the 4 graph builds of sm87
    assert check_files(bundle, manifest, hashes=True) == []


def test_build_parity_failure_leaves_the_bundle_unchanged(tiny_sam_bundle, tmp_path):
    from octopus_rt.export.trt import build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    before = snapshot(bundle)
    with pytest.raises(OctopusError, match="disagrees with the CPU path"):
        build_engines(bundle, env=orin(), session_factory=FakeTensorRT(perturb=0.5))
    assert snapshot(bundle) == before and not list(bundle.glob(".staging-*"))


def test_compare_outputs_thresholds():
    from octopus_rt.export.trt_parity import compare_outputs

    rng = np.random.default_rng(0)
    masks = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    same = compare_outputs({"low_res_masks": masks, "logits": logits}, {"low_res_masks": masks + 1e-4, "logits": logits}, "fp16")
    assert same.ok and same.outputs["low_res_masks"]["mask_iou"] > 0.99 and same.outputs["logits"]["top1_agreement"] == 1.0
    flipped = compare_outputs({"low_res_masks": masks}, {"low_res_masks": -masks}, "fp16")
    assert not flipped.ok and any("mask IoU" in f for f in flipped.failures)
    nan = compare_outputs({"x": masks}, {"x": masks * np.nan}, "fp16")
    assert any("non-finite" in f for f in nan.failures)
    # fp32 must pick the same token; fp16 may swap a near-tie but not pick an unlikely token.
    tie = np.zeros((1, 50), dtype=np.float32)
    tie[0, :2] = [10.0, 9.999]
    swapped = tie[:, [1, 0, *range(2, 50)]]
    assert not compare_outputs({"logits": tie}, {"logits": swapped}, "fp32").ok
    near = compare_outputs({"logits": tie}, {"logits": swapped}, "fp16")
    assert near.ok and near.outputs["logits"]["top1_agreement"] == 0.0
    far = logits.copy()
    low, high = logits[0].argmin(), logits[0].argmax()
    far[0, [low, high]] = far[0, [high, low]]
    assert not compare_outputs({"logits": logits}, {"logits": far}, "fp16").ok
    assert not compare_outputs({"x": masks}, {"y": masks}, "fp32").ok


def test_parity_inputs_follow_the_contract():
    from octopus_rt.export.trt_parity import parity_inputs

    manifest = phi3_manifest()
    limits = ProfileLimits(max_batch=1, max_seq=8, max_past=8, opt_seq=3, opt_past=5)
    shapes = {n: r.opt for n, r in graph_profile(manifest, "decoder", limits).items()}
    table = np.arange(20 * 3072, dtype=np.float32).reshape(20, 3072)
    feeds = parity_inputs(manifest, "decoder", shapes, embeddings=table)
    assert feeds["inputs_embeds"].shape == (1, 3, 3072) and feeds["inputs_embeds"].dtype == np.float32
    assert np.all(feeds["inputs_embeds"][..., 0] % 3072 == 0)  # rows of the table
    assert feeds["attention_mask"].dtype == np.int64 and feeds["attention_mask"].shape == (1, 8)
    assert feeds["position_ids"].tolist() == [[5, 6, 7]]
    assert feeds["past_key_values.3.value"].shape == (1, 32, 5, 96)
    sam = parity_inputs(manifest, "sam_decoder", {n: r.opt for n, r in graph_profile(manifest, "sam_decoder", limits).items()})
    assert sam["point_labels"].tolist() == [[1.0, -1.0]] and sam["has_mask_input"].tolist() == [0.0]
    assert np.all((sam["point_coords"] > 0) & (sam["point_coords"] < 1024))


def _tensorrt_ready() -> str | None:
    """None when this machine can build engines, else the reason it cannot."""
    from octopus_rt.export.trt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt(probe_device())
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.gpu
def test_gpu_build_sam_engines_and_run_them(tiny_sam_bundle, tmp_path):
    reason = _tensorrt_ready()
    if reason:
        pytest.skip(f"needs onnxruntime-gpu with TensorRT on an NVIDIA GPU: {reason}")
    from octopus_rt.bundle import read_manifest
    from octopus_rt.export.trt import TrtBuildOptions, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    result = build_engines(bundle, TrtBuildOptions(workspace_gib=1.0))
    assert all(g.parity["ok"] for g in result.target.graphs.values())
    report = diagnose(probe_device(), bundle, device="tensorrt")
    assert report.ok and set(report.plans.values()) == {"tensorrt"}
    assert read_manifest(bundle)["engines"]["targets"][result.name]["graphs"]["sam_encoder"]["layer_norm_fp32_fallback"]


def test_profile_shapes_are_valid_inputs_of_the_exported_decoder(tiny_lmm_bundle):
    """Every corner of the decoder profile (min, opt, max) is a shape the exported graph accepts,
    and the outputs have the shapes the contract promises (present = P + S)."""
    from octopus_rt.bundle import read_manifest, section_path
    from octopus_rt.export.trt_session import OrtSessionFactory
    from octopus_rt.export.trt_parity import parity_inputs

    bundle = tiny_lmm_bundle("phi3_clip", "flat_kv")  # the TensorRT-friendly decoder form
    manifest = read_manifest(bundle)
    decoder = manifest["lmm"]["decoder"]
    limits = ProfileLimits(max_batch=2, max_seq=6, max_past=9, opt_seq=1, opt_past=4)
    profile = graph_profile(manifest, "decoder", limits)
    session = OrtSessionFactory()(section_path(bundle, manifest["lmm"], decoder["file"]), [("CPUExecutionProvider", {})], False)
    declared = {i.name: i.shape for i in session.get_inputs()}
    assert set(dynamic_only(profile, declared)) == set(declared)  # all decoder inputs are dynamic
    for corner in ("min", "opt", "max"):
        shapes = {n: getattr(r, corner) for n, r in profile.items()}
        feeds = parity_inputs(manifest, "decoder", shapes)
        logits, present = session.run(["logits", "present.0.key"], feeds)[:2]
        b, s, p = shapes["inputs_embeds"][0], shapes["inputs_embeds"][1], shapes["past_key_values.0.key"][2]
        assert logits.shape == (b, decoder["vocab_size"])
        assert present.shape == (b, decoder["num_key_value_heads"], p + s, decoder["head_dim"])
    vision = graph_profile(manifest, "vision", limits)
    h, w = manifest["lmm"]["preprocess"]["input_height"], manifest["lmm"]["preprocess"]["input_width"]
    assert vision["pixel_values"].max == (2, 3, h, w)


def test_build_with_decoder_records_profiles(tiny_lmm_bundle, tmp_path):
    from octopus_rt.bundle import read_manifest
    from octopus_rt.export.trt import TrtBuildOptions, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_lmm_bundle("phi3_clip", "flat_kv"), bundle)
    fake = FakeTensorRT()
    options = TrtBuildOptions(max_batch=2, max_seq=40, max_past=60, graphs=TRT_GRAPHS_DEFAULT + ("decoder",))
    result = build_engines(bundle, options, env=orin(), session_factory=fake)
    graphs = result.target.graphs
    assert set(graphs) == {"vision", "decoder"}
    assert result.target.limits.max_seq == 40 and result.target.limits.max_past == 60
    assert graphs["decoder"].profile["past_key_values.0.value"]["max"][2] == 60
    assert graphs["decoder"].profile["attention_mask"]["max"] == [2, 100]
    assert graphs["vision"].profile["pixel_values"]["max"][0] == 2  # batch is dynamic in vision.onnx
    assert graphs["decoder"].parity["outputs"]["logits"]["top1_agreement"] == 1.0
    decoder_build = next(b for b in fake.builds if b["trt_engine_cache_prefix"] == "decoder")
    assert "past_key_values.1.key:2x" in decoder_build["trt_profile_max_shapes"]
    assert decoder_build["trt_layer_norm_fp32_fallback"] is False
    manifest = read_manifest(bundle)
    assert manifest["defaults"]["providers"]["decoder"] == "tensorrt"  # the user opted in
    report = diagnose(orin(), bundle, device="tensorrt")
    assert report.ok and report.plans == {"vision": "tensorrt", "decoder": "tensorrt"}
