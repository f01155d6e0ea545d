"""TensorRT engines, provider plans, doctor and memory estimate: everything a CPU can check.

No machine here has a GPU, TensorRT or onnxruntime-gpu. What runs on CPU:
- the pure functions of runtime/trt_profiles.py (profiles, naming, provider options, plans);
- octopus_rt/memory.py against an independent computation;
- `octopus-rt export trt` failing cleanly, and `octopus-rt doctor` exit codes;
- export/trt.py's bookkeeping (staging, manifest records, carried-over targets, timing cache,
  parity gate) with a stand-in session factory that plays the TensorRT provider's part by writing
  files where the provider writes them and answering with onnxruntime CPU sessions. It checks
  what we write, not what TensorRT builds: the GPU tests at the end do that, on a GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from octopus_rt.cli import main
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime import trt_profiles as tp
from octopus_rt.runtime.doctor import (
    Environment,
    diagnose,
    jetson_compute_capability,
    parse_nvidia_smi_query,
    probe_environment,
    tensorrt_version_from_int,
)

GIB = 1 << 30


def _phi3_manifest(tmp: Path | None = None) -> dict:
    """A manifest with LLaVA-Phi-3-mini's sizes (CLIP ViT-L/14-336: 576 image tokens) and vit_b SAM."""
    layers = 32
    return {
        "format": "octopus-rt-bundle",
        "format_version": 1,
        "defaults": {"tau": 1.0, "max_new_tokens": 64},
        "lmm": {
            "dir": "lmm-0",
            "files": {
                "vision.onnx": {"size": 600_000_000, "sha256": "v"},
                "decoder.onnx": {"size": 1_000, "sha256": "d"},
                "decoder.onnx.data": {"size": 7_600_000_000, "sha256": "dd"},
                "embed_tokens.npy": {"size": 394_000_000, "sha256": "e"},
            },
            "precision": "fp16",
            "vision": {"file": "vision.onnx", "input_names": ["pixel_values"], "num_image_tokens": 576, "hidden_size": 3072},
            "decoder": {
                "file": "decoder.onnx",
                "input_names": ["inputs_embeds", "attention_mask", "position_ids"]
                + [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")],
                "num_layers": layers, "num_key_value_heads": 32, "head_dim": 96, "hidden_size": 3072,
                "vocab_size": 32064, "max_position_embeddings": 4096, "dtype": "float32",
            },
            "preprocess": {"input_height": 336, "input_width": 336},
        },
        "sam": {
            "dir": "sam-0",
            "files": {"sam_encoder.onnx": {"size": 360_000_000, "sha256": "s"}, "sam_decoder.onnx": {"size": 16_000_000, "sha256": "t"}},
            "precision": "fp32",
            "source": {"model_type": "vit_b"},
            "encoder": {"file": "sam_encoder.onnx", "input_names": ["image"], "input_size": 1024, "embedding_shape": [1, 256, 64, 64]},
            "decoder": {
                "file": "sam_decoder.onnx",
                "input_names": ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
                "mask_input_size": [256, 256],
            },
        },
    }


# ---------------------------------------------------------------- profiles


def test_default_limits_follow_the_manifest():
    limits = tp.default_limits(_phi3_manifest())
    assert limits.max_seq == 576 + tp.TEXT_TOKENS_MARGIN == 832
    assert limits.max_past == 832 + 64 - 1
    assert (limits.max_batch, limits.opt_batch, limits.opt_seq) == (1, 1, 1)
    assert 0 < limits.opt_past <= limits.max_past
    custom = tp.default_limits(_phi3_manifest(), max_batch=4, max_seq=100, max_past=300)
    assert (custom.max_batch, custom.max_seq, custom.max_past) == (4, 100, 300)
    with pytest.raises(InputError, match="max_position_embeddings"):
        tp.default_limits(_phi3_manifest(), max_past=5000)
    with pytest.raises(InputError):
        tp.ProfileLimits(max_batch=1, max_seq=10, max_past=10, opt_seq=11)


def test_decoder_profile_shapes():
    manifest = _phi3_manifest()
    limits = tp.ProfileLimits(max_batch=2, max_seq=832, max_past=895, opt_batch=1, opt_seq=1, opt_past=600)
    profile = tp.graph_profile(manifest, "decoder", limits)
    assert list(profile) == manifest["lmm"]["decoder"]["input_names"]
    assert profile["inputs_embeds"] == tp.ShapeRange((1, 1, 3072), (1, 1, 3072), (2, 832, 3072))
    assert profile["attention_mask"] == tp.ShapeRange((1, 1), (1, 601), (2, 832 + 895))
    assert profile["position_ids"] == tp.ShapeRange((1, 1), (1, 1), (2, 832))
    for i in (0, 31):
        for kind in ("key", "value"):
            assert profile[f"past_key_values.{i}.{kind}"] == tp.ShapeRange((1, 32, 0, 96), (1, 32, 600, 96), (2, 32, 895, 96))
    # Every call the runtime makes lies inside: prefill (P = 0) and the last decode step.
    assert profile["attention_mask"].contains((1, 832)) and profile["attention_mask"].contains((1, 896))
    assert profile["past_key_values.0.key"].contains((1, 32, 0, 96))
    assert not profile["past_key_values.0.key"].contains((1, 32, 896, 96))


def test_vision_and_sam_profiles_and_dynamic_filter():
    manifest = _phi3_manifest()
    limits = tp.ProfileLimits(max_batch=4, max_seq=8, max_past=8, opt_past=4)
    vision = tp.graph_profile(manifest, "vision", limits)
    assert vision == {"pixel_values": tp.ShapeRange((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))}
    encoder = tp.graph_profile(manifest, "sam_encoder", limits)
    assert encoder["image"] == tp.ShapeRange(*[(1, 3, 1024, 1024)] * 3) and not encoder["image"].dynamic
    decoder = tp.graph_profile(manifest, "sam_decoder", limits)
    assert decoder["image_embeddings"].max == (1, 256, 64, 64)
    assert decoder["mask_input"].max == (1, 1, 256, 256)
    assert decoder["point_coords"] == tp.ShapeRange((1, 1, 2), (1, 2, 2), (1, tp.MAX_SAM_POINTS, 2))
    assert decoder["point_labels"].opt == (1, 2)
    assert list(tp.dynamic_only(decoder)) == ["point_coords", "point_labels"]
    # A dimension the ONNX graph declares symbolic needs a profile even where min == max.
    declared = {"image": ["batch", 3, 1024, 1024]}
    assert list(tp.dynamic_only(encoder, declared)) == ["image"]
    assert tp.dynamic_only(encoder, {"image": [1, 3, 1024, 1024]}) == {}
    # A batch the graph fixes is fixed in the profile; a graph without the dimension gets none.
    assert tp.dynamic_only(vision, {"pixel_values": [1, 3, 336, 336]}) == {}
    pinned = tp.dynamic_only(vision, {"pixel_values": ["batch", 3, 336, 336]})
    assert pinned["pixel_values"].max == (4, 3, 336, 336)
    assert tp.dynamic_only(decoder, {"point_coords": [1, "num_points", 2], "point_labels": [1, None]}) == {
        "point_coords": decoder["point_coords"], "point_labels": decoder["point_labels"]}
    odd = tp.dynamic_only({"x": tp.ShapeRange((1, 1), (1, 2), (4, 8))}, {"x": [1, "n"]})
    assert odd["x"] == tp.ShapeRange((1, 1), (1, 2), (1, 8))


def test_profile_strings_format():
    profile = {
        "point_coords": tp.ShapeRange((1, 1, 2), (1, 2, 2), (1, 16, 2)),
        "point_labels": tp.ShapeRange((1, 1), (1, 2), (1, 16)),
    }
    assert tp.profile_strings(profile) == {
        "trt_profile_min_shapes": "point_coords:1x1x2,point_labels:1x1",
        "trt_profile_opt_shapes": "point_coords:1x2x2,point_labels:1x2",
        "trt_profile_max_shapes": "point_coords:1x16x2,point_labels:1x16",
    }
    assert tp.profile_strings({}) == {}


def test_missing_graph_and_unknown_inputs_are_clear():
    manifest = _phi3_manifest()
    del manifest["sam"]
    with pytest.raises(InputError, match="no sam.encoder"):
        tp.graph_profile(manifest, "sam_encoder", tp.ProfileLimits())
    manifest = _phi3_manifest()
    manifest["lmm"]["decoder"]["input_names"].append("cache_position")
    with pytest.raises(InputError, match="cache_position"):
        tp.graph_profile(manifest, "decoder", tp.ProfileLimits())


# ---------------------------------------------------------------- naming and options


@pytest.mark.parametrize(
    ("cc", "trt", "name"),
    [("8.7", "10.3.0.30", "sm87-trt10.3.0"), ("9.0", "10.7.0", "sm90-trt10.7.0"), ("sm_89", "8.6.1", "sm89-trt8.6.1"),
     ((12, 0), "10.9", "sm120-trt10.9"), ("7.2", "8.5.2.2", "sm72-trt8.5.2")],
)
def test_engine_name(cc, trt, name):
    assert tp.engine_name(cc, trt) == name
    assert tp.engine_name(*tp.parse_engine_name(name)) == name


def test_engine_name_rejects_garbage():
    for cc, trt in (("", "10.3"), ("8.7", "ten"), ("gpu", "10.3")):
        with pytest.raises(InputError):
            tp.engine_name(cc, trt)
    with pytest.raises(InputError):
        tp.parse_engine_name("orin-10.3")


def test_tensorrt_build_options():
    profile = {"point_coords": tp.ShapeRange((1, 1, 2), (1, 2, 2), (1, 16, 2))}
    opts = tp.tensorrt_build_options(profile, ctx_file="/b/sm87-trt10.3.0/sam_encoder_ctx.onnx", timing_cache_dir="/b/t",
                                     cache_prefix="sam_encoder", fp16=True, layer_norm_fp32=True, workspace_bytes=3 * GIB)
    assert opts["trt_fp16_enable"] is True and opts["trt_layer_norm_fp32_fallback"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == "cache"
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == "/b/t"
    assert opts["trt_dump_ep_context_model"] is True and opts["trt_ep_context_embed_mode"] == 0
    assert opts["trt_ep_context_file_path"].endswith("sam_encoder_ctx.onnx")
    assert opts["trt_max_workspace_size"] == 3 * GIB
    assert opts["trt_profile_max_shapes"] == "point_coords:1x16x2"
    # LayerNorm fallback only matters under fp16; the engine cache path must be relative.
    assert tp.tensorrt_build_options({}, ctx_file="c", timing_cache_dir="t", cache_prefix="p", fp16=False,
                                     layer_norm_fp32=True)["trt_layer_norm_fp32_fallback"] is False
    assert "trt_profile_min_shapes" not in tp.tensorrt_build_options({}, ctx_file="c", timing_cache_dir="t", cache_prefix="p")
    with pytest.raises(InputError, match="relative"):
        tp.tensorrt_build_options({}, ctx_file="c", engine_cache_dir="/abs", timing_cache_dir="t", cache_prefix="p")
    cuda = tp.cuda_options(device_id=1, gpu_mem_limit=GIB)
    assert cuda["device_id"] == 1 and cuda["gpu_mem_limit"] == GIB and cuda["arena_extend_strategy"] == "kSameAsRequested"


# ---------------------------------------------------------------- plans

_TRT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _with_engines(manifest: dict, name: str = "sm87-trt10.3.0") -> dict:
    manifest["engines"] = {
        "dir": "engines-0",
        "format": tp.ENGINES_FORMAT,
        "targets": {name: {"precision": "fp16", "graphs": {
            g: {"file": f"{name}/{g}_ctx.onnx", "source_sha256": manifest[tp.GRAPHS[g][0]]["files"][tp.graph_record(manifest, g)["file"]]["sha256"]}
            for g in tp.TRT_GRAPHS_DEFAULT}}},
    }
    return manifest


def test_plan_cpu_only_machine():
    manifest = _with_engines(_phi3_manifest())
    device = tp.DeviceInfo(providers=("CPUExecutionProvider",))
    plan = tp.plan_graph("/b", manifest, "sam_encoder", device)
    assert plan.provider == "cpu" and plan.file == Path("/b/sam-0/sam_encoder.onnx")
    assert plan.providers == [("CPUExecutionProvider", {})]
    assert "no TensorrtExecutionProvider" in plan.reason
    with pytest.raises(InputError, match="CUDA"):
        tp.plan_graph("/b", manifest, "decoder", device, requested="cuda")
    with pytest.raises(InputError, match="TensorRT"):
        tp.plan_graph("/b", manifest, "vision", device, requested="tensorrt")


def test_plan_matching_engines():
    manifest = _with_engines(_phi3_manifest())
    device = tp.DeviceInfo(providers=_TRT, compute_capability="8.7", tensorrt="10.3.0")
    plan = tp.plan_graph("/b", manifest, "vision", device)
    assert plan.provider == "tensorrt" and plan.file == Path("/b/engines-0/sm87-trt10.3.0/vision_ctx.onnx")
    assert plan.disable_graph_optimizations
    assert [p[0] for p in plan.providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert plan.providers[0][1]["trt_fp16_enable"] is True
    # The decoder loop runs on CUDA by default, from the bundle's ONNX graph.
    decoder = tp.plan_graph("/b", manifest, "decoder", device)
    assert decoder.provider == "cuda" and decoder.file == Path("/b/lmm-0/decoder.onnx")
    assert not decoder.disable_graph_optimizations
    # Recorded per-graph defaults win over the built-in ones.
    manifest["defaults"]["providers"] = {"vision": "cuda"}
    assert tp.plan_graph("/b", manifest, "vision", device).provider == "cuda"


def test_plan_mismatched_or_stale_engines_fall_back_to_cuda():
    manifest = _with_engines(_phi3_manifest())
    other_gpu = tp.DeviceInfo(providers=_TRT, compute_capability="8.9", tensorrt="10.3.1")
    plan = tp.plan_graph("/b", manifest, "sam_decoder", other_gpu)
    assert plan.provider == "cuda" and "needs sm89-trt10.3.1" in plan.reason
    with pytest.raises(InputError, match="sm89-trt10.3.1"):
        tp.plan_graph("/b", manifest, "sam_decoder", other_gpu, requested="tensorrt")
    other_trt = tp.DeviceInfo(providers=_TRT, compute_capability="8.7", tensorrt="10.4.0")
    assert tp.plan_graph("/b", manifest, "vision", other_trt).provider == "cuda"
    manifest["lmm"]["files"]["vision.onnx"]["sha256"] = "re-exported"
    matching = tp.DeviceInfo(providers=_TRT, compute_capability="8.7", tensorrt="10.3.0")
    stale = tp.plan_graph("/b", manifest, "vision", matching)
    assert stale.provider == "cuda" and "another export" in stale.reason
    assert tp.plan_graph("/b", manifest, "sam_encoder", matching).provider == "tensorrt"


# ---------------------------------------------------------------- memory


def test_kv_cache_formula_against_hand_computation():
    from octopus_rt.memory import kv_cache_bytes

    # Phi-3-mini: 32 layers, 32 KV heads of 96, 4096 tokens, fp16: 2*32*32*96*4096*2 = 1.5 GiB.
    assert kv_cache_bytes(32, 32, 96, 4096, 2) == 1_610_612_736 == int(1.5 * GIB)
    assert kv_cache_bytes(32, 32, 96, 4096, 2, batch=2) == 3 * GIB
    # Llama-3-8B with GQA: 32 layers, 8 KV heads of 128, 8192 tokens, fp16 = 1 GiB.
    assert kv_cache_bytes(32, 8, 128, 8192, 2) == GIB


def test_memory_estimate_of_a_phi3_bundle():
    from octopus_rt.memory import JETSON_BOARDS, OS_RESERVE, check_boards, estimate_memory, format_report

    manifest = _phi3_manifest()
    est = estimate_memory(manifest)
    assert est.weights == {"lmm": 600_000_000 + 1_000 + 7_600_000_000 + 394_000_000, "sam": 376_000_000}
    assert est.max_len == 896 and est.batch == 1  # max_past + 1 of the default limits
    assert est.kv_cache == 2 * 32 * 32 * 96 * 896 * 4  # float32 I/O of the decoder graph
    # vit_b encoder at 1024: 4096 tokens, 12 heads, fp32 scores + probabilities dominate.
    assert est.activations_detail["sam_encoder"] >= 2 * 12 * 4096 * 4096 * 4
    assert est.activations == max(est.activations_detail.values())
    assert est.total == est.weights_total + est.kv_cache + est.activations + est.runtime
    fits = {f.board.name: f.fits for f in check_boards(est)}
    assert fits == {b.name: est.total <= b.memory_bytes - OS_RESERVE for b in JETSON_BOARDS}
    assert fits["Jetson Orin Nano 8GB"] is False and fits["Jetson AGX Orin 64GB"] is True
    assert any("Orin Nano 8GB" in line and "does NOT fit" in line for line in format_report(est))
    # Engine limits recorded by `export trt` replace the defaults.
    manifest = _with_engines(manifest)
    manifest["engines"]["targets"]["sm87-trt10.3.0"]["limits"] = tp.ProfileLimits(max_batch=2, max_seq=10, max_past=99, opt_past=5).to_dict()
    assert estimate_memory(manifest).kv_cache == 2 * 32 * 32 * 96 * 100 * 4 * 2


# ---------------------------------------------------------------- probes


def test_nvidia_smi_and_jetson_parsers():
    gpu = parse_nvidia_smi_query("NVIDIA H100 80GB HBM3, 9.0, 550.54.15, 81559\n")
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "550.54.15",
                   "memory_bytes": 81559 << 20}
    assert parse_nvidia_smi_query("Orin, [N/A], 540.3.0, [N/A]")["compute_capability"] is None
    assert parse_nvidia_smi_query("") == {}
    assert jetson_compute_capability("NVIDIA Jetson AGX Orin Developer Kit") == "8.7"
    assert jetson_compute_capability("NVIDIA Jetson Xavier NX") == "7.2"
    assert jetson_compute_capability("Raspberry Pi") is None
    assert tensorrt_version_from_int(100300) == "10.3.0"
    assert tensorrt_version_from_int(8601) == "8.6.1"


def test_probe_environment_with_fake_commands_and_files(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       15655100 kB\nMemFree: 1 kB\n")
    (tmp_path / "usr/local/cuda").mkdir(parents=True)
    (tmp_path / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"version": "12.6.68"}}))
    env = probe_environment(run=lambda cmd: None, root=tmp_path, tensorrt=False)
    assert env.compute_capability == "8.7" and env.jetson.startswith("NVIDIA Jetson Orin NX")
    assert env.cuda == "12.6.68" and env.system_memory_bytes == 15655100 * 1024
    assert env.memory_for_models == env.system_memory_bytes  # shared memory on Jetson

    outputs = {"--query-gpu=name,compute_cap,driver_version,memory.total": "NVIDIA L4, 8.9, 550.1, 23034\n"}
    server = probe_environment(run=lambda cmd: outputs.get(cmd[1]) if len(cmd) > 1 else "| CUDA Version: 12.4 |",
                               root=tmp_path / "nothing", tensorrt=False)
    assert (server.gpu_name, server.compute_capability, server.cuda) == ("NVIDIA L4", "8.9", "12.4")
    assert server.memory_for_models == 23034 << 20 and server.jetson is None


