"""runtime/doctor.py and `octopus-rt doctor`: whether a bundle can run on a machine, and why not."""

from __future__ import annotations

import json
import shutil

import pytest

from octopus_rt.cli import main
from octopus_rt.runtime.device_info import DeviceInfo, probe_device
from octopus_rt.runtime.doctor import diagnose
from octopus_rt.runtime.provider_plan import engine_name
from trt_helpers import GIB, TRT, FakeTensorRT, orin


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

    cpu_env = DeviceInfo("3.11", "Linux x86_64", onnxruntime="1.32.0", providers=("CPUExecutionProvider",),
                          system_memory_bytes=16 * GIB)
    plain = diagnose(cpu_env, tiny_sam_bundle)
    assert plain.ok and plain.plans == {"sam_encoder": "cpu", "sam_decoder": "cpu"}
    assert any("has no TensorRT engines" in line for line in plain.lines)
    refused = diagnose(cpu_env, tiny_sam_bundle, device="tensorrt")
    assert not refused.ok and "TensorRT" in refused.reason

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sam_bundle, bundle)
    build_engines(bundle, env=orin(), session_factory=FakeTensorRT())
    on_orin = diagnose(orin(), bundle, device="tensorrt")
    assert on_orin.ok and on_orin.plans == {"sam_encoder": "tensorrt", "sam_decoder": "tensorrt"}
    assert any("engines sm87-trt10.3.0 match this machine" in line for line in on_orin.lines)
    on_h100 = diagnose(orin(cc="9.0"), bundle)
    assert on_h100.ok and on_h100.plans["sam_encoder"] == "cuda"
    assert any("this machine needs sm90-trt10.3.0" in line for line in on_h100.lines)
    assert not diagnose(orin(cc="9.0"), bundle, device="tensorrt").ok
    assert not diagnose(cpu_env, bundle, device="cuda").ok
    # Too little memory for the bundle is a reason not to run.
    tiny_machine = DeviceInfo("3", "Linux", onnxruntime="1.32.0", providers=("CPUExecutionProvider",), system_memory_bytes=1 << 20)
    small = diagnose(tiny_machine, bundle)
    assert not small.ok and "needs about" in small.reason
    assert not diagnose(DeviceInfo("3", "Linux"), bundle).ok  # no onnxruntime
    # Without a bundle: the environment alone, against the requested device.
    assert diagnose(orin(), None, device="tensorrt").ok
    no_libs = DeviceInfo("3", "Linux", onnxruntime="1.20.0", providers=TRT, compute_capability="8.7")
    assert "TensorRT libraries" in diagnose(no_libs, None, device="tensorrt").reason
    assert "NVIDIA GPU" in diagnose(DeviceInfo("3", "Linux", onnxruntime="1.20.0", providers=TRT), None, device="cuda").reason


@pytest.mark.gpu
def test_gpu_doctor_sees_the_gpu():
    env = probe_device()
    if env.compute_capability is None:
        pytest.skip("no NVIDIA GPU found by nvidia-smi or the Jetson probes")
    assert engine_name(env.compute_capability, env.tensorrt or "10.0").startswith("sm")
    assert diagnose(env).ok
