"""`octopus-rt doctor`: whether a bundle can run on this machine, and why not.

`diagnose` turns a `DeviceInfo` (probed by runtime/device_info.probe_device, or built by a test) and
an optional bundle into a report: the per-graph provider plan (runtime/provider_plan.plan_graph),
whether the bundle's engines match this machine, the memory estimate (octopus_rt/memory.py) against
this machine's memory, and `ok` with the reason when the bundle cannot run here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime.device_info import DeviceInfo
from octopus_rt.runtime.providers import DEVICES, PROVIDERS

__all__ = ["DoctorReport", "diagnose"]


@dataclass
class DoctorReport:
    """Lines to print, and whether the bundle (if any) can run here; `reason` says why not."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True
    reason: str = ""
    plans: dict[str, str] = field(default_factory=dict)


def diagnose(env: DeviceInfo, bundle_dir: str | os.PathLike[str] | None = None, device: str = "auto") -> DoctorReport:
    """Report on `env`, and on `bundle_dir` when given; ok=False with a one-line reason when the
    bundle cannot run here with `device` (auto / tensorrt / cuda / cpu)."""
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}")
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
    add(f"engine name  {env.engine_name or '- (needs an NVIDIA GPU and TensorRT)'}")

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
    from octopus_rt.manifest import GRAPHS
    from octopus_rt.runtime.provider_plan import find_engine_target, graph_record, plan_graph, requested_provider

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
    _, _, why = find_engine_target(manifest, env)
    add(f"engines      {why}")
    for graph in graphs:
        try:
            plan = plan_graph(bundle_dir, manifest, graph, env, requested=requested_provider(manifest, graph, device))
        except OctopusError as exc:  # the device cannot run it (InputError), or a field it needs is malformed
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