# ---------------------------------------------------------------- export trt without a GPU


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_trt_fails_cleanly_without_tensorrt(tiny_sam_bundle, tmp_path, capsys):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider; the GPU tests cover this machine")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    before = _snapshot(bundle)
    code = main(["export", "trt", str(bundle)])
    err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TensorrtExecutionProvider" in lines[0]
    assert "OK" not in err.out
    assert _snapshot(bundle) == before  # nothing staged, nothing committed
    assert "engines" not in json.loads((bundle / "manifest.json").read_text())


def test_export_trt_reports_missing_gpu_and_tensorrt_by_name(tiny_sam_bundle):
    from octopus_rt.export.trt import TensorRTUnavailable, build_engines

    no_gpu = Environment("3", "Linux", onnxruntime="1.20", providers=_TRT)
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU"):
        build_engines(tiny_sam_bundle, env=no_gpu)
    no_trt = Environment("3", "Linux", onnxruntime="1.20", providers=_TRT, compute_capability="8.7")
    with pytest.raises(TensorRTUnavailable, match="TensorRT libraries not found"):
        build_engines(tiny_sam_bundle, env=no_trt)
    assert not list(tiny_sam_bundle.glob(".staging-*"))


def test_export_trt_rejects_bad_options(tiny_sam_bundle, capsys):
    assert main(["export", "trt", str(tiny_sam_bundle), "--workspace", "0"]) == 2
    assert "workspace" in capsys.readouterr().err
    assert main(["export", "trt", str(tiny_sam_bundle.parent / "missing")]) == 2
    assert "bundle not found" in capsys.readouterr().err


