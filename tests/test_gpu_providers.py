"""GPU provider handling that a CPU machine can check (issue 17): no silent CPU fallback, one clear
line with the real cause, what `doctor` reports about libnvinfer, version-exact engine reuse.

onnxruntime-gpu itself is exercised by tests/test_gpu_wheels.py (slow); here a stand-in onnxruntime
plays the parts observed with onnxruntime-gpu 1.26.0 / 1.31.1 on a machine without a GPU: CUDA
listed but silently replaced by CPU, TensorRT raising, errors logged to file descriptor 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from octopus_rt.errors import OctopusError
from octopus_rt.runtime import native_libs, providers
from octopus_rt.manifest import ENGINES_FORMAT
from octopus_rt.runtime.device_info import DeviceInfo, probe_device
from octopus_rt.runtime.doctor import diagnose
from octopus_rt.runtime.provider_plan import find_engine_target, plan_graph

ROOT = Path(__file__).resolve().parents[1]
_GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# What onnxruntime-gpu 1.26.0 wrote to stderr / raised here (no GPU, no CUDA libraries).
_LOG_LINE = ("\x1b[1;31m2026-11-30 15:05:40.5 [E:onnxruntime:Default, provider_bridge_ort.cc:2341 TryGetProviderInfo_TensorRT] "
             "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1962 onnxruntime::Provider& "
             "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
             "/x/capi/libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object file: "
             "No such file or directory\n\x1b[m\n")
_TRT_RAISED = ("/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:534 void onnxruntime::python::"
               "RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::ProviderOptions&) Please install "
               "TensorRT libraries as mentioned in the GPU requirements page, make sure they're in the PATH or "
               "LD_LIBRARY_PATH, and that your GPU is supported.\n")


@pytest.fixture(autouse=True)
def _fresh_probes():
    providers.forget_probes()
    yield
    providers.forget_probes()


def test_probe_model_is_the_documented_one():
    """runtime/probe.onnx is exactly y = x + x on 1 x 16 floats, rebuilt here with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "octopus_rt_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="octopus-rt")
    assert (ROOT / "runtime" / providers.PROBE_FILE).read_bytes() == model.SerializeToString()
    assert providers.probe("cpu") is None  # the real CPU provider runs it and gets 2x


def test_summarize_error_keeps_the_cause():
    assert providers.summarize_error(_LOG_LINE) == "libnvinfer.so.10: cannot open shared object file: No such file or directory"
    assert providers.summarize_error(_TRT_RAISED).startswith("Please install TensorRT libraries")
    cuda = ("/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:122 std::conditional_t<THRW, void, Status> "
            "onnxruntime::CudaCall(ERRTYPE, const char*) [with ERRTYPE = cudaError] CUDA failure 35: CUDA driver version "
            "is insufficient for CUDA runtime version ; GPU=-1 ; hostname=vm ; expr=cudaSetDevice(info_.device_id);")
    assert providers.summarize_error(cuda) == "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version"
    assert providers.summarize_error("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes") == "This session contains graph nodes"
    assert providers.summarize_error("") == "no message"


def test_captured_native_stderr_sees_file_descriptor_2(capfd):
    with providers.captured_native_stderr() as log:
        os.write(2, b"native line\n")
    assert log == ["native line\n"] and capfd.readouterr().err == ""
    providers.replay(log)
    assert capfd.readouterr().err == "native line\n"


class _FakeSession:
    def __init__(self, providers_, outputs=None, fail_run=None):
        self._providers = providers_
        self.fail_run = fail_run

    def get_providers(self):
        return list(self._providers)

    def run(self, names, feeds):
        if self.fail_run:
            os.write(2, self.fail_run.encode())
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : TensorRT EP execution context enqueue failed.")
        return [feeds["x"] + feeds["x"]] if "x" in feeds else []


def _fake_ort(behaviour):
    """An onnxruntime stand-in: behaviour(names, kwargs) returns a session or raises."""
    calls = []

    def session(model, sess_options=None, providers=None, provider_options=None, **kwargs):
        calls.append({"providers": providers, "kwargs": kwargs, "options": sess_options})
        return behaviour(providers, kwargs)

    class Options:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, key, value):
            self.entries[key] = value

    module = types.SimpleNamespace(InferenceSession=session, SessionOptions=Options, __version__="1.26.0",
                                   get_available_providers=lambda: list(_GPU))
    return module, calls


