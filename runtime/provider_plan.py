"""Which file and execution providers each graph of a bundle runs with (pure functions).

Plain Python over the manifest dict and a `DeviceInfo` (runtime/device_info.py): no onnxruntime, no
GPU. Manifest fields are read through the schema (`Manifest.lookup`, `read_engines`,
`Defaults.provider` in octopus_rt/manifest.py), which holds their names, types and defaults; only
the fields a plan needs are read, so a manifest that is incomplete elsewhere still plans. The one
place that knows

- how an engine target is named (`engine_name`, e.g. ``sm87-trt10.3.0``: a serialized TensorRT
  engine only deserializes on the compute capability and the exact TensorRT version that built it,
  so a patch upgrade needs a new target; `find_engine_target` also compares the version recorded
  in the target with the libnvinfer this machine loads before an engine is used);
- the provider-options dicts passed to onnxruntime to run a TensorRT EP-context model and for the
  CUDA EP, and the per-graph provider plan the runtime uses (`plan_graph`): TensorRT EP-context
  models for vision + SAM when the bundle's `engines` section has a target matching this machine,
  CUDA for the decoder loop by default (IO binding keeps the KV cache on the GPU; see
  docs/deploy.md for why the decoder is not a TensorRT engine by default), CPU otherwise. A decoder
  in the `gqa` form (manifest `lmm.decoder.form`) always runs on the CPU provider: onnxruntime's
  CUDA GroupQueryAttention has no float32 kernel and TensorRT runs no contrib ops.

Device names and their onnxruntime providers: runtime/providers.PROVIDERS (the one table).
Building engines (profiles, build options) is export/trt_profiles.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from octopus_rt.errors import InputError
from octopus_rt.manifest import GRAPHS, EngineTarget, Manifest, read_engines
from octopus_rt.runtime.providers import DEVICES
from octopus_rt.schema import ManifestError

if TYPE_CHECKING:
    from octopus_rt.runtime.device_info import DeviceInfo

__all__ = [
    "GQA_ON_CPU",
    "GraphPlan",
    "graph_record",
    "graph_sha256",
    "engine_name",
    "tensorrt_version",
    "tensorrt_load_options",
    "cuda_options",
    "find_engine_target",
    "requested_provider",
    "plan_graph",
]

GQA_ON_CPU = ("the gqa decoder form runs on the CPU provider (onnxruntime's CUDA GroupQueryAttention has no "
              "float32 kernel, TensorRT no contrib ops); for a GPU decoder re-export with "
              "`octopus-rt export lmm --decoder-form flat_kv`")


@dataclass
class GraphPlan:
    """How the runtime opens one graph: file, providers (name, options) in priority order, and
    whether ORT's own graph optimisations must be off (EP-context models must stay one node)."""

    graph: str
    file: Path
    provider: str
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    disable_graph_optimizations: bool = False
    reason: str = ""


def graph_record(manifest: Mapping[str, Any], graph: str) -> dict[str, Any] | None:
    """The manifest record of `graph` (e.g. manifest["sam"]["encoder"]), or None if absent.

    Only finds the record (where it lives is manifest.GRAPHS); its fields are read through the
    schema: `Manifest.lookup(manifest, *GRAPHS[graph], "file")`.
    """
    if graph not in GRAPHS:
        raise InputError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")
    section_name, key = GRAPHS[graph]
    section = manifest.get(section_name)
    if not isinstance(section, dict) or not isinstance(section.get(key), dict):
        return None
    return section[key]


def graph_sha256(manifest: Mapping[str, Any], graph: str) -> str | None:
    """The recorded sha256 of `graph`'s ONNX file (None if the section lists no such file): what an
    engine records as its `source_sha256` when it is built, and is compared with before it is used."""
    section, key = GRAPHS[graph]
    return Manifest.lookup(manifest, section, "files", Manifest.lookup(manifest, section, key, "file"), "sha256")


def _section_dir(manifest: Mapping[str, Any], section: str) -> str:
    """`dir` of a manifest section, which a section whose files are planned with must have."""
    folder = Manifest.lookup(manifest, section, "dir")
    if folder is None:
        raise ManifestError(f"{section}.dir is missing")
    return folder