# ---------------------------------------------------------------- build bookkeeping with a stand-in provider


class FakeTensorRT:
    """Plays onnxruntime's TensorRT provider: for a build it writes the EP-context model, the engine
    (relative `cache/`) and a timing cache where the real provider writes them; loading a context
    model answers with a CPU session of the graph it was built from, optionally perturbed."""

    def __init__(self, perturb: float = 0.0) -> None:
        from octopus_rt.export.trt import OrtSessionFactory

        self.cpu = OrtSessionFactory()
        self.builds: list[dict] = []
        self.sources: dict[Path, Path] = {}
        self.perturb = perturb

    def __call__(self, path, providers, disable_optimizations):
        name, options = providers[0]
        if name == "CPUExecutionProvider":
            return self.cpu(path, providers, disable_optimizations)
        assert name == "TensorrtExecutionProvider" and disable_optimizations
        if options.get("trt_dump_ep_context_model"):
            self.builds.append(dict(options))
            ctx = Path(options["trt_ep_context_file_path"])
            cache = ctx.parent / options["trt_engine_cache_path"]
            cache.mkdir(exist_ok=True)
            engine = cache / f"{options['trt_engine_cache_prefix']}_fake.engine"
            engine.write_bytes(b"engine")
            timing = Path(options["trt_timing_cache_path"]) / "TensorrtExecutionProvider_cache_sm87.timing"
            timing.write_bytes(timing.read_bytes() + b"+" if timing.exists() else b"timing")
            ctx.write_bytes(b"EPContext " + engine.relative_to(ctx.parent).as_posix().encode())
            self.sources[ctx] = path
            return self.cpu(path, [("CPUExecutionProvider", {})], True)
        session = self.cpu(self.sources[Path(path)], [("CPUExecutionProvider", {})], True)
        return _Perturbed(session, self.perturb) if self.perturb else session