def test_cuda_silently_replaced_by_cpu_is_refused(monkeypatch, capfd):
    def behaviour(names, kwargs):
        os.write(2, b"[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 CreateExecutionProviderFactoryInstance] "
                    b"Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*.\n")
        return _FakeSession(["CPUExecutionProvider"])  # what onnxruntime-gpu 1.26 returned here

    fake, calls = _fake_ort(behaviour)
    monkeypatch.setattr(providers, "ort", lambda: fake)
    monkeypatch.setattr(native_libs, "library_load_error", lambda device, capi=None: "libcublasLt.so.12: cannot open shared object file")
    with pytest.raises(providers.ProviderUnavailable) as info:
        providers.create_session("m.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], what="decoder graph")
    message = str(info.value)
    assert "\n" not in message and message.startswith("decoder graph: onnxruntime 1.26.0 cannot run on CUDAExecutionProvider")
    assert "would have run on CPUExecutionProvider" in message and "libcublasLt.so.12" in message and "octopus-rt[gpu]" in message
    assert calls[0]["kwargs"] == {"enable_fallback": 0}
    assert capfd.readouterr().err == ""  # the log went into the message, not onto the screen


def test_tensorrt_failure_reports_the_logged_cause(monkeypatch):
    def behaviour(names, kwargs):
        os.write(2, _LOG_LINE.encode())
        raise RuntimeError(_TRT_RAISED)

    fake, _ = _fake_ort(behaviour)
    monkeypatch.setattr(providers, "ort", lambda: fake)
    monkeypatch.setattr(native_libs, "library_load_error", lambda device, capi=None: None)
    with pytest.raises(providers.ProviderUnavailable, match=r"vision graph: .*TensorrtExecutionProvider: libnvinfer\.so\.10: cannot open.*octopus-rt\[trt\]"):
        providers.create_session("m.onnx", [("TensorrtExecutionProvider", {"device_id": 0}), "CUDAExecutionProvider"], what="vision graph")


def test_successful_session_replays_the_log(monkeypatch, capfd):
    def behaviour(names, kwargs):
        os.write(2, b"[W:onnxruntime:, x.cc:1 f] some nodes were assigned to CPU\n")
        return _FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])

    fake, _ = _fake_ort(behaviour)
    monkeypatch.setattr(providers, "ort", lambda: fake)
    session = providers.create_session("m.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert "some nodes were assigned to CPU" in capfd.readouterr().err


def test_probe_runs_a_tiny_session_and_caches(monkeypatch):
    made = []

    def behaviour(names, kwargs):
        made.append(names)
        return _FakeSession(names)

    fake, calls = _fake_ort(behaviour)
    monkeypatch.setattr(providers, "ort", lambda: fake)
    assert providers.probe("cuda") is None and providers.probe("cuda") is None
    assert made == [["CUDAExecutionProvider"]]  # once per process
    assert calls[0]["options"].entries == {"session.disable_cpu_ep_fallback": "1"}
    fake.get_available_providers = lambda: ["CPUExecutionProvider"]
    assert "has no TensorrtExecutionProvider" in providers.probe("tensorrt")


def test_backend_gpu_request_fails_with_one_line(monkeypatch, tiny_sam_bundle):
    """device="cuda" with onnxruntime-gpu on a GPU-less machine: one OctopusError line, no CPU run."""
    from octopus_rt.runtime.backends import Backend, Graph

    fake, _ = _fake_ort(lambda names, kwargs: _FakeSession(["CPUExecutionProvider"]))
    fake.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99, ORT_ENABLE_BASIC=1, ORT_DISABLE_ALL=0)
    monkeypatch.setattr(providers, "ort", lambda: fake)
    monkeypatch.setattr(native_libs, "library_load_error", lambda device, capi=None: "libcuda.so.1: cannot open shared object file")
    backend = Backend(device="cuda")
    with pytest.raises(OctopusError, match=r"sam_encoder graph .*CUDAExecutionProvider.*libcuda\.so\.1.*no NVIDIA driver"):
        backend.graph("sam_encoder", tiny_sam_bundle / "sam.onnx")
    assert backend.loaded == {}

    class Failing:
        def get_inputs(self):
            return []

        def get_outputs(self):
            return []

        def get_providers(self):
            return ["TensorrtExecutionProvider"]

        def io_binding(self):
            return types.SimpleNamespace(bind_output=lambda *a: None)

        def run_with_iobinding(self, binding):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : engine enqueue failed")

    with pytest.raises(OctopusError, match="^vision graph failed on TensorrtExecutionProvider: engine enqueue failed$"):
        Graph("vision", Failing(), "cuda").run({})


# ---------------------------------------------------------------- native libraries


def test_elf_needed_matches_readelf():
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    import onnxruntime

    libs = sorted(Path(onnxruntime.__file__).parent.joinpath("capi").glob("*.so*"))
    assert libs
    for lib in libs:
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        expected = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
        assert native_libs.elf_needed(lib) == expected
    assert native_libs.elf_needed(ROOT / "runtime" / providers.PROBE_FILE) is None
    assert native_libs.elf_needed(ROOT / "missing.so") is None


