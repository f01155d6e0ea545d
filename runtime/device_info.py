"""What this machine offers the runtime: `DeviceInfo`, and `probe_device` that fills it.

Probes (all optional, lazy, and none of them fails the probe as a whole):

- Python and platform;
- onnxruntime: version and listed execution providers (the `onnxruntime` and `onnxruntime-gpu`
  wheels both provide the module), and which of the GPU ones really run: each is probed by creating
  and running a tiny session (runtime/providers.probe), because onnxruntime-gpu lists CUDA and
  TensorRT on machines where they cannot start;
- NVIDIA GPU: `nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total` on servers and
  desktops; on Jetson (no full nvidia-smi) /etc/nv_tegra_release, /proc/device-tree/model and the
  known compute capability of the module (Orin 8.7, Xavier 7.2);
- CUDA: the "CUDA Version" of nvidia-smi, else /usr/local/cuda/version.json (JetPack);
- TensorRT: the libnvinfer onnxruntime's TensorRT provider will load: the soname from the
  provider library's NEEDED entries (libnvinfer.so.10 for onnxruntime-gpu 1.18-1.31), looked up in
  pip's tensorrt_libs and on the loader path, and the version it reports (getInferLibVersion).
  The Python `tensorrt` module is reported separately: it may be another TensorRT (pip's
  `tensorrt` 11 ships libnvinfer.so.11, which that provider cannot use).

The probe runs commands (nvidia-smi) and creates sessions, so it runs where a caller decides:
`Octopus` once, when its device is a GPU; `octopus-rt doctor`; `octopus-rt export trt`. `Backend`
and `plan_graph` only read the DeviceInfo they are given.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from octopus_rt.runtime import native_libs
from octopus_rt.runtime.provider_plan import engine_name
from octopus_rt.runtime.providers import PROVIDERS

__all__ = ["DeviceInfo", "probe_device", "parse_nvidia_smi_query", "jetson_compute_capability"]

_SMI_QUERY = ["--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader,nounits"]
# Jetson modules and their GPU compute capability (NVIDIA's CUDA GPUs table).
_JETSON_CC = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))

Runner = Callable[[list[str]], str | None]
Prober = Callable[[str], str | None]


def _this_python() -> str:
    return sys.version.split()[0]


def _this_platform() -> str:
    return f"{platform.system()} {platform.machine()}"


@dataclass
class DeviceInfo:
    """What the probes found (None: not present / not found). The default is a CPU-only machine.

    providers: what onnxruntime lists; unusable: {provider name: why it cannot run} for listed
    providers the probe refused (`can_run` is listed and not refused). compute_capability: "8.7"
    style; tensorrt: the version ("10.3.0") of the libnvinfer onnxruntime's TensorRT provider loads.
    """

    python: str = field(default_factory=_this_python)
    platform: str = field(default_factory=_this_platform)
    onnxruntime: str | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    gpu_name: str | None = None
    compute_capability: str | None = None
    driver: str | None = None
    cuda: str | None = None
    tensorrt: str | None = None
    tensorrt_library: str | None = None
    tensorrt_python: str | None = None
    unusable: dict[str, str] = field(default_factory=dict)
    jetson: str | None = None
    gpu_memory_bytes: int | None = None
    system_memory_bytes: int | None = None

    def can_run(self, device: str) -> bool:
        """Whether `device` ("cpu", "cuda", "tensorrt") is listed and was not refused by its probe."""
        name = PROVIDERS[device]
        return name in self.providers and name not in self.unusable

    def missing(self, device: str) -> str:
        """Why `device` ("tensorrt", "cuda") cannot run here."""
        name = PROVIDERS[device]
        if name in self.unusable:
            return self.unusable[name]
        return f"onnxruntime here has no {name}" + (" (install onnxruntime-gpu)" if device == "cuda" else "")

    @property
    def engine_name(self) -> str | None:
        """The engines target this machine runs ("sm87-trt10.3.0"), or None without a GPU and TensorRT."""
        if self.compute_capability is None or self.tensorrt is None:
            return None
        return engine_name(self.compute_capability, self.tensorrt)

    @property
    def memory_for_models(self) -> int | None:
        """Memory the bundle has to fit in: a discrete GPU's memory, else (CPU, or a Jetson whose
        CPU and GPU share one memory) the system memory."""
        if self.gpu_memory_bytes and not self.jetson:
            return self.gpu_memory_bytes
        return self.system_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(command: list[str]) -> str | None:
    """stdout of a command, or None if it is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_nvidia_smi_query(text: str) -> dict[str, Any]:
    """First GPU of `nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total
    --format=csv,noheader,nounits` -> {name, compute_capability, driver, memory_bytes} (MiB -> bytes).
    Fields nvidia-smi cannot fill read "[N/A]" or "[Not Supported]" and become None."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 4:
        return {}

    def value(p: str) -> str | None:
        return None if not p or p.startswith("[") or p.upper() == "N/A" else p

    memory = value(parts[3])
    return {
        "name": value(parts[0]),
        "compute_capability": value(parts[1]),
        "driver": value(parts[2]),
        "memory_bytes": int(float(memory)) << 20 if memory and re.fullmatch(r"[\d.]+", memory) else None,
    }


def jetson_compute_capability(model: str) -> str | None:
    """Compute capability from a Jetson model string ("NVIDIA Jetson AGX Orin Developer Kit" -> "8.7")."""
    lowered = model.lower()
    for key, cc in _JETSON_CC:
        if key in lowered:
            return cc
    return None


def _tensorrt_python() -> str | None:
    """Version and distribution of an installed Python `tensorrt` package, without importing it."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return f"{metadata.version(dist)} ({dist})"
        except metadata.PackageNotFoundError:
            continue
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _meminfo_total(root: Path) -> int | None:
    text = _read(root / "proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def probe_device(
    run: Runner = _run,
    root: str | os.PathLike[str] = "/",
    tensorrt: bool = True,
    probe: Prober | None = None,
    probe_devices: tuple[str, ...] = ("cuda", "tensorrt"),
) -> DeviceInfo:
    """Probe this machine (see the module docstring). `run`, `root` and `probe` (device -> None or
    why it cannot run; default runtime/providers.probe) are seams for tests. Listed GPU providers
    in `probe_devices` are probed with a tiny session; a refusal lands in `unusable`."""
    root = Path(root)
    env = DeviceInfo(providers=())
    try:
        import onnxruntime as ort  # noqa: PLC0415 - optional

        env.onnxruntime = str(ort.__version__)
        env.providers = tuple(ort.get_available_providers())
    except ImportError:
        pass
    if env.onnxruntime is not None:
        if probe is None:
            from octopus_rt.runtime.providers import probe  # noqa: PLC0415 - imports onnxruntime
        for device in probe_devices:
            if PROVIDERS[device] in env.providers:
                why_not = probe(device)
                if why_not is not None:
                    env.unusable[PROVIDERS[device]] = why_not
    env.system_memory_bytes = _meminfo_total(root)

    query = run(["nvidia-smi", *_SMI_QUERY])
    if query:
        gpu = parse_nvidia_smi_query(query)
        env.gpu_name = gpu.get("name")
        env.compute_capability = gpu.get("compute_capability")
        env.driver = gpu.get("driver")
        env.gpu_memory_bytes = gpu.get("memory_bytes")
        header = run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        env.cuda = match.group(1) if match else None

    tegra = _read(root / "etc/nv_tegra_release")
    if tegra is not None:
        model = (_read(root / "proc/device-tree/model") or "Jetson").replace("\x00", "").strip()
        release = tegra.splitlines()[0].strip("# ").strip() if tegra.strip() else "unknown release"
        env.jetson = f"{model} ({release})"
        env.gpu_name = env.gpu_name or model
        env.compute_capability = env.compute_capability or jetson_compute_capability(model)

    if env.cuda is None:
        version_json = _read(root / "usr/local/cuda/version.json")
        if version_json:
            try:
                env.cuda = json.loads(version_json).get("cuda", {}).get("version")
            except json.JSONDecodeError:
                pass
    if tensorrt:
        library = native_libs.find_tensorrt_library()
        env.tensorrt = library.version
        env.tensorrt_library = library.describe()
        env.tensorrt_python = _tensorrt_python()
    return env