_CC = re.compile(r"^\s*(?:sm_?)?(\d+)(?:\.(\d+))?\s*$")
_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")
_TARGET_GPU = re.compile(r"^(sm\d+)-trt\d")


def tensorrt_version(version: str) -> str:
    """"10.3.0.30" / "10.3.0" -> "10.3.0"; "10.3" -> "10.3" (an old record without the patch)."""
    match = _VERSION.match(str(version))
    if not match:
        raise InputError(f"not a TensorRT version: {version!r} (expected e.g. '10.3.0')")
    return ".".join(str(int(g)) for g in match.groups() if g is not None)


def engine_name(compute_capability: str | tuple[int, int], tensorrt_version_: str) -> str:
    """``sm<major><minor>-trt<major>.<minor>.<patch>``: "8.7" + "10.3.0.30" -> "sm87-trt10.3.0".

    A serialized engine only deserializes on the compute capability and the TensorRT version that
    built it (a patch release is another version), so the name carries both in full.
    """
    if isinstance(compute_capability, tuple):
        major, minor = int(compute_capability[0]), int(compute_capability[1])
    else:
        match = _CC.match(str(compute_capability))
        if not match:
            raise InputError(f"not a compute capability: {compute_capability!r} (expected e.g. '8.7')")
        digits = match.group(1)
        if match.group(2) is not None:
            major, minor = int(digits), int(match.group(2))
        elif len(digits) >= 2:  # "87" / "sm_87"
            major, minor = int(digits[:-1]), int(digits[-1])
        else:
            raise InputError(f"not a compute capability: {compute_capability!r} (expected e.g. '8.7')")
    return f"sm{major}{minor}-trt{tensorrt_version(tensorrt_version_)}"


def tensorrt_load_options(*, device_id: int = 0, fp16: bool = True, workspace_bytes: int = 2 << 30) -> dict[str, Any]:
    """TensorRT EP options to run an EP-context model: the engine comes from the EPContext node
    (its path is relative to the context model), so no profile or cache options are needed."""
    return {
        "device_id": int(device_id),
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_bytes),
    }