def _compile(tmp: Path, name: str, source: str, soname: str, link: list[str] = ()) -> Path:
    c = tmp / f"{name}.c"
    c.write_text(source)
    out = tmp / soname
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(c), f"-Wl,-soname,{soname}", f"-L{tmp}",
                    "-Wl,--no-as-needed", *link], check=True, capture_output=True)
    return out


def test_doctor_reports_the_libnvinfer_the_provider_needs(tmp_path):
    """A provider library that NEEDs libnvinfer.so.10 next to a TensorRT 11 library: the report names
    .so.10 as missing and the .so.11 as unusable; with .so.10 present, its own version is read."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build stand-in shared libraries")
    libs = tmp_path / "tensorrt_libs"
    libs.mkdir()
    capi = tmp_path / "capi"
    capi.mkdir()
    # Link against a throwaway .so.10 and remove it: a loaded soname stays loaded for the process.
    _compile(libs, "v10", "int getInferLibVersion(void){return 100161;}", "libnvinfer.so.10")
    provider = _compile(libs, "trt", "int f(void){return 0;}", "libonnxruntime_providers_tensorrt.so", ["-l:libnvinfer.so.10"])
    provider.rename(capi / provider.name)
    (libs / "libnvinfer.so.10").unlink()
    _compile(libs, "v11", "int getInferLibVersion(void){return 110400;}", "libnvinfer.so.11")
    assert native_libs.needed_libnvinfer(capi) == "libnvinfer.so.10"
    missing = native_libs.find_tensorrt_library(capi, libs)
    assert missing.version is None
    assert missing.describe() == ("not found: onnxruntime's TensorRT provider needs libnvinfer.so.10; also found "
                                  "libnvinfer.so.11 (11.4.0), which the provider cannot load")
    _compile(libs, "v10", "int getInferLibVersion(void){return 100161;}", "libnvinfer.so.10")
    found = native_libs.find_tensorrt_library(capi, libs)
    assert (found.needed, found.version, found.location) == ("libnvinfer.so.10", "10.1.61", str(libs))
    assert found.describe().startswith(f"10.1.61 (libnvinfer.so.10 from {libs})")


def test_probe_device_marks_listed_but_unusable_providers(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(_GPU))
    asked = []

    def probe(device):
        asked.append(device)
        return f"{device}: libcuda.so.1: cannot open shared object file"

    env = probe_device(run=lambda cmd: None, root="/nonexistent", tensorrt=False, probe=probe)
    assert asked == ["cuda", "tensorrt"] and set(env.unusable) == {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    assert not env.can_run("cuda") and not env.can_run("tensorrt") and env.can_run("cpu")
    report = diagnose(env, None, device="cuda")
    assert not report.ok and report.reason == "cuda: libcuda.so.1: cannot open shared object file"
    assert any(line.startswith("  unusable   CUDAExecutionProvider: cuda: libcuda.so.1") for line in report.lines)
    assert diagnose(env, None, device="auto").ok


def test_plan_names_the_probe_reason():
    manifest = {"lmm": {"dir": "lmm-0", "files": {"d.onnx": {"sha256": "x"}}, "decoder": {"file": "d.onnx"}}}
    device = DeviceInfo(providers=("CPUExecutionProvider",), unusable={"CUDAExecutionProvider": "libcuda.so.1 missing"})
    with pytest.raises(OctopusError, match="cannot run decoder on CUDA: libcuda.so.1 missing"):
        plan_graph("/b", manifest, "decoder", device, requested="cuda")
    assert "libcuda.so.1 missing" in plan_graph("/b", manifest, "decoder", device).reason


# ---------------------------------------------------------------- version-exact engines


def _engines(name: str, built_with: str | None) -> dict:
    record = {"precision": "fp16", "graphs": {}}
    if built_with is not None:
        record["tensorrt"] = built_with
    return {"engines": {"format": ENGINES_FORMAT, "dir": "e", "targets": {name: record}}}


def test_engines_are_reused_only_by_the_exact_tensorrt_version():
    orin = DeviceInfo(providers=_GPU, compute_capability="8.7", tensorrt="10.3.0")
    assert orin.engine_name == "sm87-trt10.3.0"
    assert find_engine_target(_engines("sm87-trt10.3.0", "10.3.0"), orin)[0] == "sm87-trt10.3.0"
    patched = DeviceInfo(providers=_GPU, compute_capability="8.7", tensorrt="10.3.1")
    name, record, why = find_engine_target(_engines("sm87-trt10.3.0", "10.3.0"), patched)
    assert name is None and record is None
    assert "built with TensorRT 10.3.0, but this machine loads TensorRT 10.3.1" in why and "export trt" in why
    # Targets named by major.minor (bundles built before the full version) are checked by their record.
    assert find_engine_target(_engines("sm87-trt10.3", "10.3.0.30"), orin)[0] == "sm87-trt10.3"
    assert find_engine_target(_engines("sm87-trt10.3", "10.3.0"), patched)[0] is None
    assert find_engine_target(_engines("sm87-trt10.3", None), orin)[0] is None  # version unknown: not trusted
    assert "this machine needs sm90-trt10.3.0" in find_engine_target(
        _engines("sm87-trt10.3.0", "10.3.0"), DeviceInfo(providers=_GPU, compute_capability="9.0", tensorrt="10.3.0"))[2]
    # Compute capabilities with a two-digit major: sm120 is not sm12 + 0 of another GPU.
    blackwell = DeviceInfo(providers=_GPU, compute_capability="12.0", tensorrt="10.16.1")
    assert find_engine_target(_engines("sm120-trt10.16", "10.16.1"), blackwell)[0] == "sm120-trt10.16"
    assert "built with TensorRT 10.16.0" in find_engine_target(_engines("sm120-trt10.16.0", "10.16.0"), blackwell)[2]
    assert "needs sm120-trt10.16.1" in find_engine_target(_engines("sm12-trt10.16.1", "10.16.1"), blackwell)[2]


# ---------------------------------------------------------------- export trt


def test_export_sessions_set_no_ep_context_session_options(monkeypatch, tmp_path):
    from octopus_rt.export.trt_session import OrtSessionFactory

    seen = {}

    def fake_create(path, providers_, options, what=""):
        seen["options"] = options
        return _FakeSession([p[0] for p in providers_])

    monkeypatch.setattr(providers, "create_session", fake_create)
    build = {"trt_dump_ep_context_model": True, "trt_ep_context_file_path": str(tmp_path / "g_ctx.onnx"), "trt_ep_context_embed_mode": 0}
    OrtSessionFactory()(tmp_path / "g.onnx", [("TensorrtExecutionProvider", build), ("CUDAExecutionProvider", {})], True)
    for key in ("ep.context_enable", "ep.context_file_path", "ep.context_embed_mode"):
        with pytest.raises(Exception, match="does not have configuration"):
            seen["options"].get_session_config_entry(key)


class _BuildFake:
    """Session factory whose TensorRT builder fails the way a real one logs (`fail`), or runs and
    writes no context model (`fail=None`, `log` warning)."""

    def __init__(self, fail: str | None = None, log: str = "") -> None:
        from octopus_rt.export.trt_session import OrtSessionFactory

        self.cpu, self.fail, self.log = OrtSessionFactory(), fail, log

    def __call__(self, path, providers_, disable):
        if providers_[0][0] == "CPUExecutionProvider":
            return self.cpu(path, providers_, disable)
        if self.log:
            os.write(2, self.log.encode())
        return _FakeSession(["TensorrtExecutionProvider"], fail_run=self.fail)


def _env():
    return DeviceInfo("3.11", "Linux x86_64", onnxruntime="1.26.0", providers=_GPU, gpu_name="L4",
                       compute_capability="8.9", tensorrt="10.16.1", system_memory_bytes=64 << 30)


def test_export_trt_surfaces_tensorrt_build_errors(tiny_sam_bundle, tmp_path, capfd):
    from octopus_rt.export.trt import build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    oom = ("[E:onnxruntime:Default, tensorrt_execution_provider.h:88 log] [2026-11-30 10:00:00   ERROR] "
           "[virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)\n")
    with pytest.raises(OctopusError) as info:
        build_engines(bundle, env=_env(), session_factory=_BuildFake(fail=oom))
    message = str(info.value)
    assert message.startswith("sam_encoder: TensorRT could not build the engine: ")
    assert "Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)" in message and "\n" not in message
    assert not list(bundle.glob(".staging-*")) and "engines" not in (bundle / "manifest.json").read_text()
    capfd.readouterr()

    warned = "[W:onnxruntime:Default, x.cc:1 f] [TensorRT EP] No graph will run on TensorRT execution provider\n"
    with pytest.raises(OctopusError) as info:
        build_engines(bundle, env=_env(), session_factory=_BuildFake(log=warned))
    message = str(info.value)
    assert "wrote no EP-context model sam_encoder_ctx.onnx" in message
    assert "No graph will run on TensorRT execution provider" in message and "1.18" not in message


def test_orin_nano_bandwidth_is_the_super_mode_figure():
    from octopus_rt.memory import JETSON_BOARDS

    assert {b.name: b.bandwidth_gbs for b in JETSON_BOARDS}["Jetson Orin Nano 8GB"] == 102.0
