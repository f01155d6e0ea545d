"""runtime/provider_plan.py: engine target names, provider options and the per-graph plan; Backend.plan."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime.device_info import DeviceInfo
from octopus_rt.runtime.provider_plan import cuda_options, engine_name, find_engine_target, plan_graph
from trt_helpers import GIB, TRT, FakeTensorRT, orin, phi3_manifest, with_engines


@pytest.mark.parametrize(
    ("cc", "trt", "name"),
    [("8.7", "10.3.0.30", "sm87-trt10.3.0"), ("9.0", "10.7.0", "sm90-trt10.7.0"), ("sm_89", "8.6.1", "sm89-trt8.6.1"),
     ((12, 0), "10.9", "sm120-trt10.9"), ("7.2", "8.5.2.2", "sm72-trt8.5.2")],
)
def test_engine_name(cc, trt, name):
    assert engine_name(cc, trt) == name


def test_engine_name_rejects_garbage():
    for cc, trt in (("", "10.3"), ("8.7", "ten"), ("gpu", "10.3")):
        with pytest.raises(InputError):
            engine_name(cc, trt)


def test_cuda_options():
    cuda = cuda_options(device_id=1, gpu_mem_limit=GIB)
    assert cuda["device_id"] == 1 and cuda["gpu_mem_limit"] == GIB and cuda["arena_extend_strategy"] == "kSameAsRequested"


def test_plan_cpu_only_machine():
    manifest = with_engines(phi3_manifest())
    device = DeviceInfo(providers=("CPUExecutionProvider",))
    plan = plan_graph("/b", manifest, "sam_encoder", device)
    assert plan.provider == "cpu" and plan.file == Path("/b/sam-0/sam_encoder.onnx")
    assert plan.providers == [("CPUExecutionProvider", {})]
    assert "no TensorrtExecutionProvider" in plan.reason
    with pytest.raises(InputError, match="CUDA"):
        plan_graph("/b", manifest, "decoder", device, requested="cuda")
    with pytest.raises(InputError, match="TensorRT"):
        plan_graph("/b", manifest, "vision", device, requested="tensorrt")


def test_gqa_decoder_is_planned_on_the_cpu_with_the_fix():
    """A gqa-form decoder (contrib ops, float32 GroupQueryAttention) runs on the CPU provider on any
    machine and for any request, with the re-export that gives a GPU decoder named; vision keeps its GPU."""
    manifest = with_engines(phi3_manifest())
    manifest["lmm"]["decoder"].update(form="gqa", kv_buffer="shared")
    device = DeviceInfo(providers=TRT, compute_capability="8.7", tensorrt="10.3.0")
    for requested in ("auto", "cuda", "tensorrt"):
        plan = plan_graph("/b", manifest, "decoder", device, requested=requested)
        assert plan.provider == "cpu" and plan.providers == [("CPUExecutionProvider", {})]
        assert plan.file == Path("/b/lmm-0/decoder.onnx") and "--decoder-form flat_kv" in plan.reason
    assert plan_graph("/b", manifest, "vision", device).provider == "tensorrt"


def test_plan_matching_engines():
    manifest = with_engines(phi3_manifest())
    device = DeviceInfo(providers=TRT, compute_capability="8.7", tensorrt="10.3.0")
    plan = plan_graph("/b", manifest, "vision", device)
    assert plan.provider == "tensorrt" and plan.file == Path("/b/engines-0/sm87-trt10.3.0/vision_ctx.onnx")
    assert plan.disable_graph_optimizations
    assert [p[0] for p in plan.providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert plan.providers[0][1]["trt_fp16_enable"] is True
    # The decoder loop runs on CUDA by default, from the bundle's ONNX graph.
    decoder = plan_graph("/b", manifest, "decoder", device)
    assert decoder.provider == "cuda" and decoder.file == Path("/b/lmm-0/decoder.onnx")
    assert not decoder.disable_graph_optimizations
    # Recorded per-graph defaults win over the built-in ones.
    manifest["defaults"]["providers"] = {"vision": "cuda"}
    assert plan_graph("/b", manifest, "vision", device).provider == "cuda"


def test_plan_mismatched_or_stale_engines_fall_back_to_cuda():
    manifest = with_engines(phi3_manifest())
    other_gpu = DeviceInfo(providers=TRT, compute_capability="8.9", tensorrt="10.3.1")
    plan = plan_graph("/b", manifest, "sam_decoder", other_gpu)
    assert plan.provider == "cuda" and "needs sm89-trt10.3.1" in plan.reason
    with pytest.raises(InputError, match="sm89-trt10.3.1"):
        plan_graph("/b", manifest, "sam_decoder", other_gpu, requested="tensorrt")
    other_trt = DeviceInfo(providers=TRT, compute_capability="8.7", tensorrt="10.4.0")
    assert plan_graph("/b", manifest, "vision", other_trt).provider == "cuda"
    manifest["lmm"]["files"]["vision.onnx"]["sha256"] = "re-exported"
    matching = DeviceInfo(providers=TRT, compute_capability="8.7", tensorrt="10.3.0")
    stale = plan_graph("/b", manifest, "vision", matching)
    assert stale.provider == "cuda" and "another export" in stale.reason
    assert plan_graph("/b", manifest, "sam_encoder", matching).provider == "tensorrt"


def test_engines_of_another_format_are_reported_not_read():
    """An engines section without targets or in another format gives the reason, never a parse error."""
    device = DeviceInfo(providers=TRT, compute_capability="8.7", tensorrt="10.3.0")
    for engines, why in (
        ({"format": "trt-engines-v0", "targets": {"sm87-trt10.3.0": {"plan": 1}}}, "engines format 'trt-engines-v0' is not"),
        ({"format": 2, "targets": {"sm87-trt10.3.0": {}}}, "engines format 2 is not"),
        ({"targets": {"sm87-trt10.3.0": {}}}, "engines format None is not"),
        ({"format": "trt-engines-v0"}, "the bundle has no TensorRT engines"),
        ([], "the bundle has no TensorRT engines"),
    ):
        manifest = phi3_manifest()
        manifest["engines"] = engines
        assert find_engine_target(manifest, device)[:2] == (None, None) and why in find_engine_target(manifest, device)[2]
        plan = plan_graph("/b", manifest, "vision", device)
        assert plan.provider == "cuda" and why in plan.reason


def test_backend_takes_files_and_options_from_the_plan(tiny_sam_bundle, tmp_path, monkeypatch):
    """runtime/backends.Backend plans GPU graphs from the DeviceInfo it is given and never probes the
    machine itself (no nvidia-smi on the session path); sessions themselves need a GPU."""
    import subprocess

    from octopus_rt.bundle import read_manifest
    from octopus_rt.export.trt import build_engines
    from octopus_rt.runtime.backends import Backend

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    build_engines(bundle, env=orin(), session_factory=FakeTensorRT())
    manifest = read_manifest(bundle)

    def no_commands(*args, **kwargs):
        raise AssertionError(f"the backend ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", no_commands)
    backend = Backend(device="tensorrt", bundle_dir=bundle, manifest=manifest, device_info=orin())
    assert backend.choice.name == "tensorrt"  # resolved from the DeviceInfo's providers
    plan = backend.plan("sam_encoder")
    assert plan.provider == "tensorrt" and plan.file.name == "sam_encoder_ctx.onnx" and plan.disable_graph_optimizations
    assert backend.plans["sam_encoder"] is plan
    assert Backend(device="cpu", bundle_dir=bundle, manifest=manifest, device_info=orin()).plan("sam_encoder") is None
    assert Backend(device="tensorrt", device_info=orin()).plan("sam_encoder") is None  # no bundle: the device's providers
    other_gpu = Backend(device="tensorrt", bundle_dir=bundle, manifest=manifest, device_info=orin(cc="9.0"))
    with pytest.raises(OctopusError, match="sm90-trt10.3.0"):
        other_gpu.plan("sam_decoder")
    # "auto" takes the probe results the DeviceInfo carries instead of probing again.
    refused = DeviceInfo(providers=TRT, unusable={"CUDAExecutionProvider": "libcuda.so.1 missing"})
    assert Backend(device="auto", device_info=refused).choice.name == "cpu"


def test_octopus_probes_the_machine_only_for_a_gpu_device(runtime_bundle, monkeypatch):
    """Octopus resolves its device when it is made; a CPU run probes nothing, a given DeviceInfo is
    what the backend resolves and plans with."""
    from octopus_rt.runtime import api

    def no_probe(**kwargs):
        raise AssertionError("probe_device ran")

    monkeypatch.setattr(api, "probe_device", no_probe)
    assert api.Octopus(runtime_bundle, device="cpu").backend.device_info is None
    model = api.Octopus(runtime_bundle, device="tensorrt", device_info=orin())
    assert model.device == "tensorrt" and model.backend.device_info == orin()
    with pytest.raises(InputError, match="cannot run vision on TensorRT: the bundle has no TensorRT engines"):
        model.backend.plan("vision")
    probed = []
    monkeypatch.setattr(api, "probe_device", lambda **kwargs: probed.append(kwargs) or orin())
    from octopus_rt.runtime import backends

    resolve = backends.resolve_device  # CUDA listed and its probe passing: "auto" resolves to CUDA
    monkeypatch.setattr(backends, "resolve_device", lambda device: resolve(device, TRT, lambda d: None))
    assert api.Octopus(runtime_bundle, device="auto").device == "cuda"
    assert probed == [{"probe_devices": ("cuda",)}]  # no engines in the bundle: TensorRT is not probed


def test_one_device_table():
    """The device names a manifest may record are the keys of the one device -> provider table, and
    --device / Octopus(device=) accept those plus "auto"."""
    from octopus_rt.manifest import DEVICE_NAMES
    from octopus_rt.runtime.providers import DEVICES, PROVIDERS

    assert set(DEVICE_NAMES) == set(PROVIDERS) and DEVICES == ("auto", *PROVIDERS)
    assert set(PROVIDERS.values()) == {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
    with pytest.raises(InputError, match="device must be one of auto, cpu, cuda, tensorrt"):
        plan_graph("/b", phi3_manifest(), "vision", DeviceInfo(), requested="gpu")