def cuda_options(*, device_id: int = 0, gpu_mem_limit: int | None = None) -> dict[str, Any]:
    """CUDA EP options. kSameAsRequested avoids the arena doubling its blocks, which on an 8 GB
    Jetson (CPU and GPU share the memory) can cost gigabytes for a growing KV cache."""
    options: dict[str, Any] = {
        "device_id": int(device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": True,
    }
    if gpu_mem_limit is not None:
        options["gpu_mem_limit"] = int(gpu_mem_limit)
    return options


def find_engine_target(
    manifest: Mapping[str, Any], device: DeviceInfo
) -> tuple[str | None, EngineTarget | None, str]:
    """(name, target, reason) of the engines built for this machine, or (None, None, why not)."""
    section, why_not = read_engines(manifest)
    if section is None:
        return None, None, why_not
    targets = section.targets
    built = ", ".join(sorted(targets))
    if not device.can_run("tensorrt"):
        return None, None, f"engines built for {built}, but {device.missing('tensorrt')}"
    if device.compute_capability is None:
        return None, None, f"engines built for {built}, but no NVIDIA GPU was found"
    if device.tensorrt is None:
        return None, None, f"engines built for {built}, but the TensorRT libraries were not found"
    name = device.engine_name
    here = tensorrt_version(device.tensorrt)
    candidates = [name] if name in targets else []
    # Targets of this GPU under another name: bundles built before names carried the full version.
    candidates += [t for t in targets if t != name and _target_gpu(t) == _target_gpu(name)]
    for candidate in candidates:
        built_with = targets[candidate].tensorrt
        if (built_with is None and candidate == name) or (built_with is not None and tensorrt_version(built_with) == here):
            return candidate, targets[candidate], f"engines {candidate} match this machine (TensorRT {here})"
    if candidates:
        built_with = targets[candidates[0]].tensorrt or "of an unrecorded version"
        return None, None, (
            f"engines {candidates[0]} were built with TensorRT {built_with}, "
            f"but this machine loads TensorRT {here}; an engine only loads in the TensorRT that built it: "
            "rebuild with `octopus-rt export trt`"
        )
    return None, None, f"engines built for {built}; this machine needs {name}"


def _target_gpu(name: str) -> str | None:
    """"sm87" of an engine target name ("sm87-trt10.3.0", "sm87-trt10.3"), None for other strings."""
    match = _TARGET_GPU.match(name)
    return match.group(1) if match else None


def _preferred(manifest: Mapping[str, Any], graph: str) -> str:
    """The bundle's preferred device for `graph` (manifest.Defaults.provider)."""
    return Manifest.lookup(manifest, "defaults").provider(graph)


def requested_provider(manifest: Mapping[str, Any], graph: str, device: str) -> str:
    """What `plan_graph` is asked for when the user picks `device` for the whole bundle.

    "tensorrt" means TensorRT engines where the bundle prefers them (vision, SAM) and CUDA for the
    rest (the decoder loop, unless its engine was built with --decoder); auto / cuda / cpu apply
    to every graph as they are.
    """
    if device != "tensorrt":
        return device
    return "tensorrt" if _preferred(manifest, graph) == "tensorrt" else "cuda"


def plan_graph(
    bundle_dir: str | Path,
    manifest: Mapping[str, Any],
    graph: str,
    device: DeviceInfo,
    *,
    requested: str = "auto",
    device_id: int = 0,
) -> GraphPlan:
    """Choose file and providers for `graph`.

    requested: "auto" (manifest defaults["providers"][graph], else DEFAULT_PROVIDERS, falling back
    tensorrt -> cuda -> cpu to what is available), or "tensorrt" / "cuda" / "cpu" (an error if not
    available). TensorRT runs the matching EP-context model; without matching engines the TensorRT
    EP would build an engine at every start, so auto falls back to CUDA and an explicit
    "tensorrt" is refused with the reason.
    """
    record = graph_record(manifest, graph)
    if record is None:
        raise InputError(f"the bundle has no {GRAPHS[graph][0]}.{GRAPHS[graph][1]} graph")
    if requested not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    bundle_dir = Path(bundle_dir)
    section, key = GRAPHS[graph]
    onnx_file = bundle_dir / _section_dir(manifest, section) / Manifest.lookup(manifest, section, key, "file")
    cpu = ("CPUExecutionProvider", {})
    if graph == "decoder" and Manifest.lookup(manifest, section, key, "form") == "gqa":
        return GraphPlan(graph, onnx_file, "cpu", [cpu], False, GQA_ON_CPU)
    name, target, why = find_engine_target(manifest, device)
    engine_graph = target.graphs.get(graph) if target is not None else None
    if engine_graph is not None and engine_graph.source_sha256 not in (None, graph_sha256(manifest, graph)):
        # The graph was re-exported after the engine was built: the engine is stale.
        why = f"engines {name} were built from another export of {graph}; rebuild with `octopus-rt export trt`"
        engine_graph, target = None, None
    preferred = _preferred(manifest, graph) if requested == "auto" else requested
    order = {"tensorrt": ["tensorrt", "cuda", "cpu"], "cuda": ["cuda", "cpu"], "cpu": ["cpu"]}[preferred]
    reasons: list[str] = []
    for provider in order:
        if provider == "tensorrt":
            if engine_graph is None:
                reasons.append(why if target is None else f"engines {name} have no {graph} graph")
                if requested == "tensorrt":
                    raise InputError(f"cannot run {graph} on TensorRT: {reasons[-1]}")
                continue
            ctx = bundle_dir / _section_dir(manifest, "engines") / engine_graph.file
            providers = [
                ("TensorrtExecutionProvider", tensorrt_load_options(device_id=device_id, fp16=target.precision == "fp16")),
                ("CUDAExecutionProvider", cuda_options(device_id=device_id)),
            ]
            return GraphPlan(graph, ctx, "tensorrt", providers, True, why)
        if provider == "cuda":
            if not device.can_run("cuda"):
                reasons.append(device.missing("cuda"))
                if requested == "cuda":
                    raise InputError(f"cannot run {graph} on CUDA: {reasons[-1]}")
                continue
            reason = "; ".join(reasons + ["CUDA execution provider"])
            return GraphPlan(graph, onnx_file, "cuda", [("CUDAExecutionProvider", cuda_options(device_id=device_id)), cpu], False, reason)
        return GraphPlan(graph, onnx_file, "cpu", [cpu], False, "; ".join(reasons + ["CPU execution provider"]))
    raise AssertionError("unreachable: cpu is always the last choice")