class _Perturbed:
    def __init__(self, session, scale):
        self.session, self.scale = session, scale

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        return [-o + self.scale for o in self.session.run(names, feeds)]


def _env(cc: str = "8.7", trt: str = "10.3.0") -> Environment:
    return Environment("3.10", "Linux aarch64", onnxruntime="1.20.0", providers=_TRT, gpu_name="Orin",
                       compute_capability=cc, tensorrt=trt, cuda="12.6", jetson="NVIDIA Jetson AGX Orin (R36)",
                       system_memory_bytes=64 * GIB)


def test_build_records_engines_in_the_manifest(tiny_sam_bundle, tmp_path):
    from octopus_rt.bundle import check_files, read_manifest
    from octopus_rt.export.trt import TrtBuildOptions, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    fake = FakeTensorRT()
    result = build_engines(bundle, TrtBuildOptions(fp16=True, workspace_gib=1.5), env=_env(), session_factory=fake)
    assert result.name == "sm87-trt10.3.0"
    manifest = read_manifest(bundle)
    engines = manifest["engines"]
    assert engines["format"] == tp.ENGINES_FORMAT and list(engines["targets"]) == ["sm87-trt10.3.0"]
    target = engines["targets"]["sm87-trt10.3.0"]
    assert target["precision"] == "fp16" and target["compute_capability"] == "8.7" and target["tensorrt"] == "10.3.0"
    assert set(target["graphs"]) == {"sam_encoder", "sam_decoder"}  # the bundle has no lmm
    enc, dec = target["graphs"]["sam_encoder"], target["graphs"]["sam_decoder"]
    assert enc["file"] == "sm87-trt10.3.0/sam_encoder_ctx.onnx" and enc["layer_norm_fp32_fallback"] is True
    assert dec["layer_norm_fp32_fallback"] is False
    assert enc["source_sha256"] == manifest["sam"]["files"]["sam_encoder.onnx"]["sha256"]
    assert enc["profile"] == {}  # static graph: no profile
    assert dec["profile"]["point_coords"] == {"min": [1, 1, 2], "opt": [1, 2, 2], "max": [1, tp.MAX_SAM_POINTS, 2]}
    assert enc["parity"]["ok"] and dec["parity"]["outputs"]["low_res_masks"]["mask_iou"] == 1.0
    assert {"sm87-trt10.3.0/sam_encoder_ctx.onnx", "sm87-trt10.3.0/cache/sam_encoder_fake.engine"} <= set(engines["files"])
    assert check_files(bundle, manifest, hashes=True) == []
    assert manifest["defaults"]["providers"]["sam_encoder"] == "tensorrt"
    assert manifest["defaults"]["providers"]["decoder"] == "cuda"
    # What the provider was asked for.
    options = {Path(b["trt_ep_context_file_path"]).name: b for b in fake.builds}
    assert options["sam_decoder_ctx.onnx"]["trt_profile_opt_shapes"] == "point_coords:1x2x2,point_labels:1x2"
    assert "trt_profile_min_shapes" not in options["sam_encoder_ctx.onnx"]
    assert options["sam_encoder_ctx.onnx"]["trt_max_workspace_size"] == int(1.5 * GIB)
    assert not list(bundle.glob(".staging-*"))

    # A second machine adds its target and keeps the first; rebuilding a target reuses its timing cache.
    build_engines(bundle, env=_env(cc="9.0", trt="10.7.0"), session_factory=FakeTensorRT())
    build_engines(bundle, env=_env(), session_factory=FakeTensorRT())
    manifest = read_manifest(bundle)
    assert sorted(manifest["engines"]["targets"]) == ["sm87-trt10.3.0", "sm90-trt10.7.0"]
    timing = bundle / manifest["engines"]["dir"] / "sm87-trt10.3.0/timing/TensorrtExecutionProvider_cache_sm87.timing"
    assert timing.read_bytes() == b"timing+++"  # built on by each of the 4 graph builds of sm87
    assert check_files(bundle, manifest, hashes=True) == []


