"""runtime/device_info.py: nvidia-smi and Jetson parsers, the probe with stand-in commands and files."""

from __future__ import annotations

import json

from octopus_rt.runtime.device_info import jetson_compute_capability, parse_nvidia_smi_query, probe_device
from octopus_rt.runtime.native_libs import tensorrt_version_from_int


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


def test_probe_device_with_fake_commands_and_files(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       15655100 kB\nMemFree: 1 kB\n")
    (tmp_path / "usr/local/cuda").mkdir(parents=True)
    (tmp_path / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"version": "12.6.68"}}))
    env = probe_device(run=lambda cmd: None, root=tmp_path, tensorrt=False)
    assert env.compute_capability == "8.7" and env.jetson.startswith("NVIDIA Jetson Orin NX")
    assert env.cuda == "12.6.68" and env.system_memory_bytes == 15655100 * 1024
    assert env.memory_for_models == env.system_memory_bytes  # shared memory on Jetson

    outputs = {"--query-gpu=name,compute_cap,driver_version,memory.total": "NVIDIA L4, 8.9, 550.1, 23034\n"}
    server = probe_device(run=lambda cmd: outputs.get(cmd[1]) if len(cmd) > 1 else "| CUDA Version: 12.4 |",
                               root=tmp_path / "nothing", tensorrt=False)
    assert (server.gpu_name, server.compute_capability, server.cuda) == ("NVIDIA L4", "8.9", "12.4")
    assert server.memory_for_models == 23034 << 20 and server.jetson is None
