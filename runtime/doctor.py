"""`octopus-rt doctor`: what this machine offers, and whether a bundle can run on it.

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

`diagnose` turns an `Environment` (probed, or built by a test) and an optional bundle into a
report: the per-graph provider plan (runtime/trt_profiles.plan_graph), whether the bundle's engines
match this machine, the memory estimate (octopus_rt/memory.py) against this machine's memory, and
`ok` with the reason when the bundle cannot run here.
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

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime import native_libs
from octopus_rt.runtime.native_libs import tensorrt_version_from_int
from octopus_rt.runtime.providers import PROVIDERS

__all__ = [
    "Environment",
    "DoctorReport",
    "probe_environment",
    "parse_nvidia_smi_query",
    "jetson_compute_capability",
    "tensorrt_version_from_int",
    "diagnose",
]

_SMI_QUERY = ["--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader,nounits"]
# Jetson modules and their GPU compute capability (NVIDIA's CUDA GPUs table).
_JETSON_CC = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))
_DEVICES = ("auto", "tensorrt", "cuda", "cpu")

Runner = Callable[[list[str]], str | None]
Prober = Callable[[str], str | None]


@dataclass
class Environment:
    """What the probes found. None means "not present / not found"."""

    python: str
    platform: str
    onnxruntime: str | None = None
    providers: tuple[str, ...] = ()
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

    def device_info(self):
        from octopus_rt.runtime.trt_profiles import DeviceInfo

        return DeviceInfo(
            providers=tuple(p for p in self.providers if p not in self.unusable),
            unusable=dict(self.unusable),
            compute_capability=self.compute_capability,
            tensorrt=self.tensorrt,
            gpu_name=self.gpu_name,
            cuda=self.cuda,
            memory_bytes=self.memory_for_models,
        )

    @property
    def memory_for_models(self) -> int | None:
        """Memory the bundle has to fit in: a discrete GPU's memory, else (CPU, or a Jetson whose
        CPU and GPU share one memory) the system memory."""
        if self.gpu_memory_bytes and not self.jetson:
            return self.gpu_memory_bytes
        return self.system_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorReport:
    """Lines to print, and whether the bundle (if any) can run here; `reason` says why not."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True
    reason: str = ""
    plans: dict[str, str] = field(default_factory=dict)


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


def probe_environment(
    run: Runner = _run,
    root: str | os.PathLike[str] = "/",
    tensorrt: bool = True,
    probe: Prober | None = None,
    probe_devices: tuple[str, ...] = ("cuda", "tensorrt"),
) -> Environment:
    """Probe this machine (see the module docstring). `run`, `root` and `probe` (device -> None or
    why it cannot run; default runtime/providers.probe) are seams for tests. Listed GPU providers
    in `probe_devices` are probed with a tiny session; a refusal lands in `unusable`."""
    root = Path(root)
    env = Environment(python=sys.version.split()[0], platform=f"{platform.system()} {platform.machine()}")
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


def diagnose(env: Environment, bundle_dir: str | os.PathLike[str] | None = None, device: str = "auto") -> DoctorReport:
    """Report on `env`, and on `bundle_dir` when given; ok=False with a one-line reason when the
    bundle cannot run here with `device` (auto / tensorrt / cuda / cpu)."""
    if device not in _DEVICES:
        raise InputError(f"--device must be one of {', '.join(_DEVICES)}; got {device!r}")
    from octopus_rt.memory import format_bytes

    report = DoctorReport()
    add = report.lines.append
    add(f"python       {env.python} ({env.platform})")
    add(f"onnxruntime  {env.onnxruntime or 'not installed'}")
    add(f"providers    {', '.join(env.providers) or 'none'}")
    for name, why_not in env.unusable.items():
        add(f"  unusable   {name}: {why_not}")
    gpu = env.gpu_name or "none found"
    if env.compute_capability:
        gpu += f" (compute capability {env.compute_capability})"
    add(f"gpu          {gpu}")
    if env.jetson:
        add(f"jetson       {env.jetson}")
    add(f"driver       {env.driver or '-'}")
    add(f"cuda         {env.cuda or 'not found'}")
    add(f"tensorrt     {env.tensorrt_library or env.tensorrt or 'not found'}")
    if env.tensorrt_python:
        add(f"tensorrt py  {env.tensorrt_python} (the Python module; onnxruntime's provider loads the library above)")
    if env.memory_for_models:
        add(f"memory       {format_bytes(env.memory_for_models)} for models")
    info = env.device_info()
    add(f"engine name  {info.engine_name or '- (needs an NVIDIA GPU and TensorRT)'}")

    def fail(reason: str) -> DoctorReport:
        report.ok = False
        report.reason = reason
        add(f"FAIL         {reason}")
        return report

    if env.onnxruntime is None:
        return fail("onnxruntime is not installed: pip install 'octopus-rt[cpu]' (or [gpu] / [trt], see docs/deploy.md)")
    if bundle_dir is None:
        if device != "auto":
            needed = PROVIDERS[device]
            if needed in env.unusable:
                return fail(env.unusable[needed])
            if needed not in env.providers:
                return fail(f"onnxruntime {env.onnxruntime} here has no {needed}")
            if device != "cpu" and env.compute_capability is None:
                return fail(f"--device {device} needs an NVIDIA GPU; none was found")
            if device == "tensorrt" and env.tensorrt is None:
                return fail(f"--device tensorrt needs the TensorRT libraries: {env.tensorrt_library or 'libnvinfer not found'}")
        add("OK           no bundle given; the environment was checked")
        return report

    from octopus_rt.bundle import check_files, read_manifest
    from octopus_rt.memory import estimate_memory, format_report
    from octopus_rt.runtime.trt_profiles import GRAPHS, find_engine_target, graph_record, plan_graph, requested_provider

    bundle_dir = Path(bundle_dir)
    add(f"bundle       {bundle_dir}")
    try:
        manifest = read_manifest(bundle_dir)
    except OctopusError as exc:
        return fail(str(exc))
    problems = check_files(bundle_dir, manifest)
    if problems:
        return fail(f"{len(problems)} problem(s) with the bundle's files, first: {problems[0]}")
    graphs = [g for g in GRAPHS if graph_record(manifest, g) is not None]
    if not graphs:
        return fail("the bundle has no lmm or sam graphs")
    _, _, why = find_engine_target(manifest, info)
    add(f"engines      {why}")
    for graph in graphs:
        try:
            plan = plan_graph(bundle_dir, manifest, graph, info, requested=requested_provider(manifest, graph, device))
        except InputError as exc:
            return fail(str(exc))
        report.plans[graph] = plan.provider
        add(f"  {graph:<12} -> {plan.provider:<8} {plan.file.relative_to(bundle_dir)}  ({plan.reason})")
    estimate = estimate_memory(manifest, gpu=any(p != "cpu" for p in report.plans.values()))
    report.lines += format_report(estimate)
    available = env.memory_for_models
    if available is not None and estimate.total > available:
        return fail(f"the bundle needs about {format_bytes(estimate.total)} but this machine has "
                    f"{format_bytes(available)} for models")
    add("OK           the bundle can run here")
    return report