def test_build_parity_failure_leaves_the_bundle_unchanged(tiny_sam_bundle, tmp_path):
    from octopus_rt.export.trt import build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    before = _snapshot(bundle)
    with pytest.raises(OctopusError, match="disagrees with the CPU path"):
        build_engines(bundle, env=_env(), session_factory=FakeTensorRT(perturb=0.5))
    assert _snapshot(bundle) == before and not list(bundle.glob(".staging-*"))


def test_compare_outputs_thresholds():
    from octopus_rt.export.trt import compare_outputs

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
    from octopus_rt.export.trt import parity_inputs

    manifest = _phi3_manifest()
    limits = tp.ProfileLimits(max_batch=1, max_seq=8, max_past=8, opt_seq=3, opt_past=5)
    shapes = {n: r.opt for n, r in tp.graph_profile(manifest, "decoder", limits).items()}
    table = np.arange(20 * 3072, dtype=np.float32).reshape(20, 3072)
    feeds = parity_inputs(manifest, "decoder", shapes, embeddings=table)
    assert feeds["inputs_embeds"].shape == (1, 3, 3072) and feeds["inputs_embeds"].dtype == np.float32
    assert np.all(feeds["inputs_embeds"][..., 0] % 3072 == 0)  # rows of the table
    assert feeds["attention_mask"].dtype == np.int64 and feeds["attention_mask"].shape == (1, 8)
    assert feeds["position_ids"].tolist() == [[5, 6, 7]]
    assert feeds["past_key_values.3.value"].shape == (1, 32, 5, 96)
    sam = parity_inputs(manifest, "sam_decoder", {n: r.opt for n, r in tp.graph_profile(manifest, "sam_decoder", limits).items()})
    assert sam["point_labels"].tolist() == [[1.0, -1.0]] and sam["has_mask_input"].tolist() == [0.0]
    assert np.all((sam["point_coords"] > 0) & (sam["point_coords"] < 1024))


# ---------------------------------------------------------------- doctor


def test_doctor_cli_on_a_cpu_machine(tiny_sam_bundle, capsys):
    assert main(["doctor", "--bundle", str(tiny_sam_bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "sam_encoder" in out and "-> cpu" in out
    assert "the bundle can run here" in out and "Jetson Orin Nano 8GB" in out
    assert main(["doctor", "--bundle", str(tiny_sam_bundle.parent / "missing")]) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert main(["doctor", "--device", "quantum"]) == 2
    capsys.readouterr()
    assert main(["doctor", "--bundle", str(tiny_sam_bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["plans"]["sam_decoder"] in ("cpu", "cuda", "tensorrt")
    assert "CPUExecutionProvider" in report["environment"]["providers"]


def test_doctor_with_and_without_engines(tiny_sam_bundle, tmp_path):
    from octopus_rt.export.trt import build_engines

    cpu_env = Environment("3.11", "Linux x86_64", onnxruntime="1.32.0", providers=("CPUExecutionProvider",),
                          system_memory_bytes=16 * GIB)
    plain = diagnose(cpu_env, tiny_sam_bundle)
    assert plain.ok and plain.plans == {"sam_encoder": "cpu", "sam_decoder": "cpu"}
    assert any("has no TensorRT engines" in line for line in plain.lines)
    refused = diagnose(cpu_env, tiny_sam_bundle, device="tensorrt")
    assert not refused.ok and "TensorRT" in refused.reason

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    build_engines(bundle, env=_env(), session_factory=FakeTensorRT())
    on_orin = diagnose(_env(), bundle, device="tensorrt")
    assert on_orin.ok and on_orin.plans == {"sam_encoder": "tensorrt", "sam_decoder": "tensorrt"}
    assert any("engines sm87-trt10.3.0 match this machine" in line for line in on_orin.lines)
    on_h100 = diagnose(_env(cc="9.0"), bundle)
    assert on_h100.ok and on_h100.plans["sam_encoder"] == "cuda"
    assert any("this machine needs sm90-trt10.3.0" in line for line in on_h100.lines)
    assert not diagnose(_env(cc="9.0"), bundle, device="tensorrt").ok
    assert not diagnose(cpu_env, bundle, device="cuda").ok
    # Too little memory for the bundle is a reason not to run.
    tiny_machine = Environment("3", "Linux", onnxruntime="1.32.0", providers=("CPUExecutionProvider",), system_memory_bytes=1 << 20)
    small = diagnose(tiny_machine, bundle)
    assert not small.ok and "needs about" in small.reason
    assert not diagnose(Environment("3", "Linux"), bundle).ok  # no onnxruntime
    # Without a bundle: the environment alone, against the requested device.
    assert diagnose(_env(), None, device="tensorrt").ok
    no_libs = Environment("3", "Linux", onnxruntime="1.20.0", providers=_TRT, compute_capability="8.7")
    assert "TensorRT libraries" in diagnose(no_libs, None, device="tensorrt").reason
    assert "NVIDIA GPU" in diagnose(Environment("3", "Linux", onnxruntime="1.20.0", providers=_TRT), None, device="cuda").reason


# ---------------------------------------------------------------- GPU (skipped here)


def _tensorrt_ready() -> str | None:
    """None when this machine can build engines, else the reason it cannot."""
    from octopus_rt.export.trt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt(probe_environment())
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
    assert all(g["parity"]["ok"] for g in result.target["graphs"].values())
    report = diagnose(probe_environment(), bundle, device="tensorrt")
    assert report.ok and set(report.plans.values()) == {"tensorrt"}
    assert read_manifest(bundle)["engines"]["targets"][result.name]["graphs"]["sam_encoder"]["layer_norm_fp32_fallback"]


@pytest.mark.gpu
def test_gpu_doctor_sees_the_gpu():
    env = probe_environment()
    if env.compute_capability is None:
        pytest.skip("no NVIDIA GPU found by nvidia-smi or the Jetson probes")
    assert tp.engine_name(env.compute_capability, env.tensorrt or "10.0").startswith("sm")
    assert diagnose(env).ok


# ---------------------------------------------------------------- real exported LMM graphs on CPU


def test_profile_shapes_are_valid_inputs_of_the_exported_decoder(tiny_lmm_bundle):
    """Every corner of the decoder profile (min, opt, max) is a shape the exported graph accepts,
    and the outputs have the shapes the contract promises (present = P + S)."""
    from octopus_rt.bundle import read_manifest, section_path
    from octopus_rt.export.trt import OrtSessionFactory, parity_inputs

    bundle = tiny_lmm_bundle("phi3_clip")
    manifest = read_manifest(bundle)
    decoder = manifest["lmm"]["decoder"]
    limits = tp.ProfileLimits(max_batch=2, max_seq=6, max_past=9, opt_seq=1, opt_past=4)
    profile = tp.graph_profile(manifest, "decoder", limits)
    session = OrtSessionFactory()(section_path(bundle, manifest["lmm"], decoder["file"]), [("CPUExecutionProvider", {})], False)
    declared = {i.name: i.shape for i in session.get_inputs()}
    assert set(tp.dynamic_only(profile, declared)) == set(declared)  # all decoder inputs are dynamic
    for corner in ("min", "opt", "max"):
        shapes = {n: getattr(r, corner) for n, r in profile.items()}
        feeds = parity_inputs(manifest, "decoder", shapes)
        logits, present = session.run(["logits", "present.0.key"], feeds)[:2]
        b, s, p = shapes["inputs_embeds"][0], shapes["inputs_embeds"][1], shapes["past_key_values.0.key"][2]
        assert logits.shape == (b, decoder["vocab_size"])
        assert present.shape == (b, decoder["num_key_value_heads"], p + s, decoder["head_dim"])
    vision = tp.graph_profile(manifest, "vision", limits)
    h, w = manifest["lmm"]["preprocess"]["input_height"], manifest["lmm"]["preprocess"]["input_width"]
    assert vision["pixel_values"].max == (2, 3, h, w)


def test_build_with_decoder_records_profiles(tiny_lmm_bundle, tmp_path):
    from octopus_rt.bundle import read_manifest
    from octopus_rt.export.trt import TrtBuildOptions, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_lmm_bundle("phi3_clip"), bundle)
    fake = FakeTensorRT()
    options = TrtBuildOptions(max_batch=2, max_seq=40, max_past=60, graphs=tp.TRT_GRAPHS_DEFAULT + ("decoder",))
    result = build_engines(bundle, options, env=_env(), session_factory=fake)
    graphs = result.target["graphs"]
    assert set(graphs) == {"vision", "decoder"}
    assert result.target["limits"]["max_seq"] == 40 and result.target["limits"]["max_past"] == 60
    assert graphs["decoder"]["profile"]["past_key_values.0.value"]["max"][2] == 60
    assert graphs["decoder"]["profile"]["attention_mask"]["max"] == [2, 100]
    assert graphs["vision"]["profile"]["pixel_values"]["max"][0] == 2  # batch is dynamic in vision.onnx
    assert graphs["decoder"]["parity"]["outputs"]["logits"]["top1_agreement"] == 1.0
    decoder_build = next(b for b in fake.builds if b["trt_engine_cache_prefix"] == "decoder")
    assert "past_key_values.1.key:2x" in decoder_build["trt_profile_max_shapes"]
    assert decoder_build["trt_layer_norm_fp32_fallback"] is False
    manifest = read_manifest(bundle)
    assert manifest["defaults"]["providers"]["decoder"] == "tensorrt"  # the user opted in
    report = diagnose(_env(), bundle, device="tensorrt")
    assert report.ok and report.plans == {"vision": "tensorrt", "decoder": "tensorrt"}


# ---------------------------------------------------------------- benchmark script


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_exits_clearly_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the benchmark would run")
    assert _bench_module().main(["--out", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "nothing was run" in err
    assert not Path("unused.json").exists()


def test_bench_bandwidth_arithmetic():
    bench = _bench_module()
    phi3 = bench.PHI3_MINI
    sizes = bench.decoder_bytes(phi3, 32)
    # Phi-3-mini has 3.82 B parameters; the decoder reads all but the embedding table per token.
    params = sizes["total"] / 2 + phi3["vocab"] * phi3["hidden"] - 2 * phi3["hidden"]  # + embedding, - its row
    assert 3.75e9 < params < 3.85e9
    assert bench.kv_bytes(phi3, 32, 1000) == 2 * 32 * 32 * 96 * 1000 * 2
    assert bench.extrapolate(1.0, phi3, 32, 32) == 1.0
    assert 10 < bench.extrapolate(1.0, phi3, 2, 32) < 16  # per-layer bytes dominate the head


@pytest.mark.slow
def test_bench_gpu_tiny_cpu_smoke(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--allow-cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert set(report["backends"]["ort_cpu"]["ms"]) == set(bench.STAGES)
    assert "skipped" in report["backends"]["tensorrt_fp16"]


def test_backend_takes_files_and_options_from_the_plan(tiny_sam_bundle, tmp_path):
    """runtime/backends.Backend asks plan_graph on GPU devices (sessions themselves need a GPU)."""
    from octopus_rt.bundle import read_manifest
    from octopus_rt.export.trt import build_engines
    from octopus_rt.runtime.backends import Backend

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    build_engines(bundle, env=_env(), session_factory=FakeTensorRT())
    manifest = read_manifest(bundle)
    backend = Backend(device="tensorrt", bundle_dir=bundle, manifest=manifest)
    backend._device_info = _env().device_info()  # what probe_environment finds on the Orin
    plan = backend._plan("sam_encoder", "tensorrt")
    assert plan.provider == "tensorrt" and plan.file.name == "sam_encoder_ctx.onnx" and plan.disable_graph_optimizations
    assert backend.plans["sam_encoder"] is plan
    assert backend._plan("sam_encoder", "cpu") is None
    assert Backend(device="cuda")._plan("sam_encoder", "cuda") is None  # no manifest: providers as before
    backend._device_info = _env(cc="9.0").device_info()
    with pytest.raises(OctopusError, match="sm90-trt10.3.0"):
        backend._plan("sam_decoder", "tensorrt")


def test_deploy_memory_table_is_current():
    """docs/deploy.md's memory table is what octopus_rt.memory computes for those configurations."""
    from octopus_rt.memory import check_boards, estimate_memory, format_bytes

    def manifest(decoder_bytes_per_weight, vision_bytes, sam_bytes_per_weight, sam_precision):
        m = _phi3_manifest()
        m["defaults"]["max_new_tokens"] = 64
        decoder_params = 3.821e9 - 32064 * 3072  # everything but the embedding table
        m["lmm"]["files"] = {
            "decoder.onnx.data": {"size": int(decoder_params * decoder_bytes_per_weight)},
            "vision.onnx": {"size": int(316e6 * vision_bytes)},
            "embed_tokens.npy": {"size": 32064 * 3072 * vision_bytes},
            "tokenizer.json": {"size": 2_000_000},
        }
        if sam_precision is None:
            del m["sam"]
        else:
            m["sam"]["files"] = {"sam.onnx": {"size": int(93.7e6 * sam_bytes_per_weight)}}
            m["sam"]["precision"] = sam_precision
        return m

    rows = {
        "LLaVA-Phi-3-mini fp16 + SAM vit_b fp16": manifest(2, 2, 2, "fp16"),
        "LLaVA-Phi-3-mini, int4 decoder, fp16 vision + SAM vit_b fp16": manifest(0.5625, 2, 2, "fp16"),
        "LLaVA-Phi-3-mini int4 decoder, no SAM": manifest(0.5625, 2, 0, None),
        "LLaVA-Phi-3-mini fp32 + SAM vit_b fp32": manifest(4, 4, 4, "fp32"),
    }
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name, m in rows.items():
        est = estimate_memory(m)
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == format_bytes(est.weights_total)
        assert cells[5] == f"**{format_bytes(est.total)}**"
        assert cells[6:] == ["yes" if f.fits else "no" for f in check_boards(est)]
